"""What the runtimes actually run: op-type counts after their own graph fusions, fused attention, INT8 coverage,
and OpenVINO's per-node time split into pre-processing / model / post-processing.

* **OpenVINO**: ``convert_model`` / ``read_model`` of the exported ONNX already fuses each block's attention,
  relative position bias included, into one ``ScaledDotProductAttention`` op (:func:`openvino_ir_op_counts`;
  the saved IR keeps it). The compiled model's runtime graph (``compiled.get_runtime_model()``, each node's
  ``layerType``) has no SDPA node for a ViT on the CPU: the plugin lowers it to MatMul -> Multiply/Add(bias) ->
  Softmax -> MatMul and tokenises that into one Snippets ``Subgraph`` (its fused MHA kernel), whose
  ``originalLayersNames`` list the ops it absorbed. :func:`openvino_fused_attention` counts either form.
* **ONNX Runtime**: the optimised graph the session writes (``SessionOptions.optimized_model_filepath``), op types
  as ``domain::op`` outside the standard domain. Fused attention would be a ``com.microsoft`` ``Attention`` /
  ``MultiHeadAttention`` node; ORT's CPU session fusions (1.32) do not build one for this ViT (q/v bias through
  one Split, a relative position bias): they fold the scale into ``FusedMatMul``.

Measured at the test size (``usfm_vit_test``, 4 blocks), fp32 raw-frame bundle: OpenVINO 2026.4, 4
``ScaledDotProductAttention`` ops in the IR and 4 fused MHA ``Subgraph`` nodes in the CPU runtime graph (one per
block); ORT 1.32, 0 ``Attention`` nodes, 4 ``com.microsoft::FusedMatMul`` (the scale folded into q @ k^T).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import ConfigError, require

__all__ = ["openvino_ir_op_counts", "openvino_op_counts", "openvino_fused_attention", "openvino_supports_fused_attention", "ort_op_counts",
           "ort_fused_attention", "bundle_op_counts", "nncf_quantized_matmuls", "perf_counters", "stage_shares",
           "ORT_ATTENTION_OPS"]

#: ORT contrib ops that are a fused attention kernel
ORT_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                     "PackedMultiHeadAttention")
_OV_ATTENTION_TYPES = ("ScaledDotProductAttention", "ScaledDotProductAttentionWithKVCache", "MHA")


def _compile_openvino(model, config: dict | None = None):
    ov = require("openvino", "openvino")
    core = ov.Core()
    if isinstance(model, (str, Path)):
        model = core.read_model(str(model))
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **(config or {})})


def _runtime_nodes(compiled) -> list[tuple[str, str]]:
    """``(layerType, originalLayersNames)`` of every node of a compiled model's runtime graph."""
    out = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        out.append((info["layerType"].astype(str), names))
    return out


def openvino_ir_op_counts(model) -> Counter:
    """Op types of the OpenVINO model itself (an IR as saved, or an ONNX file as ``read_model`` converts it), before
    the CPU plugin compiles it: ``ScaledDotProductAttention`` here is OpenVINO's SDPA fusion at conversion."""
    ov = require("openvino", "openvino")
    model = ov.Core().read_model(str(model)) if isinstance(model, (str, Path)) else model
    return Counter(op.get_type_name() for op in model.get_ops())


def openvino_op_counts(model, config: dict | None = None) -> Counter:
    """Runtime layer types of an IR / ONNX file / ``ov.Model`` compiled for the CPU (f32 unless ``config`` says)."""
    return Counter(t for t, _ in _runtime_nodes(_compile_openvino(model, config)))


def _fused(nodes: list[tuple[str, str]]) -> int:
    n = 0
    for kind, names in nodes:
        parts = [p.rsplit("/", 1)[-1].split("_")[0] for p in names.split(",") if p]
        if kind in _OV_ATTENTION_TYPES or (kind == "Subgraph" and "Softmax" in parts and "MatMul" in parts):
            n += 1
    return n


def openvino_fused_attention(model, config: dict | None = None) -> int:
    """Fused attention nodes in the CPU runtime graph: SDPA/MHA nodes, or Snippets subgraphs holding a Softmax and
    a MatMul (the plugin renames the ops it lowers from an IR's ``ScaledDotProductAttention``, so only the second
    MatMul keeps its exported name)."""
    return _fused(_runtime_nodes(_compile_openvino(model, config)))


def openvino_supports_fused_attention(seq: int = 17, heads: int = 2, dim: int = 32) -> bool:
    """Does this OpenVINO's CPU plugin fuse ``softmax(q @ k^T + bias) @ v`` (one small graph, compiled f32)?"""
    ov = require("openvino", "openvino")
    import openvino.opset13 as ops

    q = ops.parameter([1, heads, seq, dim], np.float32, name="q")
    k = ops.parameter([1, heads, seq, dim], np.float32, name="k")
    v = ops.parameter([1, heads, seq, dim], np.float32, name="v")
    bias = ops.constant(np.zeros((1, heads, seq, seq), np.float32))
    scores = ops.add(ops.matmul(q, k, False, True, name="MatMul_1"), bias, name="Add_1")
    out = ops.matmul(ops.softmax(scores, -1, name="Softmax"), v, False, False, name="MatMul_2")
    return _fused(_runtime_nodes(_compile_openvino(ov.Model([out], [q, k, v], "attention")))) > 0


def ort_op_counts(onnx_path: str | Path, workdir: str | Path | None = None) -> Counter:
    """Op types of the graph ONNX Runtime's CPU session runs after its optimisations (``domain::op`` outside the
    standard domain)."""
    ort = require("onnxruntime", "onnxruntime")
    onnx = require("onnx", "onnx")
    import tempfile

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)


def ort_fused_attention(counts: Counter) -> int:
    """Fused attention nodes (``ORT_ATTENTION_OPS``, any domain) in ``ort_op_counts``."""
    return sum(c for op, c in counts.items() if op.rsplit("::", 1)[-1] in ORT_ATTENTION_OPS)


def bundle_op_counts(bundle: str | Path, backend: str | None = None) -> dict:
    """``{"backend", "op_types", "fused_attention"}`` of a bundle's model file on one backend (``openvino`` for an
    OpenVINO bundle, ``onnxruntime`` for an ONNX one; an ONNX file also opens in OpenVINO); OpenVINO adds
    ``ir_sdpa``, the ``ScaledDotProductAttention`` ops of the model before compilation."""
    from usfm_edge.runtime.bundle_io import read_meta

    bundle = Path(bundle)
    meta = read_meta(bundle)
    backend = backend or ("openvino" if meta.backend == "openvino" else "onnxruntime")
    if backend == "openvino":
        path = bundle / meta.files.get("openvino_xml", meta.files.get("onnx", ""))
        nodes = _runtime_nodes(_compile_openvino(path))
        return {"backend": backend, "op_types": dict(Counter(t for t, _ in nodes)), "fused_attention": _fused(nodes),
                "ir_sdpa": openvino_ir_op_counts(path).get("ScaledDotProductAttention", 0)}
    if backend != "onnxruntime":
        raise ConfigError(f"backend must be openvino or onnxruntime, got {backend!r}")
    if "onnx" not in meta.files:
        raise ConfigError(f"{bundle.name} has no ONNX file for ONNX Runtime", path=bundle)
    counts = ort_op_counts(bundle / meta.files["onnx"])
    return {"backend": backend, "op_types": dict(counts), "fused_attention": ort_fused_attention(counts)}


_PASS = ("Convert", "Reshape", "Transpose", "Subtract", "Multiply", "FakeQuantize")


def _weights(out) -> bool:
    """A MatMul input that is a constant behind decompression / quantisation ops (a Linear layer's weight)."""
    node = out.get_node()
    while node.get_type_name() in _PASS:
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def _quantized(out) -> bool:
    """An input that comes through a FakeQuantize, or from int8 weights (compressed constant + Convert/scale)."""
    node = out.get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Transpose", "Subtract", "Multiply"):
        node = node.input_value(0).get_node()
    if node.get_type_name() == "FakeQuantize":
        return True
    return node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8")


def nncf_quantized_matmuls(xml: str | Path) -> dict:
    """INT8 coverage of an NNCF IR: ``{"linear": [quantised, total], "attention": [quantised, total]}`` MatMuls
    (linear: constant weights; attention: both inputs activations, ``q @ k^T`` and ``attn @ v``); a MatMul counts
    as quantised when both its inputs come through FakeQuantize (or int8 weights). The in-graph pre- and
    post-processing MatMuls (resize, band-stop DFT: ``/pre/``, ``/post_resize/``) are not the model's."""
    ov = require("openvino", "openvino")
    out = {"linear": [0, 0], "attention": [0, 0]}
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.get_friendly_name().startswith(("/pre/", "/post_resize/")):
            continue
        key = "linear" if _weights(op.input_value(1)) else "attention"
        out[key][1] += 1
        out[key][0] += int(all(_quantized(op.input_value(i)) for i in range(op.get_input_size())))
    return out


def perf_counters(xml: str | Path, frame: np.ndarray, threads: int, runs: int = 20,
                  top: int | None = 12) -> list[dict]:
    """OpenVINO's per-node counters (``PERF_COUNT``) of an IR on one raw frame: mean ms per inference per node
    (``node``, ``op``, ``kernel``, ``ms``), compiled as a bundle is (latency hint, ``threads``)."""
    compiled = _compile_openvino(xml, {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads,
                                       "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    totals: dict[tuple[str, str, str], float] = {}
    for _ in range(runs):
        req.infer({0: frame[None]})
        for p in req.get_profiling_info():
            if "EXECUTED" in str(p.status) and "NOT" not in str(p.status):
                key = (p.node_name, p.node_type, p.exec_type)
                totals[key] = totals.get(key, 0.0) + p.real_time.total_seconds() * 1e3 / runs
    rows = [{"node": k[0], "op": k[1], "kernel": k[2], "ms": v} for k, v in totals.items()]
    rows.sort(key=lambda r: -r["ms"])
    return rows if top is None else rows[:top]


def _stage(name: str) -> str:
    if "/pre/" in name:
        return "pre-processing"
    if name.startswith("/") and not name.startswith("/model/"):
        return "post-processing"
    return "model"


def stage_shares(rows: list[dict]) -> dict:
    """Per-node counters (``perf_counters(top=None)``) summed by stage: ``{stage: {"ms", "share"}}``.

    Stages come from the exported node names (``/pre/...``: ``PreprocessGraph``; ``/model/...``: the task model;
    other ``/...``: the raw-frame post-processing); nodes OpenVINO renamed while fusing count as model, and a
    reorder between stages counts as the stage it leaves, so the split is approximate to a node or two.
    """
    ms: dict[str, float] = {"pre-processing": 0.0, "model": 0.0, "post-processing": 0.0}
    for r in rows:
        ms[_stage(r["node"])] += r["ms"]
    total = sum(ms.values()) or 1.0
    return {k: {"ms": round(v, 3), "share": round(v / total, 4)} for k, v in ms.items()}
