"""Quantisation backends, one per target family, behind one interface.

``quantize(onnx_fp32_path, calib, recipe, workdir) -> (artifact path, details)``:

=============  ======================  =====================================================================
target         backend                 artifact
=============  ======================  =====================================================================
openvino       ``nncf_openvino``       OpenVINO IR with FakeQuantize (NNCF PTQ / accuracy control)
onnx           ``ort_qdq``             Q/DQ ONNX, S8S8 symmetric, per-channel weights (ONNX Runtime)
jetson/tensorrt ``tensorrt_qdq``       Q/DQ ONNX for TensorRT 10.3/11 (int8, zero-point 0, float bias)
=============  ======================  =====================================================================

Each backend imports its library (nncf/openvino, onnxruntime) inside its functions.
"""

from __future__ import annotations

from pathlib import Path

from usfm_edge.calibration.backends.common import check_qdq, read_contract
from usfm_edge.core.bundle_schema import BundleMeta

__all__ = ["quantize", "read_contract", "check_qdq", "BACKEND_FOR"]

#: runtime backend of a target -> quantisation backend name
BACKEND_FOR = {"openvino": "nncf_openvino", "onnxruntime": "ort_qdq", "tensorrt": "tensorrt_qdq"}


def quantize(onnx_fp32_path: str | Path, calib, recipe, workdir: str | Path, backend: str = "onnxruntime",
             meta: BundleMeta | None = None, validation=None, max_drop: float | None = None) -> tuple[Path, dict]:
    """Quantise an exported fp32 graph for a runtime backend (``openvino``, ``onnxruntime`` or ``tensorrt``).

    Args:
        onnx_fp32_path: exported fp32 ONNX (or an fp32 IR ``.xml`` for ``openvino``).
        calib: a ``CalibrationSet`` (or any iterable of uint8 frames).
        recipe: a ``QuantRecipe``.
        workdir: scratch folder for the artifact.
        backend: the target's runtime backend.
        meta: the graph contract (read from the ONNX metadata when None: ``common.read_contract``).
        validation: held-out ``ValidationItem``s -> NNCF accuracy control (openvino only).
        max_drop: accuracy-control limit.

    Returns:
        ``(artifact path, details)``.
    """
    frames = list(calib)
    if backend == "openvino":
        from usfm_edge.calibration.backends.nncf_openvino import quantize_openvino

        return quantize_openvino(onnx_fp32_path, frames, recipe, workdir, meta or read_contract(onnx_fp32_path),
                                 validation=validation, max_drop=max_drop)
    if backend == "tensorrt":
        from usfm_edge.calibration.backends.tensorrt_qdq import quantize_tensorrt_qdq

        return quantize_tensorrt_qdq(onnx_fp32_path, frames, recipe, workdir)
    from usfm_edge.calibration.backends.ort_qdq import quantize_onnx_qdq

    return quantize_onnx_qdq(onnx_fp32_path, frames, recipe, workdir)
