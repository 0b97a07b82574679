"""Overlays a reader can trust: text that fits the frame, the fitted head ellipse, the reference outline."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")

from usfm_edge.core.geometry import fit_ellipse  # noqa: E402
from usfm_edge.data.readers import read_image  # noqa: E402
from usfm_edge.data.sources import load_records, read_record_mask  # noqa: E402
from usfm_edge.runtime import overlay  # noqa: E402


def _text_bands(rgb: np.ndarray) -> int:
    """Number of separate horizontal bands holding white text pixels."""
    rows = (rgb > 200).all(-1).any(1)
    return int(np.sum(rows[1:] & ~rows[:-1]) + rows[0])


def test_long_text_is_shrunk_or_wrapped_never_cut():
    frame = np.full((120, 220), 128, np.uint8)
    line = "HC: pixel spacing unknown: give --pixel-spacing or a DICOM with PixelSpacing"
    out = overlay.draw_text(np.repeat(frame[..., None], 3, -1), [line])
    assert out.shape == (120, 220, 3)
    white_cols = np.flatnonzero((out > 200).all(-1).any(0))
    assert white_cols.max() < 220 - 2  # the text ends inside the frame
    assert _text_bands(out) >= 2  # too long for one line at the smallest size: wrapped


def test_seg_overlay_draws_ellipse_and_reference(sample_dir):
    r = load_records(f"hc18:{sample_dir / 'hc18'}")[0]
    frame, ref = read_image(r.image), read_record_mask(r)
    e = fit_ellipse(ref)
    out = overlay.seg_overlay(frame, ref, ["background", "fetal_head"], ["fetal_head"], ellipses=[e], reference=ref)
    cyan = (out[..., 0] < 40) & (out[..., 1] > 180) & (out[..., 2] > 220)
    ys, xs = np.nonzero(cyan)
    # every cyan pixel lies on the fitted ellipse (within 2 px)
    c, s = np.cos(e.theta), np.sin(e.theta)
    u, v = (xs - e.cx) * c + (ys - e.cy) * s, -(xs - e.cx) * s + (ys - e.cy) * c
    rho = np.sqrt((u / e.a) ** 2 + (v / e.b) ** 2)
    assert len(xs) > 200 and np.abs(rho - 1).max() * min(e.a, e.b) < 3.0
    white = (out == 255).all(-1)
    assert white.sum() > 100  # the reference outline (and the text) in white

