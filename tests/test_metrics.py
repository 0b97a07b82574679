"""Evaluation metrics (numpy only) against hand-computed cases, scikit-learn and a naive SSIM reference."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from usfm_edge.core import metrics as M

ROOT = Path(__file__).resolve().parents[1]


def _square(shift=(0, 0), size=64, lo=10, hi=30) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[lo + shift[0]:hi + shift[0], lo + shift[1]:hi + shift[1]] = 1
    return m


def test_metrics_module_is_numpy_only():
    code = ("import sys, usfm_edge.core.metrics, usfm_edge.data.degrade; "
            "print(sorted(m for m in ('torch', 'scipy', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_dice_iou_hand_computed():
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[:2, :2] = 1  # 4 px
    b[:2, :3] = 1  # 6 px, 4 shared
    assert M.dice(a, b) == pytest.approx(8 / 10) and M.iou(a, b) == pytest.approx(4 / 6)
    empty = np.zeros((4, 4))
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(a, empty) == 0.0 and M.iou(empty, a) == 0.0
    assert M.dice(a * 2, a) == 1.0  # any non-zero label is foreground


@pytest.mark.parametrize("shift", [(3, 0), (0, 5), (-2, 0)])
def test_hd95_shifted_squares_equals_shift(shift):
    a, b = _square(), _square(shift)
    assert M.hd95(a, b) == pytest.approx(max(abs(s) for s in shift))
    assert M.hd95(a, a) == 0.0
    assert M.hd95(a, b, spacing=0.5) == pytest.approx(0.5 * max(abs(s) for s in shift))


def test_hd95_matches_distance_transform_reference():
    ndi = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    a = ndi.gaussian_filter(rng.random((48, 48)), 3) > 0.5  # random blobs, some touching the border
    b = ndi.gaussian_filter(rng.random((48, 48)), 3) > 0.5
    assert a.any() and b.any()
    cross = ndi.generate_binary_structure(2, 1)

    def surface(m):
        return m & ~ndi.binary_erosion(m, cross, border_value=0)

    da = ndi.distance_transform_edt(~surface(b))[surface(a)]
    db = ndi.distance_transform_edt(~surface(a))[surface(b)]
    assert M.hd95(a, b) == pytest.approx(max(np.percentile(da, 95), np.percentile(db, 95)))


def test_hd95_empty_conventions():
    empty = np.zeros((8, 8))
    assert M.hd95(empty, empty) == 0.0
    assert math.isnan(M.hd95(_square(size=40), np.zeros((40, 40))))


def test_seg_metrics_merges_foreground_and_averages_per_image():
    t = _square()
    p = _square((0, 5)) * 2  # class 2 predicted: merged with class 1
    out = M.seg_metrics([p, t, np.zeros_like(t)], [t, t, np.zeros_like(t)])
    assert out["n"] == 3
    assert out["dice"] == pytest.approx((M.dice(p, t) + 1 + 1) / 3)
    assert out["iou"] == pytest.approx((M.iou(p, t) + 1 + 1) / 3)
    assert out["hd95"] == pytest.approx((5 + 0 + 0) / 3) and out["hd95_undefined"] == 0
    out = M.seg_metrics([np.zeros_like(t)], [t])
    assert out["dice"] == 0.0 and math.isnan(out["hd95"]) and out["hd95_undefined"] == 1
    assert out["sensitivity"] == 0.0 and out["specificity"] == 1.0


def test_classification_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounded: many ties
    assert M.roc_auc(s, y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert M.roc_auc(np.stack([1 - s, s], 1), y) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    y4 = rng.integers(0, 4, 400)
    p4 = rng.dirichlet(np.ones(4), 400)
    p4[np.arange(400), y4] += 0.2
    p4 /= p4.sum(1, keepdims=True)
    assert M.roc_auc(p4, y4) == pytest.approx(sk.roc_auc_score(y4, p4, multi_class="ovr", average="macro"), abs=1e-12)
    pred4, pred2 = p4.argmax(1), (s > 0.5).astype(int)
    assert M.f1(pred4, y4, "macro") == pytest.approx(sk.f1_score(y4, pred4, average="macro"))
    assert M.f1(pred2, y, "binary") == pytest.approx(sk.f1_score(y, pred2))
    assert M.balanced_accuracy(pred4, y4) == pytest.approx(sk.balanced_accuracy_score(y4, pred4))
    assert M.accuracy(pred4, y4) == pytest.approx(sk.accuracy_score(y4, pred4))
    out = M.cls_metrics(p4, y4)
    assert out["auc"] == pytest.approx(M.roc_auc(p4, y4)) and out["n"] == 400
    assert set(out) == {"accuracy", "balanced_accuracy", "f1_macro", "auc", "n"}


def test_classification_hand_cases():
    assert M.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert M.roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts one half
    assert math.isnan(M.roc_auc([0.1, 0.2], [1, 1]))
    assert M.f1([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(0.8)
    assert M.balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 1]) == 1.0
    assert M.balanced_accuracy([0, 0, 0, 0], [0, 0, 0, 1]) == 0.5
    out = M.cls_metrics(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]), np.array([0, 1, 1, 1]))
    assert out["accuracy"] == 0.75 and out["sensitivity"] == pytest.approx(2 / 3) and out["specificity"] == 1.0


def _naive_ssim(x, y, data_range=1.0, sigma=1.5, win=11):
    """Direct transcription of Wang et al. (2004): weighted local statistics window by window."""
    r = np.arange(win) - win // 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a, b = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
            ma, mb = (g * a).sum(), (g * b).sum()
            va, vb = (g * (a - ma) ** 2).sum(), (g * (b - mb) ** 2).sum()
            cov = (g * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_and_psnr():
    rng = np.random.default_rng(2)
    x = rng.random((24, 30))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    assert M.ssim(x, x) == pytest.approx(1.0)
    assert M.ssim(x, y) == pytest.approx(_naive_ssim(x, y), abs=1e-10)
    assert M.ssim(x * 255, y * 255, data_range=255) == pytest.approx(M.ssim(x, y), abs=1e-10)
    assert M.psnr(x, x) == math.inf
    assert M.psnr(np.zeros(4), np.full(4, 0.1)) == pytest.approx(20.0)
    out = M.enhance_metrics([x], [x], inputs=[y])
    assert out["psnr"] == math.inf and out["ssim"] == pytest.approx(1.0) and out["ssim_input"] < 1.0
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return
    ref = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert M.ssim(x, y) == pytest.approx(ref, abs=1e-6)


def test_fit_ellipse_synthetic():
    yy, xx = np.mgrid[:200, :260]
    cx, cy, a, b, th = 130.0, 95.0, 70.0, 40.0, 0.4
    u = (xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)
    v = -(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)
    mask = (u / a) ** 2 + (v / b) ** 2 <= 1
    mask[5:9, 5:9] = True  # a spurious blob, dropped as a small component
    fx, fy, fa, fb, ft = M.fit_ellipse(mask)
    assert (fx, fy) == pytest.approx((cx, cy), abs=0.3)
    assert (fa, fb) == pytest.approx((a, b), abs=0.5)
    assert ft % math.pi == pytest.approx(th, abs=0.01)
    ramanujan = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
    assert M.head_circumference_mm(mask, 0.1) == pytest.approx(0.1 * ramanujan, rel=0.01)
    assert M.head_circumference_mm(np.zeros((5, 5)), 0.1) == 0.0
    with pytest.raises(ValueError):
        M.fit_ellipse(np.zeros((5, 5)))


def _hc18_dir(sample_dir: Path) -> Path:
    for d in (sample_dir / "hc18", ROOT.parent / "shared" / "data" / "hc18"):
        if (d / "training_set_pixel_size_and_HC.csv").is_file():
            return d
    pytest.skip("no HC18 data: neither the bundled sample nor /work/shared/data/hc18 is present")


def test_head_circumference_on_real_hc18_annotations(sample_dir):
    ndi = pytest.importorskip("scipy.ndimage")
    from PIL import Image

    root = _hc18_dir(sample_dir)
    with open(root / "training_set_pixel_size_and_HC.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    rows = [r for r in rows if (root / "training_set" / r[0].replace(".png", "_Annotation.png")).is_file()][:5]
    if not rows:
        pytest.skip(f"no HC18 annotations under {root}")
    masks, sizes, refs = [], [], []
    for name, pixel, ref in rows:
        outline = np.asarray(Image.open(root / "training_set" / name.replace(".png", "_Annotation.png")).convert("L"))
        masks.append(ndi.binary_fill_holes(outline > 0))
        sizes.append(float(pixel))
        refs.append(float(ref))
        assert abs(M.head_circumference_mm(masks[-1], sizes[-1]) - refs[-1]) < 2.0, name
    out = M.hc_metrics(masks, sizes, refs)
    assert out["n"] == len(rows) and out["hc_mae_mm"] < 2.0 and out["hc_empty"] == 0
    assert sum(v for k, v in out.items() if k.startswith("hc_n_")) == len(rows)


def test_hc_metrics_size_bins():
    yy, xx = np.mgrid[:300, :300]
    masks = [((xx - 150) / r) ** 2 + ((yy - 150) / r) ** 2 <= 1 for r in (20, 40, 60)]
    hc = [M.head_circumference_mm(m, 1.0) for m in masks]  # ~126, ~251, ~377 mm at 1 mm per pixel
    out = M.hc_metrics(masks, [1.0] * 3, [hc[0] + 1.0, hc[1] - 2.0, 260.0])
    assert out["hc_n_lt150"] == 1 and out["hc_n_150_250"] == 1 and out["hc_n_gt250"] == 1
    assert out["hc_mae_mm_lt150"] == pytest.approx(1.0) and out["hc_mean_diff_mm_lt150"] == pytest.approx(-1.0)
    assert out["hc_mae_mm_150_250"] == pytest.approx(2.0) and out["hc_mean_diff_mm_150_250"] == pytest.approx(2.0)
    # the same errors in pixels and relative to the reference
    assert out["hc_mae_px_lt150"] == pytest.approx(1.0) and out["hc_rel_err_pct_lt150"] == pytest.approx(100 / (hc[0] + 1))
    # at 0.5 mm per pixel a 2 mm error is 4 pixels
    half = M.hc_metrics([masks[1]], [0.5], [hc[1] * 0.5 - 2.0])
    assert half["hc_mae_mm"] == pytest.approx(2.0) and half["hc_mae_px"] == pytest.approx(4.0)
    assert half["hc_rel_err_pct"] == pytest.approx(200 / (hc[1] * 0.5 - 2.0))
