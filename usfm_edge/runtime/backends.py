"""Inference backends of the runtime: ONNX Runtime, OpenVINO, TensorRT (numpy in, numpy out; no torch).

Each backend imports its library inside its constructor, so ``import usfm_edge.runtime`` stays light, and
raises ``BackendUnavailableError`` naming the extra to install when the library is missing.

Backends are created from the bytes of their model file, never from its path: ``make_backend`` hands them the
buffers :class:`~usfm_edge.runtime.bundle_io.BundleFiles` read once and hashed (verify-then-use), so a file
swapped on disk after the check is never what runs. ``io()`` describes the graph's real inputs and outputs
(names, dtypes, shapes) for the contract check at ``Engine.open``. Every backend's ``run`` may be called from
several threads at once:

* ONNX Runtime: ``InferenceSession.run`` is thread-safe;
* OpenVINO: one ``InferRequest`` per thread (``threading.local``) on a shared ``CompiledModel``;
* TensorRT: one execution context and stream guarded by a lock.

This module holds ``make_backend`` (the choice among a bundle's model files), ``available_backends`` and the
TensorRT backend; ``Backend``/``Port`` live in ``runtime.backend_base`` and the ONNX Runtime and OpenVINO backends in
``runtime.backend_onnxruntime`` and ``runtime.backend_openvino``, all re-exported here.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import BackendUnavailableError, BundleError, ConfigError, require
from usfm_edge.runtime.backend_base import BACKEND_EXTRAS, Backend, Port, check_output_names, model_bytes
from usfm_edge.runtime.backend_onnxruntime import OnnxRuntimeBackend
from usfm_edge.runtime.backend_openvino import OpenVINOBackend
from usfm_edge.runtime.bundle_io import BundleFiles, read_bundle_file

__all__ = ["Backend", "OnnxRuntimeBackend", "OpenVINOBackend", "TensorRTBackend", "BACKEND_EXTRAS", "available_backends",
           "make_backend", "Port"]

_ORDER = ("tensorrt", "openvino", "onnxruntime")
_FILE_ROLE = {"tensorrt": "tensorrt_engine", "openvino": "openvino_xml", "onnxruntime": "onnx"}
log = logging.getLogger(__name__)


def available_backends() -> list[str]:
    """Backends whose Python package is importable here (cheap: does not import them)."""
    import importlib.util

    return [b for b in _ORDER if importlib.util.find_spec(b) is not None]


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailableError("the TensorRT runtime needs cuda-python for device memory",
                                          hint="pip install cuda-python") from exc
    return cudart


def _ck(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def _require_backend(b: str) -> None:
    if b != "tensorrt":
        require(b, BACKEND_EXTRAS[b])
        return
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not installed ({exc})",
                                      hint="pip install 'usfm-edge[tensorrt]' or use JetPack's TensorRT") from exc


class TensorRTBackend(Backend):
    """A deserialised TensorRT engine (TensorRT 10/11 tensor API, ``execute_async_v3``).

    NOTE: written against the TensorRT 10 Python API and cuda-python; it could not be run on the CPU-only
    development machine (tests marked ``trt`` cover it on NVIDIA hardware).

    Args:
        engine: the serialized engine's bytes (read once by ``BundleFiles.read``) or its path (read once); built
            on this device (``build_engine.sh`` or ``onnx2engine``).
        output_names: outputs to fetch.
        device: ``cuda``/``auto`` (GPU 0) or ``cuda:N``; DLA engines choose their core at build time.
        source: the file the bytes came from (named in errors).
    """

    name = "tensorrt"

    def __init__(self, engine: bytes | str | Path, output_names: list[str], device: str = "auto", *,
                 source: str | Path | None = None):
        _require_backend(self.name)
        import tensorrt as trt

        self.trt, self.cudart = trt, _cudart()
        self.version = trt.__version__
        dev = (device or "auto").lower()
        index = int(dev.split(":")[1]) if dev.startswith("cuda:") else 0
        _ck(self.cudart.cudaSetDevice(index))
        self.device = f"cuda:{index}"
        source = source if source is not None or isinstance(engine, (bytes, bytearray)) else engine
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(bytes(model_bytes(engine)))
        if self.engine is None:
            raise BundleError("TensorRT could not load the engine: it was built for another GPU or TensorRT version",
                              path=source, hint="rebuild it on this device with the bundle's build_engine.sh")
        self.context = self.engine.create_execution_context()
        self.stream = _ck(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = list(output_names)
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        ports = {n: Port(frozenset([n]), self.dtypes[n].name,
                         tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n))) for n in names}
        self._io = ([ports[n] for n in self.inputs], [p for n, p in ports.items() if n not in self.inputs])
        check_output_names(self.output_names, self._io[1], source)
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._lock = threading.Lock()

    def io(self) -> tuple[list[Port], list[Port]]:
        return self._io

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _ck(self.cudart.cudaFree(ptr))
            ptr = _ck(self.cudart.cudaMalloc(max(nbytes, 1)))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            name = self.inputs[0]
            host_in = np.ascontiguousarray(x, dtype=self.dtypes[name])
            self.context.set_input_shape(name, tuple(host_in.shape))
            ptr = self._device_buffer(name, host_in.nbytes)
            _ck(cudart.cudaMemcpyAsync(ptr, host_in.ctypes.data, host_in.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
            outs = {}
            for out in self.output_names:
                shape = tuple(self.context.get_tensor_shape(out))
                outs[out] = np.empty(shape, dtype=self.dtypes[out])
                self.context.set_tensor_address(out, self._device_buffer(out, outs[out].nbytes))
            if not self.context.execute_async_v3(int(self.stream)):  # TensorRT takes the raw stream handle
                raise RuntimeError("TensorRT execution failed")
            for out, arr in outs.items():
                _ck(cudart.cudaMemcpyAsync(arr.ctypes.data, self._buffers[out][0], arr.nbytes, d2h, self.stream))
            _ck(cudart.cudaStreamSynchronize(self.stream))
        return outs

    def close(self) -> None:
        with self._lock:
            for ptr, _ in self._buffers.values():
                self.cudart.cudaFree(ptr)
            self._buffers.clear()
            if getattr(self, "stream", None) is not None:
                self.cudart.cudaStreamDestroy(self.stream)
                self.stream = None
            self.context = self.engine = None


def make_backend(folder: Path, meta, backend: str = "auto", device: str = "auto", threads: int | None = None,
                 spin: bool = True, files: BundleFiles | None = None) -> Backend:
    """Load a bundle's model on the best (or the requested) backend, from the verified bytes of its files.

    ``auto`` tries, among the model files the bundle holds, TensorRT engine > OpenVINO IR > ONNX Runtime,
    skipping backends that are not installed and a TensorRT engine built for another GPU.

    Args:
        folder: the bundle folder.
        meta: its ``BundleMeta``.
        backend: ``auto``, ``tensorrt``, ``openvino`` or ``onnxruntime``.
        device: ``auto`` (the bundle's default device when the backend is the bundle's own) or a device name.
        threads: CPU threads.
        spin: ONNX Runtime only: worker threads spin-wait between calls (see ``OnnxRuntimeBackend``).
        files: the open ``BundleFiles`` whose ``read`` checks each model file's bytes against ``SHA256SUMS``
            before they reach the backend; None reads the files once without a checksum (``Engine.from_file``,
            ``Engine.open(verify=False)``), still refusing links and special files.

    Raises:
        ConfigError: unknown backend name.
        BundleError: the bundle lacks the requested model file, a file is tampered, a link or not regular, or the
            backend cannot load it.
        BackendUnavailableError: no candidate backend is installed (names the extras).
    """
    folder = Path(folder)
    if files is not None:
        exists, read = files.exists, files.read
    else:
        def exists(name: str) -> bool:
            return (folder / name).exists() or (folder / name).is_symlink()  # a link: reading it says why not

        def read(name: str, writable: bool = False) -> bytes | bytearray:
            return read_bundle_file(folder, name, writable=writable)
    names = [o.name for o in meta.outputs]
    present = {b: exists(meta.files[r]) for b, r in _FILE_ROLE.items() if r in meta.files}
    if backend not in ("auto", *_ORDER):
        raise ConfigError(f"unknown backend '{backend}'; choose auto, {', '.join(_ORDER)}")
    if backend != "auto" and not present.get(backend):
        have = ", ".join(b for b, ok in present.items() if ok) or "none"
        raise BundleError(f"bundle has no model file for backend '{backend}' (usable: {have})", path=folder)
    candidates = [backend] if backend != "auto" else [b for b in _ORDER if present.get(b)]
    if not candidates:
        raise BundleError("bundle holds no model file (onnx, openvino_xml or tensorrt_engine)", path=folder)
    errors, hints = [], []
    for b in candidates:
        dev = meta.device if (device == "auto" and b == meta.backend) else device
        name = meta.files[_FILE_ROLE[b]]
        try:
            _require_backend(b)  # before reading a large model file for nothing
        except BackendUnavailableError as exc:
            if backend != "auto":
                raise
            errors.append(f"{b}: {exc.message}")
            hints.append(exc.hint)
            continue
        data = read(name)  # a tampered file, a link or a special file is refused here, never fallen back from
        weights = None
        if b == "openvino" and Path(name).suffix.lower() == ".xml":  # else an ONNX model run by OpenVINO
            weights = read(meta.files.get("openvino_bin") or str(Path(name).with_suffix(".bin")), writable=True)
        try:
            if b == "tensorrt":
                return TensorRTBackend(data, names, dev, source=folder / name)
            if b == "openvino":
                return OpenVINOBackend(data, names, dev, meta.precision, threads, weights=weights, source=folder / name)
            return OnnxRuntimeBackend(data, names, dev, threads, fp16=meta.precision != "fp32", spin=spin,
                                      source=folder / name)
        except BackendUnavailableError as exc:
            if backend != "auto":
                raise
            errors.append(f"{b}: {exc.message}")
            hints.append(exc.hint)
        except BundleError as exc:  # e.g. an engine built for another GPU: fall back to the portable files
            if backend != "auto" or b != "tensorrt" or len(candidates) == 1:
                raise
            log.warning("%s; falling back to %s", exc, candidates[1])
            errors.append(f"{b}: {exc}")
        finally:
            del data, weights
    # each backend's own hint (a missing package names its extra; a missing device names what is needed)
    hint = "; ".join(dict.fromkeys(h for h in hints if h)) or "pip install " + " or ".join(
        f"'usfm-edge[{BACKEND_EXTRAS[b]}]'" for b in candidates)
    raise BackendUnavailableError("no backend can run this bundle here: " + "; ".join(errors), hint=hint)
