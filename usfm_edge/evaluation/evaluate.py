"""Evaluate a fine-tuned checkpoint or an exported bundle on real frames, through one code path.

A *predictor* is anything with ``predict(frame: uint8 (H, W)) -> Result`` (``usfm_edge.runtime`` result types):
``runtime.Engine`` for bundles, ``evaluation.TorchPredictor`` (an Engine on the PyTorch model) for checkpoints.
The torch predictor runs the very graph that export writes (``models.raw_frame.RawFrameModel``), so an fp32
bundle and its checkpoint are scored identically and an INT8 bundle differs only by what quantisation changed.
Frames of any size go to the predictor as they are: a static-shape bundle's Engine fits them itself.

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
from usfm_edge.evaluation.records import describe_selection, evenly_spaced, read_frame, read_mask, select_records

__all__ = ["evaluate_predictor", "open_predictor", "evaluate", "PRIMARY"]


def _degraded(frame: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from usfm_edge.data.degrade import degrade

    clean = frame.astype(np.float32) / 255.0
    bad = degrade(clean, np.random.default_rng(seed))
    return clean, np.clip(np.round(bad * 255.0), 0, 255).astype(np.uint8)


def evaluate_predictor(predictor, records: Sequence, task: str, *, degrade_seed: int = 0,
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
            res = predictor.predict(read_frame(r))
            preds.append(res.mask)
            gts.append(read_mask(r))
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
            probs.append(predictor.predict(read_frame(r)).probs)
            labels.append(r.label)
        out = M.cls_metrics(np.stack(probs), np.asarray(labels))
    elif task == "enhance":
        preds, targets, inputs = [], [], []
        for i, r in enumerate(it):
            clean, bad = _degraded(read_frame(r), degrade_seed + i)
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


def open_predictor(path: str | Path, backend: str = "auto", device: str = "auto", trusted_keys=None):
    """A checkpoint (``.safetensors``) -> ``TorchPredictor``; a bundle folder -> ``runtime.Engine`` (any frame size,
    static-shape bundles included; ``trusted_keys``: it must be signed by one of them). Returns
    ``(predictor, task, info)``."""
    path = Path(path)
    if path.is_dir():
        from usfm_edge.runtime import Engine

        eng = Engine.open(path, backend=backend, device=device, trusted_keys=trusted_keys or None)
        info = {"kind": "bundle", "backend": getattr(eng.backend, "name", "?"), "precision": eng.meta.precision}
        if eng.meta.input.static_hw:
            info["frames_resized_to"] = list(eng.meta.input.static_hw)  # by the engine, outputs mapped back
        return eng, eng.task, info
    if trusted_keys:
        raise ConfigError("trusted keys check a bundle's signature; a checkpoint file has none", path=path,
                          hint="export the checkpoint to a bundle and sign it, or drop --trusted-key")
    from usfm_edge.evaluation.torch_predictor import TorchPredictor
    from usfm_edge.models.tasks import load_task_model

    model = load_task_model(path)
    dev = "cuda" if device == "auto" and _cuda() else ("cpu" if device == "auto" else device)
    return TorchPredictor(model, device=dev), model.task, {"kind": "checkpoint", "backend": "torch", "precision": "fp32"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluate(path: str | Path, data: str | Sequence[str], split: str = "val", val_fraction: float = 0.2,
             seed: int = 0, limit: int | None = None, backend: str = "auto", device: str = "auto",
             progress: Callable | None = None, trusted_keys=None) -> dict:
    """Evaluate a checkpoint or bundle on a data source's held-out split; returns metrics + provenance.

    ``scored`` says what was scored (:func:`describe_selection`: frames, patients, split).
    """
    predictor, task, info = open_predictor(path, backend=backend, device=device, trusted_keys=trusted_keys)
    chosen = select_records(data, split=split, val_fraction=val_fraction, seed=seed)
    records = evenly_spaced(chosen, limit)
    scored = describe_selection(records, split, val_fraction, seed, of=len(chosen))
    try:
        result = evaluate_predictor(predictor, records, task, progress=progress)
    finally:
        predictor.close()
    return {"task": task, "source": str(path), **info, "data": data if isinstance(data, str) else list(data),
            "split": split, "scored": scored, "metrics": result}
