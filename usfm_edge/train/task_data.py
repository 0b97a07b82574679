"""torch Datasets for fine-tuning: segmentation, classification and enhancement on real ultrasound frames.

Each sample is keyed ``(epoch, position, index)`` (see ``train.datasets.PositionedSampler``) and draws its
augmentation from ``default_rng([seed, salt, epoch, position])``, so runs are reproducible and resume
exactly. Frames are decoded once and cached in memory as uint8 (the two real sets are < 400 MB decoded).

Augmentation for ultrasound (training only): random resized crop (scale 0.6-1, aspect 3/4-4/3) applied to
frame and mask together, horizontal flip (left/right views are mirror images; no vertical flip: the
transducer is always at the top), and a gain / gamma jitter of the grey levels (scanner settings differ).
The crop is resized with the same bicubic resampling as inference (``core.preprocess``); masks use nearest.
This is ``augment="basic"``.

``augment="ultrasound"`` (or ``"light"``) is the recipe for small ultrasound datasets: each frame is resized
once to ``S x S`` with the inference resampling and cached (masks: area-weighted, then thresholded at 0.5, so
a filled HC18 outline keeps its centre line), then :class:`usfm_edge.data.augment.UltrasoundAugment` warps,
re-gains and marks it per sample (see that module). Segmentation and classification only: enhancement always
uses the basic crop/flip and its own degradation (``data.degrade``), whatever ``augment`` says.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from usfm_edge.core.errors import ConfigError
from usfm_edge.core.preprocess import PreprocessSpec, resize_gray, resize_matrix, resize_nearest
from usfm_edge.data.readers import read_image
from usfm_edge.data.sources import Record, read_record_mask

_SALT = 0x7A5C


def random_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random (top, left, height, width) box covering ``scale`` of the frame area with aspect in ``ratio``."""
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        ch, cw = int(round(np.sqrt(a / r))), int(round(np.sqrt(a * r)))
        if 0 < ch <= h and 0 < cw <= w:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w


class TaskDataset(Dataset):
    """Records -> ``(x, target)`` for one task.

    Returns:
        ``x``: normalised input (3, S, S) float32. ``target``: seg -> (S, S) int64 class map; cls -> int64
        scalar; enhance -> (1, S, S) float32 clean frame in [0, 1] (``x`` is then the degraded frame).
    """

    def __init__(self, records: Sequence[Record], task: str, spec: PreprocessSpec, train: bool, seed: int = 0,
                 scale=(0.6, 1.0), augment: str = "basic"):
        if not records:
            raise ConfigError(f"no records for the {task} dataset", hint="check --data and --label-fraction")
        if task not in ("seg", "cls", "enhance"):
            raise ConfigError(f"unknown task {task!r}")
        if task == "seg" and any(r.mask is None for r in records):
            raise ConfigError("segmentation needs masks: some records have none", path=records[0].image)
        if task == "cls" and any(r.label is None for r in records):
            raise ConfigError("classification needs labels: some records have none", path=records[0].image)
        self.records, self.task, self.spec, self.train = list(records), task, spec, train
        self.seed, self.scale = int(seed), scale
        self._frames: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._sized: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        from usfm_edge.data.augment import AUGMENT_PRESETS, UltrasoundAugment

        if augment != "basic" and augment not in AUGMENT_PRESETS:
            raise ConfigError(f"unknown augmentation {augment!r}", hint="choose basic, " + ", ".join(AUGMENT_PRESETS))
        self.augment = augment
        preset = AUGMENT_PRESETS.get(augment)
        self._us = UltrasoundAugment(preset) if preset is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def _frame(self, i: int) -> np.ndarray:
        if i not in self._frames:
            self._frames[i] = read_image(self.records[i].image)
        return self._frames[i]

    def _mask(self, i: int) -> np.ndarray:
        if i not in self._masks:
            self._masks[i] = read_record_mask(self.records[i]).astype(np.uint8)
        return self._masks[i]

    def _normalise(self, img01: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.spec.mean, np.float32)[:, None, None]
        std = np.asarray(self.spec.std, np.float32)[:, None, None]
        return ((img01[None] - mean) / std).astype(np.float32)

    def _sized_item(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The frame in [0, 1] and its class map at S x S, resized once (inference resampling for the frame)."""
        if i not in self._sized:
            s = self.spec.img_size
            frame = self._frame(i)
            img = np.clip(resize_gray(frame, (s, s), self.spec.interpolation, self.spec.antialias) / 255.0, 0, 1)
            mask = None
            if self.task == "seg":
                m = self._mask(i)
                wh = resize_matrix(m.shape[0], s, "bilinear", True).astype(np.float32)
                ww = resize_matrix(m.shape[1], s, "bilinear", True).astype(np.float32)
                planes = [wh @ (m == k).astype(np.float32) @ ww.T for k in range(max(int(m.max()) + 1, 2))]
                mask = np.argmax(np.stack(planes), axis=0).astype(np.uint8)
            self._sized[i] = (img.astype(np.float32), mask)
        return self._sized[i]

    def _recipe_item(self, index: int, rng: np.random.Generator):
        img, mask = self._sized_item(index)
        if self.train and self._us is not None:
            img, mask = self._us(img, mask, rng)
        x = torch.from_numpy(self._normalise(np.ascontiguousarray(img, dtype=np.float32)))
        if self.task == "seg":
            return x, torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
        return x, torch.tensor(int(self.records[index].label))

    def __getitem__(self, key):
        epoch, position, index = (0, int(key), int(key)) if isinstance(key, (int, np.integer)) else key
        rng = np.random.default_rng([self.seed, _SALT, epoch, position])
        if self.augment != "basic" and self.task != "enhance":
            return self._recipe_item(index, rng)
        frame = self._frame(index)
        h, w = frame.shape
        box, flip = (0, 0, h, w), False
        if self.train:
            box, flip = random_crop_box(h, w, rng, self.scale), bool(rng.random() < 0.5)
        top, left, ch, cw = box
        s = self.spec.img_size
        img = resize_gray(frame[top:top + ch, left:left + cw], (s, s), self.spec.interpolation, self.spec.antialias) / 255.0
        img = np.clip(img, 0.0, 1.0)
        if flip:
            img = img[:, ::-1]
        if self.train and self.task != "enhance":
            gain, gamma = rng.uniform(0.8, 1.2), np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
            img = np.clip(gain * img ** gamma, 0.0, 1.0)
        img = np.ascontiguousarray(img, dtype=np.float32)
        if self.task == "seg":
            m = resize_nearest(self._mask(index)[top:top + ch, left:left + cw], (s, s))
            m = m[:, ::-1] if flip else m
            return torch.from_numpy(self._normalise(img)), torch.from_numpy(np.ascontiguousarray(m).astype(np.int64))
        if self.task == "cls":
            return torch.from_numpy(self._normalise(img)), torch.tensor(int(self.records[index].label))
        from usfm_edge.data.degrade import degrade

        bad = np.clip(np.round(degrade(img, rng) * 255.0), 0, 255) / 255.0  # quantised like a real 8-bit frame
        return torch.from_numpy(self._normalise(bad.astype(np.float32))), torch.from_numpy(img[None].copy())
