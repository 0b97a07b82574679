"""Evaluate a fine-tuned checkpoint or an exported bundle on real frames, through one code path.

A *predictor* is anything with ``predict(frame: uint8 (H, W)) -> Result`` (``usfm_edge.runtime`` result types):
``runtime.Engine`` for bundles, :class:`TorchPredictor` for checkpoints. The torch predictor runs the very
graph that export writes (``export.graph.RawFrameModel``: resize, normalise, model, post-processing at the
frame's own size), so an fp32 bundle and its checkpoint are scored identically and an INT8 bundle differs
only by what quantisation changed.

Metrics (``usfm_edge.core.metrics``): segmentation Dice / IoU / HD95 (pixels) per image with all foreground
classes merged, plus the HC18 head-circumference error in mm when the records carry pixel size and reference
HC; classification accuracy, balanced accuracy, AUC, F1; enhancement PSNR / SSIM of the restored frame against
the original, for frames degraded by ``data.degrade`` with a fixed seed per frame (and the same numbers for the
degraded input, the baseline to beat).

This module imports no torch at module level: bundles are evaluated on devices without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from usfm_edge.core import metrics as M
from usfm_edge.core.errors import ConfigError
from usfm_edge.data.readers import read_image
from usfm_edge.data.sources import Record, load_records, patient_split, read_record_mask


def select_records(data: str | Sequence[str], split: str = "val", val_fraction: float = 0.2, seed: int = 0,
                   limit: int | None = None) -> list[Record]:
    """Records of one or more sources, restricted to the held-out patient split used by fine-tuning.

    Args:
        split: ``val`` (held-out patients, the default: same split as ``finetune``), ``train`` or ``all``.
        val_fraction, seed: the patient-level split (must match the one used for training).
        limit: keep at most this many records (evenly spaced, deterministic).
    """
    specs = [data] if isinstance(data, str) else list(data)
    records = [r for s in specs for r in load_records(s)]
    if split != "all":
        train, val = patient_split(records, val_fraction=val_fraction, seed=seed)
        if split not in ("train", "val"):
            raise ConfigError(f"split must be train, val or all, got {split!r}")
        records = val if split == "val" else train
    if limit is not None and len(records) > limit:
        idx = np.linspace(0, len(records) - 1, limit).round().astype(int)
        records = [records[i] for i in idx]
    return records


def _degraded(frame: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from usfm_edge.data.degrade import degrade

    clean = frame.astype(np.float32) / 255.0
    bad = degrade(clean, np.random.default_rng(seed))
    return clean, np.clip(np.round(bad * 255.0), 0, 255).astype(np.uint8)


def evaluate_predictor(predictor, records: Sequence[Record], task: str, *, degrade_seed: int = 0,
                       progress: Callable | None = None) -> dict:
    """Score ``predictor`` on ``records`` with the task metric; returns a flat dict of numbers.

    Args:
        predictor: object with ``predict(frame) -> Result``.
        records: data records (seg needs masks, cls labels; enhance needs only images).
        task: ``seg``, ``cls`` or ``enhance``.
        degrade_seed: base seed of the enhancement degradation (frame i uses ``degrade_seed + i``).
        progress: optional callable wrapping the record iterator (e.g. ``tqdm``).
    """
    if not records:
        raise ConfigError("no records to evaluate")
    it = progress(records) if progress else records
    t0 = time.perf_counter()
    if task == "seg":
        preds, gts, hc_pred, hc_px, hc_ref = [], [], [], [], []
        for r in it:
            if r.mask is None:
                raise ConfigError(f"record {r.image} has no mask: cannot evaluate segmentation")
            res = predictor.predict(read_image(r.image))
            preds.append(res.mask)
            gts.append(read_record_mask(r))
            if r.hc_mm is not None and r.pixel_size_mm:
                hc_pred.append(res.mask > 0)
                hc_px.append(r.pixel_size_mm)
                hc_ref.append(r.hc_mm)
        out = M.seg_metrics(preds, gts)
        if hc_ref:
            out.update(M.hc_metrics(hc_pred, hc_px, hc_ref))
    elif task == "cls":
        probs, labels = [], []
        for r in it:
            if r.label is None:
                raise ConfigError(f"record {r.image} has no label: cannot evaluate classification")
            probs.append(predictor.predict(read_image(r.image)).probs)
            labels.append(r.label)
        out = M.cls_metrics(np.stack(probs), np.asarray(labels))
    elif task == "enhance":
        preds, targets, inputs = [], [], []
        for i, r in enumerate(it):
            clean, bad = _degraded(read_image(r.image), degrade_seed + i)
            preds.append(predictor.predict(bad).image.astype(np.float32) / 255.0)
            targets.append(clean)
            inputs.append(bad.astype(np.float32) / 255.0)
        out = M.enhance_metrics(preds, targets, inputs=inputs)
    else:
        raise ConfigError(f"cannot evaluate task {task!r}: choose seg, cls or enhance")
    out["n"] = len(records)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in out.items()}


PRIMARY = {"seg": "dice", "cls": "auc", "enhance": "psnr"}


class TorchPredictor:
    """Runs a ``TaskModel`` through the export graph in PyTorch, returning runtime result types."""

    def __init__(self, task_model, spec=None, device: str = "cpu"):
        import torch

        from usfm_edge.core.preprocess import PreprocessSpec
        from usfm_edge.export.graph import RawFrameModel

        spec = spec or getattr(task_model, "preprocess", None) or PreprocessSpec(img_size=task_model.img_size)
        if isinstance(spec, dict):
            spec = PreprocessSpec.from_dict(spec)
        self.task, self.labels = task_model.task, list(task_model.labels)
        self.device = torch.device(device)
        self.graph = RawFrameModel(task_model, spec).to(self.device).eval()
        self._torch = torch

    def predict(self, frame: np.ndarray):
        from usfm_edge.core.preprocess import check_frame
        from usfm_edge.runtime.results import ClsResult, EnhanceResult, FeaturesResult, SegResult, class_areas

        torch = self._torch
        gray = check_frame(frame)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.graph(torch.from_numpy(np.array(gray))[None].to(self.device))
        ms = (time.perf_counter() - t0) * 1000
        if self.task == "seg":
            probs, mask = (t[0].cpu().numpy() for t in out)
            px, _ = class_areas(mask, self.labels, None)
            return SegResult(mask=mask, probs=probs, labels=self.labels, areas_px=px, timing_ms=ms)
        if self.task == "cls":
            p = out[0].cpu().numpy()
            k = int(p.argmax())
            return ClsResult(probs=p, label=k, label_name=self.labels[k], labels=self.labels, timing_ms=ms)
        if self.task == "enhance":
            return EnhanceResult(image=out[0].cpu().numpy(), timing_ms=ms)
        return FeaturesResult(features=out[0].cpu().numpy(), timing_ms=ms)


class StaticSizeAdapter:
    """Score a static-shape bundle (jetson / tensorrt, one frame size) on frames of any size.

    Frames are resized to the bundle's size (``core.preprocess.fit_frame``: the bicubic resampling of the
    preprocessing, rounded back to uint8) and the result is mapped back to the frame with
    ``runtime.results.result_at_size`` (bilinear probabilities, their argmax as the mask), the rule the INT8
    accuracy gate uses too. Classification results need no resizing.
    """

    def __init__(self, engine, static_hw: tuple[int, int]):
        self.engine, self.static_hw = engine, tuple(static_hw)
        self.task, self.labels = engine.task, getattr(engine, "labels", [])

    def predict(self, frame: np.ndarray):
        from usfm_edge.core.preprocess import check_frame, fit_frame
        from usfm_edge.runtime.results import result_at_size

        gray = check_frame(frame)
        return result_at_size(self.engine.predict(fit_frame(gray, self.static_hw)), gray.shape)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def open_predictor(path: str | Path, backend: str = "auto", device: str = "auto"):
    """A checkpoint (``.safetensors``) -> TorchPredictor; a bundle folder -> ``runtime.Engine``. Returns (predictor, task, info)."""
    path = Path(path)
    if path.is_dir():
        from usfm_edge.runtime import Engine

        eng = Engine.open(path, backend=backend, device=device)
        static = eng.meta.input.static_hw
        info = {"kind": "bundle", "backend": getattr(eng.backend, "name", "?"), "precision": eng.meta.precision}
        if static:
            info["frames_resized_to"] = list(static)
            return StaticSizeAdapter(eng, static), eng.task, info
        return eng, eng.task, info
    from usfm_edge.models.tasks import load_task_model

    model = load_task_model(path)
    dev = "cuda" if device == "auto" and _cuda() else ("cpu" if device == "auto" else device)
    return TorchPredictor(model, device=dev), model.task, {"kind": "checkpoint", "backend": "torch", "precision": "fp32"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluate(path: str | Path, data: str | Sequence[str], split: str = "val", val_fraction: float = 0.2,
             seed: int = 0, limit: int | None = None, backend: str = "auto", device: str = "auto",
             progress: Callable | None = None) -> dict:
    """Evaluate a checkpoint or bundle on a data source's held-out split; returns metrics + provenance."""
    predictor, task, info = open_predictor(path, backend=backend, device=device)
    records = select_records(data, split=split, val_fraction=val_fraction, seed=seed, limit=limit)
    result = evaluate_predictor(predictor, records, task, progress=progress)
    return {"task": task, "source": str(path), **info, "data": data if isinstance(data, str) else list(data),
            "split": split, "metrics": result}
