"""The OpenVINO backend: a compiled model with one infer request per calling thread, created from the verified
bytes of an IR (XML text + weights tensor) or of an ONNX model (``openvino`` is imported in the constructor).

Batch-1 specialisation: a bundle's graph takes any batch size, and OpenVINO's CPU plugin runs a graph whose
batch is dynamic as a dynamic-shape graph from end to end (shape inference and memory planning on every call),
even where the in-graph resize has made every other dimension static. Single frames (``predict``, ``stream``)
are the common call, so the graph is compiled with its batch fixed at 1; the any-batch graph is compiled on
the first call with a larger batch (the model is kept for it). On the shipped BUS-BRA model this took the
OpenVINO INT8 bundle from 17.6 to 13.8 ms per frame (benchmarks/RESULTS.md §4.1).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import BackendUnavailableError, BundleError, require
from usfm_edge.runtime.backend_base import BACKEND_EXTRAS, Backend, Port, check_output_names, model_bytes
from usfm_edge.runtime.onnx_scan import check_onnx_self_contained

__all__ = ["OpenVINOBackend"]

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
                weights = model_bytes(Path(xml).with_suffix(".bin"), writable=True)
        data = model_bytes(xml)
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
            self._weights = None  # OpenVINO holds its own copy
            # the contract (any batch) is the model's as stored, whatever the compiled specialisation
            self._io = ([self._port(p) for p in model.inputs], [self._port(p) for p in model.outputs])
            any_batch = _any_batch_shape(model)
            if any_batch is not None:  # compile for batch 1; keep the model for a larger batch (module docstring)
                model.reshape({model.inputs[0]: ov.PartialShape([1, *any_batch[1:]])})
            self.compiled = core.compile_model(model, dev, config)
        except Exception as exc:  # noqa: BLE001
            raise BundleError(f"OpenVINO cannot compile the model on {dev}: {exc}", path=source) from exc
        self._any_batch = (core, model, any_batch, dev, config) if any_batch is not None else None
        self._batched = None  # the any-batch compiled model, made on the first call with batch > 1
        self._lock = threading.Lock()
        self.source = source
        self.device = dev
        self.output_names = list(output_names)
        check_output_names(self.output_names, self._io[1], source)
        self._ports = _ports(self.compiled, self.output_names)
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

    def _batched_model(self):
        """The any-batch compiled model and its output ports (only asked for when the graph's batch is dynamic)."""
        with self._lock:
            if self._batched is None:
                ov = require("openvino", BACKEND_EXTRAS[self.name])
                core, model, shape, dev, config = self._any_batch
                try:
                    model.reshape({model.inputs[0]: ov.PartialShape(shape)})
                    compiled = core.compile_model(model, dev, config)
                except Exception as exc:  # noqa: BLE001
                    raise BundleError(f"OpenVINO cannot compile the any-batch model on {dev}: {exc}",
                                      path=self.source) from exc
                self._batched = (compiled, _ports(compiled, self.output_names))
            return self._batched

    def _request(self, batched: bool):
        key = "batched" if batched else "single"
        req = getattr(self._local, key, None)
        if req is None:
            compiled, ports = self._batched_model() if batched else (self.compiled, self._ports)
            req = (compiled.create_infer_request(), ports)
            setattr(self._local, key, req)
        return req

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # the input is read in place and the outputs are views of the request's own tensors, copied once here
        # (the default infer copies both ways, and the outputs were then copied a second time)
        req, ports = self._request(batched=x.shape[0] != 1 and self._any_batch is not None)
        res = req.infer({0: np.ascontiguousarray(x)}, share_inputs=True, share_outputs=True)
        return {n: np.array(res[p], copy=True) for n, p in zip(self.output_names, ports)}

    def close(self) -> None:
        self.compiled = None
        self._any_batch = self._batched = None
        self._local = threading.local()


def _any_batch_shape(model) -> list | None:
    """The input's partial shape as a list when its first (batch) dimension is dynamic, else None."""
    if len(model.inputs) != 1:
        return None
    ps = model.inputs[0].get_partial_shape()
    if ps.rank.is_dynamic or len(ps) < 2 or ps[0].is_static:
        return None
    return list(ps)


def _ports(compiled, names: list[str]) -> list:
    by_name = {n: p for p in compiled.outputs for n in p.get_names()}
    return [by_name[n] for n in names]
