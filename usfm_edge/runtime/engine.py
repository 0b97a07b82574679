"""``Engine``: open a bundle, pick a backend, run raw frames, return typed results (numpy only, never torch).

    from usfm_edge.runtime import Engine
    with Engine.open("breast_seg.usfm") as engine:
        result = engine.predict(frame)            # uint8 grey/RGB array of any size, or a file path
        result.mask, result.areas_mm2
        for r in engine.stream(read_dicom("cine.dcm").frames):   # cine loop, pipelined, in order
            ...

Raw-frame bundles do resize, filtering and normalisation inside the graph: the engine only validates the
frame (``core.preprocess.check_frame``) and reads the outputs. ``bare`` bundles take the normalised
``(B, 3, S, S)`` tensor: the engine preprocesses with ``core.preprocess`` (the same resampling) and does
the post-processing (resize back, softmax, argmax) in numpy.

Static shapes belong to the engine: a bundle with a static frame size (jetson / tensorrt) still takes frames of
any size. The engine fits each frame to ``meta.input.static_hw`` with the bundle's interpolation
(:func:`graph_input`) and maps the outputs back to the frame's size (``results.outputs_at_size``: probabilities
bilinearly, the mask as their argmax, a restored image resized). ``predict``, ``evaluate``, the INT8 gate,
parity and ``bench`` all go through it; none of them resizes frames itself.

Opening is verify-then-use (``bundle_io.BundleFiles``): each model file is read once, its bytes are checked
against ``SHA256SUMS`` and the backend is created from those bytes; links and special files are refused. The
validated ``usfm.json`` is then checked against the loaded graph (``runtime.contract``: output names, dtypes, ranks,
task and labels), statically and on a first run on a blank frame, so an edited ``usfm.json`` is a ``BundleError``
at open, never a backend's exception or nonsense later.

Every public method is safe to call from several threads at once (see ``backends``); a bad frame raises
``InputError`` and leaves the engine usable. Frame sizes are checked on the array's shape before any conversion or
copy (``core.preprocess.check_frame``), so an oversized frame costs no memory.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from usfm_edge.core.bundle_schema import BundleMeta
from usfm_edge.core.errors import BundleError, ConfigError, DataError, InputError, UsfmEdgeError
from usfm_edge.core.preprocess import PreprocessSpec, check_frame, fit_frame, preprocess
from usfm_edge.runtime.backends import Backend, available_backends, make_backend
from usfm_edge.runtime.bundle_io import BundleFiles, read_bundle_file
from usfm_edge.runtime.contract import check_graph, check_outputs
from usfm_edge.runtime.results import Result, bare_outputs_at_size, make_result, outputs_at_size, pixel_spacing

__all__ = ["Engine", "available_backends", "graph_input"]


def graph_input(meta: BundleMeta, grays: Sequence[np.ndarray], spec: PreprocessSpec | None = None,
                band_stop_mask: np.ndarray | None = None) -> np.ndarray:
    """Checked grey frames of one size -> the graph's input batch, exactly as a bundle is fed.

    Raw-frame graphs take the uint8 frames, fitted to ``meta.input.static_hw`` with the bundle's interpolation
    when the bundle has static shapes (``core.preprocess.fit_frame``, rounded to uint8); bare graphs take the
    normalised ``(B, C, S, S)`` tensor (``core.preprocess.preprocess``, band-stop filtered when the bundle is).

    Raises:
        BundleError: a bare band-stop bundle without its mask.
    """
    spec = spec or PreprocessSpec.from_dict(meta.preprocessing)
    if meta.input.raw_frame:
        hw = meta.input.static_hw
        fitted = [fit_frame(g, hw, spec.interpolation, spec.antialias) for g in grays]
        return fitted[0][None] if len(fitted) == 1 else np.stack(fitted)
    if meta.band_stop.get("enabled") and band_stop_mask is None:
        raise BundleError("a bare bundle with band-stop filtering needs its band_stop_mask to be fed")
    return np.stack([preprocess(g, spec, band_stop_mask) for g in grays])


_MODEL_ROLE = {"tensorrt": "tensorrt_engine", "openvino": "openvino_xml", "onnxruntime": "onnx"}  # usfm.json files


def _load_mask(data: bytes, path: Path) -> np.ndarray:
    """A band-stop mask ``.npy`` from its verified bytes."""
    try:
        mask = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy's ValueError / EOFError on a broken file
        raise BundleError(f"'{path.name}' is not a readable .npy mask: {exc}", path=path) from exc
    if mask.ndim != 2 or mask.dtype.kind not in "biuf":
        raise BundleError(f"'{path.name}' must hold a 2-D numeric mask, got {mask.dtype} {mask.shape}", path=path)
    return mask


class Engine:
    """A bundle loaded on one backend; thread-safe ``predict`` / ``predict_batch`` / ``stream``.

    Use :meth:`open`; the constructor takes an already created backend.

    Attributes:
        folder: the bundle folder.
        meta: its ``usfm.json`` (``BundleMeta``).
        backend: the loaded backend (``name``, ``device``, ``version``).
        task: ``seg``, ``cls``, ``enhance`` or ``features``.
        labels: class names (seg/cls).
        max_side: longest frame side accepted (the bundle's limit, lowered by ``open(max_side=...)``).
    """

    def __init__(self, folder: Path | None, meta: BundleMeta, backend: Backend, max_side: int | None = None,
                 band_stop_mask: np.ndarray | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.meta = meta
        self.backend = backend
        self.task = meta.task
        self.labels = list(meta.labels)
        self.spec = PreprocessSpec.from_dict(meta.preprocessing)
        self.raw = bool(meta.input.raw_frame)
        self.output_names = [o.name for o in meta.outputs]
        limits = [int(meta.input.max_side), int(self.spec.max_side)]
        if max_side is not None:
            if int(max_side) < int(meta.input.min_side):
                raise ConfigError(f"max_side {max_side} is below the bundle's min_side {meta.input.min_side}")
            limits.append(int(max_side))
        self.max_side = min(limits)
        self._shared: dict = {}  # threads / queues kept between streams (runtime.stream)
        self._shared_lock = threading.Lock()
        self._mask = band_stop_mask
        if not self.raw and meta.band_stop.get("enabled") and self._mask is None:
            name = meta.files.get("band_stop_mask")
            if not name or self.folder is None:
                raise BundleError("bare bundle with band-stop filtering lacks its band_stop_mask file", path=folder)
            self._mask = _load_mask(read_bundle_file(self.folder, name), self.folder / name)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, backend: str = "auto", device: str = "auto", threads: int | None = None,
             warmup: int = 1, verify: bool = True, *, max_side: int | None = None, spin: bool = True,
             trusted_keys: Sequence | None = None) -> Engine:
        """Verify a bundle, load it on a backend and warm it up.

        Args:
            path: the ``NAME.usfm`` folder.
            backend: ``auto`` (TensorRT engine if present and importable > OpenVINO IR > ONNX Runtime),
                ``tensorrt``, ``openvino`` or ``onnxruntime``.
            device: ``auto`` (the bundle's default device), ``cpu``, ``gpu``, ``cuda[:N]``, ``npu``...
            threads: CPU threads for ONNX Runtime / OpenVINO (None = backend default).
            warmup: number of warm-up runs on a blank frame. The first run (made also with ``warmup=0``) checks the
                outputs against ``usfm.json`` (``runtime.contract.check_outputs``).
            verify: check ``SHA256SUMS`` and the file listing; each model file's bytes are hashed as they are read
                and handed to the backend (``bundle_io.BundleFiles``). False still refuses links and special files
                and validates ``usfm.json``.
            max_side: refuse frames with a longer side (protects the device's memory); None = the bundle's limit.
            spin: ONNX Runtime's worker threads spin-wait between calls (its default, fastest alone); False
                frees the cores at once for other work in the process (docs/embedding.md).
            trusted_keys: Ed25519 public keys (PEM file paths or key objects; ``runtime.signing``): when given, the
                bundle must carry a ``SIGNATURE`` by one of them over the ``SHA256SUMS`` bytes read for the
                verification, checked before any model file is read; needs ``usfm-edge[sign]``.

        Raises:
            BundleError: unsigned, untrusted signer or wrong signature (with ``trusted_keys``); corrupt, tampered or too new bundle, a link or special file in it, a ``usfm.json`` field of
                the wrong type or range or that does not fit the model (output names, task, labels), or a model the
                backend cannot load; the message names the file or the field.
            BackendUnavailableError: the needed backend is not installed (names the extra).
            ConfigError: unknown backend name or a bad ``max_side``.
        """
        folder = Path(path)
        if trusted_keys is not None and not verify:
            raise ConfigError("trusted_keys need verify=True: the signature covers SHA256SUMS")
        with BundleFiles(folder, verify=verify) as files:
            meta = files.meta
            if trusted_keys is not None:
                from usfm_edge.runtime.signing import check_signature

                check_signature(files, trusted_keys)
            be = make_backend(folder, meta, backend, device, threads, spin=spin, files=files)
            try:
                source = folder / meta.files.get(_MODEL_ROLE.get(be.name, ""), "")
                check_graph(meta, be, source)
                mask = None
                name = meta.files.get("band_stop_mask")
                if not meta.input.raw_frame and meta.band_stop.get("enabled") and name:
                    mask = _load_mask(files.read(name), folder / name)
                if verify:
                    files.check_rest()  # the listed files no backend read (other models, build_engine.sh)
                engine = cls(folder, meta, be, max_side=max_side, band_stop_mask=mask)
                engine._probe(source)
                for _ in range(max(0, int(warmup)) - 1):
                    engine.run_raw(engine._blank_input())
            except BaseException:
                be.close()
                raise
        return engine

    @classmethod
    def from_file(cls, model: str | Path, meta: BundleMeta, backend: str = "onnxruntime", device: str = "cpu",
                  threads: int | None = None, band_stop_mask: np.ndarray | None = None) -> Engine:
        """An engine on one model file outside a bundle (the INT8 work's fp32 and quantised graphs), described by
        ``meta`` (its contract: ``BundleMeta.from_onnx_metadata`` or a bundle's ``usfm.json``); no warm-up.

        Args:
            model: an ``.onnx`` (ONNX Runtime) or OpenVINO ``.xml`` file.
            meta: the contract; ``meta.precision`` ``fp32`` makes OpenVINO compute in f32 (never bf16).
            backend: ``onnxruntime`` or ``openvino``.
            device, threads: as for :meth:`open`.
            band_stop_mask: the mask of a bare band-stop graph.
        """
        import dataclasses

        model = Path(model)
        role = "openvino_xml" if backend == "openvino" else "onnx"
        meta = dataclasses.replace(meta, files={role: model.name})
        be = make_backend(model.parent, meta, backend, device, threads)
        try:
            return cls(model.parent, meta, be, band_stop_mask=band_stop_mask)
        except BaseException:
            be.close()
            raise

    def close(self) -> None:
        """Release the backend and the threads kept for streaming."""
        with self._shared_lock:
            shared, self._shared = list(self._shared.values()), {}
        for res in shared:
            res.shutdown()
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({getattr(self.folder, 'name', '-')}, task={self.task}, precision={self.meta.precision}, "
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

    def _probe(self, source) -> None:
        """One run on a blank frame: the outputs must fit ``usfm.json`` (a failure is a BundleError)."""
        x = self._blank_input()
        try:
            outs = self.run_raw(x)
        except UsfmEdgeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the backend's own error types
            raise BundleError(f"the model fails on a blank {x.shape} input at open: {exc}", path=source,
                              hint="the usfm.json does not describe this model, or the model is broken") from exc
        check_outputs(self.meta, x, outs, source)

    def run_raw(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on its own input tensor (uint8 ``(B, H, W)`` or normalised ``(B, 3, S, S)``)."""
        backend = self.backend
        if backend is None:
            raise BundleError("engine is closed", path=self.folder)
        return backend.run(batch)

    def check(self, frame) -> np.ndarray:
        """Validate one frame against the bundle's input contract -> C-contiguous uint8 grey ``(H, W)``.

        Accepts uint8 ``(H, W)``, ``(H, W, 1|3|4)`` or ``(1|3, H, W)`` arrays in any memory layout; RGB(A)
        becomes BT.601 luma (the graph takes grey).

        Raises:
            InputError: empty, non-uint8 (float, NaN/inf, int16, bool...), wrong shape, too small or too
                large frames; the message names the problem (sizes: the frame's and the bundle's limit). Any size
                within the limits is accepted, also by static-shape bundles (the engine fits the frame, see the
                module docstring). Shape and sides are checked before the frame is converted or copied.
        """
        return check_frame(frame, self.spec, min_side=int(self.meta.input.min_side), max_side=self.max_side)

    def load(self, item, pixel_spacing_mm=None) -> tuple[np.ndarray, tuple[float, float] | None]:
        """A frame or a file path -> ``(checked grey frame, spacing)``.

        Files are read with ``usfm_edge.data.readers`` (a DICOM gives its first frame and its own pixel
        spacing, which wins over ``pixel_spacing_mm``; iterate ``read_dicom(path).frames`` for a cine loop).

        Raises:
            InputError: the frame is unusable.
            DataError: the file cannot be read.
        """
        spacing = pixel_spacing(pixel_spacing_mm)
        if isinstance(item, (str, Path)):
            from usfm_edge.data.readers import is_dicom, read_dicom, read_image

            if Path(item).is_file() and is_dicom(item):
                d = read_dicom(item)
                item, spacing = d.frames[0], (d.pixel_spacing_mm or spacing)
            else:
                item = read_image(item)
        return self.check(item), spacing

    # -- prediction ----------------------------------------------------------------------------------
    def predict(self, frame, pixel_spacing_mm: float | tuple[float, float] | None = None) -> Result:
        """Predict one frame.

        Args:
            frame: uint8 grey ``(H, W)`` or RGB ``(H, W, 3)`` array of any size, or an image/DICOM path.
            pixel_spacing_mm: ``(row, col)`` or isotropic spacing for seg areas in mm² (a DICOM's own wins).

        Returns:
            ``SegResult``, ``ClsResult``, ``EnhanceResult`` or ``FeaturesResult``; ``timing_ms`` covers
            preprocessing, inference and post-processing of the frame.

        Raises:
            InputError: the frame is unusable (the engine stays usable).
            DataError: the path cannot be read.
        """
        gray, spacing = self.load(frame, pixel_spacing_mm)
        t0 = time.perf_counter()
        out = self._infer([gray])
        return self._result({k: v[0] for k, v in out.items()}, spacing, (time.perf_counter() - t0) * 1000.0)

    def predict_batch(self, frames: Iterable, pixel_spacing_mm: float | tuple[float, float] | None = None,
                      batch_size: int = 8) -> list[Result]:
        """Predict several frames; same-size frames are batched when the graph allows a dynamic batch.

        Args:
            frames: arrays and/or paths (see :meth:`predict`).
            pixel_spacing_mm: spacing applied to every frame without its own (DICOM) spacing.
            batch_size: largest batch sent to the backend at once.

        Returns:
            one result per frame, in order.

        Raises:
            InputError: a frame is unusable (the message starts with its index); nothing is run.
        """
        loaded = []
        for i, item in enumerate(frames):
            try:
                loaded.append(self.load(item, pixel_spacing_mm))
            except (InputError, DataError) as exc:
                raise type(exc)(f"frame {i}: {exc.message}", path=exc.path, hint=exc.hint) from None
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

    def stream(self, frames: Iterable, pixel_spacing_mm: float | tuple[float, float] | None = None, *,
               depth: int | None = None, on_error: str = "raise") -> Iterator:
        """Predict a sequence of frames (a cine loop, a camera, a folder) with a pipeline; results in order.

        Reading and checking the next frames, inference and the caller's work on earlier results overlap
        (OpenVINO: an ``AsyncInferQueue`` of ``depth`` requests; ONNX Runtime / TensorRT: a worker thread);
        see :mod:`usfm_edge.runtime.stream`.

        Args:
            frames: any iterable of arrays, paths, or ``(frame, pixel_spacing_mm)`` pairs, e.g. the frames
                of ``read_dicom(path).frames``. Each frame is copied, so a reused camera buffer is safe.
            pixel_spacing_mm: spacing for frames without their own.
            depth: frames in flight (None = 2, or OpenVINO's optimal number of requests if larger).
            on_error: ``raise`` (stop at a bad frame, after yielding the results before it) or ``yield``
                (yield the ``InputError``/``DataError`` in the bad frame's place and go on).

        Yields:
            one result per frame, in input order.
        """
        from usfm_edge.runtime.stream import stream_results

        return stream_results(self, frames, pixel_spacing_mm, depth=depth, on_error=on_error)

    def prepare(self, grays: Sequence[np.ndarray]) -> np.ndarray:
        """Checked grey frames of one size -> this bundle's graph input batch (:func:`graph_input`)."""
        return graph_input(self.meta, grays, self.spec, self._mask)

    def _finish(self, outs: dict[str, np.ndarray], hw: tuple[int, int]) -> dict[str, np.ndarray]:
        """Graph outputs -> final per-frame outputs at frame size ``hw`` (numpy post-processing of bare bundles,
        outputs of a static-shape graph mapped back to the frame)."""
        if self.raw:
            return outputs_at_size(outs, self.task, hw)
        return bare_outputs_at_size(outs, self.task, hw)

    def _infer(self, grays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Frames of one size -> final per-frame outputs at frame size."""
        return self._finish(self.run_raw(self.prepare(grays)), grays[0].shape)

    def _result(self, out: dict[str, np.ndarray], spacing, ms: float) -> Result:
        return make_result(self.task, self.labels, out, spacing, ms)
