"""Overlay pictures of results (numpy + Pillow, OpenCV for ellipses): mask contours, the fitted head ellipse,
the reference outline, class label and probability, before/after.

Used by ``usfm-edge predict``; every function takes a uint8 grey ``(H, W)`` frame and returns an RGB uint8
``(H, W', 3)`` array, which :func:`png_bytes` encodes. Pillow is imported inside the functions.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

__all__ = ["PALETTE", "contour", "seg_overlay", "draw_ellipse", "cls_overlay", "enhance_overlay", "draw_text",
           "png_bytes"]

#: colours of classes 1, 2, ... (class 0 is the background and is not drawn)
PALETTE = ((255, 215, 0), (0, 230, 118), (41, 182, 246), (255, 82, 82), (224, 64, 251), (255, 145, 0))


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion; pixels outside the frame count as background."""
    p = np.pad(m, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Inner boundary of a binary mask, ``thickness`` pixels wide (bool ``(H, W)``)."""
    m = np.asarray(mask, dtype=bool)
    inner = m
    for _ in range(max(1, int(thickness))):
        inner = _erode(inner)
    return m & ~inner


def _rgb(gray: np.ndarray) -> np.ndarray:
    g = np.asarray(gray, dtype=np.uint8)
    return np.repeat(g[..., None], 3, axis=-1) if g.ndim == 2 else g[..., :3].copy()


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Split ``text`` at spaces into lines no wider than ``width`` pixels (a single long word stays whole)."""
    lines, cur = [], ""
    for word in text.split(" "):
        trial = f"{cur} {word}" if cur else word
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + [cur]


def draw_text(rgb: np.ndarray, lines: Sequence[str], color: tuple[int, int, int] = (255, 255, 255),
              origin: tuple[int, int] | None = None) -> np.ndarray:
    """Write text lines on a dark box in the top-left corner; returns a new array.

    The font scales with the frame (about 1/22 of the shorter side) and shrinks, down to 9 px, until the widest
    line fits the frame; lines still too wide are wrapped at spaces, so no text is cut at the frame's edge.
    """
    from PIL import Image, ImageDraw

    if not lines:
        return rgb
    h, w = rgb.shape[:2]
    size = int(np.clip(min(h, w) / 22, 10, 48))
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    x, y = origin or (max(2, size // 3), max(2, size // 3))
    avail = max(1, w - x - max(2, size // 3))
    while True:
        font = _font(size)
        if size <= 9 or max(draw.textlength(line, font=font) for line in lines) <= avail:
            break
        size -= 1
    x, y = origin or (max(2, size // 3), max(2, size // 3))
    avail = max(1, w - x - max(2, size // 3))
    lines = [part for line in lines for part in _wrap(draw, line, font, avail)]
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    width = max(b[2] - b[0] for b in boxes) + size // 2
    step = max(b[3] - b[1] for b in boxes) + size // 4
    draw.rectangle([x - size // 4, y - size // 4, min(w - 1, x + width), y + step * len(lines)], fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((x, y + i * step), line, fill=color, font=font)
    return np.asarray(img)


def seg_overlay(gray: np.ndarray, mask: np.ndarray, labels: Sequence[str], lines: Sequence[str] = (),
                alpha: float = 0.25, thickness: int | None = None, ellipses: Sequence[Sequence[float]] = (),
                reference: np.ndarray | None = None) -> np.ndarray:
    """The frame with each foreground class tinted (``alpha``) and its contour drawn in the class colour.

    Args:
        gray: uint8 ``(H, W)`` frame.
        mask: class index per pixel ``(H, W)``.
        labels: class names (index 0 = background, not drawn).
        lines: text written in the top-left corner (areas, head circumference...).
        alpha: opacity of the tint inside each class (0 = contour only).
        thickness: contour width in pixels (None = about 0.4% of the shorter side, at least 1).
        ellipses: fitted ellipses ``(cx, cy, a, b, theta)`` (pixels, radians; ``core.geometry.Ellipse``), drawn
            in cyan (the head-circumference fit).
        reference: a reference mask (any non-zero = foreground) whose outline is drawn in white, when known.

    Returns:
        RGB uint8 ``(H, W, 3)``.
    """
    rgb = _rgb(gray).astype(np.float32)
    if thickness is None:
        thickness = max(1, round(min(mask.shape) / 250))
    edges = []
    for k in range(1, max(len(labels), int(mask.max(initial=0)) + 1)):
        m = mask == k
        if not m.any():
            continue
        colour = np.asarray(PALETTE[(k - 1) % len(PALETTE)], np.float32)
        rgb[m] = (1.0 - alpha) * rgb[m] + alpha * colour
        edges.append((contour(m, thickness), colour))
    if reference is not None and np.any(reference):
        edges.append((contour(np.asarray(reference) > 0, thickness), np.asarray((255, 255, 255), np.float32)))
    for edge, colour in edges:
        rgb[edge] = colour
    out = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    for e in ellipses:
        out = draw_ellipse(out, e, thickness=thickness)
    return draw_text(out, list(lines))


def draw_ellipse(rgb: np.ndarray, ellipse: Sequence[float], color: tuple[int, int, int] = (0, 229, 255),
                 thickness: int = 1) -> np.ndarray:
    """Draw ``(cx, cy, a, b, theta)`` (pixels, radians) on an RGB uint8 image (OpenCV, anti-aliased)."""
    import math

    import cv2

    cx, cy, a, b, theta = (float(v) for v in ellipse[:5])
    out = np.ascontiguousarray(rgb, dtype=np.uint8).copy()
    shift = 4  # sub-pixel precision: coordinates in 1/16 pixel
    f = 1 << shift
    cv2.ellipse(out, (round(cx * f), round(cy * f)), (max(round(a * f), 1), max(round(b * f), 1)),
                math.degrees(theta), 0, 360, color, int(thickness), cv2.LINE_AA, shift)
    return out


def cls_overlay(gray: np.ndarray, label: str, prob: float, probs: Sequence[float] = (),
                labels: Sequence[str] = ()) -> np.ndarray:
    """The frame with the predicted label and its probability (and the other classes' below it)."""
    lines = [f"{label}  p={prob:.3f}"]
    lines += [f"  {n}: {p:.3f}" for n, p in zip(labels, probs) if n != label]
    return draw_text(_rgb(gray), lines, color=(255, 215, 0))


def enhance_overlay(gray: np.ndarray, enhanced: np.ndarray) -> np.ndarray:
    """Input and enhanced frames side by side (``(H, 2W + gap, 3)``), each captioned."""
    h = gray.shape[0]
    gap = np.full((h, max(2, gray.shape[1] // 100), 3), 255, np.uint8)
    left = draw_text(_rgb(gray), ["input"])
    right = draw_text(_rgb(enhanced), ["enhanced"])
    return np.concatenate([left, gap, right], axis=1)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an RGB (or grey) uint8 array as PNG bytes (write them with ``core.io.atomic_write_bytes``)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
