"""What every quantisation backend shares: the graph's contract, the model body, Q/DQ checks.

The contract of a graph is its ``core.bundle_schema.BundleMeta`` (:func:`read_contract` rebuilds it from the
``usfm_edge.*`` metadata the exporter wrote into the ONNX file; a bundle's ``usfm.json`` holds the same). Frames
are fed to a graph as a bundle feeds them: ``runtime.engine.graph_input`` (static shapes fitted by the runtime).

The exported graph (``models.raw_frame.RawFrameModel``) is pre-processing (Cast, Resize, band-stop DFT MatMuls,
normalisation) -> model body -> post-processing (Resize, Softmax, ArgMax). Only the body is quantised. The body
is found structurally, so it works whatever the node names are: everything the last MatMul/Gemm/Conv with
constant weights (the task classifier, kept float by default) depends on, except what feeds the first Conv with
constant weights (the ViT patch embedding; the pre-processing and band-stop MatMuls come before it). A second
conv branch on the normalised input (the hires head's stem) is therefore part of the body.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from usfm_edge.core.bundle_schema import BundleMeta
from usfm_edge.core.errors import ExportError, require

__all__ = ["read_contract", "body_nodes", "check_qdq", "ensure_node_names", "float_path_for_unquantized"]

_QLINEAR = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
            "QLinearAdd", "QLinearMul", "QLinearSoftmax")


def read_contract(path: str | Path) -> BundleMeta:
    """The model contract of an exported ONNX graph, from its ``usfm_edge.*`` metadata
    (``BundleMeta.from_onnx_metadata``).

    Raises:
        BundleError: the file lacks the usfm-edge metadata (not exported by this usfm-edge).
    """
    onnx = require("onnx", "onnx")
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    return BundleMeta.from_onnx_metadata(props, files={"onnx": path.name}, where=f"'{path.name}'")


def ensure_node_names(model) -> bool:
    """Give every unnamed node a unique name (``nodes_to_quantize`` needs names). Returns True if changed."""
    seen, changed = set(), False
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_usfm_{i}"
            changed = True
        seen.add(node.name)
    return changed


def body_nodes(model, op_types=("MatMul", "Gemm", "Conv"), keep_last_float: bool = True) -> tuple[list[str], dict]:
    """Names of the nodes to quantise (op types in ``op_types`` inside the model body) and a description.

    Returns:
        ``(names, info)``; ``info`` holds ``first``/``last`` body node names, ``kept_float`` (quantisable nodes
        left float: pre-processing MatMuls, the classifier) and counts per op type.

    Raises:
        ExportError: the graph has no MatMul/Gemm/Conv with constant weights.
    """
    nodes = list(model.graph.node)
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    weighted = [i for i, n in enumerate(nodes) if n.op_type in op_types and any(x in consts for x in n.input[1:])]
    if not weighted:
        raise ExportError("no MatMul/Gemm/Conv with constant weights found: nothing to quantise")
    convs = [i for i in weighted if nodes[i].op_type == "Conv"]
    first, last = (convs[0] if convs else weighted[0]), weighted[-1]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}

    def ancestors(start: int) -> set[int]:
        seen, stack = {start}, [start]
        while stack:
            for x in nodes[stack.pop()].input:
                j = producer.get(x)
                if j is not None and j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen

    # the body: everything the classifier depends on, minus the pre-processing that feeds the first Conv
    # (a conv branch reading the normalised input beside the patch embedding, the hires head's stem, is body)
    body = ancestors(last) - (ancestors(first) - {first})
    chosen = [i for i in sorted(body) if nodes[i].op_type in op_types and not (keep_last_float and i == last)]
    kept = [nodes[i].name for i, n in enumerate(nodes) if n.op_type in op_types and i not in set(chosen)]
    by_type: dict[str, int] = defaultdict(int)
    for i in chosen:
        by_type[nodes[i].op_type] += 1
    return [nodes[i].name for i in chosen], {"first": nodes[first].name, "last": nodes[last].name,
                                             "kept_float": kept, "quantized_by_type": dict(by_type)}


def float_path_for_unquantized(model, quantize_op_types=("MatMul", "Gemm", "Conv")) -> list[dict]:
    """Give every consumer that is not a quantised op back the float tensor a shared Q/DQ pair took from it.

    ONNX Runtime's QDQ quantiser puts one QuantizeLinear/DequantizeLinear pair on a quantised activation and
    rewires *all* its consumers to the DequantizeLinear output (``DedicatedQDQPair`` only splits the pair among
    several quantised consumers; a lone one still shares it). When a tensor feeds a MatMul/Conv and also a
    Concat, Resize, Add... (UperNet: the PPM input feeds the pooling MatMuls and the PPM Concat, each FPN level
    feeds its Conv and the top-down Resize), those float ops would compute on rounded values. This rewires them
    to the QuantizeLinear's float input (exactly the fp32 graph's tensor), so only ``quantize_op_types`` (and
    nothing else, Shape/Size included) read a DequantizeLinear output. Weight DequantizeLinears (no
    QuantizeLinear before them) are left alone. Q/DQ nodes left without consumers are removed.

    Returns:
        one dict per rewired input: ``node``, ``op``, ``from`` (the DQ output), ``to`` (the float tensor).
    """
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in model.graph.output}
    float_of = {}  # DQ output -> float tensor before its QuantizeLinear
    for n in nodes:
        if n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                float_of[n.output[0]] = q.input[0]
    changed = []
    for n in nodes:
        if n.op_type in quantize_op_types or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, x in enumerate(n.input):
            if x in float_of:
                n.input[k] = float_of[x]
                changed.append({"node": n.name, "op": n.op_type, "from": x, "to": float_of[x]})
    freed: set[str] = set()
    while True:  # drop Q/DQ nodes nobody reads any more (a DQ left only with the rewired consumers)
        used = {x for n in model.graph.node for x in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            freed.update(n.input[1:])
            model.graph.node.remove(n)
    used = {x for n in model.graph.node for x in n.input} | outputs
    for init in [i for i in model.graph.initializer if i.name in freed and i.name not in used]:
        model.graph.initializer.remove(init)
    return changed


def check_qdq(model, quantize_op_types=("MatMul", "Gemm", "Conv"), symmetric: bool = True,
              tensorrt: bool = False, path: str | Path | None = None) -> dict:
    """Verify a Q/DQ graph; returns a summary, raises ExportError naming the first violation.

    Rules: opset >= 13; standard ONNX domain only; no QLinear*/Integer ops (QOperator format); Q/DQ outputs
    consumed only by ``quantize_op_types`` nodes (and Shape) (LayerNorm/Softmax/GELU/Add... stay float); every zero-point
    0 when ``symmetric``; for TensorRT also int8 only (no uint8/int32 DequantizeLinear), Conv weight scales
    on axis 0 and MatMul weight scales on axis 1 (output channels).
    """
    from onnx import numpy_helper

    opset = max((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise ExportError(f"Q/DQ graph has opset {opset}; per-channel Q/DQ needs opset >= 13", path=path)
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for n in model.graph.node:
        for x in n.input:
            consumers[x].append(n)
    nonzero, dtypes, quantized, axes = [], set(), set(), defaultdict(set)
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            raise ExportError(f"node '{n.name}' uses domain '{n.domain}': only standard ONNX ops are allowed", path=path)
        if n.op_type in _QLINEAR:
            raise ExportError(f"node '{n.name}' is {n.op_type} (QOperator format); expected Q/DQ", path=path)
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            dtypes.add(str(zp.dtype))
            if np.any(zp != 0):
                nonzero.append(n.name)
        elif n.op_type == "DequantizeLinear" and n.input[0] in inits:
            dtypes.add(str(numpy_helper.to_array(inits[n.input[0]]).dtype))
        if n.op_type == "DequantizeLinear":
            for c in consumers.get(n.output[0], []):
                if c.op_type in ("Shape", "Size"):  # reads the shape only, not the rounded values
                    continue
                if c.op_type not in quantize_op_types:
                    raise ExportError(f"a quantised tensor feeds '{c.name}' ({c.op_type}); only "
                                      f"{'/'.join(quantize_op_types)} may be quantised", path=path)
                quantized.add(c.name)
                if n.input[0] in inits and inits[n.input[0]].dims and len(inits[n.input[0]].dims) > 1:
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                    axes[c.op_type].add(int(axis))
    if symmetric and nonzero:
        raise ExportError(f"{len(nonzero)} Q/DQ node(s) have a non-zero zero-point (e.g. '{nonzero[0]}'); "
                          "symmetric quantisation requires 0", path=path)
    if tensorrt:
        if dtypes - {"int8"}:
            raise ExportError(f"TensorRT Q/DQ must be int8; found {sorted(dtypes)}", path=path)
        want = {"Conv": {0}, "MatMul": {1}, "Gemm": {0, 1}}
        for op, got in axes.items():
            if not got <= want.get(op, got):
                raise ExportError(f"{op} weight scales on axis {sorted(got)}; TensorRT needs the output-channel "
                                  f"axis {sorted(want[op])}", path=path)
    by_type: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if n.name in quantized:
            by_type[n.op_type] += 1
    return {"opset": opset, "quantized_nodes": len(quantized), "quantized_by_type": dict(by_type),
            "zero_point_dtypes": sorted(dtypes), "nonzero_zero_points": len(nonzero),
            "weight_axes": {k: sorted(v) for k, v in axes.items()},
            "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)}
