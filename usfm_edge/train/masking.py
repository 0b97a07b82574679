"""Masks and augmentation for dual (spatial + frequency) masked image modelling, in numpy.

Everything here runs inside DataLoader workers (the data pipeline owns the masks, as in SimMIM), so the
training loop never builds a mask. Conventions:

* spatial mask: ``uint8``, **1 = masked**, on the model's patch grid ``(h, w) = (S / patch, S / patch)``
  (flattened ``(N,)`` by default), built SimMIM-style from blocks of ``mask_patch_size`` pixels;
* frequency mask: ``float32 (S, S)`` band-stop mask in the unshifted ``numpy.fft`` layout, **0 = removed
  frequency**, drawn by :class:`usfm_edge.kernels.rings.BandStopMaskGenerator`; an all-ones mask means
  "no frequency masking for this sample" (drawn with probability ``1 - freq_prob``).

Randomness: every call takes an explicit ``numpy.random.Generator``. The pretraining dataset derives it
from ``(seed, rank, epoch, position in the epoch)``, so a sample's crop, flip and masks do not depend on
which worker loads it or on how many workers there are, and a resumed run sees exactly the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from usfm_edge.core.errors import ConfigError
from usfm_edge.core.preprocess import PreprocessSpec, check_frame, resize_gray
from usfm_edge.kernels.rings import BandStopMaskGenerator

__all__ = ["SpatialMaskGenerator", "mask_to_pixels", "mean_pad", "random_resized_crop_box", "MimSample",
           "MimTransform"]


class SpatialMaskGenerator:
    """SimMIM block mask: random ``mask_patch_size`` blocks, upsampled to the model's patch grid.

    ``ceil(mask_ratio * (S / mask_patch_size)**2)`` blocks are masked, so the masked fraction is
    ``mask_ratio`` rounded up to whole blocks.

    Args:
        img_size: input side ``S`` in pixels.
        patch_size: the model's patch size (16 for USFM).
        mask_patch_size: side of a masked block in pixels; a multiple of ``patch_size`` dividing ``S``.
        mask_ratio: fraction of blocks masked, in (0, 1).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, mask_patch_size: int = 32, mask_ratio: float = 0.6):
        if img_size % mask_patch_size or mask_patch_size % patch_size:
            raise ConfigError(
                f"mask_patch_size {mask_patch_size} must divide img_size {img_size} and be a multiple of the "
                f"patch size {patch_size}", hint="SimMIM uses 32 at 224 px with 16 px patches")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.img_size, self.patch_size = img_size, patch_size
        self.mask_patch_size, self.mask_ratio = mask_patch_size, float(mask_ratio)
        self.blocks = img_size // mask_patch_size  # blocks per side
        self.scale = mask_patch_size // patch_size  # patches per block side
        self.num_masked = int(math.ceil(self.blocks**2 * self.mask_ratio))
        self.grid = (img_size // patch_size, img_size // patch_size)

    def __call__(self, rng: np.random.Generator, flat: bool = True) -> np.ndarray:
        """Draw one mask: ``(N,)`` uint8 if ``flat`` else ``(h, w)``; 1 = masked patch."""
        blocks = np.zeros(self.blocks**2, dtype=np.uint8)
        blocks[rng.choice(self.blocks**2, size=self.num_masked, replace=False)] = 1
        grid = blocks.reshape(self.blocks, self.blocks).repeat(self.scale, 0).repeat(self.scale, 1)
        return grid.reshape(-1) if flat else grid

    def __repr__(self) -> str:
        return (f"SpatialMaskGenerator(img_size={self.img_size}, patch_size={self.patch_size}, "
                f"mask_patch_size={self.mask_patch_size}, mask_ratio={self.mask_ratio})")


def mask_to_pixels(mask: np.ndarray, patch_size: int, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Patch mask ``(N,)`` or ``(h, w)`` -> pixel mask ``(h * patch, w * patch)`` of the same dtype."""
    mask = np.asarray(mask)
    if mask.ndim == 1:
        side = int(round(math.sqrt(mask.size))) if grid is None else None
        grid = grid or (side, side)
        mask = mask.reshape(grid)
    return mask.repeat(patch_size, 0).repeat(patch_size, 1)


def mean_pad(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill masked pixels with the image's per-channel mean (the paper's "mean-padded spatial mask").

    Args:
        image: ``(C, H, W)`` or ``(H, W)`` float array.
        mask: pixel mask ``(H, W)`` (1 = masked), e.g. from :func:`mask_to_pixels`.

    Returns:
        A new array; the mean is taken over the whole image (masked and visible pixels), per channel.
    """
    image = np.asarray(image)
    m = np.asarray(mask).astype(bool)
    if m.shape != image.shape[-2:]:
        raise ConfigError(f"mask {m.shape} does not match the image {image.shape[-2:]}")
    mean = image.mean(axis=(-2, -1), keepdims=True)
    return np.where(m, mean, image).astype(image.dtype, copy=False)


def random_resized_crop_box(rng: np.random.Generator, h: int, w: int, scale=(0.67, 1.0),
                            ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tuple[int, int, int, int]:
    """Inception-style crop box ``(top, left, height, width)``: area fraction in ``scale``, aspect in ``ratio``.

    Falls back to the largest centred crop with an aspect ratio inside ``ratio`` after ``attempts`` misses.
    """
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@dataclass(frozen=True)
class MimSample:
    """One pretraining sample.

    Attributes:
        image: ``(C, S, S)`` float32, normalised per the PreprocessSpec (the reconstruction target).
        spatial_mask: ``(N,)`` uint8, 1 = masked patch.
        freq_mask: ``(S, S)`` float32 band-stop mask (unshifted layout; all ones = not frequency-masked).
    """

    image: np.ndarray
    spatial_mask: np.ndarray
    freq_mask: np.ndarray


class MimTransform:
    """uint8 grey frame -> :class:`MimSample` (augmented, normalised image + spatial and frequency masks).

    Augmentation is ultrasound-aware: random resized crop (area ``scale``, aspect ``ratio``) and a
    horizontal flip. There is **no vertical flip** and no rotation: the transducer is at the top of every
    B-mode frame, depth runs downwards and attenuation/shadowing have a direction.

    Args:
        spec: preprocessing contract (size, interpolation, mean/std, channels), shared with export.
        patch_size: the model's patch size.
        mask_patch_size, mask_ratio: spatial block mask (see :class:`SpatialMaskGenerator`).
        freq_prob: probability that a sample also gets a band-stop frequency mask.
        ring_params: keyword arguments of :class:`BandStopMaskGenerator` (``drop_ratio``, ``base_width``,
            ``growth``, ``max_width``, ``center_protect``).
        scale, ratio: random-resized-crop ranges (SimMIM: (0.67, 1) and (3/4, 4/3)).
        hflip: probability of a horizontal flip.
    """

    def __init__(self, spec: PreprocessSpec, patch_size: int = 16, mask_patch_size: int = 32,
                 mask_ratio: float = 0.6, freq_prob: float = 0.5, ring_params: dict | None = None,
                 scale: tuple[float, float] = (0.67, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5):
        if not 0.0 <= freq_prob <= 1.0:
            raise ConfigError(f"freq_prob must be in [0, 1], got {freq_prob}")
        self.spec = spec
        self.spatial = SpatialMaskGenerator(spec.img_size, patch_size, mask_patch_size, mask_ratio)
        self.freq = BandStopMaskGenerator(spec.img_size, **(ring_params or {}))
        self.freq_prob, self.scale, self.ratio, self.hflip = float(freq_prob), tuple(scale), tuple(ratio), hflip
        self._mean = np.asarray(spec.mean, np.float32)[:, None, None]
        self._std = np.asarray(spec.std, np.float32)[:, None, None]
        self._ones = np.ones((spec.img_size, spec.img_size), np.float32)

    def augment(self, frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Crop, resize and flip one grey frame -> ``(S, S)`` float32 in 0..255 (not normalised)."""
        gray = check_frame(frame, self.spec)
        top, left, ch, cw = random_resized_crop_box(rng, *gray.shape, self.scale, self.ratio)
        s = self.spec.img_size
        out = resize_gray(gray[top:top + ch, left:left + cw], (s, s), self.spec.interpolation, self.spec.antialias)
        if rng.random() < self.hflip:
            out = out[:, ::-1]
        return np.ascontiguousarray(out, dtype=np.float32)

    def normalise(self, gray: np.ndarray) -> np.ndarray:
        """``(S, S)`` 0..255 -> ``(C, S, S)`` float32 normalised as in ``usfm_edge.core.preprocess``."""
        return ((gray[None] / np.float32(255.0) - self._mean) / self._std).astype(np.float32)

    def __call__(self, frame: np.ndarray, rng: np.random.Generator) -> MimSample:
        image = self.normalise(self.augment(frame, rng))
        spatial = self.spatial(rng)
        freq = self.freq(rng) if rng.random() < self.freq_prob else self._ones
        return MimSample(image, spatial, freq)
