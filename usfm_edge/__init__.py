"""usfm-edge: the USFM ultrasound foundation model from pretraining to a quantised edge engine.

Importing this package is cheap and never imports torch: ``create_model`` and ``list_models`` are
resolved lazily (PEP 562), so ``usfm_edge.runtime`` stays torch-free.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "create_model": "usfm_edge.models",
    "list_models": "usfm_edge.models",
    "load_checkpoint": "usfm_edge.models.checkpoint",
}

__all__ = ["__version__", *_LAZY]

if __import__("os").environ.get("USFM_EDGE_MKL_AVX2"):  # opt-in, must run before torch: see kernels/mkl_dispatch.py
    from usfm_edge.kernels.mkl_dispatch import apply_from_env as _apply_mkl_shim

    _apply_mkl_shim()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'usfm_edge' has no attribute {name!r}")
