"""The numpy reference of the band-stop filter: every other form (``usfm_edge.kernels``) is tested against it.

It lives in ``core`` because the torch-free runtime filters the input of ``bare`` bundles with it
(``core.preprocess.preprocess(..., band_stop_mask=...)``); ``kernels.reference`` re-exports it beside the
torch, MatMul and Triton forms.

``y = Re(IDFT2(M * DFT2(x)))`` with a real mask ``M`` in the unshifted ``numpy.fft`` layout. Unlike the
official ``Frequency_MASK`` this returns the real part, not the magnitude: the filter stays linear and
the result keeps its sign (``abs`` would fold negative values after a zero-mean normalisation).
"""

from __future__ import annotations

import numpy as np

from usfm_edge.core.errors import InputError

__all__ = ["band_stop_filter_np"]


def band_stop_filter_np(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Band-stop filter images with ``numpy.fft`` in float64.

    Args:
        x: real images ``(..., H, W)`` (any real dtype; integers are treated as float64).
        mask: real mask broadcastable to ``x``, last two dims ``(H, W)``, unshifted layout
            (``mask[0, 0]`` multiplies DC).

    Returns:
        filtered images, same shape as ``x``; dtype of ``x`` if it is floating, else float64.

    Raises:
        InputError: if ``x`` is not at least 2-D or the mask does not match its last two dims.
    """
    x = np.asarray(x)
    mask = np.asarray(mask)
    if x.ndim < 2 or mask.ndim < 2 or mask.shape[-2:] != x.shape[-2:]:
        raise InputError(f"mask {mask.shape} must end with the image size {x.shape[-2:]} of x {x.shape}")
    if np.iscomplexobj(x) or np.iscomplexobj(mask):
        raise InputError("band_stop_filter_np takes real images and a real mask")
    out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    spectrum = np.fft.fft2(x.astype(np.float64, copy=False), axes=(-2, -1))
    y = np.fft.ifft2(spectrum * mask.astype(np.float64, copy=False), axes=(-2, -1)).real
    return y.astype(out_dtype, copy=False)
