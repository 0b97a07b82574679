"""``Engine``: open a bundle, pick a backend, run raw frames, return typed results (numpy only, never torch).

    from usfm_edge.runtime import Engine
    with Engine.open("breast_seg.usfm") as engine:
        result = engine.predict(frame)            # uint8 grey/RGB array of any size, or a file path
        result.mask, result.areas_mm2

Raw-frame bundles do resize, filtering and normalisation inside the graph: the engine only validates the
frame (``core.preprocess.check_frame``) and reads the outputs. ``bare`` bundles take the normalised
``(B, 3, S, S)`` tensor: the engine preprocesses with ``core.preprocess`` (the same resampling) and does
the post-processing (resize back, softmax, argmax) in numpy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from usfm_edge.core.bundle_schema import BundleMeta
from usfm_edge.core.errors import BackendUnavailableError, BundleError, ConfigError, InputError
from usfm_edge.core.preprocess import PreprocessSpec, check_frame, preprocess, resize_matrix
from usfm_edge.runtime.backends import (
    BACKEND_EXTRAS,
    Backend,
    OnnxRuntimeBackend,
    OpenVINOBackend,
    TensorRTBackend,
)
from usfm_edge.runtime.bundle_io import read_meta, verify_bundle
from usfm_edge.runtime.results import ClsResult, EnhanceResult, FeaturesResult, Result, SegResult, class_areas

__all__ = ["Engine", "available_backends"]

log = logging.getLogger(__name__)

_ORDER = ("tensorrt", "openvino", "onnxruntime")
_FILE_ROLE = {"tensorrt": "tensorrt_engine", "openvino": "openvino_xml", "onnxruntime": "onnx"}


def available_backends() -> list[str]:
    """Backends whose Python package is importable here (cheap: does not import them)."""
    import importlib.util

    mods = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
    return [b for b in _ORDER if importlib.util.find_spec(mods[b]) is not None]


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _resize_maps(maps: np.ndarray, hw: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(..., S, S) float -> (..., H, W) float32 with the torch/ONNX resampling of ``core.preprocess``."""
    s_h, s_w = maps.shape[-2:]
    wh = resize_matrix(s_h, hw[0], mode).astype(np.float32)
    ww = resize_matrix(s_w, hw[1], mode).astype(np.float32)
    return (wh @ maps.astype(np.float32) @ ww.T).astype(np.float32)


class Engine:
    """A bundle loaded on one backend; thread-safe ``predict`` / ``predict_batch``.

    Use :meth:`open`; the constructor takes an already created backend.
    """

    def __init__(self, folder: Path, meta: BundleMeta, backend: Backend):
        self.folder = Path(folder)
        self.meta = meta
        self.backend = backend
        self.task = meta.task
        self.labels = list(meta.labels)
        self.spec = PreprocessSpec.from_dict(meta.preprocessing)
        self.raw = bool(meta.input.raw_frame)
        self.output_names = [o.name for o in meta.outputs]
        self._mask = None
        if not self.raw and meta.band_stop.get("enabled"):
            name = meta.files.get("band_stop_mask")
            if not name:
                raise BundleError("bare bundle with band-stop filtering lacks its band_stop_mask file", path=folder)
            self._mask = np.load(self.folder / name, allow_pickle=False)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, backend: str = "auto", device: str = "auto", threads: int | None = None,
             warmup: int = 1, verify: bool = True) -> Engine:
        """Verify a bundle, load it on a backend and warm it up.

        Args:
            path: the ``NAME.usfm`` folder.
            backend: ``auto`` (TensorRT engine if present and importable > OpenVINO IR > ONNX Runtime),
                ``tensorrt``, ``openvino`` or ``onnxruntime``.
            device: ``auto`` (the bundle's default device), ``cpu``, ``gpu``, ``cuda[:N]``, ``npu``...
            threads: CPU threads for ONNX Runtime / OpenVINO (None = backend default).
            warmup: number of warm-up runs on a blank frame.
            verify: check ``SHA256SUMS`` and the schema first (``verify_bundle``).

        Raises:
            BundleError: corrupt, tampered or too new bundle, or a model the backend cannot load.
            BackendUnavailableError: the needed backend is not installed (names the extra).
            ConfigError: unknown backend name.
        """
        folder = Path(path)
        meta = verify_bundle(folder) if verify else read_meta(folder)
        be = cls._make_backend(folder, meta, backend, device, threads)
        engine = cls(folder, meta, be)
        for _ in range(max(0, int(warmup))):
            engine.run_raw(engine._blank_input())
        return engine

    @staticmethod
    def _make_backend(folder: Path, meta: BundleMeta, backend: str, device: str, threads: int | None) -> Backend:
        names = [o.name for o in meta.outputs]
        present = {b: (folder / meta.files[r]).is_file() for b, r in _FILE_ROLE.items() if r in meta.files}
        if backend not in ("auto", *_ORDER):
            raise ConfigError(f"unknown backend '{backend}'; choose auto, {', '.join(_ORDER)}")
        if backend != "auto" and not present.get(backend):
            have = ", ".join(b for b, ok in present.items() if ok) or "none"
            raise BundleError(f"bundle has no model file for backend '{backend}' (usable: {have})", path=folder)
        candidates = [backend] if backend != "auto" else [b for b in _ORDER if present.get(b)]
        if not candidates:
            raise BundleError("bundle holds no model file (onnx, openvino_xml or tensorrt_engine)", path=folder)
        errors = []
        for b in candidates:
            dev = meta.device if (device == "auto" and b == meta.backend) else device
            try:
                if b == "tensorrt":
                    return TensorRTBackend(folder / meta.files["tensorrt_engine"], names, dev)
                if b == "openvino":
                    return OpenVINOBackend(folder / meta.files["openvino_xml"], names, dev, meta.precision, threads)
                return OnnxRuntimeBackend(folder / meta.files["onnx"], names, dev, threads,
                                          fp16=meta.precision != "fp32")
            except BackendUnavailableError as exc:
                if backend != "auto":
                    raise
                errors.append(f"{b}: {exc}")
            except BundleError as exc:  # e.g. an engine built for another GPU: fall back to the portable files
                if backend != "auto" or b != "tensorrt" or len(candidates) == 1:
                    raise
                log.warning("%s; falling back to %s", exc, candidates[1])
                errors.append(f"{b}: {exc}")
        extras = " or ".join(f"'usfm-edge[{BACKEND_EXTRAS[b]}]'" for b in candidates)
        raise BackendUnavailableError("no backend can run this bundle here: " + "; ".join(errors),
                                      hint=f"pip install {extras}")

    def close(self) -> None:
        """Release the backend."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Engine({self.folder.name}, task={self.task}, precision={self.meta.precision}, "
                f"backend={self.backend!r})")

    # -- low level -----------------------------------------------------------------------------------
    @property
    def dynamic_batch(self) -> bool:
        return "batch" in self.meta.input.dynamic_axes

    def _blank_input(self) -> np.ndarray:
        s = int(self.spec.img_size)
        if not self.raw:
            return np.zeros((1, self.spec.in_chans, s, s), np.float32)
        h, w = self.meta.input.static_hw or (s, s)
        return np.zeros((1, h, w), np.uint8)

    def run_raw(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on its own input tensor (uint8 ``(B, H, W)`` or normalised ``(B, 3, S, S)``)."""
        if self.backend is None:
            raise BundleError("engine is closed", path=self.folder)
        return self.backend.run(batch)

    def check(self, frame) -> np.ndarray:
        """Validate one frame against the bundle's input contract -> uint8 grey ``(H, W)``."""
        gray = check_frame(frame, self.spec)
        h, w = gray.shape
        inp = self.meta.input
        if min(h, w) < inp.min_side or max(h, w) > inp.max_side:
            raise InputError(f"frame is {h}x{w}; this bundle accepts sides {inp.min_side}..{inp.max_side} px")
        if inp.static_hw is not None and [h, w] != list(inp.static_hw):
            sh, sw = inp.static_hw
            raise InputError(f"frame is {h}x{w} but this bundle has static shapes for {sh}x{sw} frames",
                             hint="export again with frame_size=(H, W) of your scanner, or use the 'onnx' target")
        return gray

    def _load(self, item, spacing):
        if isinstance(item, (str, Path)):
            from usfm_edge.data.readers import is_dicom, read_dicom, read_image

            if is_dicom(item):
                d = read_dicom(item)
                return d.frames[0], spacing if spacing is not None else d.pixel_spacing_mm
            return read_image(item), spacing
        return item, spacing

    # -- prediction ----------------------------------------------------------------------------------
    def predict(self, frame, pixel_spacing_mm: float | tuple[float, float] | None = None) -> Result:
        """Predict one frame.

        Args:
            frame: uint8 grey ``(H, W)`` or RGB ``(H, W, 3)`` array of any size, or an image/DICOM path.
            pixel_spacing_mm: ``(row, col)`` or isotropic spacing for seg areas in mm² (DICOM files carry it).

        Returns:
            ``SegResult``, ``ClsResult``, ``EnhanceResult`` or ``FeaturesResult``.

        Raises:
            InputError: the frame is unusable (the engine stays usable).
            DataError: the path cannot be read.
        """
        return self.predict_batch([frame], pixel_spacing_mm)[0]

    def predict_batch(self, frames: Iterable, pixel_spacing_mm: float | tuple[float, float] | None = None,
                      batch_size: int = 8) -> list[Result]:
        """Predict several frames; same-size frames are batched when the graph allows a dynamic batch.

        Args:
            frames: arrays and/or paths (see :meth:`predict`).
            pixel_spacing_mm: spacing applied to every frame without its own (DICOM) spacing.
            batch_size: largest batch sent to the backend at once.

        Returns:
            one result per frame, in order.
        """
        loaded = []
        for i, item in enumerate(frames):
            raw, spacing = self._load(item, pixel_spacing_mm)
            try:
                gray = self.check(raw)
            except InputError as exc:
                raise InputError(f"frame {i}: {exc.message}", hint=exc.hint) from None
            if spacing is not None and not isinstance(spacing, (tuple, list)):
                spacing = (float(spacing), float(spacing))
            loaded.append((gray, tuple(spacing) if spacing is not None else None))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (g, _) in enumerate(loaded):
            groups.setdefault(g.shape, []).append(i)
        step = max(1, int(batch_size)) if self.dynamic_batch else 1
        results: list[Result | None] = [None] * len(loaded)
        for idx in groups.values():
            for start in range(0, len(idx), step):
                chunk = idx[start:start + step]
                t0 = time.perf_counter()
                outs = self._infer([loaded[i][0] for i in chunk])
                per = (time.perf_counter() - t0) * 1000.0 / len(chunk)
                for j, i in enumerate(chunk):
                    results[i] = self._result({k: v[j] for k, v in outs.items()}, loaded[i][1], per)
        return results  # type: ignore[return-value]

    def _infer(self, grays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Frames of one size -> final per-frame outputs (post-processed to frame size)."""
        if self.raw:
            return self.run_raw(np.stack(grays))
        x = np.stack([self._preprocess(g) for g in grays])
        outs = self.run_raw(x)
        hw = grays[0].shape
        if self.task == "seg":
            logits = _resize_maps(outs["logits"], hw)
            return {"probs": _softmax(logits, 1).astype(np.float32), "mask": logits.argmax(1).astype(np.uint8)}
        if self.task == "cls":
            return {"probs": _softmax(outs["logits"].astype(np.float32), -1)}
        if self.task == "enhance":
            img = _resize_maps(outs["restored"][:, 0], hw)
            return {"restored": np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)}
        return outs

    def _preprocess(self, gray: np.ndarray) -> np.ndarray:
        if self._mask is None:
            return preprocess(gray, self.spec)
        from usfm_edge.core.preprocess import resize_gray
        from usfm_edge.kernels.reference import band_stop_filter_np

        s = self.spec.img_size
        img = resize_gray(gray, (s, s), self.spec.interpolation, self.spec.antialias) / np.float32(255.0)
        img = band_stop_filter_np(img.astype(np.float64), self._mask).astype(np.float32)
        mean = np.asarray(self.spec.mean, np.float32)[:, None, None]
        std = np.asarray(self.spec.std, np.float32)[:, None, None]
        return ((img[None] - mean) / std).astype(np.float32)

    def _result(self, out: dict[str, np.ndarray], spacing, ms: float) -> Result:
        if self.task == "seg":
            mask = np.ascontiguousarray(out["mask"])
            px, mm2 = class_areas(mask, self.labels, spacing)
            return SegResult(mask=mask, probs=np.ascontiguousarray(out["probs"], dtype=np.float32), labels=self.labels,
                             areas_px=px, areas_mm2=mm2, pixel_spacing_mm=spacing, timing_ms=ms)
        if self.task == "cls":
            probs = np.asarray(out["probs"], dtype=np.float32)
            k = int(probs.argmax())
            name = self.labels[k] if k < len(self.labels) else str(k)
            return ClsResult(probs=probs, label=k, label_name=name, labels=self.labels, timing_ms=ms)
        if self.task == "enhance":
            return EnhanceResult(image=np.ascontiguousarray(out["restored"]), timing_ms=ms)
        return FeaturesResult(features=np.asarray(out["features"], dtype=np.float32), timing_ms=ms)
