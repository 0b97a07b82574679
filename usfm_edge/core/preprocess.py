"""Preprocessing contract shared by training, export and the runtime (numpy implementation).

USFM's official pipeline reads a grey B-mode frame as RGB (grey replicated to 3 channels), resizes it to a
square with bicubic interpolation, scales to [0, 1] and normalises with the ImageNet mean/std
(dossier §4). ``PreprocessSpec`` records exactly that, and ``preprocess`` implements it in numpy so a
device without torch computes the same tensor the model was trained on.

Resampling: ``bicubic`` is cubic convolution with a = -0.75 on half-pixel centres, edge-clamped, without
antialiasing: the definition shared by ``torch.nn.functional.interpolate(mode="bicubic")`` and ONNX
``Resize(mode="cubic")``, so the in-graph preprocessing of an exported bundle and this function agree.
``antialias=True`` widens the kernel when downsampling (a = -0.5, as PIL and torch's antialias path do),
which matches PIL's ``Image.resize(BICUBIC)`` used by the official classification pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from usfm_edge.core.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """What turns a raw uint8 grey frame into the model's input tensor.

    Attributes:
        img_size: side of the square model input in pixels (multiple of the patch size).
        interpolation: ``bicubic`` or ``bilinear``.
        antialias: widen the resampling kernel when downsampling (PIL-like); off by default because
            it is not expressible in every backend's resize op.
        mean: per-channel mean subtracted after scaling to [0, 1] (ImageNet, as USFM).
        std: per-channel std divided after the mean.
        in_chans: channels the model expects; grey is replicated (USFM: 3).
        max_side: frames with a side longer than this are refused (protects the device's memory).
    """

    img_size: int = 224
    interpolation: str = "bicubic"
    antialias: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    in_chans: int = 3
    max_side: int = 4096
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        from usfm_edge.core.errors import ConfigError

        if self.interpolation not in ("bicubic", "bilinear"):
            raise ConfigError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if self.img_size < 1:
            raise ConfigError(f"img_size must be positive, got {self.img_size}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError("mean and std need one value per input channel")
        if any(s <= 0 for s in self.std):
            raise ConfigError("std values must be positive")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        from usfm_edge.core.config import from_dict

        return from_dict(cls, d)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    x2, x3 = x * x, x * x * x
    w = np.where(x <= 1, (a + 2) * x3 - (a + 3) * x2 + 1, 0.0)
    return np.where((x > 1) & (x < 2), a * x3 - 5 * a * x2 + 8 * a * x - 4 * a, w)


def _linear(x: np.ndarray, a: float) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


@lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, interpolation: str = "bicubic", antialias: bool = False) -> np.ndarray:
    """Dense (out_size, in_size) float64 resampling matrix: ``out = W @ signal`` along one axis.

    Half-pixel centres, edge clamping; rows sum to 1. Without antialiasing this is exactly
    ``torch.nn.functional.interpolate(mode, align_corners=False)`` (cubic a = -0.75, taps clamped to the border),
    including its float32 source coordinates: ``fma(float(in) / out, i + 0.5f, -0.5f)`` rounded once to float32, as
    torch's compiled CPU kernel computes them (computed in float64 they drift by ~1e-5 px, up to 7e-3 grey levels
    on a real 540x800 frame; float32 without the fused multiply-add, 1e-3: tests/test_resize_matmul.py).
    """
    scale = in_size / out_size
    kernel, support = (_cubic, 2.0) if interpolation == "bicubic" else (_linear, 1.0)
    a = -0.75
    stretch = 1.0
    if antialias:  # PIL / torch antialias convention: a = -0.5, kernel widened when downsampling
        stretch, a = max(scale, 1.0), -0.5
        centres = (np.arange(out_size) + 0.5) * scale - 0.5
    else:  # torch's area_pixel_compute_source_index in float32 (the product of two float32 is exact in float64)
        f32 = np.float32
        half = (np.arange(out_size, dtype=f32) + f32(0.5)).astype(np.float64)
        centres = (np.float64(f32(in_size) / f32(out_size)) * half - 0.5).astype(f32).astype(np.float64)
    reach = int(np.ceil(support * stretch)) + 1
    base = np.floor(centres).astype(np.int64)
    offsets = np.arange(-reach + 1, reach + 1)
    taps = base[:, None] + offsets[None, :]
    weights = kernel((taps - centres[:, None]) / stretch, a)
    if antialias:
        # antialias (PIL / torch antialias): taps outside the image are dropped and the rest renormalised
        weights = np.where((taps >= 0) & (taps < in_size), weights, 0.0)
        weights = weights / weights.sum(axis=1, keepdims=True)
    mat = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.repeat(np.arange(out_size), taps.shape[1])
    np.add.at(mat, (rows, np.clip(taps, 0, in_size - 1).ravel()), weights.ravel())
    return mat


def resize_gray(frame: np.ndarray, out_hw: tuple[int, int], interpolation="bicubic", antialias=False) -> np.ndarray:
    """Resize a 2-D array (any real dtype) to ``out_hw``; returns float32 (no clipping)."""
    h, w = frame.shape
    wh = resize_matrix(h, out_hw[0], interpolation, antialias).astype(np.float32)
    ww = resize_matrix(w, out_hw[1], interpolation, antialias).astype(np.float32)
    return wh @ frame.astype(np.float32) @ ww.T


def fit_frame(frame: np.ndarray, hw: tuple[int, int] | None, interpolation: str = "bicubic",
              antialias: bool = False) -> np.ndarray:
    """Resize a uint8 frame to ``hw`` (rounded, clipped to uint8) for a static-shape graph; unchanged when ``hw``
    is None or already the frame's size. Only ``runtime.Engine`` calls it (with the bundle's interpolation)."""
    if hw is None or tuple(frame.shape) == tuple(hw):
        return frame
    return np.clip(np.round(resize_gray(frame, tuple(hw), interpolation, antialias)), 0, 255).astype(np.uint8)


def resize_nearest(a: np.ndarray, hw: tuple[int, int], centred: bool = True) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes (label maps, masks), C-contiguous.

    ``centred``: sample at pixel centres (``(i + 0.5) * in / out``, the half-pixel convention of the training
    masks and of ``resize_matrix``); False: ``i * in // out`` (top-left aligned).
    """
    (h, w), (oh, ow) = a.shape[-2:], hw
    if centred:
        ys = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
        xs = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    else:
        ys, xs = np.arange(oh) * h // oh, np.arange(ow) * w // ow
    return np.ascontiguousarray(a[..., ys[:, None], xs[None, :]])


def frame_layout(frame, name: str = "frame") -> tuple[int, int, str]:
    """``(H, W, layout)`` of a raw frame from its shape alone (no data is read, nothing is copied).

    ``layout``: ``HW``, ``HWC`` (channels last: 1, 3 or 4) or ``CHW`` (channels first: 1 or 3).

    Raises:
        InputError: not an array, empty, or a shape that is no frame.
    """
    if not isinstance(frame, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(frame).__name__}")
    shape = frame.shape
    if frame.ndim not in (2, 3):
        if frame.size == 0:
            raise InputError(f"{name} is empty (shape {shape})")
        raise InputError(f"{name} has {frame.ndim} dimensions (shape {shape}); expected a 2-D grey frame")
    if frame.ndim == 2:
        h, w, layout = shape[0], shape[1], "HW"
    elif shape[0] in (1, 3) and shape[-1] not in (1, 3, 4):
        h, w, layout = shape[1], shape[2], "CHW"
    elif shape[-1] in (1, 3, 4):
        h, w, layout = shape[0], shape[1], "HWC"
    else:
        raise InputError(f"{name} has shape {shape}; expected (H, W), (H, W, 3) or (3, H, W)")
    if frame.size == 0:
        raise InputError(f"{name} is empty: {h}x{w} pixels (shape {shape})")
    return int(h), int(w), layout


def check_frame(frame, spec: PreprocessSpec | None = None, name: str = "frame", *, min_side: int = 2,
                max_side: int | None = None) -> np.ndarray:
    """Validate one raw frame and return it as a C-contiguous uint8 (H, W) grey array.

    Accepts uint8 (H, W), (H, W, 1), (H, W, 3/4) RGB(A) or channel-first (1/3, H, W). RGB is converted
    to grey with ITU-R BT.601 luma weights. Anything else raises InputError naming the problem.

    The shape, the sides (``min_side``; ``max_side``, else ``spec.max_side``) and the dtype are checked on the
    array as given, before any conversion, copy or scan of the values: a 20000x20000x3 frame (or a broadcast view
    of one) is refused without allocating anything.
    """
    h, w, layout = frame_layout(frame, name)
    limit = max_side if max_side is not None else (spec.max_side if spec is not None else None)
    if min(h, w) < max(2, int(min_side)):
        need = max(2, int(min_side))
        raise InputError(f"{name} is {h}x{w} pixels; this model needs sides of at least {need} px")
    if limit is not None and max(h, w) > limit:
        raise InputError(f"{name} is {h}x{w} pixels, larger than the configured maximum side {limit} px",
                         hint="crop or downsample the frame, or open the engine with a larger max_side")
    if frame.dtype == np.bool_:
        raise InputError(f"{name} has dtype bool (a mask?); expected a uint8 grey or RGB frame")
    if frame.dtype != np.uint8:
        if frame.dtype.kind in "fc" and not np.isfinite(frame).all():
            raise InputError(f"{name} ({frame.dtype}) contains NaN or infinite values; expected a uint8 frame",
                             hint="fix the source of the frame; the engine never guesses a value for NaN")
        raise InputError(
            f"{name} has dtype {frame.dtype}; expected uint8 (raw 8-bit B-mode frame)",
            hint="convert with np.clip(x, 0, 255).astype(np.uint8) if the values are already 0..255",
        )
    if layout == "CHW":
        frame = np.moveaxis(frame, 0, -1)
    if layout != "HW":
        if frame.shape[-1] == 1:
            frame = frame[..., 0]
        else:
            rgb = frame[..., :3].astype(np.float32)
            frame = np.clip(rgb @ np.array([0.299, 0.587, 0.114], np.float32) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frame)


def preprocess(frame: np.ndarray, spec: PreprocessSpec = PreprocessSpec(),
               band_stop_mask: np.ndarray | None = None) -> np.ndarray:
    """Raw uint8 frame (any size) -> float32 model input of shape (in_chans, S, S).

    ``band_stop_mask``: an ``(S, S)`` mask (``core.band_stop``) applied to the resized [0, 1] image before the
    normalisation, as the exported graph does in-graph (bare bundles with band-stop filtering).
    """
    gray = check_frame(frame, spec)
    s = spec.img_size
    img = resize_gray(gray, (s, s), spec.interpolation, spec.antialias) / np.float32(255.0)
    if band_stop_mask is not None:
        from usfm_edge.core.band_stop import band_stop_filter_np

        img = band_stop_filter_np(img.astype(np.float64), band_stop_mask).astype(np.float32)
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    return ((img[None] - mean) / std).astype(np.float32)


def preprocess_batch(frames, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """List of raw frames -> (B, in_chans, S, S) float32."""
    return np.stack([preprocess(f, spec) for f in frames])
