"""Typed results of ``Engine.predict`` and the numpy post-processing that makes them from graph outputs (numpy
only): outputs mapped back to the frame's size (:func:`outputs_at_size` for raw-frame graphs,
:func:`bare_outputs_at_size` for bare ones) and one frame's outputs -> its result (:func:`make_result`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from usfm_edge.core.errors import ConfigError

__all__ = ["SegResult", "ClsResult", "EnhanceResult", "FeaturesResult", "Result", "class_areas", "resize_maps",
           "outputs_at_size", "bare_outputs_at_size", "make_result", "pixel_spacing"]


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


def pixel_spacing(value) -> tuple[float, float] | None:
    """``None``, a number (isotropic) or ``(row, col)`` -> ``(row, col)`` floats in mm.

    Raises:
        ConfigError: not one or two positive finite numbers.
    """
    if value is None:
        return None
    if isinstance(value, (tuple, list, np.ndarray)):
        if len(value) != 2:
            raise ConfigError(f"pixel spacing must be one number or (row, col) in mm, got {value!r}")
        out = (float(value[0]), float(value[1]))
    else:
        out = (float(value), float(value))
    if not all(np.isfinite(v) and v > 0 for v in out):
        raise ConfigError(f"pixel spacing must be positive and finite, got {value!r}")
    return out


def class_areas(mask: np.ndarray, labels: list[str],
                pixel_spacing_mm: tuple[float, float] | None) -> tuple[dict[str, int], dict[str, float] | None]:
    """Pixels (and mm² when the spacing is known) of each class in a mask (classes beyond ``labels`` are named
    ``class_<i>``); ``count_nonzero`` per class is ~10x faster than ``bincount`` on uint8 masks."""
    k = max(len(labels), int(mask.max()) + 1) if mask.size else len(labels)
    names = [labels[i] if i < len(labels) else f"class_{i}" for i in range(k)]
    if k <= 16:
        px = {n: int(np.count_nonzero(mask == i)) for i, n in enumerate(names)}
    else:
        px = {n: int(c) for n, c in zip(names, np.bincount(mask.ravel(), minlength=k))}
    if pixel_spacing_mm is None:
        return px, None
    area = float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    return px, {n: c * area for n, c in px.items()}


def resize_maps(maps: np.ndarray, hw: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """``(..., h, w)`` -> ``(..., H, W)`` float32 with the torch/ONNX resampling of ``core.preprocess.resize_matrix``
    (half-pixel centres): the engine's post-processing of bare bundles and :func:`outputs_at_size` use it."""
    from usfm_edge.core.preprocess import resize_matrix

    h, w = maps.shape[-2:]
    wh = resize_matrix(h, hw[0], mode).astype(np.float32)
    ww = resize_matrix(w, hw[1], mode).astype(np.float32)
    return (wh @ maps.astype(np.float32) @ ww.T).astype(np.float32)


def outputs_at_size(outs: dict[str, np.ndarray], task: str, hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """A raw-frame graph's outputs for a batch -> the same outputs at frame size ``hw`` (new arrays where resized).

    The one rule for static-shape bundles (jetson / tensorrt) run on frames of another size (``Engine``, hence
    predict, evaluate, the INT8 gate, parity and bench): segmentation probabilities ``(B, K, h, w)`` are resized
    bilinearly (half-pixel centres, ``core.preprocess.resize_matrix``) and the mask is their argmax; a restored
    image ``(B, h, w)`` is resized bilinearly and rounded. Classification and features need nothing; outputs
    already at ``hw`` are returned unchanged.
    """
    hw = (int(hw[0]), int(hw[1]))
    if task == "seg" and tuple(outs["probs"].shape[-2:]) != hw:
        probs = resize_maps(outs["probs"], hw)
        return {**outs, "probs": probs, "mask": probs.argmax(-3).astype(np.uint8)}
    if task == "enhance" and tuple(outs["restored"].shape[-2:]) != hw:
        img = np.clip(np.round(resize_maps(outs["restored"], hw)), 0, 255).astype(np.uint8)
        return {**outs, "restored": img}
    return outs


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def bare_outputs_at_size(outs: dict[str, np.ndarray], task: str, hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """A bare graph's outputs for a batch -> final outputs at frame size ``hw``: segmentation logits resized
    bilinearly, then softmax and argmax; classification logits -> softmax; a restored image in [0, 1] resized and
    scaled to uint8; features unchanged."""
    if task == "seg":
        logits = resize_maps(outs["logits"], hw)
        return {"probs": _softmax(logits, 1).astype(np.float32), "mask": logits.argmax(1).astype(np.uint8)}
    if task == "cls":
        return {"probs": _softmax(outs["logits"].astype(np.float32), -1)}
    if task == "enhance":
        img = resize_maps(outs["restored"][:, 0], hw)
        return {"restored": np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)}
    return outs


def make_result(task: str, labels: list[str], out: dict[str, np.ndarray], spacing: tuple[float, float] | None,
                ms: float) -> Result:
    """One frame's final outputs -> its typed result (seg areas from ``spacing`` when known)."""
    if task == "seg":
        mask = np.ascontiguousarray(out["mask"])
        px, mm2 = class_areas(mask, labels, spacing)
        return SegResult(mask=mask, probs=np.ascontiguousarray(out["probs"], dtype=np.float32), labels=labels,
                         areas_px=px, areas_mm2=mm2, pixel_spacing_mm=spacing, timing_ms=ms)
    if task == "cls":
        probs = np.asarray(out["probs"], dtype=np.float32)
        k = int(probs.argmax())
        name = labels[k] if k < len(labels) else str(k)
        return ClsResult(probs=probs, label=k, label_name=name, labels=labels, timing_ms=ms)
    if task == "enhance":
        return EnhanceResult(image=np.ascontiguousarray(out["restored"]), timing_ms=ms)
    return FeaturesResult(features=np.asarray(out["features"], dtype=np.float32), timing_ms=ms)
