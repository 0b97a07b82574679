"""The numpy reference of the band-stop filter, beside the other forms of this package.

The function itself lives in ``usfm_edge.core.band_stop`` (the torch-free runtime needs it and may import only
``core``); every form in ``kernels`` (torch FFT, DFT as MatMul, Triton) is tested against it.
"""

from __future__ import annotations

from usfm_edge.core.band_stop import band_stop_filter_np

__all__ = ["band_stop_filter_np"]
