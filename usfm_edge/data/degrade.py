"""Synthetic ultrasound degradation for the enhancement task (numpy only).

The enhancement head learns ``clean = f(degrade(clean))`` on real frames. ``degrade`` applies, in the order of
the imaging chain:

1. **PSF blur**: an anisotropic Gaussian point-spread function, wider laterally (columns) than axially (rows),
   as the lateral resolution of a linear array is worse than its axial resolution.
2. **Multiplicative speckle**: fully developed speckle has Rayleigh-distributed amplitude, i.e. an exponential
   (Gamma with 1 look) intensity; partially developed / compounded speckle is Gamma with ``L`` looks (unit
   mean, variance 1/L). The field is spatially correlated by a small Gaussian blur (speckle grains span a few
   pixels), renormalised to unit mean, and applied to the *amplitude* as ``x * n ** (1/2)``.
3. **Dynamic-range compression**: gain and gamma (``offset + gain * x ** gamma``): a low-contrast, washed-out
   frame as with a poorly set gain / dynamic range.
4. **Additive Gaussian noise** (electronic noise), then clipping to [0, 1].

Every parameter is drawn from the ranges of :class:`DegradeConfig` with the caller's ``numpy.random.Generator``,
so the result is deterministic for a given generator state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["DegradeConfig", "degrade", "gaussian_blur"]


@dataclass(frozen=True)
class DegradeConfig:
    """Parameter ranges ``(low, high)``, each sampled uniformly per frame.

    Attributes:
        psf_sigma_axial: PSF std along rows, pixels.
        psf_sigma_lateral: PSF std along columns, pixels.
        looks: speckle looks ``L`` (1 = fully developed Rayleigh speckle; higher = milder).
        speckle_corr: std of the blur that correlates the speckle field, pixels.
        gain: output range after compression (1 = full range).
        gamma: intensity exponent (< 1 brightens and flattens, > 1 darkens).
        offset: black level added after compression.
        noise_std: std of the additive Gaussian noise (intensity units, [0, 1] scale).
    """

    psf_sigma_axial: tuple[float, float] = (0.5, 1.2)
    psf_sigma_lateral: tuple[float, float] = (1.0, 2.5)
    looks: tuple[float, float] = (1.5, 6.0)
    speckle_corr: tuple[float, float] = (0.5, 1.2)
    gain: tuple[float, float] = (0.6, 0.9)
    gamma: tuple[float, float] = (0.7, 1.3)
    offset: tuple[float, float] = (0.0, 0.08)
    noise_std: tuple[float, float] = (0.005, 0.03)

    def __post_init__(self):
        for name, (lo, hi) in asdict(self).items():
            if lo > hi or lo < 0:
                raise ValueError(f"DegradeConfig.{name}: need 0 <= low <= high, got ({lo}, {hi})")
        if self.looks[0] <= 0 or self.gamma[0] <= 0:
            raise ValueError("looks and gamma must be positive")


def _kernel(sigma: float) -> np.ndarray:
    if sigma <= 0:
        return np.ones(1)
    r = max(1, int(3.0 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img: np.ndarray, sigma_y: float, sigma_x: float | None = None) -> np.ndarray:
    """Separable Gaussian blur of a 2-D image (reflect borders, kernel radius 3 sigma)."""
    sigma_x = sigma_y if sigma_x is None else sigma_x
    out = np.asarray(img, dtype=np.float64)
    for axis, sigma in ((0, sigma_y), (1, sigma_x)):
        k = _kernel(sigma)
        r = len(k) // 2
        if r == 0:
            continue
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect" if out.shape[axis] > r else "edge")
        n = out.shape[axis]
        out = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(len(k)))
    return out


def degrade(frame: np.ndarray, rng: np.random.Generator, config: DegradeConfig | None = None,
            return_params: bool = False):
    """Degrade a clean grey frame the way a poor acquisition would.

    Args:
        frame: (H, W) float image in [0, 1].
        rng: the random generator (``numpy.random.default_rng(seed)``); the only source of randomness.
        config: parameter ranges (default :class:`DegradeConfig`).
        return_params: also return the sampled parameters.

    Returns:
        The degraded (H, W) float32 image in [0, 1] (and the parameter dict if ``return_params``).
    """
    cfg = config or DegradeConfig()
    x = np.asarray(frame, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"degrade expects a 2-D grey frame, got shape {x.shape}")
    params = {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in asdict(cfg).items()}
    x = gaussian_blur(np.clip(x, 0.0, 1.0), params["psf_sigma_axial"], params["psf_sigma_lateral"])
    looks = params["looks"]
    speckle = rng.gamma(shape=looks, scale=1.0 / looks, size=x.shape)
    speckle = gaussian_blur(speckle, params["speckle_corr"])
    speckle /= speckle.mean()
    x = x * np.sqrt(speckle)
    x = params["offset"] + params["gain"] * np.clip(x, 0.0, 1.0) ** params["gamma"]
    x = x + rng.normal(0.0, params["noise_std"], size=x.shape)
    out = np.clip(x, 0.0, 1.0).astype(np.float32)
    return (out, params) if return_params else out
