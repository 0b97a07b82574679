"""``export``: checkpoint -> raw-frame graph -> target artifact -> bundle -> parity gate.

    from usfm_edge.export import export
    export("seg.safetensors", target="jetson", frame_size=(540, 800))   # -> seg-jetson-fp16.usfm/
    export("seg.safetensors", ExportConfig(target="openvino"))          # the same settings as one object

Steps: load the task model (or a backbone as a ``features`` model) -> wrap it in ``models.raw_frame.RawFrameModel``
(pre/post-processing in the graph) -> its contract (``RawFrameModel.contract``: the ``BundleMeta`` that goes into
the ONNX metadata and ``usfm.json`` alike) -> ONNX (opset 17, op check per target) -> OpenVINO IR / TensorRT engine
or ``build_engine.sh`` -> ``usfm.json`` + ``SHA256SUMS`` in a temporary folder -> parity against the same graph in
PyTorch fp32 (``evaluation.TorchPredictor``), both through ``predict`` on real frames -> rename into place. A
failed step or a failed gate leaves no bundle (unless ``force``, which keeps it and records the failure).

INT8 is produced by ``usfm_edge.calibration`` and enters through ``ExportConfig.quantizer``: a callable
``quantizer(onnx_fp32: Path, target: Target, workdir: Path) -> dict`` returning ``{"onnx": Path}`` (Q/DQ ONNX,
for onnx/jetson/tensorrt) or ``{"openvino_xml": Path}`` (for openvino), plus ``"manifest_sha256"`` of the
calibration set and optional ``"thresholds"`` and ``"report"``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from usfm_edge.core.bundle_schema import BUNDLE_SUFFIX, BundleMeta, default_thresholds
from usfm_edge.core.errors import ConfigError, ExportError, ValidationError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.export.bundle import BundleWriter, bundle_path, sha256_file, tool_versions
from usfm_edge.export.config import ExportConfig, resolve_frame_size
from usfm_edge.export.onnx_export import torch2onnx
from usfm_edge.export.parity import default_frames, run_parity
from usfm_edge.export.targets import Target, check_precision, get_target
from usfm_edge.models.raw_frame import RawFrameModel

__all__ = ["export", "load_for_export", "band_stop_from", "ExportConfig"]

log = logging.getLogger(__name__)

Quantizer = Callable[[Path, Target, Path], dict]


def _backbone_preset(sd: dict, cfg: dict | None, path: Path) -> tuple[str, int]:
    from usfm_edge.models.registry import infer_preset, list_models, model_args

    if cfg and cfg.get("model") in list_models():
        return cfg["model"], int((cfg.get("model_args") or {}).get("img_size") or cfg.get("img_size") or 224)
    name = infer_preset(sd)
    if name is None:
        raise ExportError("cannot tell which backbone preset this checkpoint holds", path=path,
                          hint="convert it first: usfm-edge convert-weights CKPT -o backbone.safetensors")
    return name, int(model_args(name)["img_size"])


def _refuse_training_state(sd: dict, path: Path) -> None:
    """A run's ``checkpoint.pt`` (optimiser, RNG, counters: for ``--resume``) is not what one exports."""
    if not str(sd.get("format", "")).startswith("usfm_edge.train_state"):
        return
    model_files = [path.parent / n for n in ("best.safetensors", "last.safetensors", "encoder.safetensors")]
    found = [str(p) for p in model_files if p.is_file()]
    raise ExportError("this is a training-state file (model + optimiser + counters, for --resume), not a model",
                      path=path, hint="export the run's model file instead: " + (" or ".join(found) if found else
                                      "best.safetensors / last.safetensors (fine-tuning) or encoder.safetensors "
                                      "(pretraining) in the run folder"))


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
        _refuse_training_state(sd, path)
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


def export(checkpoint_or_model, target: str | ExportConfig = "onnx", precision: str | None = None,
           out: str | Path | None = None, **options) -> Path:
    """Export a USFM task model to a verified bundle for one target.

    Args:
        checkpoint_or_model: task checkpoint, backbone checkpoint (-> ``features``), or a ``TaskModel``.
        target: a target name (then ``precision``, ``out`` and ``options`` are the other ``ExportConfig``
            fields), or a whole ``ExportConfig`` (``precision``/``out``/``options`` given as well override it).
        precision, out, **options: see :class:`~usfm_edge.export.config.ExportConfig`.

    Returns:
        the bundle path.

    Raises:
        ConfigError: unknown target or unsupported precision (lists the choices).
        BackendUnavailableError: the converter's package is missing (names the extra).
        ExportError: an op the target cannot run (names it), a converter failure, a wrong checkpoint.
        ValidationError: the parity gate failed (``results`` holds the numbers); no bundle is left.
        TypeError: an unknown option.
    """
    if isinstance(target, ExportConfig):
        given = {k: v for k, v in (("precision", precision), ("out", out)) if v is not None}
        cfg = target.replace(**given, **options)
    else:
        cfg = ExportConfig(target=target, precision=precision, out=out, **options)
    tgt = get_target(cfg.target)
    prec = check_precision(tgt, cfg.precision)
    if prec == "int8" and cfg.quantizer is None:
        raise ExportError("INT8 needs a real ultrasound calibration set",
                          hint="quantise with usfm_edge.calibration (it calls export(..., quantizer=...))")
    model, source = load_for_export(checkpoint_or_model, cfg.task, cfg.img_size)
    spec = getattr(model, "preprocess", None) or PreprocessSpec(img_size=int(model.img_size))
    mask, band_record = band_stop_from(cfg.band_stop, int(spec.img_size), _config(model))
    # a frame size makes the frame static on any target (onnx/openvino: the in-graph resizes become MatMuls, the
    # batch stays dynamic); static-shape targets always have one
    static = tgt.static_shapes or (cfg.frame_size is not None and not cfg.bare)
    hw = resolve_frame_size(cfg.frame_size, static, cfg.bare, int(spec.img_size), tgt.name)
    meta = RawFrameModel(model, spec, mask, bare=cfg.bare).contract(
        precision=prec, backend=tgt.backend, target=tgt.name, dynamic_batch=tgt.dynamic_batch,
        dynamic_hw=tgt.dynamic_hw and hw is None, static_hw=hw, band_stop=band_record)
    meta.thresholds = {**default_thresholds(prec), "max_abs": None, **(cfg.thresholds or {})}
    out_path = bundle_path(cfg.out or _default_name(checkpoint_or_model, model, tgt, prec))
    with BundleWriter(out_path, overwrite=cfg.overwrite) as w:
        engine_info = _write_model_files(w, model, spec, mask, meta, tgt, cfg)
        _describe(meta, model, source, tgt, cfg, out_path, engine_info)
        w.write_meta(meta)
        _parity_gate(w.path, meta, model, spec, mask, cfg, out_path)
        w.write_meta(meta)
        return w.commit()


def _config(model) -> dict:
    return model.config() if hasattr(model, "config") else {}


def _default_name(checkpoint_or_model, model, tgt: Target, precision: str) -> Path:
    stem = Path(checkpoint_or_model).stem if isinstance(checkpoint_or_model, (str, Path)) else \
        f"{getattr(model, 'preset', 'usfm')}-{model.task}"
    return Path(f"{stem}-{tgt.name}-{precision}{BUNDLE_SUFFIX}")


def _write_model_files(w: BundleWriter, model, spec: PreprocessSpec, mask, meta: BundleMeta, tgt: Target,
                       cfg: ExportConfig) -> dict | None:
    """ONNX (carrying ``meta``'s contract), then INT8 / OpenVINO IR / TensorRT artifacts into the bundle; fills
    ``meta.files``, ``meta.calibration``, ``meta.thresholds`` and ``meta.notes``. Returns the built engine's record."""
    half = meta.precision == "fp16" and tgt.backend in ("onnxruntime", "tensorrt")
    # what the model file's metadata says of the network (the INT8 recipe reads the head from it)
    meta.model = {"preset": getattr(model, "preset", None), "head": getattr(model, "head_name", None),
                  "img_size": int(meta.preprocessing["img_size"])}
    scratch = w.path.parent / f"{w.path.name}-scratch"
    scratch.mkdir()
    try:
        # OpenVINO runs resize_taps' Gathers fastest; ONNX Runtime its own bilinear Resize, TensorRT MatMuls
        graph = RawFrameModel(_clone(model) if half else model, spec, mask, bare=cfg.bare, half=half,
                              static_hw=meta.input.static_hw,
                              resample="gather" if tgt.backend == "openvino" else "matmul")
        onnx_fp = torch2onnx(graph, scratch / "model.onnx", graph.example_input(1, meta.input.static_hw),
                             input_names=[graph.input_name], output_names=list(graph.output_names),
                             dynamic_axes=graph.dynamic_axes(tgt.dynamic_batch, "height" in meta.input.dynamic_axes),
                             opset=tgt.opset,
                             allow_opset_upgrade=(tgt.backend != "tensorrt"), metadata=meta.onnx_metadata(),
                             op_profile=tgt.op_profile)
        quant = _quantize(onnx_fp, tgt, scratch, meta, cfg.quantizer) if meta.precision == "int8" else {}
        if tgt.backend == "openvino":
            _add_openvino(w, quant.get("openvino_xml"), quant.get("onnx", onnx_fp), meta)
        else:
            w.add(quant.get("onnx", onnx_fp), "model.onnx")
            meta.files["onnx"] = "model.onnx"
        engine_info = _tensorrt_artifacts(w, meta.files, tgt, meta.precision, cfg.workspace_gb, cfg.dla_core,
                                          meta.notes) if tgt.builds_engine else None
        if cfg.bare and mask is not None:
            np.save(w.file("band_stop_mask.npy"), mask.astype(np.float32), allow_pickle=False)
            meta.files["band_stop_mask"] = "band_stop_mask.npy"
        return engine_info
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _quantize(onnx_fp: Path, tgt: Target, scratch: Path, meta: BundleMeta, quantizer: Quantizer) -> dict:
    """Run the INT8 hook; record its calibration and thresholds; check a Q/DQ graph against the target's op rules."""
    quant = dict(quantizer(onnx_fp, tgt, scratch))
    meta.calibration = {"manifest_sha256": quant.get("manifest_sha256"), "report": quant.get("report")}
    meta.thresholds.update(quant.get("thresholds") or {})
    if quant.get("onnx"):  # the Q/DQ graph must obey the same op rules (no QLinear* for TensorRT)
        import onnx

        from usfm_edge.export.onnx_export import check_onnx_ops

        check_onnx_ops(onnx.load(str(quant["onnx"])), tgt.op_profile, quant["onnx"])
    return quant


def _add_openvino(w: BundleWriter, quantized_xml, onnx_path: Path, meta: BundleMeta) -> None:
    if quantized_xml:
        xml = Path(quantized_xml)
        w.add(xml, "model.xml")
        w.add(xml.with_suffix(".bin"), "model.bin")
    else:
        from usfm_edge.export.openvino_export import onnx2openvino

        onnx2openvino(onnx_path, w.file("model.xml"), meta.precision, metadata=meta.onnx_metadata())
    meta.files.update(openvino_xml="model.xml", openvino_bin="model.bin")


def _describe(meta: BundleMeta, model, source: dict, tgt: Target, cfg: ExportConfig, out: Path,
              engine_info: dict | None) -> None:
    """Complete the contract into ``usfm.json``: provenance, tools, name, device, notes."""
    hw = meta.input.static_hw
    if hw is not None:
        how = "given as frame_size" if cfg.frame_size is not None else \
            "the model input size, chosen because no frame_size was given"
        meta.notes.append(f"static input: the graph takes {hw[0]}x{hw[1]} frames ({how}); usfm_edge.runtime fits "
                          "frames of other sizes to it and maps the outputs back, other callers must resize "
                          "(re-export with frame_size for your scanner's size)")
    meta.model = {**meta.model, "embed_dim": getattr(getattr(model, "backbone", None), "embed_dim", None),
                  "bare": bool(cfg.bare), "config": _config(model)}
    meta.source, meta.tools = source, tool_versions()
    meta.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta.name, meta.device = out.name[: -len(BUNDLE_SUFFIX)], tgt.device_for(str(cfg.target))
    meta.extra = {"engine": engine_info} if engine_info else {}


def _parity_gate(folder: Path, meta: BundleMeta, model, spec: PreprocessSpec, mask, cfg: ExportConfig,
                 out: Path) -> None:
    """The bundle against the same graph in PyTorch fp32 on real frames; records ``meta.parity``; raises
    ValidationError on failure unless ``cfg.force``."""
    from usfm_edge.evaluation.torch_predictor import TorchPredictor
    from usfm_edge.runtime.engine import Engine

    if isinstance(cfg.verify_frames, str):  # a data source: its first 8 frames
        from usfm_edge.evaluation import select_records

        frames = [r.image for r in select_records(cfg.verify_frames, split="all")[:8]]
    elif cfg.verify_frames is not None:
        frames = list(cfg.verify_frames)
    else:  # INT8: held-out frames of the calibration sources (the model's domain); else the bundled sample
        frames = list(((meta.calibration or {}).get("report") or {}).get("parity_frames") or []) or default_frames()
    reference = TorchPredictor(model, spec, band_stop_mask=mask, bare=cfg.bare, static_hw=meta.input.static_hw)
    device = "auto" if (folder / "model.engine").is_file() else "cpu"  # the export machine may lack the target device
    with Engine.open(folder, device=device, warmup=0) as engine:
        results = run_parity(engine, reference, frames, meta.thresholds)
    meta.parity = results
    if not results["passed"]:
        msg = f"parity gate failed for {out.name} ({meta.precision}, {results['backend']}): " + \
            "; ".join(results["failures"])
        if not cfg.force:
            raise ValidationError(msg, path=out, results=results,
                                  hint="inspect the numbers; force=True keeps the bundle anyway")
        log.warning("%s (kept because force=True)", msg)
        meta.notes.append("PARITY GATE FAILED; bundle kept with force=True")


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


