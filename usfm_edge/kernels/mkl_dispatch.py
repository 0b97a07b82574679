"""Opt-in: let the oneMKL inside the PyTorch CPU wheel run its AVX2 kernels on AMD (non-Intel) CPUs.

oneMKL picks its code path per CPU, and on a CPU whose vendor is not Intel it falls back to a generic
path for some domains, FFT among them: on this project's AMD EPYC (AVX2 + FMA) ``torch.fft`` ran
1.3-1.9x slower than with MKL's AVX2 kernels (``benchmarks/bench_kernels.py`` reports both; numbers in
``benchmarks/RESULTS.md`` §6.4). The vendor test is the internal function ``mkl_serv_intel_cpu_true``,
which ``libtorch_cpu.so`` exports and calls through its symbol table. A one-line shared library that
defines it (returning 1) and is loaded into the global symbol scope *before torch* makes MKL decide
by the CPU's instruction set alone. The CPU must of course have the instructions MKL then uses:
:func:`shim_applicable` only agrees on x86-64 Linux with AVX2 and FMA, and MKL still reads the CPUID
feature bits to choose between SSE, AVX2 and AVX-512 paths.

Effects and limits:
- process-wide: every MKL routine in the process (FFT, and BLAS/LAPACK where torch calls MKL) may
  take another path; results differ from the generic path only in float rounding (the band-stop
  parity tests run under it, ``tests/test_mkl_dispatch.py``);
- must happen before ``import torch``: afterwards torch's MKL is already bound and
  :func:`enable_mkl_avx2` raises :class:`ConfigError`;
- needs a C compiler once (``$CC``, ``cc``, ``gcc`` or ``clang``); the 8 KB library is cached in
  ``$USFM_EDGE_CACHE`` (default ``~/.cache/usfm-edge``) and rebuilt only if missing;
- no effect, and nothing built, on Intel CPUs, non-Linux systems or CPUs without AVX2.

Use it with ``USFM_EDGE_MKL_AVX2=1`` in the environment (``import usfm_edge`` applies it, so the CLI,
scripts and every ``torchrun`` worker get it) or call :func:`enable_mkl_avx2` first thing. This module
imports no torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from usfm_edge.core.errors import BackendUnavailableError, ConfigError
from usfm_edge.core.io import atomic_write_with
from usfm_edge.core.io import cache_dir as default_cache_dir

__all__ = ["ENV_VAR", "shim_applicable", "build_shim", "enable_mkl_avx2", "shim_loaded", "apply_from_env"]

ENV_VAR = "USFM_EDGE_MKL_AVX2"
_SYMBOL = "mkl_serv_intel_cpu_true"
_SOURCE = f"/* usfm-edge: report an Intel CPU to oneMKL's dispatcher */\nint {_SYMBOL}(void) {{ return 1; }}\n"
_TRUE = {"1", "true", "yes", "on"}


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def shim_applicable(cpuinfo: str | None = None, system: str | None = None, machine: str | None = None) -> tuple[bool, str]:
    """Whether the shim can help here: x86-64 Linux, a non-Intel vendor, AVX2 and FMA.

    Args:
        cpuinfo: text of ``/proc/cpuinfo`` (read when None).
        system: ``platform.system()`` (when None).
        machine: ``platform.machine()`` (when None).

    Returns:
        ``(applicable, reason)``; the reason says why not, or names the vendor when it applies.
    """
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if system != "Linux" or machine.lower() not in ("x86_64", "amd64"):
        return False, f"only for x86-64 Linux (this is {system} {machine})"
    text = _cpuinfo_text() if cpuinfo is None else cpuinfo
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vendor, flags = fields.get("vendor_id", ""), set(fields.get("flags", "").split())
    if not vendor:
        return False, "CPU vendor unknown (no vendor_id in /proc/cpuinfo)"
    if vendor == "GenuineIntel":
        return False, "Intel CPU: MKL already picks its fastest path"
    missing = sorted({"avx2", "fma"} - flags)
    if missing:
        return False, f"{vendor} CPU without {', '.join(missing)}: MKL's AVX2 kernels cannot run"
    return True, f"{vendor} CPU with AVX2 and FMA"


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        found = shutil.which(name)
        if found:
            return found
    return None


def build_shim(cache_dir: str | Path | None = None) -> Path:
    """Compile the shim library once and return its path (cached; written to a temporary name, then renamed).

    Raises:
        BackendUnavailableError: no C compiler, or the compiler failed (its message is included).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    target = folder / f"mkl_vendor_shim-{digest}.so"
    if target.is_file():
        return target
    cc = _compiler()
    if cc is None:
        raise BackendUnavailableError("no C compiler to build the MKL vendor shim",
                                      hint="install gcc or clang, or set CC; or leave USFM_EDGE_MKL_AVX2 unset")

    def compile_to(tmp: str) -> None:  # the C source comes on stdin
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-x", "c", "-o", tmp, "-"], input=_SOURCE,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BackendUnavailableError(f"{cc} could not build the MKL vendor shim: {proc.stderr.strip()[:300]}",
                                          path=target)

    try:  # atomic: concurrent builders (torchrun workers) each publish a whole file
        return atomic_write_with(target, compile_to)
    except OSError as exc:
        raise BackendUnavailableError(f"cannot write the MKL vendor shim: {exc}", path=folder,
                                      hint="set USFM_EDGE_CACHE to a writable folder") from exc


def shim_loaded() -> bool:
    """True if a usfm-edge MKL vendor shim is mapped into this process (Linux; False elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "mkl_vendor_shim-" in maps


def enable_mkl_avx2(cache_dir: str | Path | None = None) -> str:
    """Load the shim into the global symbol scope so torch's MKL uses its AVX2 kernels on this CPU.

    Call it before anything imports torch. Does nothing (and builds nothing) where
    :func:`shim_applicable` says no.

    Returns:
        what happened, one line (``"enabled: ..."``, ``"already enabled"`` or ``"not applied: ..."``).

    Raises:
        ConfigError: torch is already imported, so its MKL can no longer be redirected.
        BackendUnavailableError: the shim cannot be built (no C compiler).
    """
    ok, reason = shim_applicable()
    if not ok:
        return f"not applied: {reason}"
    if shim_loaded():
        return "already enabled"
    if "torch" in sys.modules:
        raise ConfigError("the MKL AVX2 shim must be loaded before torch is imported",
                          hint=f"set {ENV_VAR}=1 in the environment, or call enable_mkl_avx2() before import torch")
    path = build_shim(cache_dir)
    try:
        ctypes.CDLL(str(path), mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)
    except OSError as exc:  # e.g. a damaged cached file: say which, so it can be deleted
        raise BackendUnavailableError(f"cannot load the MKL vendor shim: {exc}", path=path,
                                      hint="delete the file; it is rebuilt on the next use") from exc
    return f"enabled: {reason}; {path}"


def apply_from_env() -> str | None:
    """Apply :func:`enable_mkl_avx2` when ``USFM_EDGE_MKL_AVX2`` is true; warn (never raise) on failure."""
    if os.environ.get(ENV_VAR, "").strip().lower() not in _TRUE:
        return None
    try:
        return enable_mkl_avx2()
    except (ConfigError, BackendUnavailableError) as exc:
        warnings.warn(f"{ENV_VAR} is set but the MKL shim was not applied: {exc}", RuntimeWarning, stacklevel=2)
        return f"not applied: {exc}"
