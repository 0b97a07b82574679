"""Mask geometry in numpy: fill an outline into a solid mask, fit an ellipse, measure head circumference.

HC18 annotates the fetal skull as a thin ellipse *outline*; a segmentation model needs the filled region, and the
challenge metric needs the circumference of the ellipse fitted to a (predicted or reference) mask.
"""

from __future__ import annotations

import math

import numpy as np


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (pure numpy, border treated as background)."""
    p = np.pad(mask, 1)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(3):
        for dx in range(3):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (pure numpy, border treated as foreground so shapes touching it are kept)."""
    return ~_dilate(~mask)


def _spread_rows(seed: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Grow ``seed`` along each row across every run of non-wall pixels it touches."""
    h, w = wall.shape
    segment = np.cumsum(wall, axis=1) + (np.arange(h) * (w + 1))[:, None]
    touched = np.bincount(segment[seed & ~wall], minlength=h * (w + 1) + 1) > 0
    return touched[segment] & ~wall


def fill_holes(wall: np.ndarray) -> np.ndarray:
    """Fill every background region not 4-connected to the image border (like ``binary_fill_holes``).

    Pure numpy: the outside is flooded from the border by alternating row and column sweeps, each of which
    spreads along whole runs of background at once, until nothing changes (a few sweeps for convex shapes).

    Args:
        wall: boolean (H, W) array of foreground pixels.

    Returns:
        boolean (H, W): the foreground plus its enclosed holes.
    """
    wall = np.asarray(wall, bool)
    outside = np.zeros_like(wall)
    outside[[0, -1], :] = True
    outside[:, [0, -1]] = True
    outside &= ~wall
    count = -1
    while count != int(outside.sum()):
        count = int(outside.sum())
        outside |= _spread_rows(outside, wall)
        outside |= _spread_rows(outside.T, wall.T).T
    return ~outside


def _convex_fill(points_yx: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise the convex hull of pixel coordinates (monotone chain hull, drawn by Pillow)."""
    pts = sorted({(int(x), int(y)) for y, x in points_yx})

    def half(seq):
        chain: list[tuple[int, int]] = []
        for p in seq:
            while len(chain) >= 2:
                (ax, ay), (bx, by) = chain[-2], chain[-1]
                if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    from PIL import Image, ImageDraw  # only annotations need Pillow; the runtime's HC path does not

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    if len(hull) >= 3:
        ImageDraw.Draw(canvas).polygon(hull, fill=1, outline=1)
    else:
        for x, y in pts:
            canvas.putpixel((x, y), 1)
    return np.asarray(canvas, dtype=bool)


def fill_outline_mask(outline: np.ndarray) -> np.ndarray:
    """Fill a closed outline (e.g. an HC18 ellipse annotation) into a solid 0/1 mask.

    A 3x3 closing seals one-pixel gaps, then enclosed holes are filled. The outline pixels themselves belong to
    the mask. When the outline is open (an ellipse cut by the image border, or a wider gap) the hole filling
    finds little inside it; then the convex hull of the outline is filled instead, which is exact for a
    convex shape such as an ellipse clipped by the border.

    Args:
        outline: (H, W) array; any non-zero pixel is part of the outline.

    Returns:
        uint8 (H, W) mask of 0/1.
    """
    wall = np.asarray(outline) > 0
    if not wall.any():
        return np.zeros(wall.shape, np.uint8)
    filled = fill_holes(_dilate(wall))
    filled = _erode(filled) | wall
    if filled.sum() < 3 * wall.sum():  # open outline: nothing enclosed
        filled = _convex_fill(np.argwhere(wall), wall.shape) | wall
    outer_layer = wall & _dilate(~filled)  # drop the outline's outer layer: the edge runs mid-line
    return (filled & ~outer_layer).astype(np.uint8)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D boolean mask (union-find over row runs, pure numpy)."""
    mask = np.asarray(mask) > 0
    runs, parent, prev = [], [], []  # run = (row, start, end)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y, row in enumerate(mask):
        d = np.diff(np.r_[0, row.astype(np.int8), 0])
        cur = []
        for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)):
            idx = len(runs)
            runs.append((y, s, e))
            parent.append(idx)
            for j in prev:  # 8-connectivity: overlap including diagonal neighbours
                if runs[j][1] <= e and s <= runs[j][2]:
                    parent[find(j)] = find(idx)
            cur.append(idx)
        prev = cur
    roots = np.array([find(i) for i in range(len(runs))], dtype=np.int64)
    best = int(np.argmax(np.bincount(roots, weights=[e - s for _, s, e in runs]))) if runs else -1
    out = np.zeros_like(mask)
    for (y, s, e), r in zip(runs, roots):
        out[y, s:e] |= bool(r == best)
    return out


def _boundary(mask: np.ndarray) -> np.ndarray:
    """(y, x) of mask pixels with a background 4-neighbour inside the image (image-border cuts excluded)."""
    p = np.pad(mask, 1, mode="edge")
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return np.argwhere(mask & ~inner).astype(np.float64)


def _ellipse_from_moments(mask: np.ndarray) -> tuple[float, float, float, float, float]:
    yx = np.argwhere(mask).astype(np.float64)
    cy, cx = yx.mean(axis=0)
    cov = np.cov((yx - (cy, cx)).T) + np.eye(2) / 12.0  # + pixel-area variance
    evals, evecs = np.linalg.eigh(cov)
    b, a = 2.0 * np.sqrt(np.maximum(evals, 0.0))  # a filled ellipse has variance (semi-axis)^2 / 4
    theta = math.atan2(evecs[0, 1], evecs[1, 1])
    return float(cx), float(cy), float(a), float(b), float(theta)


def _ellipse_from_conic(pts_yx: np.ndarray) -> tuple[float, float, float, float, float] | None:
    """Direct least-squares ellipse fit (constraint 4AC - B^2 = 1) on boundary points; None if not an ellipse."""
    if len(pts_yx) < 6:
        return None
    my, mx = pts_yx.mean(axis=0)
    scale = float(pts_yx.std()) or 1.0
    y, x = (pts_yx[:, 0] - my) / scale, (pts_yx[:, 1] - mx) / scale
    quad = np.stack([x * x, x * y, y * y], axis=1)
    lin = np.stack([x, y, np.ones_like(x)], axis=1)
    s1, s2, s3 = quad.T @ quad, quad.T @ lin, lin.T @ lin
    try:
        t = -np.linalg.solve(s3, s2.T)
    except np.linalg.LinAlgError:
        return None
    m = s1 + s2 @ t
    m = np.array([m[2] / 2.0, -m[1], m[0] / 2.0])  # C^-1 M for the ellipse constraint matrix
    evals, evecs = np.linalg.eig(m)
    evecs = np.real(evecs)
    cond = 4 * evecs[0] * evecs[2] - evecs[1] ** 2
    if not np.any(cond > 0):
        return None
    a1 = evecs[:, int(np.argmax(cond > 0))]
    a_, b_, c_ = a1
    d_, e_, f_ = t @ a1
    # centre and axes of A x^2 + B xy + C y^2 + D x + E y + F = 0
    den = b_ * b_ - 4 * a_ * c_
    if den >= 0:
        return None
    x0 = (2 * c_ * d_ - b_ * e_) / den
    y0 = (2 * a_ * e_ - b_ * d_) / den
    f0 = a_ * x0 * x0 + b_ * x0 * y0 + c_ * y0 * y0 + d_ * x0 + e_ * y0 + f_
    evals2, evecs2 = np.linalg.eigh(np.array([[a_, b_ / 2], [b_ / 2, c_]]))
    if f0 == 0 or np.any(-f0 / evals2 <= 0):
        return None
    axes = np.sqrt(-f0 / evals2) * scale
    major = int(np.argmax(axes))
    theta = math.atan2(evecs2[1, major], evecs2[0, major])
    return float(x0 * scale + mx), float(y0 * scale + my), float(axes.max()), float(axes.min()), theta


def fit_ellipse(mask: np.ndarray, largest_component: bool = False) -> tuple[float, float, float, float, float]:
    """Fit an ellipse to a filled binary mask.

    Boundary pixels inside the image are fitted with a direct least-squares conic fit, which stays right
    when the ellipse is cut by the image border; shape moments of the filled region are the fallback.

    Args:
        mask: (H, W) array, non-zero inside the object.
        largest_component: keep only the largest 8-connected component first (drops the spurious blobs of a
            predicted mask; reference masks are one component).

    Returns:
        (cx, cy, a, b, theta): centre in pixels (x = column), semi-axes a >= b in pixels (measured to the
        outer edge of the boundary pixels), angle of the major axis in radians.

    Raises:
        ValueError: the mask is empty.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 2 or not mask.any():
        raise ValueError("cannot fit an ellipse to an empty or non-2-D mask")
    if largest_component:
        mask = keep_largest_component(mask)
    pts = _boundary(mask)
    h, w = mask.shape
    keep = (pts[:, 0] > 0) & (pts[:, 0] < h - 1) & (pts[:, 1] > 0) & (pts[:, 1] < w - 1)
    fit = _ellipse_from_conic(pts[keep])
    moments = _ellipse_from_moments(mask)
    if fit is None or fit[2] > 4 * max(h, w):
        return moments
    cx, cy, a, b, theta = fit
    return cx, cy, a + 0.5, b + 0.5, theta  # boundary pixel centres lie half a pixel inside the edge


def ellipse_perimeter(a: float, b: float) -> float:
    """Ramanujan's second approximation of the perimeter of an ellipse with semi-axes a and b."""
    h = ((a - b) / (a + b)) ** 2 if a + b > 0 else 0.0
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def head_circumference_mm(mask: np.ndarray, pixel_size_mm: float, largest_component: bool = False) -> float:
    """Head circumference of a (filled) fetal head mask, as the HC18 challenge measures it.

    Args:
        mask: (H, W) filled head mask (non-zero inside).
        pixel_size_mm: size of one (square) pixel in mm.
        largest_component: fit the largest 8-connected component only (use for predicted masks).

    Returns:
        Perimeter of the fitted ellipse (Ramanujan) in mm.

    Raises:
        ValueError: the mask is empty.
    """
    _, _, a, b, _ = fit_ellipse(mask, largest_component=largest_component)
    return ellipse_perimeter(a, b) * float(pixel_size_mm)
