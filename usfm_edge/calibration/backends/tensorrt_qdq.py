"""Explicit Q/DQ ONNX for TensorRT 10.3 (JetPack 6) and TensorRT 11 (JetPack 7, x86): ``jetson`` / ``tensorrt``.

TensorRT 11 removed implicit INT8 calibration; both versions build an INT8 engine from explicit
QuantizeLinear/DequantizeLinear pairs (edge-anchors.md §0, §7). What this module emits, and checks:

* int8 activations and weights with **zero-point 0** (TensorRT supports symmetric int8 only);
* per-channel weight scales on the output-channel axis (Conv axis 0, MatMul ``[in, out]`` axis 1), per-tensor
  activation scales; pre-quantised int8 weights behind a DequantizeLinear (TensorRT's "quantized weights" form);
* float bias (TensorRT has no INT32 DequantizeLinear), Q/DQ on the inputs of MatMul/Gemm/Conv only, no
  QLinear*/Integer ops, standard ONNX domain only, opset 17 (>= 13), static shapes (the exported graph's);
* LayerNorm, Softmax, GELU, residual Adds and the in-graph pre/post-processing stay float (TensorRT runs them
  in fp16/fp32 and fuses the Q/DQ around the GEMMs).

NVIDIA ModelOpt (``modelopt.onnx.quantization``) is the reference producer for TensorRT; it is not installed
here (``pip install nvidia-modelopt[onnx]`` would replace onnxruntime with onnxruntime-gpu 1.24 and downgrade
onnx), so ONNX Runtime's quantiser is configured for TensorRT instead. The result is checked by running it in
ONNX Runtime (parity + accuracy gate); building the engine needs TensorRT on the device (``build_engine.sh``).
"""

from __future__ import annotations

from pathlib import Path

from usfm_edge.calibration.backends.common import read_contract
from usfm_edge.calibration.backends.ort_qdq import quantize_onnx_qdq
from usfm_edge.core.errors import ExportError, require

__all__ = ["quantize_tensorrt_qdq"]


def quantize_tensorrt_qdq(onnx_fp32: str | Path, frames, recipe, workdir: str | Path) -> tuple[Path, dict]:
    """Quantise an exported static-shape graph to TensorRT-ready Q/DQ ONNX.

    Calibration frames are fitted to the graph's static frame size by ``runtime.engine.graph_input``, as a bundle
    is fed.

    Returns:
        ``(path, info)`` as ``quantize_onnx_qdq``, plus ``static_hw``.

    Raises:
        ExportError: the graph has dynamic frame sizes or opset < 13, or the result breaks a TensorRT rule.
    """
    meta = read_contract(onnx_fp32)
    static_hw = meta.input.static_hw
    if meta.input.raw_frame and static_hw is None:
        raise ExportError("TensorRT Q/DQ needs a static-shape graph (export with the jetson/tensorrt target)",
                          path=onnx_fp32)
    onnx = require("onnx", "onnx")
    opset = max((int(o.version) for o in onnx.load(str(onnx_fp32), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx")), default=0)
    if opset and opset < 13:
        raise ExportError(f"opset {opset} < 13: per-channel Q/DQ is not expressible", path=onnx_fp32)
    path, details = quantize_onnx_qdq(onnx_fp32, frames, recipe, workdir, backend="tensorrt")
    details["static_hw"] = list(static_hw) if static_hw else None
    details["notes"].append("ONNX Runtime quantiser configured for TensorRT (ModelOpt not installed); "
                            "engine build runs on the device (build_engine.sh)")
    return path, details
