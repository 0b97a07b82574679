"""ONNX -> OpenVINO IR (``.xml`` + ``.bin``).

The IR is converted from the same ONNX file the other targets use (``openvino.convert_model``), so the
in-graph preprocessing is identical everywhere. ``fp16`` stores fp16-compressed weights
(``save_model(compress_to_fp16=True)``); ``fp32`` keeps fp32 weights. What precision the CPU then
*computes* in is a compile-time choice of the runtime: OpenVINO defaults to bf16 on CPUs with
AVX512-BF16/AMX, so ``runtime`` compiles fp32 bundles with ``INFERENCE_PRECISION_HINT="f32"``.

INT8 is NNCF post-training quantisation on real ultrasound frames, owned by ``usfm_edge.calibration``;
it plugs in here as ``quantize``: a callable ``ov.Model -> ov.Model`` applied before saving.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from usfm_edge.core.errors import ExportError, require

__all__ = ["onnx2openvino"]


def onnx2openvino(onnx_path: str | Path, out_xml: str | Path, precision: str = "fp32",
                  quantize: Callable | None = None, metadata: Mapping[str, object] | None = None) -> Path:
    """Convert an ONNX file to OpenVINO IR.

    Args:
        onnx_path: the source ``.onnx``.
        out_xml: the ``.xml`` to write (the ``.bin`` goes next to it).
        precision: ``fp32``, ``fp16`` (compressed weights) or ``int8`` (needs ``quantize``).
        quantize: INT8 hook, ``ov.Model -> ov.Model`` (NNCF, from ``usfm_edge.calibration``).
        metadata: strings stored in the IR's ``rt_info`` under ``usfm_edge``.

    Returns:
        the ``.xml`` path.

    Raises:
        BackendUnavailableError: openvino is not installed.
        ExportError: conversion failed, or INT8 was asked without a quantisation hook.
    """
    ov = require("openvino", "openvino")
    onnx_path, out_xml = Path(onnx_path), Path(out_xml)
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"OpenVINO precision must be fp32, fp16 or int8, got {precision!r}")
    if precision == "int8" and quantize is None:
        raise ExportError("OpenVINO INT8 needs a calibration set and NNCF quantisation",
                          hint="use usfm_edge.calibration to quantise with real ultrasound frames")
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own exception types
        raise ExportError(f"OpenVINO could not convert the ONNX model: {exc}", path=onnx_path) from exc
    if quantize is not None:
        model = quantize(model)
    for k, v in (metadata or {}).items():
        model.set_rt_info(str(v), ["usfm_edge", str(k)])
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(model, str(out_xml), compress_to_fp16=(precision == "fp16"))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"OpenVINO could not save the IR: {exc}", path=out_xml) from exc
    return out_xml
