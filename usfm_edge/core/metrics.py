"""Evaluation metrics for segmentation, classification, enhancement and head circumference (numpy only).

No torch and no scipy: the torch-free runtime scores bundles with this module. Arguments always put the
**prediction first** (``dice(pred, target)``, ``f1(pred, target)``, ``roc_auc(scores, target)``); note that
scikit-learn puts ``y_true`` first.

Conventions for empty inputs (documented so numbers from different tools can be compared):

* ``dice`` / ``iou``: both masks empty -> 1.0 (nothing to find, nothing found); one empty -> 0.0.
* ``hd95``: both empty -> 0.0; exactly one empty -> ``nan`` (undefined); ``seg_metrics`` averages the
  defined values and reports ``hd95_undefined`` (how many images had none).
* sensitivity without positive pixels and specificity without negative pixels -> 1.0 (as USFM's smoothed
  ratios give).
* ``roc_auc``: a class without positives or without negatives has no AUC: ``nan`` for binary, skipped in
  the one-vs-rest macro mean.
* ``f1``: a class never predicted and never present scores 0 where it is averaged (sklearn
  ``zero_division=0``); by default the macro mean runs over the classes present in ``pred`` or ``target``.
* ``psnr`` of identical images -> ``inf``; ``head_circumference_mm`` of an empty mask -> 0.0.

Segmentation follows USFM's reporting (dossier §3.1): per-image metrics with every foreground class merged
(``pred >= 1``), then mean and std over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from usfm_edge.core.geometry import HC_SIZE_BINS, fit_ellipse, head_circumference_mm

__all__ = ["dice", "iou", "hd95", "seg_metrics", "accuracy", "balanced_accuracy", "roc_auc", "f1", "cls_metrics",
           "psnr", "ssim", "enhance_metrics", "fit_ellipse", "head_circumference_mm", "hc_metrics"]


# -- segmentation --------------------------------------------------------------------------------------
def _counts(pred, target) -> tuple[int, int, int, int]:
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} differ in shape")
    tp = int(np.count_nonzero(p & t))
    fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp
    return tp, fp, fn, p.size - tp - fp - fn


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient 2|P & T| / (|P| + |T|) of two masks (non-zero = foreground)."""
    tp, fp, fn, _ = _counts(pred, target)
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union |P & T| / |P | T| of two masks (non-zero = foreground)."""
    tp, fp, fn, _ = _counts(pred, target)
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask (pixels on the image edge count as boundary)."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _directed_distances(a: np.ndarray, b: np.ndarray, max_elems: int = 4_000_000) -> np.ndarray:
    """For each point of ``a`` (N, 2) the Euclidean distance to the nearest point of ``b`` (M, 2)."""
    out = np.empty(len(a))
    bb = (b * b).sum(1)
    step = max(1, max_elems // max(len(b), 1))
    for i in range(0, len(a), step):
        ai = a[i:i + step]
        d2 = (ai * ai).sum(1)[:, None] + bb[None, :] - 2.0 * ai @ b.T
        out[i:i + step] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def hd95(pred: np.ndarray, target: np.ndarray, spacing: float | Sequence[float] = 1.0) -> float:
    """95th-percentile symmetric Hausdorff distance between the mask boundaries.

    The boundaries are the 4-connected contour pixels of each mask; the distances from every boundary pixel of
    one mask to the nearest boundary pixel of the other are computed exactly (the same values as a Euclidean
    distance transform), and the result is ``max(p95(pred -> target), p95(target -> pred))`` (MONAI's
    definition), in the units of ``spacing`` (a scalar or per-axis ``(row, col)`` pixel size).

    Returns:
        The distance; 0.0 when both masks are empty and ``nan`` when only one is.
    """
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} differ in shape")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("nan")
    scale = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (p.ndim,))
    bp = np.argwhere(_boundary(p)) * scale
    bt = np.argwhere(_boundary(t)) * scale
    return float(max(np.percentile(_directed_distances(bp, bt), 95), np.percentile(_directed_distances(bt, bp), 95)))


def seg_metrics(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], spacing: float = 1.0,
                with_hd95: bool = True) -> dict:
    """Per-image segmentation metrics (all foreground classes merged: ``label >= 1``), averaged over images.

    Args:
        preds, targets: label maps (H, W) per image (a stacked (N, H, W) array works too); sizes may differ
            between images but not between a prediction and its target.
        spacing: pixel size for ``hd95``.
        with_hd95: compute ``hd95`` (the slowest metric).

    Returns:
        ``dice``, ``iou``, ``sensitivity``, ``specificity``, ``pixel_accuracy`` (means), ``dice_std``,
        ``iou_std``, ``hd95`` (mean over images where it is defined), ``hd95_undefined`` and ``n``.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")

    def ratio(num: int, den: int) -> float:
        return 1.0 if den == 0 else num / den

    rows = []
    for pred, target in zip(preds, targets):
        tp, fp, fn, tn = _counts(pred, target)
        rows.append((ratio(2 * tp, 2 * tp + fp + fn), ratio(tp, tp + fp + fn), ratio(tp, tp + fn), ratio(tn, tn + fp),
                     ratio(tp + tn, tp + fp + fn + tn), hd95(pred, target, spacing) if with_hd95 else 0.0))
    r = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    nan = float("nan")
    out: dict = {k: float(r[:, i].mean()) if len(r) else nan
                 for i, k in enumerate(("dice", "iou", "sensitivity", "specificity", "pixel_accuracy"))}
    out["dice_std"], out["iou_std"] = (float(r[:, 0].std()), float(r[:, 1].std())) if len(r) else (nan, nan)
    if with_hd95:
        ok = ~np.isnan(r[:, 5])
        out["hd95"], out["hd95_undefined"] = float(r[ok, 5].mean()) if ok.any() else nan, int((~ok).sum())
    out["n"] = len(r)
    return out


# -- classification -------------------------------------------------------------------------------------
def _labels(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions for {t.size} targets")
    return p, t


def accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of predicted labels equal to the target labels."""
    p, t = _labels(pred, target)
    return float(np.mean(p == t)) if t.size else float("nan")


def balanced_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean recall over the classes present in ``target`` (sklearn ``balanced_accuracy_score``)."""
    p, t = _labels(pred, target)
    recalls = [np.mean(p[t == c] == c) for c in np.unique(t)]
    return float(np.mean(recalls)) if recalls else float("nan")


def f1(pred: np.ndarray, target: np.ndarray, average: str = "binary", pos_label=1,
       classes: Sequence | None = None) -> float:
    """F1 score: ``binary`` (of ``pos_label``) or ``macro`` (unweighted mean over ``classes``, default the
    classes present in ``pred`` or ``target``)."""
    p, t = _labels(pred, target)

    def one(c) -> float:
        tp = np.count_nonzero((p == c) & (t == c))
        denom = np.count_nonzero(p == c) + np.count_nonzero(t == c)
        return 0.0 if denom == 0 else 2.0 * tp / denom

    if average == "binary":
        return one(pos_label)
    if average != "macro":
        raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
    cls = np.union1d(np.unique(p), np.unique(t)) if classes is None else classes
    return float(np.mean([one(c) for c in cls])) if len(cls) else float("nan")


def _rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    new = np.r_[True, x[order][1:] != x[order][:-1]]
    starts = np.flatnonzero(new)
    ends, ranks = np.r_[starts[1:], len(x)], np.empty(len(x))
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def _binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((_rank(scores)[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(scores: np.ndarray, target: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (tied scores count one half).

    ``scores``: (N,) positive-class scores (``target`` in {0, 1}), (N, 2) probabilities (column 1 is used) or
    (N, K) per-class scores for the one-vs-rest macro AUC; ``target``: (N,) integer labels.
    """
    s, t = np.asarray(scores, dtype=np.float64), np.asarray(target).ravel()
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim == 1:
        return _binary_auc(s, t == 1)
    aucs = [_binary_auc(s[:, k], t == k) for k in range(s.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def cls_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Classification metrics from (N, K) class probabilities (or (N,) positive-class ones) and (N,) labels.

    Returns ``accuracy``, ``balanced_accuracy`` (USFM selects checkpoints on it), ``f1_macro``, ``auc`` (binary or
    one-vs-rest macro) and ``n``; binary problems also get ``f1``, ``sensitivity`` and ``specificity``.
    """
    p, t = np.asarray(probs, dtype=np.float64), np.asarray(labels).astype(np.int64).ravel()
    pred = (p >= 0.5).astype(np.int64) if p.ndim == 1 else p.argmax(1)
    k = 2 if p.ndim == 1 else p.shape[1]
    out = {"accuracy": accuracy(pred, t), "balanced_accuracy": balanced_accuracy(pred, t),
           "f1_macro": f1(pred, t, "macro"), "auc": roc_auc(p, t), "n": int(t.size)}
    if k == 2:
        out["f1"] = f1(pred, t, "binary")
        pos, neg = t == 1, t == 0
        out["sensitivity"] = float(np.mean(pred[pos] == 1)) if pos.any() else 1.0
        out["specificity"] = float(np.mean(pred[neg] == 0)) if neg.any() else 1.0
    return out


# -- enhancement -------------------------------------------------------------------------------------------
def psnr(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)`` (``inf`` for identical images)."""
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    mse = float(np.mean((p - t) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gauss_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable filtering of the last two axes with ``w``, keeping only positions where it fits ('valid')."""
    n = len(w)
    h, wd = img.shape[-2] - n + 1, img.shape[-1] - n + 1
    rows = sum(w[k] * img[..., k:k + h, :] for k in range(n))
    return sum(w[k] * rows[..., k:k + wd] for k in range(n))


def ssim(pred: np.ndarray, target: np.ndarray, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, win_size: int = 11) -> float:
    """Structural similarity (Wang et al., IEEE TIP 2004) with an 11x11 Gaussian window (sigma 1.5).

    Gaussian-weighted local statistics without sample-covariance correction (the paper's definition; skimage's
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``), SSIM map averaged where the window fits
    inside the image. ``pred``, ``target``: (..., H, W) with H, W >= ``win_size``; leading axes are averaged.
    """
    x, y = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if x.shape != y.shape or x.ndim < 2 or min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs two images of one shape, each side >= {win_size}; got {x.shape}, {y.shape}")
    r = np.arange(win_size) - (win_size - 1) / 2.0
    w = np.exp(-(r ** 2) / (2 * sigma ** 2))
    w /= w.sum()
    mx, my = _gauss_valid(x, w), _gauss_valid(y, w)
    vx, vy = _gauss_valid(x * x, w) - mx * mx, _gauss_valid(y * y, w) - my * my
    cxy = _gauss_valid(x * y, w) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def enhance_metrics(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], inputs: Sequence | None = None,
                    data_range: float = 1.0) -> dict:
    """Mean ``psnr`` and ``ssim`` over images; with the degraded ``inputs`` also ``psnr_input`` and
    ``ssim_input`` (the do-nothing baseline the model has to beat)."""
    pairs = {"": preds} if inputs is None else {"": preds, "_input": inputs}
    out: dict = {}
    for suffix, images in pairs.items():
        out["psnr" + suffix] = float(np.mean([psnr(p, t, data_range) for p, t in zip(images, targets)]))
        out["ssim" + suffix] = float(np.mean([ssim(p, t, data_range) for p, t in zip(images, targets)]))
    out["n"] = len(targets)
    return out


# -- head circumference (HC18) ----------------------------------------------------------------------------
# One implementation of the ellipse fit and the circumference: core.geometry (re-exported here).
_BIN_KEYS = {"<150": "lt150", "150-250": "150_250", ">250": "gt250"}


def hc_metrics(pred_masks: Sequence[np.ndarray], pixel_sizes: Sequence[float], ref_hc_mm: Sequence[float]) -> dict:
    """HC18 head-circumference errors of predicted masks against the reference circumferences.

    Returns:
        ``hc_mae_mm`` (mean absolute difference), ``hc_mean_diff_mm`` (mean signed difference, pred - ref),
        ``hc_abs_diff_std_mm``, ``hc_empty`` (empty predictions, scored as a circumference of 0), ``n``, and per
        reference size bin (``core.geometry.HC_SIZE_BINS``: < 150, 150-250, > 250 mm) ``hc_mae_mm_lt150`` /
        ``_150_250`` / ``_gt250``, ``hc_mean_diff_mm_...`` and ``hc_n_...`` (bins without frames are left out).
        The same absolute error in frame pixels (``hc_mae_px``, ``hc_mae_px_...``) and relative to the
        reference (``hc_rel_err_pct``, ``hc_rel_err_pct_...``): late-trimester frames have ~1.7x larger pixels
        than mid-trimester ones, so an edge placed equally well costs more millimetres there (RESULTS.md §1.1).
    """
    if not len(pred_masks) == len(pixel_sizes) == len(ref_hc_mm) > 0:
        raise ValueError("pred_masks, pixel_sizes and ref_hc_mm must be non-empty and of the same length")
    hc = np.array([head_circumference_mm(m, s) for m, s in zip(pred_masks, pixel_sizes)], dtype=np.float64)
    ref = np.asarray(ref_hc_mm, dtype=np.float64)
    diff = hc - ref
    err = np.abs(diff)
    err_px = err / np.asarray(pixel_sizes, dtype=np.float64)
    err_rel = 100.0 * err / ref
    out = {"hc_mae_mm": float(err.mean()), "hc_mean_diff_mm": float(diff.mean()),
           "hc_abs_diff_std_mm": float(err.std()), "hc_mae_px": float(err_px.mean()),
           "hc_rel_err_pct": float(err_rel.mean()), "hc_empty": int((hc == 0).sum()), "n": int(diff.size)}
    for name, lo, hi in HC_SIZE_BINS:
        sel = (ref >= lo) & (ref < hi)
        if sel.any():
            key = _BIN_KEYS[name]
            out[f"hc_mae_mm_{key}"] = float(err[sel].mean())
            out[f"hc_mean_diff_mm_{key}"] = float(diff[sel].mean())
            out[f"hc_mae_px_{key}"] = float(err_px[sel].mean())
            out[f"hc_rel_err_pct_{key}"] = float(err_rel[sel].mean())
            out[f"hc_n_{key}"] = int(sel.sum())
    return out
