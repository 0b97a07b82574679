"""The INT8 accuracy gate: the quantised artifact against its fp32 source on held-out real frames.

Both models run through ``runtime.Engine`` (``Engine.from_file``: frames of any size, a static-shape graph's
frames fitted and its outputs mapped back by the engine, as for a bundle) and are scored by the one evaluation path, ``usfm_edge.evaluation.evaluate_predictor``, with the task metric:
Dice (seg), AUC (cls; accuracy when the held-out set has one class) or PSNR (enhance). On top, per output:
raw cosine and **centred** cosine (the fp32 mean output over the evaluation frames is subtracted from both
sides first: raw cosine hides damage, reference/perf-baseline.md §2), and for seg the agreement (Dice) of the
int8 mask with the fp32 mask.

The gate fails when the primary metric drops by more than ``max_drop`` (fp32 - int8, absolute), the mean
centred cosine of the main output falls below ``recipe.min_centred_cosine``, or (HC18-style records with a
reference head circumference, when ``recipe.max_hc_increase_mm`` is set) the mean absolute head-circumference
error grows by more than that many mm; the HC change is always reported as ``hc_increase_mm``. On failure,
:func:`sensitivity_report` lists the layers that add most error (int8 vs fp32 intermediate outputs, one run
of each graph on a few frames): the first candidates to keep in float.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from usfm_edge.core.bundle_schema import BundleMeta
from usfm_edge.evaluation.records import read_frame
from usfm_edge.export.parity import cosine, mask_dice, result_arrays
from usfm_edge.runtime.engine import Engine
from usfm_edge.runtime.results import resize_maps

__all__ = ["accuracy_gate", "sensitivity_report", "fidelity", "centred_cosines"]

log = logging.getLogger(__name__)
_MAIN = {"seg": "probs", "cls": "probs", "enhance": "restored", "features": "features"}


class _Recorded:
    """An engine whose every result is also kept as arrays (the fidelity comparison of int8 vs fp32)."""

    def __init__(self, engine: Engine):
        self.engine, self.task = engine, engine.task
        self.outputs: list[dict[str, np.ndarray]] = []

    def predict(self, frame: np.ndarray):
        res = self.engine.predict(frame)
        self.outputs.append(result_arrays(res))
        return res

    def close(self) -> None:
        self.engine.close()


def _open(path: str | Path, meta: BundleMeta, backend: str, precision: str) -> _Recorded:
    """A model file run like a bundle: ``fp32`` makes OpenVINO compute in f32 (never bf16); TensorRT Q/DQ graphs
    are run by ONNX Runtime here."""
    return _Recorded(Engine.from_file(path, dataclasses.replace(meta, precision=precision), backend))


def centred_cosines(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], grid: int) -> list[float] | None:
    """Per-frame cosine after subtracting the mean fp32 output over all frames (maps resampled to ``grid``²).

    Returns None for fewer than two frames (the centred value is undefined).
    """
    if len(ref) < 2:
        return None

    def g(a):
        a = np.asarray(a, np.float64)
        return resize_maps(a, (grid, grid)) if a.ndim >= 2 else a

    r, q = [g(a) for a in ref], [g(a) for a in got]
    mean = np.mean(r, axis=0)
    return [cosine(a - mean, b - mean) for a, b in zip(r, q)]


def fidelity(ref: list[dict], got: list[dict], grid: int) -> dict:
    """Raw/centred cosine per float output and mask agreement (seg) of int8 vs fp32 outputs."""
    out = {}
    for name in ref[0] if ref else []:
        if name == "mask":
            ag = [mask_dice(a["mask"], b["mask"], min_fraction=0.0) for a, b in zip(ref, got)]
            out["mask"] = {"agreement_mean": round(float(np.mean(ag)), 5), "agreement_min": round(float(min(ag)), 5)}
            continue
        raw = [cosine(a[name], b[name]) for a, b in zip(ref, got)]
        cc = centred_cosines([a[name] for a in ref], [b[name] for b in got], grid)
        out[name] = {"cosine_mean": round(float(np.mean(raw)), 5), "cosine_min": round(float(min(raw)), 5),
                     "centred_cosine_mean": None if cc is None else round(float(np.mean(cc)), 5),
                     "centred_cosine_min": None if cc is None else round(float(min(cc)), 5)}
    return out


def _has_target(task: str, r) -> bool:
    return {"seg": r.mask is not None, "cls": r.label is not None, "enhance": True}.get(task, False)


def accuracy_gate(fp32_path: str | Path, int8_path: str | Path, meta: BundleMeta, records: Sequence,
                  recipe, backend: str = "onnxruntime", max_drop: float | None = None,
                  fp32_backend: str | None = None) -> dict:
    """Score the INT8 artifact against its fp32 source on held-out records; never raises on failure.

    Args:
        fp32_path: the fp32 graph (ONNX, or fp32 IR).
        int8_path: the quantised artifact.
        meta: the graph contract (``BundleMeta``).
        records: held-out records (patients not used for calibration); labels/masks enable the task metric.
        recipe: the ``QuantRecipe`` (``min_centred_cosine``, ``gate_frames``).
        backend: runtime backend of the INT8 artifact (``tensorrt`` Q/DQ runs in ONNX Runtime here).
        max_drop: allowed primary-metric drop (None = recipe/task default).
        fp32_backend: backend for the fp32 model (default: the same as the INT8 one).

    Returns:
        ``{"passed", "failures", "metric", "fp32", "int8", "drop", "max_drop", "fidelity", "frames", ...}``.
    """
    t0 = time.perf_counter()
    run_backend = "openvino" if backend == "openvino" else "onnxruntime"
    records = list(records)
    if len(records) > recipe.gate_frames:
        idx = np.linspace(0, len(records) - 1, recipe.gate_frames).round().astype(int)
        records = [records[i] for i in idx]
    task = meta.task
    max_drop = recipe.max_drop_for(task) if max_drop is None else float(max_drop)
    preds = [_open(fp32_path, meta, fp32_backend or run_backend, "fp32"), _open(int8_path, meta, run_backend, "int8")]
    scored = [r for r in records if _has_target(task, r)]
    metric, scores, notes = None, [{}, {}], []
    try:
        if task in ("seg", "cls", "enhance") and scored:
            from usfm_edge.evaluation import PRIMARY, evaluate_predictor  # the one scoring path

            scores = [evaluate_predictor(p, scored, task) for p in preds]
            metric = PRIMARY[task]
            if task == "cls" and any(math.isnan(float(s.get("auc", float("nan")))) for s in scores):
                metric = "accuracy"
                notes.append("AUC undefined on the held-out frames (one class): accuracy used")
        else:
            notes.append("no held-out labels for the task metric: fidelity only")
            for p in preds:
                for r in records:
                    p.predict(read_frame(r))
    finally:
        for p in preds:
            p.close()
    fid = fidelity(preds[0].outputs, preds[1].outputs, int(meta.preprocessing["img_size"]))
    failures = []
    drop = None
    if metric is not None:
        drop = float(scores[0][metric]) - float(scores[1][metric])
        if max_drop is not None and drop > max_drop:
            failures.append(f"{metric} drop {drop:.4f} > max_drop {max_drop} "
                            f"(fp32 {scores[0][metric]:.4f}, int8 {scores[1][metric]:.4f})")
    hc_increase = None
    if all("hc_mae_mm" in sc for sc in scores):  # fetal-head records with a reference circumference (HC18)
        hc_increase = float(scores[1]["hc_mae_mm"]) - float(scores[0]["hc_mae_mm"])
        limit = recipe.max_hc_increase_mm
        if limit is not None and hc_increase > limit:
            failures.append(f"head-circumference error up {hc_increase:.2f} mm > {limit} mm "
                            f"(fp32 {scores[0]['hc_mae_mm']:.2f}, int8 {scores[1]['hc_mae_mm']:.2f} mm)")
    main = fid.get(_MAIN.get(task, ""), {})
    cc = main.get("centred_cosine_mean")
    if cc is not None and cc < recipe.min_centred_cosine:
        failures.append(f"{_MAIN[task]}: mean centred cosine {cc:.4f} < {recipe.min_centred_cosine}")
    keep = ("dice", "iou", "hd95", "auc", "accuracy", "balanced_accuracy", "psnr", "ssim", "hc_mae_mm")

    def pick(s: dict) -> dict:
        return {k: (round(float(v), 5) if math.isfinite(float(v)) else None) for k, v in s.items()
                if k in keep and v is not None}

    return {"passed": not failures, "failures": failures, "task": task, "metric": metric,
            "fp32": pick(scores[0]), "int8": pick(scores[1]), "drop": None if drop is None else round(drop, 5),
            "hc_increase_mm": None if hc_increase is None else round(hc_increase, 3),
            "max_drop": max_drop, "max_hc_increase_mm": recipe.max_hc_increase_mm, "min_centred_cosine": recipe.min_centred_cosine, "fidelity": fid,
            "frames": len(preds[0].outputs), "scored_frames": len(scored) if metric else 0,
            "held_out_patients": len({(r.organ, r.patient) for r in records}),
            "backend": run_backend, "notes": notes, "seconds": round(time.perf_counter() - t0, 2)}


def sensitivity_report(fp32_path: str | Path, int8_path: str | Path, meta: BundleMeta, frames: Sequence[np.ndarray],
                       backend: str, workdir: str | Path, top_k: int = 5) -> dict:
    """The ``top_k`` layers whose quantisation adds most error (int8 vs fp32 intermediate outputs).

    ``added`` = relative L2 error of the layer's output minus the largest error on its float inputs.
    """
    t0 = time.perf_counter()
    frames = list(frames)[:4]
    try:
        if backend == "openvino":
            from usfm_edge.calibration.backends.nncf_openvino import openvino_layer_errors

            rows = openvino_layer_errors(fp32_path, int8_path, frames, meta)
        else:
            from usfm_edge.calibration.backends.ort_qdq import onnx_layer_errors

            rows = onnx_layer_errors(fp32_path, int8_path, frames, workdir)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the gate's own result
        log.warning("sensitivity analysis failed: %s", exc)
        return {"method": "intermediate outputs", "error": f"{type(exc).__name__}: {exc}", "layers": []}
    rows.sort(key=lambda r: r["added"], reverse=True)
    return {"method": "int8 vs fp32 intermediate outputs (relative L2), error added per layer",
            "frames": len(frames), "layers": rows[:top_k], "quantized_layers": len(rows),
            "hint": "keep these layers in float (nodes_to_exclude / nncf.IgnoredScope) or improve the calibration set",
            "seconds": round(time.perf_counter() - t0, 2)}
