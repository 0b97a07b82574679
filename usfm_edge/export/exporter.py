"""``export``: checkpoint -> raw-frame graph -> target artifact -> bundle -> parity gate.

    from usfm_edge.export import export
    export("seg.safetensors", target="jetson")          # -> seg-jetson-fp16.usfm/

Steps: load the task model (or a backbone as a ``features`` model) -> wrap it in ``graph.RawFrameModel``
(pre/post-processing in the graph) -> ONNX (opset 17, op check per target) -> OpenVINO IR / TensorRT engine or
``build_engine.sh`` -> ``usfm.json`` + ``SHA256SUMS`` in a temporary folder -> parity against the same
RawFrameModel in PyTorch fp32 through ``runtime.Engine`` on real frames -> rename into place. A failed
step or a failed gate leaves no bundle (unless ``force=True``, which keeps it and records the failure).

INT8 is produced by ``usfm_edge.calibration`` and enters through ``quantizer``: a callable
``quantizer(onnx_fp32: Path, target: Target, workdir: Path) -> dict`` returning ``{"onnx": Path}`` (Q/DQ ONNX,
for onnx/jetson/tensorrt) or ``{"openvino_xml": Path}`` (for openvino), plus ``"manifest_sha256"`` of the
calibration set and optional ``"thresholds"`` and ``"report"``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from usfm_edge.core.bundle_schema import BUNDLE_SUFFIX, BundleMeta, InputContract, default_thresholds
from usfm_edge.core.errors import ConfigError, ExportError, ValidationError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.export.bundle import BundleWriter, bundle_path, sha256_file, tool_versions
from usfm_edge.export.graph import RawFrameModel, describe_io
from usfm_edge.export.onnx_export import torch2onnx
from usfm_edge.export.parity import default_frames, run_parity
from usfm_edge.export.targets import Target, check_precision, get_target

__all__ = ["export", "load_for_export", "band_stop_from"]

log = logging.getLogger(__name__)

Quantizer = Callable[[Path, Target, Path], dict]


def _backbone_preset(sd: dict, cfg: dict | None, path: Path) -> tuple[str, int]:
    from usfm_edge.models.registry import list_models

    if cfg and cfg.get("model") in list_models():
        return cfg["model"], int((cfg.get("model_args") or {}).get("img_size") or cfg.get("img_size") or 224)
    widths = {768: "usfm_vit_base_patch16_224", 384: "usfm_vit_small_patch16_224", 192: "usfm_vit_tiny_patch16_224",
              64: "usfm_vit_test"}
    for k, v in sd.items():
        if k.endswith("patch_embed.proj.weight") and hasattr(v, "shape") and int(v.shape[0]) in widths:
            name = widths[int(v.shape[0])]
            return name, 64 if name == "usfm_vit_test" else 224
    raise ExportError("cannot tell which backbone preset this checkpoint holds", path=path,
                      hint="convert it first: usfm-edge convert-weights CKPT -o backbone.safetensors")


def load_for_export(checkpoint, task: str | None = None, img_size: int | None = None):
    """Load a task model to export, and describe its source.

    Args:
        checkpoint: a ``TaskModel`` instance, a task checkpoint (``save_task_checkpoint``), or a backbone
            checkpoint (official ``USFM_latest.pth``, usfm-edge backbone ``.safetensors``) -> ``features``.
        task: the task the caller expects (None = whatever the checkpoint holds).
        img_size: input size for backbone checkpoints (task checkpoints keep their fine-tuning size).

    Returns:
        ``(model, source dict)``.

    Raises:
        ExportError: a backbone-only checkpoint was asked for a task other than ``features``, or a task mismatch.
    """
    from usfm_edge.models.checkpoint import read_checkpoint
    from usfm_edge.models.tasks import build_task_model, load_task_model

    if isinstance(checkpoint, torch.nn.Module):
        model = checkpoint
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        source = {"checkpoint": None, "sha256": None, "state_dict_sha256": h.hexdigest()}
    else:
        path = Path(checkpoint)
        sd, cfg = read_checkpoint(path)
        source = {"checkpoint": path.name, "sha256": sha256_file(path), "kind": "task"}
        if isinstance(cfg, dict) and cfg.get("task") in ("features", "seg", "cls", "enhance"):
            model = load_task_model(path)
        else:
            source["kind"] = "backbone"
            if task not in (None, "features"):
                raise ExportError(f"'{path.name}' holds only a backbone (no {task} head): it can be exported as "
                                  "task 'features' only", path=path,
                                  hint=f"fine-tune a {task} head first (usfm-edge finetune), then export that checkpoint")
            preset, size = _backbone_preset(sd, cfg, path)
            model = build_task_model("features", backbone=preset, img_size=int(img_size or size), checkpoint=path)
    model = model.eval()
    if not hasattr(model, "task"):
        raise ExportError("the model to export has no 'task' attribute (expected a usfm_edge TaskModel)")
    if task is not None and model.task != task:
        raise ExportError(f"the checkpoint holds a '{model.task}' model, not '{task}'")
    if img_size is not None and int(img_size) != int(model.img_size):
        raise ConfigError(f"the model was built for {model.img_size} px input; it cannot be exported at {img_size} px",
                          hint="export at the fine-tuning size (omit img_size)")
    return model, source


def band_stop_from(band_stop, size: int, model_cfg: dict | None = None) -> tuple[np.ndarray | None, dict]:
    """Resolve the ``band_stop`` option to an ``(S, S)`` mask and its ``usfm.json`` record.

    ``False``/None: off. A sequence of ring ids: those rings of ``kernels.rings`` dropped. An ``(S, S)`` array:
    that mask. ``True``: the rings recorded in the model config (``band_stop_rings``), else the outermost
    ring (suppresses the highest-frequency band, i.e. speckle-scale texture).
    """
    if band_stop is None or band_stop is False:
        return None, {"enabled": False, "rings": None, "mask_sha256": None}
    from usfm_edge.kernels.rings import band_stop_mask, ring_edges

    rings = None
    if isinstance(band_stop, np.ndarray):
        mask = np.asarray(band_stop, dtype=np.float32)
    else:
        edges = ring_edges(size)
        if band_stop is True:
            rings = list((model_cfg or {}).get("band_stop_rings") or [len(edges) - 2])
        else:
            rings = [int(r) for r in band_stop]
        mask = band_stop_mask(size, size, rings, edges)
    if mask.shape != (size, size):
        raise ConfigError(f"band-stop mask must be ({size}, {size}), got {mask.shape}")
    digest = hashlib.sha256(np.ascontiguousarray(mask, dtype=np.float32).tobytes()).hexdigest()
    return mask, {"enabled": True, "rings": rings, "mask_sha256": digest}


def _reference(model: RawFrameModel) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = model(torch.from_numpy(np.array(batch, copy=True)))
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.numpy() for n, o in zip(model.output_names, out)}

    return run


def export(checkpoint_or_model, target: str = "onnx", precision: str | None = None, out: str | Path | None = None,
           *, task: str | None = None, img_size: int | None = None, band_stop=False, bare: bool = False,
           frame_size: tuple[int, int] | None = None, verify_frames: Iterable | None = None, force: bool = False,
           thresholds: dict | None = None, workspace_gb: float = 4.0, dla_core: int | None = None,
           quantizer: Quantizer | None = None, overwrite: bool = True) -> Path:
    """Export a USFM task model to a verified bundle for one target.

    Args:
        checkpoint_or_model: task checkpoint, backbone checkpoint (-> ``features``), or a ``TaskModel``.
        target: a name or alias of ``targets.TARGETS`` (``onnx``, ``openvino``, ``intel-gpu``, ``jetson``...).
        precision: ``fp32``/``fp16``/``int8``; None = the target's default.
        out: bundle folder (default ``<checkpoint stem>-<target>-<precision>.usfm`` in the current folder).
        task: expected task (a backbone-only checkpoint asked for ``seg``/``cls``/``enhance`` -> ExportError).
        img_size: model input size for backbone checkpoints.
        band_stop: in-graph band-stop filter: False, True, ring ids, or an ``(S, S)`` mask.
        bare: export the plain model on normalised ``(B, 3, S, S)`` input (no in-graph pre/post-processing).
        frame_size: ``(H, W)`` of the frames for static-shape targets (jetson/tensorrt); default ``(S, S)``.
        verify_frames: real frames (arrays or paths) for the parity gate; default: the bundled sample.
        force: keep the bundle when the parity gate fails (the failure is recorded in ``usfm.json``).
        thresholds: override the parity thresholds of the precision (``cosine``, ``dice``, ``max_abs``).
        workspace_gb: TensorRT builder workspace.
        dla_core: TensorRT DLA core (jetson).
        quantizer: INT8 hook from ``usfm_edge.calibration`` (see the module docstring).
        overwrite: replace an existing bundle at ``out``.

    Returns:
        the bundle path.

    Raises:
        ConfigError: unknown target or unsupported precision (lists the choices).
        BackendUnavailableError: the converter's package is missing (names the extra).
        ExportError: an op the target cannot run (names it), a converter failure, a wrong checkpoint.
        ValidationError: the parity gate failed (``results`` holds the numbers); no bundle is left.
    """
    tgt = get_target(target)
    precision = check_precision(tgt, precision)
    if precision == "int8" and quantizer is None:
        raise ExportError("INT8 needs a real ultrasound calibration set",
                          hint="quantise with usfm_edge.calibration (it calls export(..., quantizer=...))")
    model, source = load_for_export(checkpoint_or_model, task, img_size)
    cfg = model.config() if hasattr(model, "config") else {}
    spec = getattr(model, "preprocess", None) or PreprocessSpec(img_size=int(model.img_size))
    size = int(spec.img_size)
    mask, band_record = band_stop_from(band_stop, size, cfg)
    static = tgt.static_shapes
    hw = tuple(int(v) for v in (frame_size or (size, size))) if (static and not bare) else None
    if frame_size is not None and not static:
        log.info("frame_size is ignored for '%s': its graph accepts any frame size", tgt.name)
    half = precision == "fp16" and tgt.backend in ("onnxruntime", "tensorrt")
    reference_model = RawFrameModel(model, spec, mask, bare=bare)
    if out is None:
        stem = Path(checkpoint_or_model).stem if isinstance(checkpoint_or_model, (str, Path)) else \
            f"{getattr(model, 'preset', 'usfm')}-{model.task}"
        out = Path(f"{stem}-{tgt.name}-{precision}{BUNDLE_SUFFIX}")
    out = bundle_path(out)

    num_out = int(getattr(model, "num_classes", 0) or len(getattr(model, "labels", []) or []))
    embed_dim = getattr(getattr(model, "backbone", None), "embed_dim", None)
    batch_label = "batch" if tgt.dynamic_batch else 1
    inp, outs = describe_io(reference_model, num_out, embed_dim, batch_label, hw or ("height", "width"))
    meta_props = {"usfm_edge.task": model.task, "usfm_edge.labels": list(getattr(model, "labels", [])),
                  "usfm_edge.preprocess": spec.to_dict(), "usfm_edge.band_stop": band_record,
                  "usfm_edge.precision": precision, "usfm_edge.target": tgt.name}
    thr = {**default_thresholds(precision), "max_abs": None, **(thresholds or {})}
    notes: list[str] = []
    with BundleWriter(out, overwrite=overwrite) as w:
        files: dict[str, str] = {}
        scratch = w.path.parent / f"{w.path.name}-scratch"
        scratch.mkdir()
        try:
            export_model = RawFrameModel(_clone(model) if half else model, spec, mask, bare=bare, half=half)
            onnx_fp = scratch / "model.onnx"
            example = export_model.example_input(1, hw)
            torch2onnx(export_model, onnx_fp, example, input_names=[export_model.input_name],
                       output_names=list(export_model.output_names),
                       dynamic_axes=export_model.dynamic_axes(tgt.dynamic_batch, tgt.dynamic_hw), opset=tgt.opset,
                       allow_opset_upgrade=(tgt.backend != "tensorrt"), metadata=meta_props, op_profile=tgt.op_profile)
            calib = {"manifest_sha256": None}
            quant: dict = {}
            if precision == "int8":
                quant = dict(quantizer(onnx_fp, tgt, scratch))
                calib = {"manifest_sha256": quant.get("manifest_sha256"), "report": quant.get("report")}
                if quant.get("thresholds"):
                    thr.update(quant["thresholds"])
                if quant.get("onnx"):  # the Q/DQ graph must obey the same op rules (no QLinear* for TensorRT)
                    import onnx

                    from usfm_edge.export.onnx_export import check_onnx_ops

                    check_onnx_ops(onnx.load(str(quant["onnx"])), tgt.op_profile, quant["onnx"])
            if tgt.backend == "openvino":
                if quant.get("openvino_xml"):
                    xml = Path(quant["openvino_xml"])
                    w.add(xml, "model.xml")
                    w.add(xml.with_suffix(".bin"), "model.bin")
                else:
                    from usfm_edge.export.openvino_export import onnx2openvino

                    onnx2openvino(quant.get("onnx", onnx_fp), w.file("model.xml"), precision,
                                  metadata={k: str(v) for k, v in meta_props.items()})
                files.update(openvino_xml="model.xml", openvino_bin="model.bin")
            else:
                w.add(quant.get("onnx", onnx_fp), "model.onnx")
                files["onnx"] = "model.onnx"
            engine_info = None
            if tgt.builds_engine:
                engine_info = _tensorrt_artifacts(w, files, tgt, precision, workspace_gb, dla_core, notes)
            if bare and mask is not None:
                np.save(w.file("band_stop_mask.npy"), mask.astype(np.float32), allow_pickle=False)
                files["band_stop_mask"] = "band_stop_mask.npy"
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if hw is not None:
            notes.append(f"static input: frames must be {hw[0]}x{hw[1]} (re-export with frame_size for another size)")
        meta = BundleMeta(
            task=model.task, labels=list(getattr(model, "labels", []) or []),
            input=InputContract(tensor=inp, layout="BCHW" if bare else "BHW", raw_frame=not bare,
                                dynamic_axes=(["batch"] if tgt.dynamic_batch else [])
                                + (["height", "width"] if tgt.dynamic_hw and not bare else []),
                                min_side=8, max_side=int(spec.max_side), static_hw=list(hw) if hw else None,
                                max_batch=None if tgt.dynamic_batch else 1),
            outputs=outs, preprocessing=spec.to_dict(), band_stop=band_record, precision=precision,
            backend=tgt.backend, target=tgt.name, files=files,
            model={"preset": getattr(model, "preset", None), "head": getattr(model, "head_name", None),
                   "img_size": size, "embed_dim": embed_dim, "bare": bool(bare), "config": cfg},
            source=source, calibration=calib, parity=None, thresholds=thr, tools=tool_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            name=out.name[: -len(BUNDLE_SUFFIX)], device=tgt.device_for(str(target)), notes=notes,
            extra={"engine": engine_info} if engine_info else {})
        w.write_meta(meta)
        results = _parity(w.path, reference_model, verify_frames, thr, hw)
        meta.parity = results
        if not results["passed"]:
            msg = f"parity gate failed for {out.name} ({precision}, {results['backend']}): " + "; ".join(results["failures"])
            if not force:
                raise ValidationError(msg, path=out, results=results,
                                      hint="inspect the numbers; force=True keeps the bundle anyway")
            log.warning("%s (kept because force=True)", msg)
            meta.notes.append("PARITY GATE FAILED; bundle kept with force=True")
        w.write_meta(meta)
        return w.commit()


def _clone(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _on_jetson() -> bool:
    import platform

    return platform.machine() == "aarch64" and Path("/etc/nv_tegra_release").exists()


def _tensorrt_artifacts(w: BundleWriter, files: dict, tgt: Target, precision: str, workspace_gb: float,
                        dla_core: int | None, notes: list[str]) -> dict | None:
    from usfm_edge.export.tensorrt_export import onnx2engine, tensorrt_available, write_build_script

    write_build_script(w.path, "model.onnx", "model.engine", precision, workspace_gb, "timing.cache", dla_core)
    files["build_script"] = "build_engine.sh"
    files["tensorrt_engine"] = "model.engine"
    ok, why = tensorrt_available()
    if ok and tgt.dla and not _on_jetson():
        ok, why = False, "this is not a Jetson: an engine built here would not run on the device"
    if not ok:
        notes.append(f"TensorRT engine not built here ({why}): run ./build_engine.sh on the device; the parity "
                     "gate ran the TensorRT-ready ONNX with ONNX Runtime")
        return None
    engine = onnx2engine(w.file("model.onnx"), w.file("model.engine"), precision, workspace_gb,
                         w.file("timing.cache"), dla_core)
    import tensorrt as trt

    return {"sha256": sha256_file(engine), "tensorrt": trt.__version__, "dla_core": dla_core}


def _parity(folder: Path, reference_model: RawFrameModel, frames, thr: dict, hw) -> dict:
    from usfm_edge.runtime.engine import Engine

    frames = list(frames) if frames is not None else default_frames()
    device = "auto" if (folder / "model.engine").is_file() else "cpu"  # the export machine may lack the target device
    with Engine.open(folder, device=device, warmup=0) as engine:
        return run_parity(engine, _reference(reference_model), frames, thr, hw)
