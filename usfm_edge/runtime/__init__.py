"""Torch-free runtime: open a bundle, run raw ultrasound frames on ONNX Runtime / OpenVINO / TensorRT.

Imports only numpy and ``usfm_edge.core`` at import time; each backend library is imported when an
engine is opened on it.
"""

from __future__ import annotations

from usfm_edge.runtime.bundle_io import read_meta, verify_bundle
from usfm_edge.runtime.engine import Engine, available_backends
from usfm_edge.runtime.results import ClsResult, EnhanceResult, FeaturesResult, Result, SegResult

__all__ = ["Engine", "available_backends", "verify_bundle", "read_meta", "SegResult", "ClsResult",
           "EnhanceResult", "FeaturesResult", "Result"]
