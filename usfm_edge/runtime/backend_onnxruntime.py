"""The ONNX Runtime backend: a session on CPU, CUDA or ORT's TensorRT execution provider, created from the
model's verified bytes (``onnxruntime`` is imported in the constructor; ``InferenceSession.run`` is thread-safe).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import BackendUnavailableError, BundleError, ConfigError, require
from usfm_edge.runtime.backend_base import BACKEND_EXTRAS, Backend, Port, check_output_names, model_bytes
from usfm_edge.runtime.onnx_scan import check_onnx_self_contained

__all__ = ["OnnxRuntimeBackend"]

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
        data = model_bytes(model)
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
        check_output_names(self.output_names, self._io[1], source)
        self.device = self.session.get_providers()[0]

    def io(self) -> tuple[list[Port], list[Port]]:
        return self._io

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None
