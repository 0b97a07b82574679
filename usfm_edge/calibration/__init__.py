"""INT8 quantisation from real ultrasound calibration sets, with an accuracy gate.

    from usfm_edge.calibration import build_calibration_set, make_quantizer, quantize_bundle, QuantRecipe

* :func:`build_calibration_set` / :class:`CalibrationSet`: balanced real frames + SHA-256 manifest + report;
* :class:`QuantRecipe`: the transformer preset and its per-backend translation;
* ``backends``: NNCF/OpenVINO, ONNX Runtime Q/DQ, TensorRT-ready Q/DQ;
* :func:`accuracy_gate` / :func:`sensitivity_report`: INT8 vs fp32 on held-out real frames;
* :func:`make_quantizer` (the exporter's ``quantizer=`` hook) and :func:`quantize_bundle`.

Importing this package loads numpy only; nncf, openvino and onnxruntime are imported by the functions that
need them (a missing one raises ``BackendUnavailableError`` naming the extra to install).
"""

from __future__ import annotations

from usfm_edge.calibration.calibset import CalibrationSet, build_calibration_set, stratified_round_robin
from usfm_edge.calibration.gate import accuracy_gate, sensitivity_report
from usfm_edge.calibration.quantize import make_quantizer, quantize_bundle
from usfm_edge.calibration.recipe import DEFAULT_MAX_DROP, INT8_PARITY, RECIPES, QuantRecipe, get_recipe

__all__ = ["CalibrationSet", "build_calibration_set", "stratified_round_robin", "QuantRecipe", "RECIPES",
           "get_recipe", "DEFAULT_MAX_DROP", "INT8_PARITY", "accuracy_gate", "sensitivity_report", "make_quantizer",
           "quantize_bundle"]
