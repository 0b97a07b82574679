"""``usfm.json`` against the graph a backend really loaded, checked at ``Engine.open`` (numpy only).

A bundle whose metadata was edited (and its ``SHA256SUMS`` regenerated) must fail at open with a ``BundleError``
naming the field, never later with a backend's own exception or with nonsense results. Two checks:

* :func:`check_graph` (static, before any run): the graph has the one input ``usfm.json`` describes (name, dtype,
  rank); every output ``usfm.json`` lists exists in the graph with the same dtype, rank and fixed dims; the outputs
  the task needs are there with the right rank and kind (seg: ``probs`` ``(B, K, H, W)`` + ``mask``; cls:
  ``probs`` ``(B, K)``; bare graphs: ``logits``...) and a fixed class axis equals ``len(labels)``;
* :func:`check_outputs` (on the first run, on a blank frame): the arrays that came back have those dtypes, ranks,
  batch, class count (``len(labels)``) and, for raw-frame seg/enhance graphs, the frame's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from usfm_edge.core.bundle_schema import BundleMeta
from usfm_edge.core.errors import BundleError

__all__ = ["task_outputs", "check_graph", "check_outputs"]

_FLOAT, _INDEX, _UINT8 = ("float32", "float16"), ("uint8", "int64"), ("uint8",)
#: (task, raw_frame) -> {output name: (rank, allowed dtypes, class axis or None, what it is)}
_TASK_OUTPUTS: dict[tuple[str, bool], dict[str, tuple[int, tuple[str, ...], int | None, str]]] = {
    ("seg", True): {"probs": (4, _FLOAT, 1, "(batch, classes, H, W) probabilities"),
                    "mask": (3, _INDEX, None, "(batch, H, W) class indices")},
    ("seg", False): {"logits": (4, _FLOAT, 1, "(batch, classes, S, S) logits")},
    ("cls", True): {"probs": (2, _FLOAT, 1, "(batch, classes) probabilities")},
    ("cls", False): {"logits": (2, _FLOAT, 1, "(batch, classes) logits")},
    ("enhance", True): {"restored": (3, _UINT8, None, "(batch, H, W) uint8 frame")},
    ("enhance", False): {"restored": (4, _FLOAT, None, "(batch, 1, S, S) image")},
    ("features", True): {"features": (2, _FLOAT, None, "(batch, D) embedding")},
    ("features", False): {"features": (2, _FLOAT, None, "(batch, D) embedding")},
}


def task_outputs(meta: BundleMeta) -> dict[str, tuple[int, tuple[str, ...], int | None, str]]:
    """The outputs ``Engine`` reads for this bundle's task and input kind."""
    return _TASK_OUTPUTS[(meta.task, bool(meta.input.raw_frame))]


def _err(message: str, source) -> BundleError:
    return BundleError(message, path=source, hint="the usfm.json does not describe this model: restore it or export "
                                                  "the bundle again")


def _find(ports, name: str):
    return next((p for p in ports if name in p.names), None)


def check_graph(meta: BundleMeta, backend, source: str | Path | None = None) -> None:
    """Static check of ``meta`` against ``backend.io()`` (skipped for a backend that cannot describe its graph).

    Raises:
        BundleError: the message names the ``usfm.json`` field that does not fit the graph.
    """
    io = backend.io()
    if io is None:
        return
    inputs, outputs = io
    spec = meta.input.tensor
    if len(inputs) != 1:
        raise _err(f"the model takes {len(inputs)} inputs ({', '.join(sorted(n for p in inputs for n in p.names))}); "
                   "a bundle's graph takes one frame tensor", source)
    port = inputs[0]
    if spec.name not in port.names:
        raise _err(f"usfm.json input.tensor.name {spec.name!r} is not the model's input "
                   f"({', '.join(sorted(port.names))})", source)
    if port.dtype is not None and port.dtype != spec.dtype:
        raise _err(f"usfm.json input.tensor.dtype {spec.dtype!r} does not match the model's input ({port.dtype})", source)
    if port.shape is not None and len(port.shape) != len(spec.shape):
        raise _err(f"usfm.json input.tensor.shape has {len(spec.shape)} dimensions, the model's input "
                   f"{len(port.shape)} (input.layout {meta.input.layout!r}, raw_frame {meta.input.raw_frame})", source)
    for i, out in enumerate(meta.outputs):
        port = _find(outputs, out.name)
        if port is None:
            have = ", ".join(sorted(n for p in outputs for n in p.names))
            raise _err(f"usfm.json outputs[{i}].name {out.name!r} is not an output of the model (its outputs: "
                       f"{have})", source)
        if port.dtype is not None and port.dtype != out.dtype:
            raise _err(f"usfm.json outputs[{i}].dtype {out.dtype!r} does not match the model's output "
                       f"'{out.name}' ({port.dtype})", source)
        if port.shape is not None:
            if len(port.shape) != len(out.shape):
                raise _err(f"usfm.json outputs[{i}].shape has {len(out.shape)} dimensions, the model's output "
                           f"'{out.name}' {len(port.shape)}", source)
            for axis, (want, have) in enumerate(zip(out.shape, port.shape)):
                if isinstance(want, int) and have is not None and want != have:
                    raise _err(f"usfm.json outputs[{i}].shape[{axis}] is {want}, the model's output '{out.name}' "
                               f"has {have}", source)
    k = len(meta.labels)
    for name, (rank, dtypes, class_axis, what) in task_outputs(meta).items():
        declared = next((o for o in meta.outputs if o.name == name), None)
        port = _find(outputs, name)
        if declared is None or port is None:
            raise _err(f"task {meta.task!r} needs the output '{name}' {what}, but usfm.json outputs list "
                       f"{[o.name for o in meta.outputs]} and the model has "
                       f"{sorted(n for p in outputs for n in p.names)}: the task does not fit the model", source)
        if len(declared.shape) != rank or declared.dtype not in dtypes:
            raise _err(f"task {meta.task!r} needs '{name}' as {what} of dtype {' or '.join(dtypes)}, but it has "
                       f"{len(declared.shape)} dimensions and dtype {declared.dtype}: the task does not fit the model",
                       source)
        if class_axis is not None:
            dims = [declared.shape[class_axis]] + ([port.shape[class_axis]] if port.shape is not None else [])
            for d in dims:
                if isinstance(d, int) and d != k:
                    raise _err(f"the model's '{name}' has {d} classes but usfm.json labels names {k}: "
                               f"{meta.labels}", source)


def check_outputs(meta: BundleMeta, x: np.ndarray, outs: dict[str, np.ndarray], source: str | Path | None = None
                  ) -> None:
    """Check the outputs of one run on input batch ``x`` against ``meta`` (dtypes, ranks, batch, classes, size).

    Raises:
        BundleError: names the output and what does not fit.
    """
    k = len(meta.labels)
    for i, spec in enumerate(meta.outputs):
        if spec.name not in outs:
            raise _err(f"the model returned no output '{spec.name}' (usfm.json outputs[{i}])", source)
        a = np.asarray(outs[spec.name])
        if a.dtype.name != spec.dtype or a.ndim != len(spec.shape):
            raise _err(f"the model's output '{spec.name}' is {a.dtype.name} of shape {a.shape}; usfm.json "
                       f"outputs[{i}] says {spec.dtype} with {len(spec.shape)} dimensions", source)
        if a.shape[0] != x.shape[0]:
            raise _err(f"the model's output '{spec.name}' has batch {a.shape[0]} for an input batch of "
                       f"{x.shape[0]}", source)
    for name, (_, _, class_axis, _) in task_outputs(meta).items():
        a = np.asarray(outs[name])
        if class_axis is not None and a.shape[class_axis] != k:
            raise _err(f"the model's '{name}' has {a.shape[class_axis]} classes but usfm.json labels names {k}: "
                       f"{meta.labels}", source)
    if meta.input.raw_frame and meta.task in ("seg", "enhance"):
        hw = tuple(x.shape[1:3])
        for name in ("probs", "mask") if meta.task == "seg" else ("restored",):
            if tuple(outs[name].shape[-2:]) != hw:
                raise _err(f"the model's '{name}' is {outs[name].shape[-2:]} for a {hw} frame; a raw-frame "
                           f"{meta.task} graph answers at the frame's size", source)
