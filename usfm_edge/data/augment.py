"""Training augmentation that mimics how ultrasound frames differ between scanners, presets and operators.

Applied to a grey frame already resized to the model's input size (``S x S``, the inference resampling), with
its mask, by :class:`UltrasoundAugment` (OpenCV does the geometry and the filtering). Each effect and its range
is a field of :class:`AugmentConfig`, drawn per sample from the caller's ``numpy.random.Generator``, so a
sample is reproducible from its seed:

====================  ======================================================================================
geometry              horizontal flip (left/right views mirror each other; never vertical: the probe is on
                      top); scale, rotation and shift as one affine warp of frame and mask (probe angle,
                      depth setting, zoom); bilinear for the frame, bilinear + 0.5 threshold for the mask
overall gain          a global multiplier (the gain knob)
time-gain curve       a smooth depth-dependent gain (the TGC sliders): a random monotone-free curve over rows
gamma                 dynamic-range / compression map differences between presets
speckle               multiplicative noise with unit mean, spatially correlated over a few pixels
blur                  Gaussian blur (a softer transducer or a lower frequency)
electronic noise      additive Gaussian noise
occluding marks       calipers (+ / x), dotted measurement lines and text burned into the frame, as on
                      exported screenshots (BUS-BRA has many); the mask is unchanged under them
====================  ======================================================================================

The intensity effects are applied in [0, 1] and the result is clipped; the frame stays float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from usfm_edge.core.geometry import opencv

__all__ = ["AugmentConfig", "UltrasoundAugment", "AUGMENT_PRESETS"]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of each effect (ranges are ``(low, high)``, drawn uniformly).

    Attributes:
        flip: probability of a horizontal flip.
        p_affine, scale, rotate_deg, shift: the affine warp (shift as a fraction of the side).
        gain: global intensity multiplier range.
        p_tgc, tgc_amplitude: probability and +- amplitude of the depth gain curve (multiplier 1 +- a).
        gamma: exponent range (log-uniform).
        p_speckle, speckle_sigma, speckle_corr: multiplicative noise (std of the unit-mean field, and the
            blur in pixels that correlates it).
        p_blur, blur_sigma: Gaussian blur.
        p_noise, noise_sigma: additive noise std.
        p_marks, max_marks: probability of burned-in marks and how many at most.
    """

    flip: float = 0.5
    p_affine: float = 0.8
    scale: tuple[float, float] = (0.8, 1.25)
    rotate_deg: tuple[float, float] = (-15.0, 15.0)
    shift: tuple[float, float] = (-0.08, 0.08)
    gain: tuple[float, float] = (0.75, 1.3)
    p_tgc: float = 0.5
    tgc_amplitude: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.4)
    p_speckle: float = 0.4
    speckle_sigma: tuple[float, float] = (0.05, 0.3)
    speckle_corr: tuple[float, float] = (0.5, 1.5)
    p_blur: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (0.0, 0.04)
    p_marks: float = 0.4
    max_marks: int = 4


AUGMENT_PRESETS: dict[str, AugmentConfig | None] = {
    "ultrasound": AugmentConfig(),
    "light": AugmentConfig(p_affine=0.5, scale=(0.9, 1.1), rotate_deg=(-5.0, 5.0), shift=(-0.03, 0.03), p_tgc=0.0,
                           p_speckle=0.0, p_blur=0.0, p_noise=0.0, p_marks=0.0),
    "none": None,
}


def _cv2():
    return opencv("ultrasound augmentation")


class UltrasoundAugment:
    """``(frame, mask, rng) -> (frame, mask)`` with the effects of :class:`AugmentConfig`.

    Args:
        config: the ranges; ``None`` uses the defaults.

    Call with ``frame`` float32 (S, S) in [0, 1] and ``mask`` uint8 (S, S) class map or None.
    """

    def __init__(self, config: AugmentConfig | None = None):
        self.cfg = config or AugmentConfig()

    def __call__(self, frame: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
        c, cv2 = self.cfg, _cv2()
        img = np.asarray(frame, np.float32)
        h, w = img.shape
        if rng.random() < c.flip:
            img = img[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        if rng.random() < c.p_affine:
            img, mask = self._affine(img, mask, rng, cv2)
        img = img * rng.uniform(*c.gain)
        if rng.random() < c.p_tgc:
            knots = 1.0 + rng.uniform(-c.tgc_amplitude, c.tgc_amplitude, size=5)
            curve = np.interp(np.linspace(0, 4, h), np.arange(5), knots).astype(np.float32)
            img = img * curve[:, None]
        img = np.clip(img, 0.0, 1.0) ** np.float32(np.exp(rng.uniform(*np.log(c.gamma))))
        if rng.random() < c.p_speckle:
            field = rng.normal(0.0, 1.0, size=(h, w)).astype(np.float32)
            corr = rng.uniform(*c.speckle_corr)
            field = cv2.GaussianBlur(field, (0, 0), corr)
            field /= field.std() + 1e-6
            img = img * np.clip(1.0 + rng.uniform(*c.speckle_sigma) * field, 0.0, None)
        if rng.random() < c.p_blur:
            img = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), rng.uniform(*c.blur_sigma))
        if rng.random() < c.p_noise:
            img = img + rng.normal(0.0, rng.uniform(*c.noise_sigma), size=(h, w)).astype(np.float32)
        img = np.clip(img, 0.0, 1.0).astype(np.float32)
        if c.max_marks > 0 and rng.random() < c.p_marks:
            img = self._marks(np.ascontiguousarray(img), rng, cv2)
        return np.ascontiguousarray(img), (None if mask is None else np.ascontiguousarray(mask))

    def _affine(self, img, mask, rng, cv2):
        c = self.cfg
        h, w = img.shape
        scale = float(np.exp(rng.uniform(*np.log(c.scale))))
        angle = float(rng.uniform(*c.rotate_deg))
        m = cv2.getRotationMatrix2D((w / 2.0 - 0.5, h / 2.0 - 0.5), angle, scale)
        m[0, 2] += rng.uniform(*c.shift) * w
        m[1, 2] += rng.uniform(*c.shift) * h
        img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        if mask is not None:
            k = int(mask.max()) + 1
            if k <= 2:
                soft = cv2.warpAffine(np.ascontiguousarray(mask, dtype=np.float32), m, (w, h),
                                      flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
                mask = (soft >= 0.5).astype(np.uint8)
            else:  # several classes: warp each one-hot plane, keep the argmax
                planes = [cv2.warpAffine((mask == i).astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                                         borderMode=cv2.BORDER_CONSTANT, borderValue=float(i == 0))
                          for i in range(k)]
                mask = np.argmax(np.stack(planes), axis=0).astype(np.uint8)
        return img, mask

    def _marks(self, img, rng, cv2):
        h, w = img.shape
        side = min(h, w)
        for _ in range(int(rng.integers(1, self.cfg.max_marks + 1))):
            value = float(rng.uniform(0.7, 1.0)) if rng.random() < 0.8 else float(rng.uniform(0.0, 0.1))
            canvas = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only: draw, then blend
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            kind = rng.random()
            if kind < 0.4:  # caliper cross
                r = max(2, int(side * rng.uniform(0.01, 0.03)))
                if rng.random() < 0.5:
                    cv2.line(canvas, (x - r, y), (x + r, y), 255, 1)
                    cv2.line(canvas, (x, y - r), (x, y + r), 255, 1)
                else:
                    cv2.line(canvas, (x - r, y - r), (x + r, y + r), 255, 1)
                    cv2.line(canvas, (x - r, y + r), (x + r, y - r), 255, 1)
            elif kind < 0.7:  # dotted measurement line
                x2, y2 = int(rng.integers(0, w)), int(rng.integers(0, h))
                n = max(2, int(np.hypot(x2 - x, y2 - y) / max(3, side // 40)))
                for t in np.linspace(0.0, 1.0, n):
                    cv2.circle(canvas, (int(x + t * (x2 - x)), int(y + t * (y2 - y))), 0, 255, -1)
            else:  # burned-in text
                text = "".join(rng.choice(list("0123456789ABCDEFGHLRMmcs.:/ "), size=int(rng.integers(3, 9))))
                cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX,
                            float(side / 600.0 * rng.uniform(0.6, 1.3)), 255, 1, cv2.LINE_AA)
            alpha = canvas.astype(np.float32) / 255.0
            img = img * (1.0 - alpha) + value * alpha
        return img.astype(np.float32)
