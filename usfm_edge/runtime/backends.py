"""Inference backends of the runtime: ONNX Runtime, OpenVINO, TensorRT (numpy in, numpy out; no torch).

Each backend imports its library inside its constructor, so ``import usfm_edge.runtime`` stays light, and
raises ``BackendUnavailableError`` naming the extra to install when the library is missing. Every backend's
``run`` may be called from several threads at once:

* ONNX Runtime: ``InferenceSession.run`` is thread-safe;
* OpenVINO: one ``InferRequest`` per thread (``threading.local``) on a shared ``CompiledModel``;
* TensorRT: one execution context and stream guarded by a lock.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import BackendUnavailableError, BundleError, ConfigError, require

__all__ = ["Backend", "OnnxRuntimeBackend", "OpenVINOBackend", "TensorRTBackend", "BACKEND_EXTRAS", "available_backends",
           "make_backend"]

BACKEND_EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino", "tensorrt": "tensorrt"}
_ORDER = ("tensorrt", "openvino", "onnxruntime")
_FILE_ROLE = {"tensorrt": "tensorrt_engine", "openvino": "openvino_xml", "onnxruntime": "onnx"}
log = logging.getLogger(__name__)


def available_backends() -> list[str]:
    """Backends whose Python package is importable here (cheap: does not import them)."""
    import importlib.util

    return [b for b in _ORDER if importlib.util.find_spec(b) is not None]


class Backend:
    """Interface: ``run(x) -> {output name: array}`` for one input array, plus ``close()``."""

    name = "base"
    device = "cpu"
    version = ""

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release the session / compiled model."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, version={self.version!r})"


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime session on CPU, CUDA or the TensorRT execution provider.

    Args:
        model_path: the ``.onnx`` file.
        output_names: outputs to fetch, in order.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``/``gpu``, or ``tensorrt`` (ORT's
            TensorRT EP; engine cache under ``$USFM_EDGE_CACHE`` or ``~/.cache/usfm-edge``).
        threads: intra-op threads (None = ORT default: all physical cores).
        fp16: let the TensorRT EP use fp16 kernels.
        spin: let the intra-op worker threads spin-wait after a call (ORT's default). Fastest when the
            process runs nothing else; False hands the cores back at once, for hosts that run other
            compute between frames (see docs/embedding.md: measured both ways).
    """

    name = "onnxruntime"

    def __init__(self, model_path: str | Path, output_names: list[str], device: str = "auto",
                 threads: int | None = None, fp16: bool = False, spin: bool = True):
        ort = require("onnxruntime", BACKEND_EXTRAS[self.name])
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
            self.session = ort.InferenceSession(str(model_path), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
            raise BundleError(f"ONNX Runtime cannot load the model: {exc}", path=model_path) from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = list(output_names)
        self.device = self.session.get_providers()[0]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None


class OpenVINOBackend(Backend):
    """OpenVINO compiled model with one infer request per calling thread.

    Args:
        xml_path: the IR ``.xml``.
        output_names: outputs to fetch.
        device: ``auto``/``cpu`` -> ``CPU``, ``gpu`` -> ``GPU``, ``npu`` -> ``NPU``, or any OpenVINO device string.
        precision: the bundle's precision; ``fp32`` compiles with ``INFERENCE_PRECISION_HINT=f32`` (OpenVINO
            would otherwise compute in bf16 on CPUs with AVX512-BF16/AMX).
        threads: ``INFERENCE_NUM_THREADS`` on CPU (None = OpenVINO default).
    """

    name = "openvino"

    def __init__(self, xml_path: str | Path, output_names: list[str], device: str = "auto", precision: str = "fp32",
                 threads: int | None = None):
        ov = require("openvino", BACKEND_EXTRAS[self.name])
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
        try:
            self.compiled = core.compile_model(core.read_model(str(xml_path)), dev, config)
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"OpenVINO cannot compile the model on {dev}: {exc}", path=xml_path) from exc
        self.device = dev
        self.output_names = list(output_names)
        self._ports = [self.compiled.output(n) for n in self.output_names]
        self._local = threading.local()

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


class TensorRTBackend(Backend):
    """A deserialised TensorRT engine (TensorRT 10/11 tensor API, ``execute_async_v3``).

    NOTE: written against the TensorRT 10 Python API and cuda-python; it could not be run on the CPU-only
    development machine (tests marked ``trt`` cover it on NVIDIA hardware).

    Args:
        engine_path: the serialized engine built on this device (``build_engine.sh`` or ``onnx2engine``).
        output_names: outputs to fetch.
        device: ``cuda``/``auto`` (GPU 0) or ``cuda:N``; DLA engines choose their core at build time.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, output_names: list[str], device: str = "auto"):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailableError(f"TensorRT is not installed ({exc})",
                                          hint="pip install 'usfm-edge[tensorrt]' or use JetPack's TensorRT") from exc
        self.trt, self.cudart = trt, _cudart()
        self.version = trt.__version__
        dev = (device or "auto").lower()
        index = int(dev.split(":")[1]) if dev.startswith("cuda:") else 0
        _ck(self.cudart.cudaSetDevice(index))
        self.device = f"cuda:{index}"
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BundleError("TensorRT could not load the engine: it was built for another GPU or TensorRT version",
                              path=engine_path, hint="rebuild it on this device with the bundle's build_engine.sh")
        self.context = self.engine.create_execution_context()
        self.stream = _ck(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = list(output_names)
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._lock = threading.Lock()

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
                 spin: bool = True) -> Backend:
    """Load a bundle's model on the best (or the requested) backend.

    ``auto`` tries, among the model files the bundle holds, TensorRT engine > OpenVINO IR > ONNX Runtime,
    skipping backends that are not installed and a TensorRT engine built for another GPU.

    Args:
        folder: the bundle folder.
        meta: its ``BundleMeta``.
        backend: ``auto``, ``tensorrt``, ``openvino`` or ``onnxruntime``.
        device: ``auto`` (the bundle's default device when the backend is the bundle's own) or a device name.
        threads: CPU threads.
        spin: ONNX Runtime only: worker threads spin-wait between calls (see ``OnnxRuntimeBackend``).

    Raises:
        ConfigError: unknown backend name.
        BundleError: the bundle lacks the requested model file, or the backend cannot load it.
        BackendUnavailableError: no candidate backend is installed (names the extras).
    """
    folder = Path(folder)
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
    errors, hints = [], []
    for b in candidates:
        dev = meta.device if (device == "auto" and b == meta.backend) else device
        try:
            if b == "tensorrt":
                return TensorRTBackend(folder / meta.files["tensorrt_engine"], names, dev)
            if b == "openvino":
                return OpenVINOBackend(folder / meta.files["openvino_xml"], names, dev, meta.precision, threads)
            return OnnxRuntimeBackend(folder / meta.files["onnx"], names, dev, threads,
                                      fp16=meta.precision != "fp32", spin=spin)
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
    # each backend's own hint (a missing package names its extra; a missing device names what is needed)
    hint = "; ".join(dict.fromkeys(h for h in hints if h)) or "pip install " + " or ".join(
        f"'usfm-edge[{BACKEND_EXTRAS[b]}]'" for b in candidates)
    raise BackendUnavailableError("no backend can run this bundle here: " + "; ".join(errors), hint=hint)
