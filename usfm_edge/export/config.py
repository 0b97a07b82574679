"""``ExportConfig``: every setting of one export, and the one function that rebuilds it from a bundle's contract.

    from usfm_edge.export import ExportConfig, export, export_config_from_meta
    export("seg.safetensors", ExportConfig(target="jetson", frame_size=(540, 800)))
    export("seg.safetensors", target="jetson", frame_size=(540, 800))      # the same, keywords build the config
    export(ckpt, export_config_from_meta(read_meta("seg-jetson-fp16.usfm"), precision="int8", quantizer=q))

torch-free: the CLI and ``usfm_edge.calibration`` build configs without loading the exporter.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from usfm_edge.core.bundle_schema import BundleMeta

__all__ = ["ExportConfig", "export_config_from_meta", "resolve_frame_size"]


@dataclass
class ExportConfig:
    """How to export a checkpoint (see :func:`usfm_edge.export.export`).

    Attributes:
        target: a name or alias of ``targets.TARGETS`` (``onnx``, ``openvino``, ``intel-gpu``, ``jetson``...).
        precision: ``fp32``/``fp16``/``int8``; None = the target's default.
        out: bundle folder (default ``<checkpoint stem>-<target>-<precision>.usfm`` in the current folder).
        task: expected task (a backbone-only checkpoint asked for ``seg``/``cls``/``enhance`` -> ExportError).
        img_size: model input size for backbone checkpoints.
        band_stop: in-graph band-stop filter: False, True, ring ids, or an ``(S, S)`` mask.
        bare: export the plain model on normalised ``(B, 3, S, S)`` input (no in-graph pre/post-processing).
        frame_size: ``(H, W)`` the graph's frame is fixed at. Static-shape targets (jetson/tensorrt) always have
            one (None = the model input size, with a warning); on onnx/openvino it is optional (None = any frame
            size) and makes the in-graph resizes two MatMuls each, the batch staying dynamic. The runtime fits
            other frames, other callers must resize.
        verify_frames: real frames (arrays or paths) for the parity gate, or a data source spec
            (``busbra:PATH``: its first 8 frames); default: for INT8, four held-out frames of the calibration
            sources (the model's own domain: a fetal-head model is not judged on breast frames), else the bundled
            sample.
        force: keep the bundle when the parity gate fails (the failure is recorded in ``usfm.json``).
        thresholds: override the parity thresholds of the precision (``cosine``, ``dice``, ``max_abs``).
        workspace_gb: TensorRT builder workspace.
        dla_core: TensorRT DLA core (jetson).
        quantizer: INT8 hook from ``usfm_edge.calibration`` (``quantizer(onnx_fp32, target, workdir) -> dict``).
        overwrite: replace an existing bundle at ``out`` (the CLI passes ``--force``; without it the CLI
            refuses an existing bundle).
    """

    target: str = "onnx"
    precision: str | None = None
    out: str | Path | None = None
    task: str | None = None
    img_size: int | None = None
    band_stop: object = False
    bare: bool = False
    frame_size: tuple[int, int] | None = None
    verify_frames: Iterable | str | None = None
    force: bool = False
    thresholds: dict | None = None
    workspace_gb: float = 4.0
    dla_core: int | None = None
    quantizer: Callable | None = None
    overwrite: bool = True

    def replace(self, **changes) -> ExportConfig:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)


def export_config_from_meta(meta: BundleMeta, **overrides) -> ExportConfig:
    """The export settings that made a bundle, rebuilt from its ``BundleMeta`` (the one place that does it).

    Target, precision, task, graph form (bare or raw-frame), band-stop rings, static frame size and (for a
    backbone exported as ``features``) the input size come from the contract; ``overrides`` change any of them
    (e.g. ``precision="int8", quantizer=...`` to re-export a bundle as INT8). A band-stop mask that was given as
    an array is not recorded (``rings`` None): it comes back as ``band_stop=True`` (the model's own rings).
    """
    band = meta.band_stop or {}
    model = meta.model or {}
    cfg = ExportConfig(
        target=meta.target, precision=meta.precision, task=meta.task,
        img_size=model.get("img_size") if (meta.source or {}).get("kind") == "backbone" else None,
        band_stop=list(band["rings"]) if band.get("enabled") and band.get("rings") is not None else bool(band.get("enabled")),
        bare=bool(model.get("bare", not meta.input.raw_frame)),
        frame_size=tuple(meta.input.static_hw) if meta.input.static_hw else None)
    return cfg.replace(**overrides)


def resolve_frame_size(frame_size, static: bool, bare: bool, size: int, target: str) -> tuple[int, int] | None:
    """The static frame ``(H, W)`` of a raw-frame graph for a static-shape target, else None.

    Without ``frame_size`` a static target gets the model input size ``(size, size)`` and a loud warning on
    stderr naming the size and why: the ONNX / TensorRT engine then takes only that size, so scanner software
    feeding it directly must resize its frames (``runtime.Engine`` fits any frame itself).
    """
    if not static or bare:
        return None
    if frame_size is not None:
        return int(frame_size[0]), int(frame_size[1])
    print(f"usfm-edge: WARNING: target '{target}' has static shapes and no frame size was given: the graph is built "
          f"for {size}x{size} frames (the model input size). usfm_edge.runtime.Engine fits frames of other sizes "
          f"to it, but software feeding the ONNX/TensorRT engine directly must resize to {size}x{size}; export "
          f"with --frame-size HxW (frame_size=(H, W)) of your scanner's frames to avoid the extra resize.",
          file=sys.stderr)
    return size, size
