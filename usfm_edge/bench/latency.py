"""Measure bundles and the PyTorch fp32 model side by side on real ultrasound frames.

Every variant (each bundle, and the checkpoint in PyTorch through the same raw-frame graph; ``bench.variants``
opens and times both) is timed in processes of its own (``bench.memprobe.run_isolated``): ``rounds`` fresh processes per variant, the variants
in a rotating order, so a slow spell of a shared machine is spread over all of them. One runtime per
process is what scanner software runs, and it matters: timed call by call in ONE process, each variant
competes with the others' idle worker threads (ONNX Runtime's pool and libgomp spin after each call). On the
demo model (2 threads) PyTorch took 47.6 ms per frame alternating with an ONNX Runtime bundle and 23.0 ms
in blocks or alone; with five bundles in the process 54.7 ms alternating, 32.9 ms in blocks. The shared
process remains available (``isolate=False``: blocks of calls after an untimed one), faster to run.

Latency is end to end for one call: raw uint8 frame(s) in, task outputs at the frame's size out
(``Engine.predict_batch``), i.e. what scanner software pays. Memory: each variant's peak resident set in its
own timing process after its first batch size (interpreter and libraries included, what an embedding
application holds), and the resident-set growth of this process when the variant is opened for the task
metric (it holds all variants and reuses memory freed by earlier ones, so that is a lower bound). The task
metric is computed with ``evaluation.evaluate_predictor`` on held-out real frames: the same code path for
every variant.

Back-to-back calls keep the cores busy. A scanner instead delivers one frame every ``1 / fps`` seconds and the
cores idle in between; on machines that power down or lend out idle cores (laptops, Jetsons, shared VMs) a
call that follows an idle gap can be slower. ``fps`` adds that measurement (:func:`paced_latency`): batch-1
calls at the scanner's frame rate, per variant, reported beside the back-to-back figures.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from usfm_edge.bench.sysinfo import machine_info
from usfm_edge.bench.variants import (
    Variant,
    open_bundle,
    open_torch,
    paced_latency,
    paced_summary,
    process_rss_mb,
    time_once,
)
from usfm_edge.core.errors import BackendUnavailableError, ConfigError, UsfmEdgeError

__all__ = ["BenchRow", "run_bench", "stability", "rotating_rounds", "machine_info", "paced_latency", "paced_summary",
           "process_rss_mb"]

PRIMARY = {"seg": "dice", "cls": "auc", "enhance": "psnr", "features": None}


@dataclass
class BenchRow:
    """One variant at one batch size."""

    name: str
    backend: str
    precision: str
    target: str
    device: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    fps: float
    ratio_vs_torch: float | None
    size_mb: float | None
    rss_mb: float
    metric: str | None = None
    peak_rss_mb: float | None = None
    metric_value: float | None = None
    extra: dict = field(default_factory=dict)
    p10_ms: float | None = None
    load: float | None = None  # highest 1-minute load average seen while this variant was timed
    unstable: list[str] = field(default_factory=list)  # why its figures are not to be trusted (empty: stable)


def stability(p50: float, p90: float, load: float | None, cores: int) -> list[str]:
    """Reasons a row's timings are unreliable: a long tail (p90 > 2x p50), or a machine busier than its cores
    (1-minute load average above the core count: other work competed for them)."""
    reasons = []
    if p90 > 2.0 * p50:
        reasons.append(f"p90 {p90:.1f} ms > 2x p50 {p50:.1f} ms")
    if load is not None and load > cores:
        reasons.append(f"load {load:.1f} > {cores} cores")
    return reasons


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on this platform
        return None


def _max_load(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def rotating_rounds(items: list, runs: int, rounds: int) -> list[tuple[int, object]]:
    """``[(runs in this job, item)]``: ``rounds`` rounds over ``items``, each round starting one item later, the
    ``runs`` split over the rounds (exactly ``runs`` per item in all; at most ``runs`` rounds)."""
    rounds = max(1, min(rounds, runs))
    n = max(len(items), 1)
    return [(runs // rounds + (r < runs % rounds), item)
            for r in range(rounds) for item in items[r % n:] + items[: r % n]]


def _time_isolated(variants, skipped, frame_path, batches, threads, runs, warmup, rounds, device, backend, fps,
                   progress, spin=True):
    """Each variant timed in fresh processes (``bench.memprobe.run_isolated``), ``rounds`` of them per variant,
    in a rotating order so a slow spell of a shared machine is spread over the variants."""
    from usfm_edge.bench.memprobe import run_isolated

    jobs = rotating_rounds(variants, runs, rounds)
    times = {b: {v.name: [] for v in variants} for b in batches}
    paced_runs = {v.name: [] for v in variants}
    peaks: dict[str, float | None] = {}
    loads: dict[str, float | None] = {}
    failed: set[str] = set()
    it = jobs if progress is None else progress(jobs, "variants (own processes)")
    for n_runs, v in it:
        if v.name in failed:
            continue
        spec = {"batches": list(batches), "runs": n_runs, "warmup": warmup, "fps": fps, "spin": spin}
        try:
            before = _load()
            res = run_isolated(v.kind, v.path, frame_path, threads, device, backend, spec)
            loads[v.name] = _max_load(loads.get(v.name), _max_load(before, _load()))
        except RuntimeError as exc:
            failed.add(v.name)
            skipped.append({"bundle": v.name, "reason": f"timing: {exc}"})
            continue
        for b, t in res["times"].items():
            times[int(b)][v.name] += t
        if res.get("paced"):
            paced_runs[v.name] += res["paced"]["times_ms"]
        peak = res.get("peak_rss_mb")
        peaks[v.name] = peak if peaks.get(v.name) is None else max(peaks[v.name], peak)
    for name in failed:
        peaks.pop(name, None)
    return times, paced_runs, peaks, loads


def _time_shared(variants, frame, batches, runs, warmup, block, fps, progress):
    """All variants in this process, in blocks (one untimed call, then ``block`` timed ones) round-robin."""
    times = {b: {v.name: [] for v in variants} for b in batches}
    load = _load()
    for batch in batches:
        # the same real frame repeated: batching needs same-size frames
        inputs = [frame] * batch
        for v in variants:
            for _ in range(warmup):
                time_once(v, inputs)
        rounds = -(-runs // block)
        it = range(rounds) if progress is None else progress(range(rounds), f"batch {batch}")
        for _ in it:
            for v in variants:
                if block > 1:  # let the previous variant's worker threads go idle before timing this one
                    time_once(v, inputs)
                for _ in range(block):
                    times[batch][v.name].append(time_once(v, inputs))
        load = _max_load(load, _load())
    paced_runs = {}
    for v in variants:
        if fps:
            time_once(v, [frame])
            paced_runs[v.name] = paced_latency(lambda v=v: time_once(v, [frame]), fps, runs)["times_ms"]
    return times, paced_runs, {}, {v.name: load for v in variants}


def run_bench(bundles: list[str | Path], torch_ckpt: str | Path | None = None, data: str | None = None,
              batches: tuple[int, ...] = (1,), threads: int = 2, runs: int = 30, warmup: int = 3,
              eval_frames: int = 16, device: str = "cpu", backend: str = "auto", torch_bf16: bool = False,
              progress=None, memory: bool = True, fps: float | None = None, isolate: bool = True, rounds: int = 2,
              block: int = 5, spin: bool = True, peer: bool = False) -> dict:
    """Benchmark bundles (and a PyTorch checkpoint) side by side; returns {"machine", "rows", "settings"}.

    Args:
        bundles: bundle folders (``NAME.usfm``).
        torch_ckpt: task checkpoint run in PyTorch fp32 as the reference row (ratios are against it).
        data: data source for frames and the task metric (default: the bundled BUS-BRA sample).
        batches: batch sizes to time (same-size frames are batched where the graph allows it).
        threads: intra-op threads of every backend (and torch).
        runs, warmup: timed repetitions per variant and batch size (split over ``rounds``), and untimed ones
            before them (per process, or per variant in the shared process).
        eval_frames: held-out frames for the task metric (0 = skip accuracy).
        device: ``cpu`` or an accelerator (``cuda`` for ORT CUDA / TensorRT and PyTorch, ``GPU`` / ``NPU`` for
            OpenVINO); variants that cannot use it are reported as skipped.
        torch_bf16: add a PyTorch bf16 row (useful on GPUs and CPUs with native bf16).
        memory: with ``isolate=False``, measure each variant's peak RSS in a process of its own
            (``bench.memprobe``, a few s each); isolated timing measures it anyway.
        fps: also time ``runs`` batch-1 calls per variant paced at this frame rate (:func:`paced_latency`);
            reported under ``"paced"`` with the ratio to the back-to-back batch-1 p50.
        isolate: time each variant in fresh processes, ``rounds`` per variant in a rotating order (the
            default: one runtime per process, as in scanner software); False: all in this process, in blocks
            of ``block`` timed calls after an untimed one (faster, but the variants' idle worker threads
            compete: see the module docstring).
        spin: ONNX Runtime bundles' worker threads spin-wait between calls (``Engine.open(spin=...)``).
        peer: add the by-hand INT8 rows of ``torch_ckpt`` (``bench.peer.bench_peer_rows``: OpenVINO+NNCF and ORT
            ``quantize_static`` on the bare model), timed in fresh processes after the bundles.
    """
    if rounds < 1 or block < 1:
        raise ConfigError(f"rounds and block must be >= 1, got {rounds} and {block}")
    from usfm_edge.evaluation import read_frame, select_records

    if not bundles and torch_ckpt is None:
        raise ConfigError("nothing to benchmark: give bundle folders and/or --torch CKPT")
    if data is None:
        from usfm_edge.data import sample_dir

        data = f"busbra:{sample_dir() / 'busbra'}"
    records = select_records(data, split="all")
    variants, skipped = _open_variants(bundles, torch_ckpt, torch_bf16, threads, device, backend, spin)
    if isolate:
        times, paced_runs, peaks, loads = _time_isolated(variants, skipped, records[0].image, batches, threads,
                                                         runs, warmup, rounds, device, backend, fps, progress, spin)
        variants = [v for v in variants if v.name in peaks]
    else:
        frame = read_frame(records[0])
        times, paced_runs, peaks, loads = _time_shared(variants, frame, batches, runs, warmup, block, fps, progress)
    if not variants:
        _nothing_ran(skipped)
    rows = _rows(variants, times, batches, loads)
    if peer:
        from usfm_edge.bench.peer import bench_peer_rows

        rows += [BenchRow(**r) for r in bench_peer_rows(torch_ckpt, bundles, data, rows, batches, threads, runs,
                                                         warmup, rounds)]
    paced = []
    if fps:
        b2b = {r.name: r.p50_ms for r in rows if r.batch == 1}
        for v in variants:
            res = {"name": v.name, **paced_summary(paced_runs[v.name], fps)}
            res["p50_vs_back_to_back"] = res["p50_ms"] / b2b[v.name] if v.name in b2b else None
            paced.append(res)
    if memory and not isolate:
        from usfm_edge.bench.memprobe import isolated_peak_rss_mb

        for v in variants:
            peaks[v.name] = isolated_peak_rss_mb(v.kind, v.path, records[0].image, threads, device, backend)
    for r in rows:
        r.peak_rss_mb = peaks.get(r.name)
    if eval_frames:
        _accuracy(variants, rows, select_records(data, split="val", limit=eval_frames), skipped)
    return {"machine": machine_info(), "rows": [asdict(r) for r in rows], "skipped": skipped, "paced": paced,
            "settings": {"threads": threads, "runs": runs, "warmup": warmup, "batches": list(batches), "data": data,
                         "eval_frames": eval_frames, "device": device, "fps": fps, "isolate": isolate,
                         "rounds": rounds if isolate else None, "block": None if isolate else block, "spin": spin,
                         "peak_rss_mb": process_rss_mb("VmHWM")}}


def _nothing_ran(skipped: list[dict]):
    """Every variant was skipped: a typed error listing each reason (a missing backend or device: exit 4)."""
    reasons = "; ".join(f"{sk['bundle']}: {sk['reason']}" for sk in skipped) or "no variant"
    if skipped and all(sk["reason"].startswith("BackendUnavailableError") for sk in skipped):
        raise BackendUnavailableError(f"nothing was benchmarked, every variant was skipped: {reasons}",
                                      hint="check --device / --backend against what this machine has (usfm-edge info)")
    raise UsfmEdgeError(f"nothing was benchmarked, every variant was skipped: {reasons}")


def _open_variants(bundles, torch_ckpt, torch_bf16: bool, threads: int, device: str, backend: str,
                   spin: bool) -> tuple[list[Variant], list[dict]]:
    """The PyTorch row(s) and the bundles, opened; what cannot run here is reported as skipped, with the reason."""
    variants: list[Variant] = []
    skipped: list[dict] = []
    if torch_ckpt is not None:
        for bf16 in (False, True) if torch_bf16 else (False,):
            try:  # never a silent fallback to the CPU: a device torch cannot use is reported as skipped
                variants.append(open_torch(Path(torch_ckpt), threads, device, bf16=bf16))
            except BackendUnavailableError as exc:
                skipped.append({"bundle": f"{torch_ckpt} (PyTorch {'bf16' if bf16 else 'fp32'})",
                                "reason": f"{type(exc).__name__}: {exc}"})
    for b in bundles:
        try:
            variants.append(open_bundle(Path(b), threads, device, backend, spin))
        except Exception as exc:  # a backend or device that is not here: report, do not abort the others
            skipped.append({"bundle": str(b), "reason": f"{type(exc).__name__}: {exc}"})
    return variants, skipped


def _rows(variants: list[Variant], times: dict, batches, loads: dict | None = None) -> list[BenchRow]:
    """One row per variant and batch size: percentiles, throughput, the ratio to PyTorch fp32's median, and
    whether the figures are stable (:func:`stability`)."""
    rows: list[BenchRow] = []
    loads = loads or {}
    cores = os.cpu_count() or 1
    for batch in batches:
        ref = np.median(times[batch]["pytorch-fp32"]) if "pytorch-fp32" in times[batch] else None
        for v in variants:
            t = np.asarray(times[batch][v.name])
            p50 = float(np.median(t))
            p90 = float(np.percentile(t, 90))
            rows.append(BenchRow(v.name, v.backend, v.precision, v.target, v.device, batch, p50, p90,
                                 float(np.percentile(t, 99)), 1000.0 * batch / p50,
                                 float(ref / p50) if ref is not None else None, v.size_mb, v.rss_mb,
                                 p10_ms=float(np.percentile(t, 10)), load=loads.get(v.name),
                                 unstable=stability(p50, p90, loads.get(v.name), cores)))
    return rows


def _accuracy(variants: list[Variant], rows: list[BenchRow], held: list, skipped: list[dict]) -> None:
    """The task metric of every variant on the held-out records (``evaluation.evaluate_predictor``: the one
    scoring path; static-shape bundles' engines fit the frames), into its rows."""
    from usfm_edge.evaluation import evaluate_predictor

    for v in variants:
        task = getattr(v.predictor, "task", None)
        metric = PRIMARY.get(task)
        if metric is None:
            continue
        try:
            res = evaluate_predictor(v.predictor, held, task)
        except Exception as exc:
            skipped.append({"bundle": v.name, "reason": f"accuracy: {type(exc).__name__}: {exc}"})
            continue
        for r in rows:
            if r.name == v.name:
                r.metric, r.metric_value = metric, float(res[metric])
                r.extra = {k: res[k] for k in ("iou", "hd95", "accuracy", "ssim", "hc_mae_mm") if k in res}
