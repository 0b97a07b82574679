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
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from usfm_edge.core.errors import BackendUnavailableError, BundleError, ConfigError, require
from usfm_edge.runtime.bundle_io import BundleFiles, check_onnx_self_contained, read_bundle_file

__all__ = ["Backend", "OnnxRuntimeBackend", "OpenVINOBackend", "TensorRTBackend", "BACKEND_EXTRAS", "available_backends",
           "make_backend", "Port"]

BACKEND_EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino", "tensorrt": "tensorrt"}
_ORDER = ("tensorrt", "openvino", "onnxruntime")
_FILE_ROLE = {"tensorrt": "tensorrt_engine", "openvino": "openvino_xml", "onnxruntime": "onnx"}
log = logging.getLogger(__name__)


def available_backends() -> list[str]:
    """Backends whose Python package is importable here (cheap: does not import them)."""
    import importlib.util

    return [b for b in _ORDER if importlib.util.find_spec(b) is not None]


class Port(NamedTuple):
    """One graph input or output as the backend sees it.

    Attributes:
        names: its names (OpenVINO ports may have several).
        dtype: numpy dtype name (``float32``, ``uint8``...) or None when the backend does not say.
        shape: dims, None for a dynamic one; None when even the rank is dynamic.
    """

    names: frozenset[str]
    dtype: str | None
    shape: tuple[int | None, ...] | None


class Backend:
    """Interface: ``run(x) -> {output name: array}`` for one input array, ``io()`` and ``close()``."""

    name = "base"
    device = "cpu"
    version = ""

    def io(self) -> tuple[list[Port], list[Port]] | None:
        """``(inputs, outputs)`` of the loaded graph, or None when the backend cannot tell (no static check)."""
        return None

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release the session / compiled model."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, version={self.version!r})"


def _model_bytes(model: bytes | bytearray | str | Path, writable: bool = False) -> bytes | bytearray:
    """A model given as bytes is used as is; a path is read once (links and special files refused)."""
    if isinstance(model, (bytes, bytearray)):
        return model
    path = Path(model)
    return read_bundle_file(path.parent, path.name, writable=writable)


def _check_output_names(names: list[str], graph: list[Port], source) -> None:
    have = {n for p in graph for n in p.names}
    for i, name in enumerate(names):
        if name not in have:
            listed = ", ".join(sorted(n for p in graph for n in p.names)) or "none"
            raise BundleError(f"usfm.json outputs[{i}].name {name!r} is not an output of the model (its outputs: "
                              f"{listed})", path=source, hint="fix usfm.json or export the bundle again")


_ORT_TYPES = {"float": "float32", "float16": "float16", "double": "float64", "uint8": "uint8", "int8": "int8",
              "int32": "int32", "int64": "int64", "bool": "bool", "uint16": "uint16", "int16": "int16"}


def _ort_port(arg) -> Port:
    t = str(arg.type)
    dtype = _ORT_TYPES.get(t[len("tensor("):-1]) if t.startswith("tensor(") else None
    shape = None if arg.shape is None else tuple(d if isinstance(d, int) else None for d in arg.shape)
    return Port(frozenset([arg.name]), dtype, shape)


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session on CPU, CUDA or the TensorRT execution provider.

    Args:
        model: the ``.onnx`` model's bytes (as verified by ``BundleFiles.read``), or its path (read once). A model
            with external data is refused: its weights would come from outside these bytes.
        output_names: outputs to fetch, in order.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``/``gpu``, or ``tensorrt`` (ORT's
            TensorRT EP; engine cache under ``$USFM_EDGE_CACHE`` or ``~/.cache/usfm-edge``).
        threads: intra-op threads (None = ORT default: all physical cores).
        fp16: let the TensorRT EP use fp16 kernels.
        spin: let the intra-op worker threads spin-wait after a call (ORT's default). Fastest when the
            process runs nothing else; False hands the cores back at once, for hosts that run other
            compute between frames (see docs/embedding.md: measured both ways).
        source: the file the bytes came from (named in errors).
    """

    name = "onnxruntime"

    def __init__(self, model: bytes | str | Path, output_names: list[str], device: str = "auto",
                 threads: int | None = None, fp16: bool = False, spin: bool = True, *, source: str | Path | None = None):
        ort = require("onnxruntime", BACKEND_EXTRAS[self.name])
        source = source if source is not None or isinstance(model, (bytes, bytearray)) else model
        data = _model_bytes(model)
        check_onnx_self_contained(data, source or "model.onnx")
        self.version = ort.__version__
        available = ort.get_available_providers()
        dev = (device or "auto").lower()
        if dev in ("auto",):
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        elif dev == "cpu":
            providers = ["CPUExecutionProvider"]
        elif dev in ("cuda", "gpu") or dev.startswith("cuda:"):
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailableError(f"ONNX Runtime has no CUDA provider (available: {', '.join(available)})",
                                              hint="pip install onnxruntime-gpu")
            index = int(dev.split(":")[1]) if ":" in dev else 0
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        elif dev == "tensorrt":
            if "TensorrtExecutionProvider" not in available:
                raise BackendUnavailableError("ONNX Runtime has no TensorRT provider",
                                              hint="pip install onnxruntime-gpu and TensorRT")
            from usfm_edge.core.io import cache_dir

            cache = cache_dir() / "ort-trt"
            cache.mkdir(parents=True, exist_ok=True)
            providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": bool(fp16), "trt_engine_cache_enable": True,
                                                        "trt_engine_cache_path": str(cache),
                                                        "trt_timing_cache_enable": True}),
                         "CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise ConfigError(f"unknown ONNX Runtime device {device!r}; use auto, cpu, cuda, cuda:N or tensorrt")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            with tempfile.TemporaryDirectory(prefix="usfm-noext-") as empty:
                # second line of defence: external data of a model loaded from bytes resolves in this empty folder
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
                self.session = ort.InferenceSession(bytes(data), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"ONNX Runtime cannot load the model: {exc}", path=source) from exc
        del data
        self._io = ([_ort_port(a) for a in self.session.get_inputs()], [_ort_port(a) for a in self.session.get_outputs()])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = list(output_names)
        _check_output_names(self.output_names, self._io[1], source)
        self.device = self.session.get_providers()[0]

    def io(self) -> tuple[list[Port], list[Port]]:
        return self._io

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None


class OpenVINOBackend(Backend):
    """OpenVINO compiled model with one infer request per calling thread.

    Args:
        xml: the IR ``.xml`` bytes (as verified by ``BundleFiles.read``), or its path (read once); or an ONNX
            model's bytes / path (then without ``weights``).
        output_names: outputs to fetch.
        device: ``auto``/``cpu`` -> ``CPU``, ``gpu`` -> ``GPU``, ``npu`` -> ``NPU``, or any OpenVINO device string.
        precision: the bundle's precision; ``fp32`` compiles with ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO
            would otherwise compute in bf16 on CPUs with AVX512-BF16/AMX).
        threads: ``INFERENCE_NUM_THREADS`` on CPU (None = OpenVINO default).
        weights: the ``.bin`` bytes of an IR (a ``bytearray`` is shared with OpenVINO without a copy and kept alive
            by the backend); None reads the ``.bin`` beside ``xml`` when ``xml`` is the path of an ``.xml``, and
            means an ONNX model (run by OpenVINO, ``Engine.from_file``) otherwise.
        source: the file the bytes came from (named in errors).
    """

    name = "openvino"

    def __init__(self, xml: bytes | str | Path, output_names: list[str], device: str = "auto", precision: str = "fp32",
                 threads: int | None = None, *, weights: bytes | bytearray | None = None,
                 source: str | Path | None = None):
        ov = require("openvino", BACKEND_EXTRAS[self.name])
        if not isinstance(xml, (bytes, bytearray)):
            source = source or xml
            if weights is None and Path(xml).suffix.lower() == ".xml":
                weights = _model_bytes(Path(xml).with_suffix(".bin"), writable=True)
        data = _model_bytes(xml)
        self.version = ov.get_version()
        core = ov.Core()
        dev = {"auto": "CPU", "cpu": "CPU", "gpu": "GPU", "npu": "NPU"}.get((device or "auto").lower(), device)
        base = dev.split(".")[0].split(":")[0]
        if base not in ("AUTO", "MULTI", "HETERO") and base not in {d.split(".")[0] for d in core.available_devices}:
            raise BackendUnavailableError(f"OpenVINO device '{dev}' is not available "
                                          f"(available: {', '.join(core.available_devices)})",
                                          hint="install the device's OpenVINO driver or use device='cpu'")
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads and base == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._weights = None
        if weights is not None:  # an IR: the XML text and a weights tensor made from the verified buffer. It is
            # copied into OpenVINO's own memory (shared_memory=False): a compiled model can outlive this backend
            # (an async queue of a stream still draining when the engine closes), and shared weights freed with the
            # backend would then be read after free.
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BundleError(f"the OpenVINO IR is not UTF-8 XML (byte offset {exc.start})", path=source) from None
            self._weights = np.frombuffer(weights if isinstance(weights, bytearray) else bytearray(weights), np.uint8)
        else:  # an ONNX model run by OpenVINO (Engine.from_file): its weights must be inside these bytes
            check_onnx_self_contained(data, source or "model.onnx")
        try:
            model = core.read_model(text, ov.Tensor(self._weights, shared_memory=False)) if self._weights is not None \
                else core.read_model(bytes(data))
            self.compiled = core.compile_model(model, dev, config)
            del model
            self._weights = None  # OpenVINO holds its own copy
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"OpenVINO cannot compile the model on {dev}: {exc}", path=source) from exc
        self.device = dev
        self.output_names = list(output_names)
        self._io = ([self._port(p) for p in self.compiled.inputs], [self._port(p) for p in self.compiled.outputs])
        _check_output_names(self.output_names, self._io[1], source)
        by_name = {n: p for p in self.compiled.outputs for n in p.get_names()}
        self._ports = [by_name[n] for n in self.output_names]
        self._local = threading.local()

    @staticmethod
    def _port(p) -> Port:
        try:
            dtype = np.dtype(p.get_element_type().to_dtype()).name
        except Exception:  # noqa: BLE001 - dynamic or exotic element types
            dtype = None
        ps = p.get_partial_shape()
        shape = None if ps.rank.is_dynamic else tuple(d.get_length() if d.is_static else None for d in ps)
        return Port(frozenset(p.get_names()), dtype, shape)

    def io(self) -> tuple[list[Port], list[Port]]:
        return self._io

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        res = self._request().infer({0: x})
        return {n: np.array(res[p], copy=True) for n, p in zip(self.output_names, self._ports)}

    def close(self) -> None:
        self.compiled = None
        self._local = threading.local()


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
        self.engine = self._runtime.deserialize_cuda_engine(bytes(_model_bytes(engine)))
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
        _check_output_names(self.output_names, self._io[1], source)
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
