"""What the machine is and what it runs: CPU and ISA, library versions, the devices each backend sees.

``machine_info`` heads every benchmark result (DESIGN: results name their machine); ``usfm-edge info`` prints
:func:`backend_versions`, :func:`backend_devices` and :func:`mkl_shim_state`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["machine_info", "machine_line", "load_note", "backend_versions", "backend_devices", "mkl_shim_state", "environment", "environment_text"]


def machine_line(m: dict | None = None) -> str:
    """``AMD EPYC, 2 cores, ISA avx2 fma avx512f ...`` as detected (for report headers)."""
    m = m or machine_info()
    return f"{m['cpu']}, {m['cores']} cores, ISA {' '.join(m['isa']) or 'without AVX2'}"


def load_note(loads, cores: int | None = None) -> str:
    """What the load averages seen during a run mean for its figures: a warning when any exceeded the cores.

    ``loads``: 1-minute load averages, each a number or an ``os.getloadavg()`` triple (its first value is used).
    """
    cores = cores or os.cpu_count() or 1
    items = loads if isinstance(loads, list) else [loads]
    values = [v[0] if isinstance(v, (list, tuple)) else v for v in items if v is not None]
    if values and max(values) > cores:
        return (f"load reached {max(values):.1f} on {cores} cores: other work competed for the CPUs, so compare "
                "ratios within this run, not absolute times")
    return f"load stayed at or below the {cores} cores"


INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_int8_dot_products(isa) -> bool:
    """Whether the CPU flags ``isa`` (e.g. ``machine_info()["isa"]``) include int8 dot-product instructions (VNNI or
    AMX): without them OpenVINO's int8 kernels sum u8 x s8 pairs in 16 bits and fuse no INT8 attention."""
    return bool(set(INT8_DOT_PRODUCT_FLAGS) & set(isa))


def machine_info() -> dict:
    """CPU model, ISA flags that matter for inference, core count and library versions."""
    from importlib import metadata

    cpu, flags = platform.processor() or "?", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                flags = [f for f in wanted if f in have]
                break
    except OSError:
        pass
    versions = {}
    for dist in ("usfm-edge", "torch", "onnxruntime", "openvino", "nncf", "tensorrt", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpus = []
    try:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {"cpu": cpu, "isa": flags, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "gpus": gpus, "versions": versions}


def backend_versions() -> dict[str, str]:
    """Installed versions of usfm-edge and its backends (``not installed`` where missing)."""
    from importlib import metadata

    out = {}
    for dist in ("usfm-edge", "torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def backend_devices() -> dict[str, str]:
    """The devices each backend sees (a broken driver is reported, never raised)."""
    out = {}
    try:
        import torch

        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["torch"] = ", ".join(["cpu", *cuda])
    except ImportError:
        out["torch"] = "not installed"
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ", ".join(ort.get_available_providers())
    except ImportError:
        out["onnxruntime"] = "not installed"
    try:
        import openvino as ov

        core = ov.Core()
        out["openvino"] = ", ".join(f"{d} ({core.get_property(d, 'FULL_DEVICE_NAME')})" for d in core.available_devices)
    except ImportError:
        out["openvino"] = "not installed"
    except Exception as exc:  # a broken driver must not break `info`
        out["openvino"] = f"error: {exc}"
    try:
        import tensorrt as trt  # noqa: F401
        import torch

        out["tensorrt"] = "usable" if torch.cuda.is_available() else "installed, but no CUDA GPU visible"
    except ImportError:
        out["tensorrt"] = "not installed (engines are built on the device: see the bundle's build_engine.sh)"
    return out


def mkl_shim_state() -> dict:
    """Whether the MKL AVX2 shim (``kernels.mkl_dispatch``) applies here and is loaded, in words."""
    from usfm_edge.kernels.mkl_dispatch import ENV_VAR, shim_applicable, shim_loaded

    (ok, reason), loaded = shim_applicable(), shim_loaded()
    state = "loaded" if loaded else (f"off; set {ENV_VAR}=1 to use it ({reason})" if ok else f"not needed: {reason}")
    return {"env_var": ENV_VAR, "applicable": ok, "loaded": loaded, "state": state}


def environment() -> dict:
    """What ``usfm-edge info --json`` prints: versions, devices, Python, machine, the MKL shim's state."""
    return {"versions": backend_versions(), "devices": backend_devices(), "python": platform.python_version(),
            "machine": platform.machine(), "system": platform.system(), "mkl_avx2_shim": mkl_shim_state()}


def environment_text(env: dict) -> str:
    """:func:`environment` as ``usfm-edge info`` prints it."""
    lines = [f"python {env['python']} on {env['machine']} ({env['system']})"]
    lines += [f"  {k:<12} {v}" for k, v in env["versions"].items()]
    lines += [f"MKL AVX2 shim ({env['mkl_avx2_shim']['env_var']}): {env['mkl_avx2_shim']['state']}", "devices:"]
    lines += [f"  {k:<12} {v}" for k, v in env["devices"].items()]
    return "\n".join(lines)
