"""One variant in a process of its own (``python -m usfm_edge.bench.memprobe``): latency and peak memory.

Scanner software runs one model with one runtime. Timed in one process beside the others, a variant competes
with their idle worker threads (ONNX Runtime's and libgomp's spin after each call; measured on the demo
model: PyTorch 47.6 ms per frame alternating with ONNX Runtime, 23.0 ms alone), and memory freed by one
engine is reused by the next. So :func:`run_isolated` starts a fresh interpreter that opens ONE bundle (or the
PyTorch checkpoint), times it on a real frame exactly as the benchmark feeds it (``variants.time_once``),
optionally paced at a frame rate, and reports the times and the process's peak resident set (``VmHWM``,
interpreter and libraries included: what an embedding application holds; host memory only on a GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

__all__ = ["isolated_peak_rss_mb", "run_isolated"]

KINDS = ("bundle", "torch", "torch-bf16")


def run_isolated(kind: str, path: str | Path, frame: str | Path, threads: int = 2, device: str = "cpu",
                 backend: str = "auto", timing: dict | None = None, timeout: float = 600.0) -> dict:
    """Open ``path`` in a fresh process, time it (``timing``) and return what it measured.

    Args:
        kind: ``bundle`` (runtime.Engine), ``torch`` or ``torch-bf16`` (task checkpoint, raw-frame graph).
        path: the bundle folder or checkpoint.
        frame: an image file (read with ``data.readers.read_image``).
        threads, device, backend: as for the benchmark.
        timing: ``{"batches": [1, 8], "runs": 15, "warmup": 3, "fps": 20.0 or None, "spin": True}``; None or
            ``{}``: 3 untimed calls (memory only).
        timeout: seconds before the process is abandoned.

    Returns:
        ``{"peak_rss_mb": float, "times": {"1": [ms, ...], ...}, "paced": dict or None}``.

    Raises:
        RuntimeError: the process failed; the message ends with its last stderr lines.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cmd = [sys.executable, "-m", "usfm_edge.bench.memprobe", kind, str(path), str(frame), str(threads), device,
           backend, json.dumps(timing or {})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{path}: no result within {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{path}: the measuring process exited with {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def isolated_peak_rss_mb(kind: str, path: str | Path, frame: str | Path, threads: int = 2, device: str = "cpu",
                         backend: str = "auto", timeout: float = 300.0) -> float | None:
    """Peak RSS in MB of a process that opens ``path`` and runs it 3 times on ``frame``; None when it fails."""
    try:
        return float(run_isolated(kind, path, frame, threads, device, backend, None, timeout)["peak_rss_mb"])
    except (RuntimeError, ValueError, KeyError, OSError):
        return None


def _probe(kind: str, path: str, frame_path: str, threads: int, device: str, backend: str, timing: dict) -> dict:
    # opened and fed exactly as the benchmark opens and feeds the variant
    from usfm_edge.bench.variants import open_bundle, open_torch, paced_latency, process_rss_mb, time_once
    from usfm_edge.data.readers import read_image

    if kind == "bundle":
        v = open_bundle(Path(path), threads, device, backend, (timing or {}).get("spin", True))
    else:
        v = open_torch(Path(path), threads, device, bf16=kind == "torch-bf16")
    frame = read_image(frame_path)
    if not timing or "batches" not in timing:
        for _ in range(3):
            time_once(v, [frame])
        return {"peak_rss_mb": process_rss_mb("VmHWM"), "times": {}, "paced": None}
    times, peak = {}, None
    for batch in timing["batches"]:
        inputs = [frame] * batch
        for _ in range(timing.get("warmup", 3)):
            time_once(v, inputs)
        times[str(batch)] = [time_once(v, inputs) for _ in range(timing["runs"])]
        if peak is None:  # the peak of the first (smallest) batch, as a scanner feeding frames one by one
            peak = process_rss_mb("VmHWM")
    paced = None
    if timing.get("fps"):
        paced = paced_latency(lambda: time_once(v, [frame]), timing["fps"], timing["runs"])
    return {"peak_rss_mb": peak, "times": times, "paced": paced}


if __name__ == "__main__":
    k, p, f, t, d, b = sys.argv[1:7]
    spec = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    print(json.dumps(_probe(k, p, f, int(t), d, b, spec)))
