"""The parity gate: every bundle is run through ``runtime.Engine`` on real frames and compared with PyTorch.

Both sides are predictors with the Engine's interface: the bundle's ``Engine`` and ``evaluation.TorchPredictor``
(the same raw-frame graph in PyTorch fp32, under the same contract: a static-shape bundle's reference fits the
frame to the same size). Each gets the frame as it is (any size) through ``predict``; neither side is fed a
resized frame by this module.

Per output and frame: max absolute error, cosine similarity (float64, flattened) and centred cosine
(means removed: raw cosine hides damage when every value shares a large offset, reference/perf-baseline.md);
for segmentation also the Dice between the bundle's and PyTorch's argmax masks (mean over the classes
present in either mask and covering at least 0.1% of the frame) and their pixel agreement. The worst frame counts. Limits per precision (``core.bundle_schema.default_thresholds``):

====== ============== ==========
prec.  min cosine     min Dice
====== ============== ==========
fp32   0.9999         0.99
fp16   0.999          0.98
int8   0.98 (loose)   0.90       (set properly by the quantisation work, from held-out accuracy)
====== ============== ==========
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import DataError
from usfm_edge.evaluation.records import default_frames, read_frame

__all__ = ["cosine", "centred_cosine", "mask_dice", "MIN_CLASS_FRACTION", "compare_outputs", "result_arrays",
           "run_parity", "default_frames"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays (flattened, float64); 1.0 when both are all zero."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def centred_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine after removing each array's mean (a near-constant output still has to match its pattern)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return cosine(a - a.mean(), b - b.mean())


#: classes covering less than this fraction of the frame in both masks are left out of the parity Dice: a
#: 5-pixel blob that loses 2 pixels scores Dice 0.75 while 99.998% of the pixels agree (seen on a weak test
#: model's BUS-BRA frame, ORT INT8). Their pixels still count in ``pixel_agreement``.
MIN_CLASS_FRACTION = 1e-3


def mask_dice(a: np.ndarray, b: np.ndarray, min_fraction: float = MIN_CLASS_FRACTION) -> float:
    """Mean Dice over the class ids present in either integer mask (1.0 for identical masks).

    Classes whose union covers less than ``min_fraction`` of the pixels are left out (0 keeps every class).
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    scores = []
    for c in np.union1d(np.unique(a), np.unique(b)):
        pa, pb = a == c, b == c
        if np.count_nonzero(pa | pb) < min_fraction * a.size:
            continue
        scores.append(2.0 * np.count_nonzero(pa & pb) / (np.count_nonzero(pa) + np.count_nonzero(pb)))
    return float(np.mean(scores)) if scores else 1.0


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: ``max_abs``, ``cosine``, ``cosine_centred``; for an output named ``mask`` also ``dice``."""
    out = {}
    for name, r in ref.items():
        if name not in got:
            raise DataError(f"the bundle did not return output '{name}'")
        g = got[name]
        if tuple(g.shape) != tuple(r.shape):
            out[name] = {"shape_mismatch": 1.0, "max_abs": float("inf"), "cosine": 0.0, "cosine_centred": 0.0}
            continue
        diff = np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64))
        m = {"max_abs": float(diff.max()) if diff.size else 0.0, "cosine": cosine(r, g),
             "cosine_centred": centred_cosine(r, g)}
        if name == "mask":
            m["dice"] = mask_dice(r, g)
            m["pixel_agreement"] = float(np.mean(np.asarray(r) == np.asarray(g)))
        out[name] = m
    return out


def result_arrays(res) -> dict[str, np.ndarray]:
    """A predictor's result as its outputs by name: seg ``probs`` and ``mask``, cls ``probs``, enhance
    ``restored``, features ``features`` (what parity and the INT8 gate compare)."""
    if res.task == "seg":
        return {"probs": res.probs, "mask": res.mask}
    if res.task == "cls":
        return {"probs": res.probs}
    if res.task == "enhance":
        return {"restored": res.image}
    return {"features": res.features}


def _as_frames(frames: Iterable) -> list[np.ndarray]:
    from usfm_edge.core.preprocess import check_frame

    return [check_frame(read_frame(f) if isinstance(f, (str, Path)) else f, name="verification frame") for f in frames]


def run_parity(engine, reference, frames: Iterable, thresholds: Mapping[str, float | None]) -> dict:
    """Compare a bundle with its PyTorch reference on real frames, both through ``predict``.

    Args:
        engine: an open ``runtime.Engine`` on the bundle.
        reference: the PyTorch fp32 predictor (``evaluation.TorchPredictor`` under the bundle's contract).
        frames: uint8 frames or image paths, of any size.
        thresholds: ``cosine`` (min over float outputs), ``dice`` (min, seg masks), optional ``max_abs``.

    Returns:
        ``{"passed", "failures", "frames", "backend", "device", "outputs": {name: worst metrics}, "per_frame"}``.
    """
    frames = _as_frames(frames)
    worst: dict[str, dict[str, float]] = {}
    per_frame = []
    for frame in frames:
        metrics = compare_outputs(result_arrays(reference.predict(frame)), result_arrays(engine.predict(frame)))
        per_frame.append({"hw": list(frame.shape), **metrics})
        for name, m in metrics.items():
            w = worst.setdefault(name, {})
            for k, v in m.items():
                better_high = k in ("cosine", "cosine_centred", "dice", "pixel_agreement")
                w[k] = min(w.get(k, v), v) if better_high else max(w.get(k, v), v)
    failures = []
    cos_min, dice_min, abs_max = thresholds.get("cosine"), thresholds.get("dice"), thresholds.get("max_abs")
    for name, w in worst.items():
        if w.get("shape_mismatch"):
            failures.append(f"{name}: output shape differs from PyTorch")
            continue
        if name == "mask":
            if dice_min is not None and w["dice"] < dice_min:
                failures.append(f"mask: Dice {w['dice']:.5f} < {dice_min}")
        elif cos_min is not None and w["cosine"] < cos_min:
            failures.append(f"{name}: cosine {w['cosine']:.6f} < {cos_min}")
        if abs_max is not None and name != "mask" and w["max_abs"] > abs_max:
            failures.append(f"{name}: max abs error {w['max_abs']:.3g} > {abs_max}")
    return {"passed": not failures, "failures": failures, "frames": len(frames),
            "backend": engine.backend.name, "device": str(engine.backend.device),
            "thresholds": dict(thresholds), "outputs": worst, "per_frame": per_frame}
