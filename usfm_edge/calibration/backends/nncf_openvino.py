"""NNCF post-training quantisation of the OpenVINO model (``openvino`` target), optionally accuracy-controlled.

    model = ov.Core().read_model("model.onnx")          # or the fp32 IR of a bundle
    q = nncf.quantize(model, nncf.Dataset(frames, transform), model_type=nncf.ModelType.TRANSFORMER,
                      preset=MIXED, subset_size=len(frames), ignored_scope=<everything outside the body>,
                      advanced_parameters=<SmoothQuant alpha>)
    openvino.save_model(q, "model_int8.xml", compress_to_fp16=False)

Accuracy control (``nncf.quantize_with_accuracy_control``) uses OUR task metric on held-out real frames:
Dice of the graph's ``mask`` output against the real masks (seg), accuracy of ``probs`` (cls), PSNR of
``restored`` against the clean frame (enhance), and reverts the most harmful layers to float until the drop is
within ``max_drop``. Calibration batches are single frames (NNCF: batch > 1 is not supported for transformers).
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np

from usfm_edge.core.bundle_schema import BundleMeta
from usfm_edge.core.errors import ExportError, require
from usfm_edge.runtime.engine import graph_input

__all__ = ["quantize_openvino", "openvino_layer_errors", "ov_body", "ValidationItem"]

log = logging.getLogger(__name__)
_WEIGHTED = ("MatMul", "Convolution", "GroupConvolution")


def _is_constant(out) -> bool:
    """True when an output is a weight: a Constant, possibly behind decompression/quantisation ops."""
    node = out.get_node()
    while node.get_type_name() in ("Convert", "FakeQuantize", "Subtract", "Multiply", "Reshape", "Transpose"):
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def _const_input(op) -> bool:
    return any(_is_constant(inp.get_source_output()) for inp in op.inputs()[1:])


def ov_body(model, keep_last_float: bool = True, float_scopes=()) -> tuple[list[str], dict]:
    """Friendly names of the ops outside the model body (the ignored scope) and a description.

    The body is what the last weighted MatMul/Convolution (the classifier; also ignored when ``keep_last_float``)
    depends on, minus the pre-processing feeding the first weighted Convolution (patch embedding); inside it every op but
    MatMul/Convolution is ignored too, and so is every op whose name starts with one of ``float_scopes``.
    """
    ops = list(model.get_ordered_ops())
    weighted = [i for i, op in enumerate(ops) if op.get_type_name() in _WEIGHTED and _const_input(op)]
    if not weighted:
        raise ExportError("the OpenVINO model has no MatMul/Convolution with constant weights")
    convs = [i for i in weighted if ops[i].get_type_name() != "MatMul"]
    first, last = (convs[0] if convs else weighted[0]), weighted[-1]
    index = {op.get_friendly_name(): i for i, op in enumerate(ops)}
    def ancestors(start: int) -> set[int]:
        seen, queue = {start}, deque([start])
        while queue:
            for inp in ops[queue.popleft()].inputs():
                j = index.get(inp.get_source_output().get_node().get_friendly_name())
                if j is not None and j not in seen:
                    seen.add(j)
                    queue.append(j)
        return seen

    body = ancestors(last) - (ancestors(first) - {first}) - ({last} if keep_last_float else set())
    # only MatMul/Convolution inputs are quantised: NNCF would also quantise e.g. Interpolate inputs (the
    # head's feature upsampling), which measurably hurts (centred cosine 0.98 -> 0.70 on the test model)
    ignored = [op.get_friendly_name() for i, op in enumerate(ops)
               if (i not in body or op.get_type_name() not in _WEIGHTED
                   or any(op.get_friendly_name().startswith(p) for p in float_scopes))
               and op.get_type_name() not in ("Parameter", "Result", "Constant")]
    return ignored, {"first": ops[first].get_friendly_name(), "last": ops[last].get_friendly_name(),
                     "body_ops": len(body), "ignored_ops": len(ignored)}


class ValidationItem:
    """One held-out frame and its reference: a mask (seg), a label (cls) or the clean frame (enhance)."""

    def __init__(self, frame: np.ndarray, target):
        self.frame, self.target = frame, target


def _validation_fn(task: str, meta: BundleMeta):
    from usfm_edge.core import metrics as M

    def fn(compiled, items):
        values, probs, labels = [], [], []
        for item in items:
            res = compiled(graph_input(meta, [item.frame]))
            if task == "seg":
                values.append(M.dice(res[compiled.output("mask")][0], item.target))
            elif task == "cls":
                p = np.asarray(res[compiled.output("probs")][0])
                probs.append(p)
                labels.append(item.target)
                values.append(float(int(p.argmax()) == int(item.target)))
            else:
                img = np.asarray(res[compiled.output("restored")][0], np.float32) / 255.0
                values.append(M.psnr(img, item.target))
        return float(np.mean(values)), values

    return fn


def quantize_openvino(model_path: str | Path, frames, recipe, workdir: str | Path, meta: BundleMeta,
                      validation: list[ValidationItem] | None = None, max_drop: float | None = None) -> tuple[Path, dict]:
    """NNCF PTQ (or accuracy-controlled PTQ when ``validation`` is given) of an ONNX graph or fp32 IR.

    Args:
        model_path: exported fp32 ``.onnx`` or fp32 IR ``.xml``.
        frames: calibration frames (uint8, each at its own size; the graph is dynamic).
        recipe: a ``QuantRecipe``.
        workdir: where ``model_int8.xml``/``.bin`` are written.
        meta: the graph contract (``common.read_contract`` or the bundle's usfm.json).
        validation: held-out items for ``nncf.quantize_with_accuracy_control`` (None = plain PTQ).
        max_drop: accuracy-control limit (absolute, in the task metric).

    Returns:
        ``(xml path, details)``.
    """
    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = ov.Core().read_model(str(model_path))
    ignored, body = ov_body(model, recipe.keep_last_layer_float, recipe.float_scopes)
    frames = list(frames)
    dataset = nncf.Dataset(frames, lambda f: graph_input(meta, [f]))
    scope = nncf.IgnoredScope(names=ignored, validate=False)
    opts = recipe.nncf_options()
    mode = "ptq"
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(max(level, logging.WARNING))  # one INFO line per non-quantised op otherwise
    try:
        if validation:
            mode = "accuracy_control"
            adv = opts.pop("advanced_parameters")
            opts.pop("fast_bias_correction")
            q = nncf.quantize_with_accuracy_control(
                model, dataset, nncf.Dataset(list(validation)), _validation_fn(meta.task, meta),
                max_drop=float(max_drop if max_drop is not None else 0.01), subset_size=len(frames),
                ignored_scope=scope, advanced_quantization_parameters=adv, **opts)
        else:
            q = nncf.quantize(model, dataset, subset_size=len(frames), ignored_scope=scope, **opts)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - NNCF raises many types
        raise ExportError(f"NNCF quantisation failed ({mode}): {type(exc).__name__}: {exc}", path=model_path) from exc
    finally:
        nncf_log.setLevel(level)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in q.get_ordered_ops())
    if fq == 0:
        raise ExportError("NNCF inserted no quantiser: the result would not be INT8", path=model_path)
    xml = workdir / "model_int8.xml"
    ov.save_model(q, str(xml), compress_to_fp16=False)
    log.info("NNCF %s: %d FakeQuantize", mode, fq)
    return xml, {"mode": mode, "fake_quantize": fq, "body": body, "notes": [],
                 "nncf_options": {k: str(v) for k, v in opts.items()}}


def _float_source(port):
    """Walk back from a quantised op's input through FakeQuantize and SmoothQuant scaling to the float producer."""
    out = port.get_source_output()
    node = out.get_node()
    while node.get_type_name() == "FakeQuantize" or node.get_friendly_name().endswith("/nncf_smooth_quant"):
        out = node.input_value(0)
        node = out.get_node()
    return out


def _key(out) -> str:
    return f"{out.get_node().get_friendly_name()}:{out.get_index()}"


def openvino_layer_errors(fp32_path: str | Path, int8_xml: str | Path, frames, meta: BundleMeta) -> list[dict]:
    """Relative L2 error of each quantised MatMul/Convolution output (int8 IR vs fp32 model); see ``ort_qdq``."""
    ov = require("openvino", "openvino")
    core = ov.Core()
    f_model, q_model = core.read_model(str(fp32_path)), core.read_model(str(int8_xml))
    f_ops = {op.get_friendly_name(): op for op in f_model.get_ordered_ops()}
    layers = []
    for op in q_model.get_ordered_ops():
        if op.get_type_name() in _WEIGHTED and op.get_friendly_name() in f_ops and any(
                i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs()):
            srcs = [_float_source(i) for i in op.inputs()]
            srcs = [s for s in srcs if not _is_constant(s) and s.get_node().get_friendly_name() in f_ops]
            layers.append((op, srcs))
    if not layers:
        return []
    ports = {}
    for op, srcs in layers:
        ports[_key(op.output(0))] = op.output(0)
        ports.update({_key(s): s for s in srcs})
    keys = sorted(ports)
    q_ops = {op.get_friendly_name(): op for op in q_model.get_ordered_ops()}

    def port_in(ops, key):
        name, idx = key.rsplit(":", 1)
        return ops[name].output(int(idx))

    nf, nq = len(f_model.outputs), len(q_model.outputs)
    f_model.add_outputs([port_in(f_ops, k) for k in keys])
    q_model.add_outputs([port_in(q_ops, k) for k in keys])
    cfg = {"INFERENCE_PRECISION_HINT": "f32"}
    fc, qc = core.compile_model(f_model, "CPU", cfg), core.compile_model(q_model, "CPU", cfg)
    f_outs, q_outs = fc.outputs[nf:], qc.outputs[nq:]
    errs: dict[str, list[float]] = {k: [] for k in keys}
    for frame in frames:
        x = graph_input(meta, [frame])
        fr, qr = fc(x), qc(x)
        for k, fo, qo in zip(keys, f_outs, q_outs):
            r, g = np.asarray(fr[fo], np.float64), np.asarray(qr[qo], np.float64)
            errs[k].append(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-12)))
    mean = {k: float(np.mean(v)) for k, v in errs.items()}
    out = []
    for op, srcs in layers:
        own = mean[_key(op.output(0))]
        inp = max((mean[_key(s)] for s in srcs), default=0.0)
        out.append({"layer": op.get_friendly_name(), "op": op.get_type_name(), "output_error": round(own, 5),
                    "input_error": round(inp, 5), "added": round(own - inp, 5)})
    return out
