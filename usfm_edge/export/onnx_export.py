"""torch -> ONNX: export, check, stamp metadata, and refuse ops a target cannot run.

Exporter choice (measured with torch 2.13, see reference/perf-baseline.md §5): the TorchScript exporter
(``dynamo=False``) writes one self-contained file at opset 17, which TensorRT 10.3 (JetPack 6) parses,
and handles the uint8 raw-frame graph with dynamic batch, height and width (the resize sizes become a
computed ``Resize`` input). It is tried first. The dynamo exporter (opset >= 18) is the fallback for
graphs the tracer cannot handle, and only for targets that accept opset 18; its weights are kept inside
the file (``external_data=False``) unless the model exceeds protobuf's 2 GB.

fp16: done in the graph (``models.raw_frame.RawFrameModel(half=True)``: fp16 weights and compute inside the model,
explicit Casts, fp32 pre/post-processing), not by rewriting the ONNX: no onnxconverter-common needed and
the uint8 input path stays fp32 by construction.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from usfm_edge.core.errors import ExportError, require

__all__ = ["FORBIDDEN_OPS", "torch2onnx", "check_onnx_ops", "onnx_is_static", "add_metadata", "onnx_op_types"]

# ONNX ops the TensorRT 10.x ONNX parser rejects (onnx-tensorrt docs/operators.md, "N" rows), plus DFT/STFT.
_TRT_UNSUPPORTED = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad",
    "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear", "ImageDecoder",
    "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss",
    "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "STFT", "StringConcat", "StringNormalizer",
    "StringSplit", "TfIdfVectorizer", "Unique",
})

#: op_profile -> {op: reason}. "DFT" is forbidden everywhere: OpenVINO 2026.4 converts it silently wrong,
#: TensorRT and ORT-CUDA have no kernel; the band-stop filter is exported as MatMuls instead.
FORBIDDEN_OPS: dict[str, dict[str, str]] = {
    "onnx": {
        "DFT": "no CUDA/TensorRT kernel in ONNX Runtime (CPU fallback); use the MatMul band-stop form",
        "STFT": "no CUDA kernel in ONNX Runtime",
    },
    "openvino": {
        "DFT": "OpenVINO 2026.4 converts ONNX DFT with wrong output shapes (silently wrong results)",
        "STFT": "not validated with OpenVINO's ONNX frontend",
    },
    "tensorrt": {op: "not supported by the TensorRT 10.x ONNX parser" for op in sorted(_TRT_UNSUPPORTED)},
}


def onnx_op_types(model) -> list[tuple[str, str, str]]:
    """``(domain, op_type, node name)`` of every node, including nodes in subgraphs and functions."""
    out = []

    def walk(graph):
        for node in graph.node:
            out.append((node.domain or "", node.op_type, node.name))
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            out.append((node.domain or "", node.op_type, f"{fn.name}/{node.name}"))
    return out


def check_onnx_ops(model, profile: str, path: str | Path | None = None) -> None:
    """Raise ExportError naming the first op that the target profile forbids.

    Rules: no op outside the standard ONNX domain (``""``/``ai.onnx``) for any profile (a portable bundle
    must not need ORT contrib ops or custom plugins); the profile's ``FORBIDDEN_OPS``; for ``tensorrt``
    also: the uint8 graph input may only feed ``Cast``/``Shape`` (TensorRT supports UINT8 only as a network
    input/output).

    Args:
        model: an ``onnx.ModelProto``.
        profile: ``onnx``, ``openvino`` or ``tensorrt`` (a target's ``op_profile``).
        path: the file, for the error message.
    """
    if profile not in FORBIDDEN_OPS:
        raise ExportError(f"unknown op profile {profile!r}; expected one of {', '.join(FORBIDDEN_OPS)}")
    forbidden = FORBIDDEN_OPS[profile]
    local_functions = {(f.domain, f.name) for f in model.functions}
    for domain, op, name in onnx_op_types(model):
        if domain not in ("", "ai.onnx") and (domain, op) not in local_functions:
            raise ExportError(f"op '{domain}::{op}' (node '{name}') is outside the standard ONNX domain; the "
                              f"'{profile}' target needs standard ops only", path=path)
        if op in forbidden:
            raise ExportError(f"op '{op}' (node '{name}') is not supported for the '{profile}' target: "
                              f"{forbidden[op]}", path=path,
                              hint="band-stop filtering must use kernels.dft_matmul.BandStopMatMul, not torch.fft")
    if profile == "tensorrt":
        u8_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == 2}
        for node in model.graph.node:
            for inp in node.input:
                if inp in u8_inputs and node.op_type not in ("Cast", "Shape"):
                    raise ExportError(f"uint8 input '{inp}' feeds op '{node.op_type}' (node '{node.name}'); "
                                      "TensorRT accepts UINT8 only into Cast", path=path)


def onnx_is_static(model) -> bool:
    """True when every graph input and output dimension is a fixed number."""
    for vi in list(model.graph.input) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value") or d.dim_value <= 0:
                return False
    return True


def add_metadata(model, metadata: Mapping[str, object]) -> None:
    """Set ``metadata_props`` (strings; other values are JSON-encoded), replacing keys already there."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key = str(k)
        entry.value = v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _export_torchscript(module, args, path, input_names, output_names, dynamic_axes, opset):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DeprecationWarning of the legacy exporter, TracerWarnings
        torch.onnx.export(module, args, str(path), input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes or None, opset_version=opset, do_constant_folding=True,
                          dynamo=False)


def _export_dynamo(module, args, path, input_names, output_names, dynamic_axes, opset):
    import torch

    dynamic_shapes = None
    if any(0 in dynamic_axes.get(n, {}) for n in input_names):  # torch.export specialises a size-1 dim
        args = tuple(a.expand(2, *a.shape[1:]).contiguous() if a.shape[0] == 1 else a for a in args)
    if dynamic_axes:
        dims: dict[str, object] = {}
        spec = []
        for name in input_names:
            axes = dynamic_axes.get(name, {})
            spec.append({ax: dims.setdefault(label, torch.export.Dim(label, min=1 if label == "batch" else 8))
                         for ax, label in axes.items()} or None)
        dynamic_shapes = tuple(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, None, input_names=list(input_names), output_names=list(output_names),
                                 opset_version=max(opset, 18), dynamic_shapes=dynamic_shapes, dynamo=True,
                                 verbose=False)
        prog.save(str(path), external_data=False)


def torch2onnx(module, path: str | Path, example, *, input_names: Sequence[str] = ("input",),
               output_names: Sequence[str] = ("output",), dynamic_batch: bool = True,
               dynamic_axes: Mapping[str, Mapping[int, str]] | None = None, opset: int = 17,
               exporter: str = "auto", allow_opset_upgrade: bool = True,
               metadata: Mapping[str, object] | None = None, op_profile: str | None = None) -> Path:
    """Export a torch module to one ONNX file, check it, stamp metadata and check ops for a target.

    Args:
        module: the ``nn.Module`` (put in eval mode by the caller).
        path: the ``.onnx`` file to write.
        example: example input tensor (or tuple of tensors) used for tracing.
        input_names: graph input names.
        output_names: graph output names.
        dynamic_batch: when ``dynamic_axes`` is None, make axis 0 of every input and output dynamic.
        dynamic_axes: ``{tensor name: {axis: label}}``; overrides ``dynamic_batch``.
        opset: ONNX opset for the TorchScript exporter (17 for TensorRT 10.3).
        exporter: ``auto`` (TorchScript, then dynamo on failure), ``torchscript`` or ``dynamo``.
        allow_opset_upgrade: let the ``auto`` fallback use the dynamo exporter's opset 18.
        metadata: ``metadata_props`` to add (non-strings are JSON-encoded).
        op_profile: if given, ``check_onnx_ops`` with this profile.

    Returns:
        the written path.

    Raises:
        ExportError: both exporters failed, the checker rejected the model, or an op is forbidden.
    """
    onnx = require("onnx", "onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()  # the exporters restore the caller's mode afterwards; a train-mode wrapper would re-enable dropout/BN
    args = example if isinstance(example, tuple) else (example,)
    if dynamic_axes is None and dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in (*input_names, *output_names)}
    dynamic_axes = {k: dict(v) for k, v in (dynamic_axes or {}).items()}
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ExportError(f"exporter must be auto, torchscript or dynamo, got {exporter!r}")
    errors = []
    order = {"auto": ["torchscript", "dynamo"] if allow_opset_upgrade else ["torchscript"],
             "torchscript": ["torchscript"], "dynamo": ["dynamo"]}[exporter]
    used = None
    for name in order:
        fn = _export_torchscript if name == "torchscript" else _export_dynamo
        try:
            fn(module, args, path, input_names, output_names, dynamic_axes, opset)
            used = name
            break
        except Exception as exc:  # noqa: BLE001 - every exporter failure is reported together below
            errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:400] if str(exc) else ''}")
    if used is None:
        raise ExportError("ONNX export failed: " + " | ".join(errors), path=path)
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - checker errors have many types
        raise ExportError(f"the exported ONNX model is invalid: {exc}", path=path) from exc
    if op_profile is not None:
        check_onnx_ops(model, op_profile, path)
    meta = {"usfm_edge.exporter": used}
    meta.update(dict(metadata or {}))
    add_metadata(model, meta)
    model.producer_name = "usfm-edge"
    onnx.save(model, str(path))
    return path


def onnx_opset(model) -> int:
    """Opset of the standard ONNX domain."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0
