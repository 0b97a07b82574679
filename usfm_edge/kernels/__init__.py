"""Band-stop frequency masking in every form, each tested against one numpy reference.

``y = Re(IDFT2(M * DFT2(x)))`` with a real mask ``M`` in the unshifted (``numpy.fft``) layout.

numpy, importable without torch (the torch-free runtime uses them):
    ``ring_edges``, ``ring_index``, ``band_stop_mask``, ``BandStopMaskGenerator`` (rings.py) and
    ``band_stop_filter_np`` (reference.py).
torch, resolved lazily on first attribute access (PEP 562), so importing this package never imports torch:
    ``band_stop_filter`` (torch.fft / MatMul / Triton, torch_fft.py), ``dft_matrices``,
    ``band_stop_filter_matmul``, ``BandStopMatMul``, ``export_band_stop_onnx`` (dft_matmul.py).
"""

from __future__ import annotations

from usfm_edge.kernels.reference import band_stop_filter_np
from usfm_edge.kernels.rings import (
    DEFAULT_RING_PARAMS,
    BandStopMaskGenerator,
    RingParams,
    band_stop_mask,
    frequency_radius,
    ring_edges,
    ring_index,
    symmetrize_mask,
)

_LAZY = {
    "band_stop_filter": "usfm_edge.kernels.torch_fft",
    "symmetrize": "usfm_edge.kernels.torch_fft",
    "dft_matrices": "usfm_edge.kernels.dft_matmul",
    "RealDFT": "usfm_edge.kernels.dft_matmul",
    "band_stop_filter_matmul": "usfm_edge.kernels.dft_matmul",
    "BandStopMatMul": "usfm_edge.kernels.dft_matmul",
    "export_band_stop_onnx": "usfm_edge.kernels.dft_matmul",
    "band_stop_filter_triton": "usfm_edge.kernels._triton",
}

__all__ = [
    "DEFAULT_RING_PARAMS",
    "RingParams",
    "BandStopMaskGenerator",
    "band_stop_mask",
    "frequency_radius",
    "ring_edges",
    "ring_index",
    "symmetrize_mask",
    "band_stop_filter_np",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'usfm_edge.kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
