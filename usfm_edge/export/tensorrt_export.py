"""ONNX -> TensorRT engine, with the Python API where TensorRT is importable, else a ``trtexec`` script.

Engines are tied to one GPU model and one TensorRT version, so the bundle always carries the ONNX and
``build_engine.sh`` (the exact ``trtexec`` command), and an engine only when it was built on the machine
that will run it.

TensorRT 10 vs 11 (reference/edge-anchors.md §7): 10.x (JetPack 6.x: 10.3) builds weakly typed networks
where ``--fp16``/``--int8`` (``BuilderFlag.FP16/INT8``) allow lower precision; 11.x removed those flags and
implicit calibration: the network is strongly typed and precision comes from the ONNX (fp16 weights and
Casts from ``models.raw_frame.RawFrameModel(half=True)``, Q/DQ nodes for INT8). Both code paths are below; neither
could be run on the CPU-only development machine (see tests marked ``trt``).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from usfm_edge.core.errors import BackendUnavailableError, ExportError

__all__ = ["tensorrt_available", "onnx2engine", "trtexec_command", "write_build_script", "BUILD_SCRIPT"]

BUILD_SCRIPT = "build_engine.sh"
_INSTALL_HINT = "pip install tensorrt (x86 CUDA machines) / use JetPack's TensorRT on Jetson"

Shapes = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(f"TensorRT is not installed ({exc})", hint=_INSTALL_HINT) from exc
    return trt


def _major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def tensorrt_available() -> tuple[bool, str]:
    """Whether an engine can be built here: ``(ok, reason)``; needs TensorRT and a CUDA GPU."""
    try:
        trt = _import_trt()
    except BackendUnavailableError as exc:
        return False, str(exc)
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is None:
            return False, "TensorRT could not create a builder (no CUDA GPU?)"
    except Exception as exc:  # noqa: BLE001 - CUDA initialisation errors vary
        return False, f"TensorRT is installed but no CUDA GPU is usable: {exc}"
    return True, f"TensorRT {trt.__version__}"


def onnx2engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16", workspace_gb: float = 4.0,
                timing_cache: str | Path | None = None, dla_core: int | None = None,
                shapes: Shapes | None = None) -> Path:
    """Build a serialized TensorRT engine from an ONNX file with the TensorRT Python API (10.x or 11.x).

    Args:
        onnx_path: the ONNX model (opset 17, standard ops).
        engine_path: where to write the engine (``.engine`` / plan).
        precision: ``fp32``, ``fp16`` or ``int8`` (INT8 needs Q/DQ nodes in the ONNX: explicit quantisation).
        workspace_gb: builder workspace memory pool limit in GiB.
        timing_cache: timing cache file, loaded if it exists and saved after the build (faster rebuilds).
        dla_core: run on this DLA core (Jetson AGX Orin / Orin NX) with GPU fallback; needs fp16/int8.
        shapes: ``{input: (min, opt, max)}`` for dynamic inputs (an optimisation profile is added).

    Returns:
        the engine path.

    Raises:
        BackendUnavailableError: TensorRT is not importable.
        ExportError: parsing or building failed (parser errors are listed), or a bad option.
    """
    trt = _import_trt()
    major = _major(trt)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"TensorRT precision must be fp32, fp16 or int8, got {precision!r}")
    if dla_core is not None and precision == "fp32":
        raise ExportError("DLA runs fp16 or int8 only", hint="export with --precision fp16")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if major >= 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} could not parse the ONNX model: {errors}", path=onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if major < 11:  # weakly typed: allow lower precision kernels (flags removed in TensorRT 11)
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit Q/DQ network; no calibrator
    cache_file = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if dla_core is not None:
        if builder.num_DLA_cores <= int(dla_core):
            raise ExportError(f"DLA core {dla_core} requested but this device has {builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if dynamic:
        if not shapes:
            names = ", ".join(t.name for t in dynamic)
            raise ExportError(f"inputs {names} have dynamic dims; pass shapes={{name: (min, opt, max)}}")
        profile = builder.create_optimization_profile()
        for t in dynamic:
            if t.name not in shapes:
                raise ExportError(f"no (min, opt, max) shapes given for dynamic input '{t.name}'")
            lo, opt, hi = (tuple(int(v) for v in s) for s in shapes[t.name])
            profile.set_shape(t.name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build the engine (see the log above)",
                          path=onnx_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    if cache_file is not None:
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def _shape_arg(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def trtexec_command(onnx: str = "model.onnx", engine: str = "model.engine", precision: str = "fp16",
                    workspace_gb: float = 4.0, timing_cache: str | None = "timing.cache", dla_core: int | None = None,
                    shapes: Shapes | None = None, trt_major: int = 10) -> list[str]:
    """The ``trtexec`` command that builds the same engine as ``onnx2engine``.

    Args:
        onnx: ONNX file (relative to the bundle folder).
        engine: engine file to write.
        precision: ``fp32``, ``fp16`` or ``int8``.
        workspace_gb: workspace memory pool in GiB (``--memPoolSize=workspace:<MiB>M``).
        timing_cache: ``--timingCacheFile`` (None to omit).
        dla_core: add ``--useDLACore=N --allowGPUFallback``.
        shapes: ``--minShapes/--optShapes/--maxShapes`` for dynamic inputs.
        trt_major: TensorRT major version: 10 uses ``--fp16``/``--int8``, 11+ ``--stronglyTyped``.

    Returns:
        the argument list (``shlex.join`` it for a shell).
    """
    cmd = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}",
           f"--memPoolSize=workspace:{int(round(workspace_gb * 1024))}M"]
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if trt_major >= 11:
        cmd.append("--stronglyTyped")
    else:
        if precision in ("fp16", "int8"):
            cmd.append("--fp16")
        if precision == "int8":
            cmd.append("--int8")
    if shapes:
        for flag, idx in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            cmd.append(f"{flag}=" + ",".join(f"{name}:{_shape_arg(s[idx])}" for name, s in shapes.items()))
    if dla_core is not None:
        cmd += [f"--useDLACore={int(dla_core)}", "--allowGPUFallback"]
    cmd.append("--skipInference")
    return cmd


_SCRIPT = """#!/usr/bin/env bash
# Build the TensorRT engine of this usfm-edge bundle ON THE DEVICE THAT WILL RUN IT.
# Engines are specific to the GPU and the TensorRT version; rebuild after a JetPack/TensorRT upgrade.
#   JetPack 6.x (Jetson Orin) = TensorRT 10.x (10.3 on JetPack 6.1): uses --fp16 / --int8
#   TensorRT >= 11 (JetPack >= 7.2.2, Thor, x86): precision flags were removed; uses --stronglyTyped
# Usage: ./{script} [DLA_CORE]      (or DLA_CORE=0 ./{script}; TRTEXEC=/path/to/trtexec to override)
# Exact command (TensorRT 10): {cmd10}
set -euo pipefail
cd "$(dirname "$0")"
DLA_CORE="${{1:-${{DLA_CORE:-{dla_default}}}}}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ]; then
  echo "trtexec not found: install TensorRT (JetPack on Jetson) or set TRTEXEC=/path/to/trtexec" >&2
  exit 4
fi
VER="$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n1 | tr -dc '0-9' || true)"
TRT_MAJOR="${{TRT_MAJOR:-$(( ${{VER:-100000}} / 10000 ))}}"
echo "building {engine} with TensorRT major version $TRT_MAJOR"
if [ "$TRT_MAJOR" -ge 11 ]; then
  set -- {args11}
else
  set -- {args10}
fi
if [ -n "$DLA_CORE" ]; then
  set -- "$@" "--useDLACore=$DLA_CORE" --allowGPUFallback
fi
"$TRTEXEC" "$@"
echo "wrote $(pwd)/{engine}"
"""


def write_build_script(bundle_dir: str | Path, onnx: str = "model.onnx", engine: str = "model.engine",
                       precision: str = "fp16", workspace_gb: float = 4.0, timing_cache: str | None = "timing.cache",
                       dla_core: int | None = None, shapes: Shapes | None = None) -> Path:
    """Write ``build_engine.sh`` (executable) into the bundle folder.

    The script holds the exact ``trtexec`` command (TensorRT 10 form, also as a comment), switches to
    ``--stronglyTyped`` on TensorRT >= 11, and takes an optional DLA core (argument or ``DLA_CORE``).

    Returns:
        the script path.
    """
    kw = dict(onnx=onnx, engine=engine, precision=precision, workspace_gb=workspace_gb, timing_cache=timing_cache,
              shapes=shapes)
    cmd10 = trtexec_command(**kw, dla_core=dla_core, trt_major=10)
    args10 = trtexec_command(**kw, trt_major=10)[1:]
    args11 = trtexec_command(**kw, trt_major=11)[1:]
    text = _SCRIPT.format(script=BUILD_SCRIPT, cmd10=shlex.join(cmd10), engine=engine,
                          dla_default="" if dla_core is None else int(dla_core),
                          args10=shlex.join(args10), args11=shlex.join(args11))
    path = Path(bundle_dir) / BUILD_SCRIPT
    path.write_text(text)
    path.chmod(0o755)
    return path
