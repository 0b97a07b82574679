"""Typed results of ``Engine.predict`` (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SegResult", "ClsResult", "EnhanceResult", "FeaturesResult", "Result", "class_areas", "resize_maps", "result_at_size"]


@dataclass
class SegResult:
    """Segmentation of one frame.

    Attributes:
        mask: uint8 ``(H, W)`` class index per pixel, at the frame's own size.
        probs: float32 ``(K, H, W)`` class probabilities.
        labels: class names, index = class id.
        areas_px: pixels per class name.
        areas_mm2: mm² per class name when the pixel spacing is known, else None.
        pixel_spacing_mm: ``(row, col)`` spacing used for ``areas_mm2``.
        timing_ms: wall time of this frame's prediction (the batch's time divided by its size).
    """

    mask: np.ndarray
    probs: np.ndarray
    labels: list[str]
    areas_px: dict[str, int]
    areas_mm2: dict[str, float] | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    timing_ms: float = 0.0
    task: str = field(default="seg", init=False)


@dataclass
class ClsResult:
    """Classification of one frame.

    Attributes:
        probs: float32 ``(K,)`` class probabilities.
        label: index of the most probable class.
        label_name: its name.
        labels: all class names.
        timing_ms: wall time of this frame's prediction.
    """

    probs: np.ndarray
    label: int
    label_name: str
    labels: list[str]
    timing_ms: float = 0.0
    task: str = field(default="cls", init=False)


@dataclass
class EnhanceResult:
    """Restored (enhanced) frame.

    Attributes:
        image: uint8 ``(H, W)`` at the frame's own size.
        timing_ms: wall time of this frame's prediction.
    """

    image: np.ndarray
    timing_ms: float = 0.0
    task: str = field(default="enhance", init=False)


@dataclass
class FeaturesResult:
    """Embedding of one frame.

    Attributes:
        features: float32 ``(D,)`` pooled embedding.
        timing_ms: wall time of this frame's prediction.
    """

    features: np.ndarray
    timing_ms: float = 0.0
    task: str = field(default="features", init=False)


Result = SegResult | ClsResult | EnhanceResult | FeaturesResult


def class_areas(mask: np.ndarray, labels: list[str],
                pixel_spacing_mm: tuple[float, float] | None) -> tuple[dict[str, int], dict[str, float] | None]:
    """Pixels (and mm² when the spacing is known) of each class in a mask."""
    counts = np.bincount(mask.ravel(), minlength=len(labels))
    names = [labels[i] if i < len(labels) else f"class_{i}" for i in range(counts.size)]
    px = {n: int(c) for n, c in zip(names, counts)}
    if pixel_spacing_mm is None:
        return px, None
    dy, dx = pixel_spacing_mm
    return px, {n: float(c) * float(dy) * float(dx) for n, c in px.items()}


def resize_maps(maps: np.ndarray, hw: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """``(..., h, w)`` -> ``(..., H, W)`` float32 with the torch/ONNX resampling of ``core.preprocess.resize_matrix``
    (half-pixel centres): the engine's post-processing of bare bundles and :func:`result_at_size` use it."""
    from usfm_edge.core.preprocess import resize_matrix

    h, w = maps.shape[-2:]
    wh = resize_matrix(h, hw[0], mode).astype(np.float32)
    ww = resize_matrix(w, hw[1], mode).astype(np.float32)
    return (wh @ maps.astype(np.float32) @ ww.T).astype(np.float32)


def result_at_size(res: Result, hw: tuple[int, int]) -> Result:
    """Map a result computed on a resized frame back to a frame of size ``hw`` (a new result).

    The one rule for static-shape bundles (jetson / tensorrt) scored on frames of another size, used by the
    INT8 accuracy gate, ``usfm-edge evaluate`` and ``usfm-edge bench`` alike, and the same resampling the
    engine applies to a bare bundle's outputs: segmentation probabilities are resized bilinearly (half-pixel
    centres, ``core.preprocess.resize_matrix``), the mask is their argmax and the areas are recounted;
    a restored image is resized bilinearly and rounded. Classification and features need nothing.
    """
    import dataclasses

    hw = (int(hw[0]), int(hw[1]))
    if isinstance(res, SegResult) and res.mask.shape != hw:
        probs = resize_maps(res.probs, hw)
        mask = probs.argmax(0).astype(np.uint8)
        px, mm2 = class_areas(mask, res.labels, res.pixel_spacing_mm)
        return dataclasses.replace(res, mask=mask, probs=probs, areas_px=px, areas_mm2=mm2)
    if isinstance(res, EnhanceResult) and res.image.shape != hw:
        return dataclasses.replace(res, image=np.clip(np.round(resize_maps(res.image, hw)), 0, 255).astype(np.uint8))
    return res
