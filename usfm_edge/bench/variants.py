"""One benchmark variant: a bundle (``runtime.Engine``) or the PyTorch checkpoint (``evaluation.TorchPredictor``),
opened and timed the same way by ``bench.latency`` (in this process) and ``bench.memprobe`` (in a process of its
own), plus the paced (scanner frame rate) timing and this process's memory.

Frames are fed as they come, at any size: a static-shape bundle's Engine fits them itself (the fit is part of
the measured call, as for scanner software using the runtime).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import BackendUnavailableError, ConfigError

__all__ = ["Variant", "open_bundle", "open_torch", "time_once", "paced_latency", "paced_summary", "process_rss_mb"]


def process_rss_mb(key: str = "VmRSS") -> float:
    """Resident set size (``VmRSS``) or its peak (``VmHWM``) of this process in MB; nan where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


@dataclass
class Variant:
    """An opened variant: its predictor (``predict`` / ``predict_batch``) and what the report says about it."""

    name: str
    predictor: object
    backend: str
    precision: str
    target: str
    device: str
    size_mb: float
    rss_mb: float
    path: Path | None = None

    @property
    def kind(self) -> str:
        """``bundle``, ``torch`` or ``torch-bf16`` (what ``bench.memprobe`` reopens it as)."""
        return ("torch-bf16" if self.precision == "bf16" else "torch") if self.backend == "torch" else "bundle"


def open_bundle(path: Path, threads: int, device: str, backend: str, spin: bool = True) -> Variant:
    """A bundle on ``runtime.Engine`` (any frame size, static-shape bundles included)."""
    from usfm_edge.runtime import Engine

    before = process_rss_mb()
    eng = Engine.open(path, backend=backend, device=device, threads=threads, spin=spin)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
    return Variant(Path(path).name.removesuffix(".usfm"), eng, getattr(eng.backend, "name", backend),
                   eng.meta.precision, eng.meta.target, device, size, process_rss_mb() - before, Path(path))


def open_torch(ckpt: Path, threads: int, device: str, bf16: bool = False) -> Variant:
    """The task checkpoint in PyTorch through the raw-frame graph (``evaluation.TorchPredictor``), fp32 or bf16.

    Raises:
        BackendUnavailableError: ``device`` is not one PyTorch can use here (never a silent CPU fallback).
    """
    import torch

    from usfm_edge.evaluation import TorchPredictor
    from usfm_edge.models.tasks import load_task_model

    if device != "cpu" and not (device == "cuda" and torch.cuda.is_available()):
        why = (f"torch {torch.__version__} sees no CUDA device" if device == "cuda" else
               f"the PyTorch reference runs on cpu or cuda, not on OpenVINO's {device!r}")
        raise BackendUnavailableError(f"PyTorch on {device!r}: {why}", hint="use --device cpu for the CPU rows")
    torch.set_num_threads(threads)
    before = process_rss_mb()
    pred = TorchPredictor(load_task_model(ckpt), device=device)
    if bf16:
        pred.graph.model = pred.graph.model.to(torch.bfloat16)
        pred.graph.half = False
        inner = pred.graph._model
        pred.graph._model = lambda x: inner(x.to(torch.bfloat16)).float()  # noqa: E731
    return Variant(f"pytorch-{'bf16' if bf16 else 'fp32'}", pred, "torch", "bf16" if bf16 else "fp32", "pytorch",
                   device, Path(ckpt).stat().st_size / 1e6, process_rss_mb() - before, Path(ckpt))


def time_once(v: Variant, frames: list[np.ndarray]) -> float:
    """Milliseconds of one call on ``frames``: ``predict_batch`` for bundles, frame by frame for PyTorch (as the
    reference row has always been timed)."""
    t0 = time.perf_counter()
    if len(frames) == 1 or v.backend == "torch":
        for f in frames:
            v.predictor.predict(f)
    else:
        v.predictor.predict_batch(frames, batch_size=len(frames))
    return (time.perf_counter() - t0) * 1000.0


def paced_latency(call, fps: float, runs: int, clock=time.perf_counter, sleep=time.sleep) -> dict:
    """Time ``call`` once per frame slot of a ``fps`` frame rate, as a scanner delivers frames.

    Frame ``i`` arrives at ``t0 + (i + 1) / fps`` (a fixed grid); its call starts when it has arrived and the
    previous call has returned, idling until then. Returns the call latencies' percentiles in ms and
    ``over_budget``, the calls longer than one frame period (the rate could not be sustained for that frame).
    """
    if not fps > 0:
        raise ConfigError(f"fps must be > 0, got {fps!r}")
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs!r}")
    period = 1.0 / fps
    times = []
    start = clock()
    for i in range(runs):
        wait = start + (i + 1) * period - clock()
        if wait > 0:
            sleep(wait)
        t0 = clock()
        call()
        times.append((clock() - t0) * 1000.0)
    return paced_summary(times, fps)


def paced_summary(times_ms: list[float], fps: float) -> dict:
    """Percentiles of paced call latencies and how many exceeded the frame period (``over_budget``)."""
    t = np.asarray(times_ms, dtype=float)
    period_ms = 1000.0 / fps
    return {"fps": float(fps), "runs": len(t), "p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "over_budget": int((t > period_ms).sum()), "period_ms": period_ms,
            "times_ms": [float(x) for x in t]}


