"""Export: one target table, torch -> ONNX -> OpenVINO IR / TensorRT, in-graph preprocessing, bundles, parity.

Heavy modules (torch, onnx) load on first use of ``export`` and friends, so ``import usfm_edge.export`` (the
target table, ``ExportConfig``) stays cheap for the CLI and for ``usfm_edge.calibration``.
"""

from __future__ import annotations

from usfm_edge.export.config import ExportConfig, export_config_from_meta
from usfm_edge.export.targets import TARGETS, Target, check_precision, get_target, list_targets, target_table

_LAZY = {
    "export": "usfm_edge.export.exporter",
    "load_for_export": "usfm_edge.export.exporter",
    "RawFrameModel": "usfm_edge.models.raw_frame",
    "PreprocessGraph": "usfm_edge.models.raw_frame",
    "torch2onnx": "usfm_edge.export.onnx_export",
    "check_onnx_ops": "usfm_edge.export.onnx_export",
    "onnx2openvino": "usfm_edge.export.openvino_export",
    "onnx2engine": "usfm_edge.export.tensorrt_export",
    "trtexec_command": "usfm_edge.export.tensorrt_export",
    "write_build_script": "usfm_edge.export.tensorrt_export",
    "BundleWriter": "usfm_edge.export.bundle",
    "write_bundle": "usfm_edge.export.bundle",
    "verify_bundle": "usfm_edge.export.bundle",
    "read_meta": "usfm_edge.export.bundle",
    "run_parity": "usfm_edge.export.parity",
}

__all__ = ["TARGETS", "Target", "check_precision", "get_target", "list_targets", "target_table", "ExportConfig",
           "export_config_from_meta", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'usfm_edge.export' has no attribute {name!r}")
