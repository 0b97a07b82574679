"""ONNX Runtime static quantisation to a Q/DQ ONNX (``onnx`` target), and per-layer error of a Q/DQ graph.

    quantize_static(fp32, out, reader, QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    nodes_to_quantize=<model body>, per_channel=True, activation/weight int8 (symmetric)...)

The calibration reader feeds real uint8 frames to the graph input ``frame`` one at a time (batch 1, each at
its own size: the graph is dynamic; a static graph gets each frame fitted to its size by
``runtime.engine.graph_input``, as a bundle is fed). Before that, ``quant_pre_process`` runs ONNX + symbolic shape inference (not ORT's graph optimiser, which would emit
``com.microsoft`` fused ops a portable bundle must not contain); if it fails on a graph, the original graph is
quantised and the report says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from usfm_edge.calibration.backends.common import (
    body_nodes,
    check_qdq,
    ensure_node_names,
    float_path_for_unquantized,
    read_contract,
)
from usfm_edge.core.bundle_schema import ONNX_META_PREFIX, BundleMeta
from usfm_edge.core.errors import ExportError, require
from usfm_edge.runtime.engine import graph_input

__all__ = ["quantize_onnx_qdq", "onnx_layer_errors", "FrameReader"]

log = logging.getLogger(__name__)


def FrameReader(frames, meta: BundleMeta):  # noqa: N802 - a factory that stands in for the class
    """An ``onnxruntime.quantization.CalibrationDataReader`` over real frames, fed as a bundle feeds them
    (``runtime.engine.graph_input``); built lazily: ORT is optional."""
    qmod = require("onnxruntime.quantization", "onnx")

    class _Reader(qmod.CalibrationDataReader):
        def __init__(self):
            self._frames = list(frames)
            self._i = 0

        def get_next(self):
            if self._i >= len(self._frames):
                return None
            x = graph_input(meta, [self._frames[self._i]])
            self._i += 1
            return {meta.input.tensor.name: x}

        def rewind(self):
            self._i = 0

    return _Reader()


def _pre_process(src: Path, dst: Path, notes: list[str]) -> Path:
    """Shape inference for quantisation (no ORT optimisation: it would add com.microsoft ops)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_optimization=True)
        return dst
    except Exception as exc:  # noqa: BLE001 - symbolic shape inference fails on some dynamic graphs
        notes.append(f"quant_pre_process skipped ({type(exc).__name__}: {str(exc)[:200]})")
        return src


def quantize_onnx_qdq(onnx_fp32: str | Path, frames, recipe, workdir: str | Path, backend: str = "onnxruntime",
                      out_name: str = "model_int8.onnx") -> tuple[Path, dict]:
    """Quantise the model body of an exported ONNX graph with ONNX Runtime (Q/DQ, standard ops only).

    Args:
        onnx_fp32: the exported fp32 graph (carries usfm-edge metadata).
        frames: calibration frames (uint8, any size).
        recipe: a ``QuantRecipe``.
        workdir: scratch folder.
        backend: ``onnxruntime`` or ``tensorrt`` (symmetric int8, float bias, inputs-only Q/DQ).
        out_name: output file name inside ``workdir``.

    Returns:
        ``(path, info)`` with the Q/DQ summary (``check_qdq``), body description and notes.

    Raises:
        ExportError: the result breaks a Q/DQ rule (non-zero zero-point, contrib op, ...).
    """
    onnx = require("onnx", "onnx")
    qmod = require("onnxruntime.quantization", "onnx")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    meta = read_contract(onnx_fp32)
    notes: list[str] = []
    src = Path(onnx_fp32)
    model = onnx.load(str(src))
    if ensure_node_names(model):
        src = workdir / "fp32_named.onnx"
        onnx.save(model, str(src))
    prepped = _pre_process(src, workdir / "fp32_prep.onnx", notes)
    names, body = body_nodes(onnx.load(str(prepped), load_external_data=False), recipe.quantize_op_types,
                             recipe.keep_last_layer_float)
    scoped = [n for n in names if recipe.in_float_scope(n)]
    names = [n for n in names if not recipe.in_float_scope(n)]
    if not names:  # an empty nodes_to_quantize would make ORT quantise every node
        raise ExportError(f"nothing left to quantise outside the float scopes {list(recipe.float_scopes)}",
                          path=onnx_fp32)
    body["kept_float"] = body["kept_float"] + scoped
    body["float_scoped"] = len(scoped)
    out = workdir / out_name
    opts = recipe.ort_options(backend)
    try:
        qmod.quantize_static(str(prepped), str(out), FrameReader(frames, meta), nodes_to_quantize=names,
                             calibration_providers=["CPUExecutionProvider"], **opts)
    except Exception as exc:  # noqa: BLE001 - ORT raises plain Exceptions
        raise ExportError(f"ONNX Runtime quantisation failed: {type(exc).__name__}: {exc}", path=onnx_fp32) from exc
    qmodel = onnx.load(str(out))
    rewired = float_path_for_unquantized(qmodel, recipe.quantize_op_types)
    if rewired:
        notes.append(f"{len(rewired)} input(s) of non-quantised ops read the float tensor again instead of a "
                     f"shared DequantizeLinear (e.g. '{rewired[0]['node']}' ({rewired[0]['op']}))")
    summary = check_qdq(qmodel, recipe.quantize_op_types, symmetric=recipe.activations_symmetric(backend),
                        tensorrt=backend == "tensorrt", path=out)
    summary["float_consumers_rewired"] = len(rewired)
    keep = {p.key: p.value for p in model.metadata_props}
    meta.precision = "int8"
    keep.update(meta.onnx_metadata())
    keep[ONNX_META_PREFIX + "quantizer"] = f"onnxruntime.quantization ({backend} recipe '{recipe.name}')"
    del qmodel.metadata_props[:]
    for k, v in keep.items():
        qmodel.metadata_props.add(key=k, value=v)
    qmodel.producer_name = "usfm-edge"
    onnx.save(qmodel, str(out))
    for tmp in ("fp32_named.onnx", "fp32_prep.onnx"):
        (workdir / tmp).unlink(missing_ok=True)
    log.info("ORT Q/DQ (%s): %s", backend, summary)
    return out, {"qdq": summary, "body": {k: v for k, v in body.items() if k != "kept_float"},
                 "kept_float": body["kept_float"], "notes": notes,
                 "ort_options": {k: str(v) for k, v in opts.items()}}


def _with_outputs(model, names: list[str], dst: Path) -> Path:
    from onnx import TensorProto, helper

    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    import onnx

    onnx.save(model, str(dst))
    return dst


def onnx_layer_errors(fp32_path: str | Path, int8_path: str | Path, frames, workdir: str | Path,
                      op_types=("MatMul", "Gemm", "Conv")) -> list[dict]:
    """Relative L2 error of each quantised layer's output (int8 graph vs fp32 graph) on a few frames.

    ``added`` = the layer's output error minus the largest error already present on its float inputs, i.e.
    what quantising this layer itself contributes (cheap: one run of each graph with the layer tensors exposed).

    Returns:
        one dict per quantised layer: ``layer``, ``op``, ``output_error``, ``input_error``, ``added``.
    """
    onnx = require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    meta = read_contract(fp32_path)
    f_model, q_model = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    f_nodes = {n.name: n for n in f_model.graph.node}
    inits = {i.name for i in f_model.graph.initializer} | {o for n in f_model.graph.node if n.op_type == "Constant"
                                                            for o in n.output}
    dq_out = {n.output[0] for n in q_model.graph.node if n.op_type == "DequantizeLinear"}
    layers = []
    for n in q_model.graph.node:
        if n.op_type in op_types and any(x in dq_out for x in n.input) and n.name in f_nodes:
            fn = f_nodes[n.name]
            layers.append((n.name, n.op_type, fn.output[0], [x for x in fn.input if x and x not in inits]))
    if not layers:
        return []
    tensors = sorted({t for _, _, o, ins in layers for t in [o, *ins]})
    workdir = Path(workdir)
    paths = [_with_outputs(f_model, tensors, workdir / "sens_fp32.onnx"),
             _with_outputs(q_model, tensors, workdir / "sens_int8.onnx")]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in paths]
    errs: dict[str, list[float]] = {t: [] for t in tensors}
    for frame in frames:
        x = {meta.input.tensor.name: graph_input(meta, [frame])}
        ref, got = (dict(zip(tensors, s.run(tensors, x))) for s in sessions)
        for t in tensors:
            r, g = np.asarray(ref[t], np.float64), np.asarray(got[t], np.float64)
            errs[t].append(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-12)))
    for p in paths:
        p.unlink(missing_ok=True)
    mean = {t: float(np.mean(v)) for t, v in errs.items()}
    out = []
    for name, op, o, ins in layers:
        inp = max((mean[t] for t in ins), default=0.0)
        out.append({"layer": name, "op": op, "output_error": round(mean[o], 5), "input_error": round(inp, 5),
                    "added": round(mean[o] - inp, 5)})
    return out

