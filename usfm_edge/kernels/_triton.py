"""Fused Triton kernel for the band-stop filter on NVIDIA GPUs (training path).

``band_stop_filter_triton`` runs ``irfft2(K(rfft2(x)))`` where cuFFT does the transforms and one Triton
kernel ``K`` does everything between them for a whole batch: it reads the per-sample (or shared) full
mask, symmetrises it on the fly (``(M(k) + M(-k)) / 2``, so any real mask is exact on the half
spectrum), picks the half-spectrum entries and multiplies the complex spectrum, writing the result
once. The eager path needs a roll, a flip, an add, a slice, a broadcast and a complex multiply
(several full-size temporaries per batch). The backward is the same kernel (the map is a real
diagonal scaling of the spectrum), wrapped in a ``torch.autograd.Function``; gradients flow to ``x``
(not to the mask).

triton is imported inside functions only; ``tl`` is bound on first use by :func:`_load`. Kernel
parameters annotated ``tl.constexpr`` are strings under ``from __future__ import annotations``;
``_load`` replaces them by the real ``tl.constexpr`` before jitting, so both the compiler and
Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) see them as compile-time constants.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from usfm_edge.core.errors import BackendUnavailableError

__all__ = ["band_stop_filter_triton"]

tl: Any = None  # triton.language, bound by _load()
BLOCK = 1024


def _mask_spectrum_kernel(
    spec_ptr,
    mask_ptr,
    out_ptr,
    n_freq,
    height,
    width,
    half_width,
    channels,
    mask_stride,
    SYMMETRIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """out[n, i, j] = spec[n, i, j] * m(i, j) for one block of half-spectrum bins of image ``n``.

    ``spec``/``out`` are ``(N, H, W//2+1, 2)`` float (complex as pairs), ``mask`` is ``(Bm, H, W)``
    with ``mask_stride`` = ``H*W`` per sample (0 for a shared mask); image ``n`` uses sample
    ``n // channels``. ``m`` is ``(M[i, j] + M[-i, -j]) / 2`` when ``SYMMETRIZE`` else ``M[i, j]``.
    """
    img = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    valid = offs < n_freq
    row = offs // half_width
    col = offs % half_width
    mask_base = mask_ptr + (img // channels) * mask_stride
    m = tl.load(mask_base + row * width + col, mask=valid, other=0.0)
    if SYMMETRIZE:
        mirror = ((height - row) % height) * width + (width - col) % width
        m = 0.5 * (m + tl.load(mask_base + mirror, mask=valid, other=0.0))
    pair = tl.arange(0, 2)
    ptrs = img * n_freq * 2 + offs[:, None] * 2 + pair[None, :]
    z = tl.load(spec_ptr + ptrs, mask=valid[:, None], other=0.0)
    tl.store(out_ptr + ptrs, z * m[:, None], mask=valid[:, None])


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, Any]:
    """Import triton, bind ``tl`` and jit the kernel once; returns ``(triton, kernel)``."""
    global tl
    try:
        import triton
        import triton.language as language
    except ImportError as exc:
        raise BackendUnavailableError(
            f"triton is not installed ({exc})", hint="pip install triton (NVIDIA GPU build; ships with CUDA torch)"
        ) from exc
    tl = language
    fn = _mask_spectrum_kernel
    fn.__annotations__ = {
        k: (language.constexpr if isinstance(v, str) and v.endswith("constexpr") else v)
        for k, v in fn.__annotations__.items()
    }
    return triton, triton.jit(fn)


def _launch(spec: torch.Tensor, mask: torch.Tensor, channels: int, symmetrize: bool) -> torch.Tensor:
    triton, kernel = _load()
    n, h, half_w, _ = spec.shape
    w = mask.shape[-1]
    out = torch.empty_like(spec)
    n_freq = h * half_w
    mask_stride = h * w if mask.shape[0] > 1 else 0
    grid = (n, triton.cdiv(n_freq, BLOCK))
    kernel[grid](spec, mask, out, n_freq, h, w, half_w, channels, mask_stride, SYMMETRIZE=symmetrize, BLOCK_SIZE=BLOCK)
    return out


class _MaskSpectrum(torch.autograd.Function):
    """Real-diagonal scaling of a half spectrum (as float pairs); its own adjoint."""

    @staticmethod
    def forward(ctx, spec: torch.Tensor, mask: torch.Tensor, channels: int, symmetrize: bool) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.channels, ctx.symmetrize = channels, symmetrize
        return _launch(spec, mask, channels, symmetrize)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        grad_spec = _launch(grad.contiguous(), mask, ctx.channels, ctx.symmetrize) if ctx.needs_input_grad[0] else None
        return grad_spec, None, None, None


def band_stop_filter_triton(x: torch.Tensor, mask: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """Band-stop filter with cuFFT + the fused Triton mask kernel.

    Args:
        x: float32/float64 images ``(B, C, H, W)`` or ``(B, H, W)`` on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        mask: real mask ``(H, W)``, ``(B|1, 1, H, W)`` (4-D ``x``) or ``(B|1, H, W)`` (3-D ``x``), as
            returned by :func:`usfm_edge.kernels.torch_fft.prepare_mask`.
        symmetric: the mask already satisfies ``M(k) == M(-k)``; skips the in-kernel symmetrisation.

    Returns:
        ``Re(IDFT2(mask * DFT2(x)))`` with the shape and dtype of ``x``.
    """
    h, w = x.shape[-2:]
    channels = x.shape[1] if x.ndim == 4 else 1
    m = mask.reshape(-1, h, w).to(dtype=x.dtype, device=x.device).contiguous()
    spec = torch.view_as_real(torch.fft.rfft2(x.reshape(-1, h, w))).contiguous()
    out = _MaskSpectrum.apply(spec, m, channels, not symmetric)
    y = torch.fft.irfft2(torch.view_as_complex(out), s=(h, w))
    return y.reshape(x.shape)
