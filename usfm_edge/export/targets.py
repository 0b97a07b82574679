"""The one table of deployment targets, read by the exporter, the CLI, the runtime and the benchmarks.

Each row says which backend runs the artifact, in which file format, at which precisions, and whether
its shapes may vary. Adding a target = adding a row (and, if it needs a new converter, one function in
``exporter.py``).

TensorRT notes (reference/edge-anchors.md §0, §7):
    * Jetson Orin on JetPack 6.x stays on **TensorRT 10.x** (JetPack 6.1 = TensorRT 10.3); JetPack >= 7.2.2
      (AGX Orin, Thor) brings TensorRT 11. TensorRT 11 removed the ``--fp16``/``--int8`` builder flags and
      implicit calibration: precision comes from the ONNX itself (strong typing, explicit Q/DQ).
    * So the TensorRT targets ship ONE ONNX (opset 17, static shapes, fp16 weights for ``fp16``, Q/DQ for
      ``int8``) that builds on both: ``build_engine.sh`` passes ``--fp16``/``--int8`` to TensorRT 10 and
      ``--stronglyTyped`` to TensorRT >= 11.
    * Engines are specific to the GPU and the TensorRT version: they are built on the device (or at export
      time where TensorRT and a GPU are present), never shipped between machines.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from usfm_edge.core.errors import ConfigError

__all__ = ["Target", "TARGETS", "get_target", "check_precision", "list_targets", "target_table"]


@dataclass(frozen=True)
class Target:
    """One deployment target.

    Attributes:
        name: canonical name (``usfm-edge export --target NAME``).
        aliases: other accepted names; ``alias_devices`` maps some of them to a default device.
        backend: runtime backend: ``onnxruntime``, ``openvino`` or ``tensorrt``.
        file_format: ``onnx``, ``openvino-ir`` or ``tensorrt-onnx`` (ONNX ready for trtexec + engine).
        default_precision: precision used when none is asked for.
        precisions: precisions this target supports.
        dynamic_batch: the graph accepts any batch size.
        dynamic_hw: the graph accepts frames of any height and width.
        opset: ONNX opset of the exported graph.
        op_profile: which op-support rules apply (see ``onnx_export.FORBIDDEN_OPS``).
        builds_engine: a TensorRT engine is built where TensorRT is importable, else ``build_engine.sh``.
        dla: the device may have DLA cores (``--useDLACore``).
        device: default runtime device for the canonical name.
        alias_devices: default runtime device per alias.
        notes: where it runs and what to watch out for.
    """

    name: str
    aliases: tuple[str, ...]
    backend: str
    file_format: str
    default_precision: str
    precisions: tuple[str, ...]
    dynamic_batch: bool
    dynamic_hw: bool
    opset: int
    op_profile: str
    builds_engine: bool = False
    dla: bool = False
    device: str = "auto"
    alias_devices: tuple[tuple[str, str], ...] = ()
    notes: str = ""

    @property
    def static_shapes(self) -> bool:
        """True when every input dimension is fixed at export time."""
        return not (self.dynamic_batch or self.dynamic_hw)

    def device_for(self, alias: str | None) -> str:
        """Default runtime device for the name the user typed (``intel-gpu`` -> ``GPU``)."""
        return dict(self.alias_devices).get((alias or "").lower(), self.device)


TARGETS: tuple[Target, ...] = (
    Target(
        name="onnx", aliases=("onnxruntime", "ort"), backend="onnxruntime", file_format="onnx",
        default_precision="fp32", precisions=("fp32", "fp16", "int8"), dynamic_batch=True, dynamic_hw=True,
        opset=17, op_profile="onnx", device="auto",
        notes="any ONNX Runtime: CPU, CUDA, TensorRT, DirectML, CoreML execution providers; one self-contained "
              ".onnx file taking raw uint8 frames of any size; fp16 = fp16 weights and compute inside the "
              "model, pre/post-processing stay fp32",
    ),
    Target(
        name="openvino", aliases=("intel-cpu", "intel-gpu", "ov"), backend="openvino", file_format="openvino-ir",
        default_precision="fp32", precisions=("fp32", "fp16", "int8"), dynamic_batch=True, dynamic_hw=True,
        opset=17, op_profile="openvino", device="CPU", alias_devices=(("intel-cpu", "CPU"), ("intel-gpu", "GPU")),
        notes="OpenVINO IR (.xml + .bin) for Intel CPU / iGPU / NPU; fp32 bundles are compiled with "
              "INFERENCE_PRECISION_HINT=f32 (OpenVINO defaults to bf16 on AVX512-BF16/AMX CPUs); fp16 = "
              "fp16-compressed weights; int8 = NNCF post-training quantisation (usfm_edge.calibration)",
    ),
    Target(
        name="jetson", aliases=("jetson-orin", "orin"), backend="tensorrt", file_format="tensorrt-onnx",
        default_precision="fp16", precisions=("fp16", "int8"), dynamic_batch=False, dynamic_hw=False,
        opset=17, op_profile="tensorrt", builds_engine=True, dla=True, device="cuda",
        notes="NVIDIA Jetson Orin: TensorRT-ready ONNX (opset 17, static shapes, no DFT) + build_engine.sh "
              "(trtexec); JetPack 6.x = TensorRT 10.3 (--fp16/--int8), JetPack >= 7.2.2 = TensorRT 11 "
              "(--stronglyTyped); DLA (AGX Orin / Orin NX) needs fp16 or int8 and static shapes",
    ),
    Target(
        name="tensorrt", aliases=("trt", "engine", "nvidia-gpu"), backend="tensorrt", file_format="tensorrt-onnx",
        default_precision="fp16", precisions=("fp32", "fp16", "int8"), dynamic_batch=False, dynamic_hw=False,
        opset=17, op_profile="tensorrt", builds_engine=True, dla=False, device="cuda",
        notes="x86 NVIDIA GPU with TensorRT 10.x or 11.x: same TensorRT-ready ONNX and build script as jetson; "
              "the engine is built where TensorRT and a GPU are present",
    ),
)


def list_targets() -> list[Target]:
    """All rows of the table, in display order."""
    return list(TARGETS)


def _index() -> dict[str, Target]:
    out = {}
    for t in TARGETS:
        for key in (t.name, *t.aliases):
            out[key] = t
    return out


def get_target(name: str | Target) -> Target:
    """Look a target up by name or alias (case-insensitive).

    Args:
        name: ``onnx``, ``openvino``, ``intel-cpu``, ``intel-gpu``, ``jetson``, ``jetson-orin``, ``tensorrt``...

    Returns:
        the table row.

    Raises:
        ConfigError: unknown name; the message lists every choice and the closest match.
    """
    if isinstance(name, Target):
        return name
    index = _index()
    key = str(name).strip().lower()
    if key in index:
        return index[key]
    close = difflib.get_close_matches(key, list(index), n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else None
    choices = ", ".join(f"{t.name} ({'/'.join(t.aliases)})" if t.aliases else t.name for t in TARGETS)
    raise ConfigError(f"unknown target '{name}'; choose from: {choices}", hint=hint)


def check_precision(target: str | Target, precision: str | None) -> str:
    """Return the precision to use for ``target`` (its default when ``precision`` is None).

    Raises:
        ConfigError: the target does not support ``precision``; the message lists the supported ones.
    """
    t = get_target(target)
    if precision is None:
        return t.default_precision
    p = str(precision).lower()
    p = {"float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16", "half": "fp16", "i8": "int8"}.get(p, p)
    if p not in t.precisions:
        raise ConfigError(f"target '{t.name}' does not support precision '{precision}'; "
                          f"supported: {', '.join(t.precisions)}")
    return p


def target_table() -> list[dict[str, str]]:
    """The table as rows of strings (for ``usfm-edge export --list-targets`` and the docs)."""
    rows = []
    for t in TARGETS:
        rows.append({
            "target": t.name,
            "aliases": ", ".join(t.aliases),
            "backend": t.backend,
            "format": t.file_format,
            "precision": f"{t.default_precision} ({'/'.join(t.precisions)})",
            "shapes": "dynamic" if t.dynamic_hw else "static",
            "notes": t.notes,
        })
    return rows
