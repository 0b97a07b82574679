"""Concentric frequency rings and random band-stop masks (numpy only, importable without torch).

USFM's frequency band-stop masked image modelling drops a random subset of concentric rings of the
image spectrum whose width grows geometrically (dossier §2). This module reimplements the idea with
fixed, documented geometry, and without the quirks of the official ``Frequency_MASK``: its loop never
ends when ``int(width * factor) == 0``, its first ring can hold the value 2, and it returns
``abs(ifft(...))`` instead of the real part.

Geometry:
    Radii are measured in frequency bins of the *shorter* image side: a bin at ``(i, j)`` of the
    unshifted spectrum (the layout of ``numpy.fft.fft2``) has radius
    ``min(h, w) * sqrt(fy[i]**2 + fx[j]**2)`` with ``fy = fftfreq(h)``, ``fx = fftfreq(w)`` in cycles
    per pixel. For a square image this is exactly the distance from the centre of the fftshifted
    spectrum; for ``h != w`` the rings stay circles in physical frequency (isotropic) and every ring is
    at least ``base_width`` bins wide along both axes. Bins with radius ``< center_protect`` form the
    protected centre (ring id -1, never dropped: it holds the mean brightness and the coarsest
    anatomy). Bins beyond the Nyquist circle (the spectrum's corners) belong to the outermost ring,
    so dropping the highest band removes all of the highest frequencies, not a ring with corners left.

Default parameters (the paper gives none; ``DEFAULT_RING_PARAMS``), chosen for 224 px input whose
spectrum has radius 112 bins:
    * ``center_protect=4``: radii < 4 bins (periods longer than ~56 px, a quarter of the frame) carry
      the mean, gain and depth-attenuation trends rather than texture; keeping them keeps the corrupted
      image recognisable, so the model learns texture and grey-level detail.
    * ``base_width=2``: the first ring is 2 bins wide so the low frequencies, where most ultrasound
      energy sits, are split finely (a 1-bin ring holds only ~25 bins near radius 4).
    * ``growth=1.5`` and ``max_width=16``: widths 2, 3, 4.5, 6.8, 10.1, 15.2 then 16, 16, 16, ...
      give 10 rings at 224 px (edges 4, 6, 9, 13.5, 20.3, 30.4, 45.6, 61.6, 77.6, 93.6, 112), inside
      the wanted 8-12. Up to 45.6 bins each edge is 1.5x the previous one (about 1.7 rings per
      octave, equal on a log-frequency axis, where speckle and edge scales live); above it 16-bin
      bands, so no single draw removes most of the high frequencies.
    * ``drop_ratio=0.3``: 3 of 10 rings per sample. Frequency masking is combined with a 60 % spatial
      mask (SimMIM default), so the frequency corruption is kept moderate.
    A last ring narrower than half the previous width is merged into it (at 224 px none is; at 96x128
    the 2.4-bin remainder beyond 45.6 is merged, giving 6 rings up to 48).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from usfm_edge.core.errors import ConfigError

__all__ = [
    "DEFAULT_RING_PARAMS",
    "RingParams",
    "ring_edges",
    "frequency_radius",
    "ring_index",
    "band_stop_mask",
    "BandStopMaskGenerator",
    "symmetrize_mask",
]


@dataclass(frozen=True)
class RingParams:
    """Ring geometry and drop ratio (see the module docstring for why these defaults).

    Attributes:
        base_width: width of the innermost ring in bins (>= 1).
        growth: factor by which each ring is wider than the previous one (>= 1).
        max_width: cap on a ring's width in bins (>= base_width).
        center_protect: radius in bins of the protected centre, never dropped (> 0, so DC is kept).
        drop_ratio: fraction of rings dropped per sample, in (0, 1].
    """

    base_width: float = 2.0
    growth: float = 1.5
    max_width: float = 16.0
    center_protect: float = 4.0
    drop_ratio: float = 0.3


DEFAULT_RING_PARAMS = RingParams()


def _min_side(img_size: int | tuple[int, int]) -> int:
    if isinstance(img_size, (tuple, list)):
        if len(img_size) != 2:
            raise ConfigError(f"img_size must be an int or (h, w), got {img_size!r}")
        h, w = (int(v) for v in img_size)
    else:
        h = w = int(img_size)
    if h < 2 or w < 2:
        raise ConfigError(f"img_size must be at least 2 x 2 pixels, got {img_size!r}")
    return min(h, w)


def _check_float(name: str, value: float, low: float, *, inclusive: bool = True) -> float:
    value = float(value)
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        op = ">=" if inclusive else ">"
        raise ConfigError(f"{name} must be a finite number {op} {low}, got {value!r}")
    return value


def ring_edges(
    img_size: int | tuple[int, int],
    base_width: float = DEFAULT_RING_PARAMS.base_width,
    growth: float = DEFAULT_RING_PARAMS.growth,
    max_width: float = DEFAULT_RING_PARAMS.max_width,
    center_protect: float = DEFAULT_RING_PARAMS.center_protect,
) -> np.ndarray:
    """Radii (in bins of the shorter side) that bound the concentric rings.

    Ring ``k`` spans ``edges[k] <= r < edges[k + 1]``. ``edges[0] == center_protect`` and
    ``edges[-1] == min(h, w) / 2`` (Nyquist). Widths are ``base_width * growth**k`` capped at
    ``max_width``; a last ring narrower than half of the ring before it is merged into that ring.
    Every width is >= ``base_width`` >= 1 bin, so the construction always terminates.

    Args:
        img_size: image side ``s`` or ``(h, w)``.
        base_width: width of the first ring in bins, >= 1.
        growth: geometric growth factor of the widths, >= 1.
        max_width: largest ring width in bins, >= ``base_width``.
        center_protect: radius of the protected centre in bins, > 0 and < Nyquist radius.

    Returns:
        float64 array of ``n_rings + 1`` strictly increasing radii.

    Raises:
        ConfigError: on a non-finite, too small or inconsistent parameter.
    """
    radius = _min_side(img_size) / 2.0
    base_width = _check_float("base_width", base_width, 1.0)
    growth = _check_float("growth", growth, 1.0)
    max_width = _check_float("max_width", max_width, base_width)
    center_protect = _check_float("center_protect", center_protect, 0.0, inclusive=False)
    if center_protect + base_width > radius:
        raise ConfigError(
            f"center_protect ({center_protect}) + base_width ({base_width}) exceed the spectrum radius "
            f"{radius} bins of img_size={img_size!r}: no ring fits",
            hint="lower center_protect/base_width or use a larger image",
        )
    edges = [center_protect]
    width = base_width
    while edges[-1] < radius:
        edges.append(min(edges[-1] + width, radius))
        width = min(width * growth, max_width)
    if len(edges) > 2 and edges[-1] - edges[-2] < 0.5 * (edges[-2] - edges[-3]):
        del edges[-2]  # merge a thin last ring into the previous one
    return np.asarray(edges, dtype=np.float64)


def frequency_radius(h: int, w: int) -> np.ndarray:
    """Radius of every bin of an unshifted ``(h, w)`` spectrum, in bins of the shorter side.

    Args:
        h: spectrum height (image rows).
        w: spectrum width (image columns).

    Returns:
        float64 array ``(h, w)``; 0 at ``[0, 0]`` (DC), ``min(h, w) / 2`` at the Nyquist frequency.
    """
    fy = np.fft.fftfreq(int(h))[:, None]
    fx = np.fft.fftfreq(int(w))[None, :]
    return min(h, w) * np.sqrt(fy * fy + fx * fx)


def ring_index(h: int, w: int, edges: np.ndarray) -> np.ndarray:
    """Ring id of every bin of an unshifted ``(h, w)`` spectrum (``numpy.fft.fft2`` layout).

    Args:
        h: spectrum height.
        w: spectrum width.
        edges: ring radii from :func:`ring_edges` (bins of ``min(h, w)``).

    Returns:
        int32 array ``(h, w)``: -1 for the protected centre (radius < ``edges[0]``), else the ring id
        in ``[0, len(edges) - 2]``; bins beyond ``edges[-1]`` (corners) get the last ring.
    """
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0) or edges[0] <= 0:
        raise ConfigError(f"edges must be >= 2 strictly increasing positive radii, got {edges!r}")
    idx = np.searchsorted(edges, frequency_radius(h, w), side="right") - 1
    return np.minimum(idx, edges.size - 2).astype(np.int32)


def band_stop_mask(h: int, w: int, drop, edges: np.ndarray) -> np.ndarray:
    """Band-stop mask that zeroes the rings in ``drop``.

    Args:
        h: mask height.
        w: mask width.
        drop: iterable of ring ids to drop (ids outside ``[0, n_rings)`` raise ConfigError).
        edges: ring radii from :func:`ring_edges`.

    Returns:
        float32 ``(h, w)`` mask in the unshifted layout: 0 in dropped rings, 1 elsewhere; the protected
        centre is always 1.
    """
    lut_index = ring_index(h, w, edges).astype(np.intp) + 1
    return _mask_from_lut_index(lut_index, drop, len(edges) - 1)


def _mask_from_lut_index(lut_index: np.ndarray, drop, n_rings: int) -> np.ndarray:
    """Mask from ``ring_index + 1`` (0 = protected centre) with one table lookup."""
    drop = np.asarray(list(drop), dtype=np.int64)
    if drop.size and (drop.min() < 0 or drop.max() >= n_rings):
        raise ConfigError(f"ring ids to drop must be in [0, {n_rings}), got {drop.tolist()}")
    lut = np.ones(n_rings + 1, dtype=np.float32)  # lut[0] is the protected centre
    lut[drop + 1] = 0.0
    return lut[lut_index]


def symmetrize_mask(mask: np.ndarray) -> np.ndarray:
    """Return ``(M(k) + M(-k)) / 2`` for an unshifted mask ``(..., H, W)``.

    ``Re(IDFT(M * DFT(x)))`` equals ``IDFT(sym(M) * DFT(x))`` for real ``x``, so any real mask can be
    replaced by its point-symmetric part, whose filtered output is real and fits a half spectrum.
    """
    mask = np.asarray(mask)
    flipped = np.roll(np.flip(mask, axis=(-2, -1)), shift=(1, 1), axis=(-2, -1))
    return 0.5 * (mask + flipped)


class BandStopMaskGenerator:
    """Random band-stop masks for frequency masked image modelling (cheap, DataLoader-worker safe).

    The ring index map is computed once; a call draws ``max(1, round(drop_ratio * n_rings))`` distinct
    rings with the given ``numpy.random.Generator`` and builds the mask with one table lookup.

    Args:
        img_size: image side or ``(h, w)``.
        drop_ratio: fraction of rings dropped per mask, in (0, 1].
        base_width: see :func:`ring_edges`.
        growth: see :func:`ring_edges`.
        max_width: see :func:`ring_edges`.
        center_protect: see :func:`ring_edges`.

    Example:
        >>> gen = BandStopMaskGenerator(224)
        >>> mask = gen(np.random.default_rng(0))  # (224, 224) float32, unshifted layout
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        drop_ratio: float = DEFAULT_RING_PARAMS.drop_ratio,
        base_width: float = DEFAULT_RING_PARAMS.base_width,
        growth: float = DEFAULT_RING_PARAMS.growth,
        max_width: float = DEFAULT_RING_PARAMS.max_width,
        center_protect: float = DEFAULT_RING_PARAMS.center_protect,
    ):
        drop_ratio = float(drop_ratio)
        if not (0.0 < drop_ratio <= 1.0):
            raise ConfigError(f"drop_ratio must be in (0, 1], got {drop_ratio!r}")
        _min_side(img_size)
        self.shape = tuple(int(v) for v in img_size) if isinstance(img_size, (tuple, list)) else (int(img_size),) * 2
        self.drop_ratio = drop_ratio
        self.edges = ring_edges(img_size, base_width, growth, max_width, center_protect)
        self.n_rings = len(self.edges) - 1
        self.n_drop = min(self.n_rings, max(1, int(round(drop_ratio * self.n_rings))))
        self.index = ring_index(*self.shape, self.edges)
        self._lut_index = (self.index + 1).astype(np.intp)

    @property
    def symmetric(self) -> bool:
        """True: masks depend on the radius only, so ``M(k) == M(-k)`` and filtered real images stay real."""
        return True

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Draw the ids of the rings to drop (sorted int64 array of length ``n_drop``)."""
        return np.sort(rng.choice(self.n_rings, size=self.n_drop, replace=False)).astype(np.int64)

    def mask_for(self, drop) -> np.ndarray:
        """Mask ``(H, W)`` float32 that drops the rings ``drop``."""
        return _mask_from_lut_index(self._lut_index, drop, self.n_rings)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One random mask ``(H, W)`` float32 in the unshifted layout (deterministic for a seeded rng)."""
        return self.mask_for(self.draw(rng))

    def __repr__(self) -> str:
        return (
            f"BandStopMaskGenerator(shape={self.shape}, n_rings={self.n_rings}, n_drop={self.n_drop}, "
            f"edges={np.round(self.edges, 2).tolist()})"
        )
