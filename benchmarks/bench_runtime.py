"""Benchmark the torch-free runtime: its overhead over bare ONNX Runtime, cold start and resident memory.

(a) Overhead: ``Engine.predict(frame)`` end to end (checks, inference, typed result with per-class areas)
    minus ``session.run`` of the engine's own ONNX Runtime session on the very same uint8 frame, for a
    ``usfm_vit_small_patch16_224`` bundle (seg and cls; random weights: the work per frame does not depend
    on the weights). Both are timed in one loop, alternating which goes first, on real frames (one HC18
    540x800, one BUS-BRA ~300x270); medians, and the median of the per-round paired differences.
    Goal: overhead <= 5% of the model time.
(b) Cold start and memory of tiny / small / base seg bundles (fp32; INT8 too when
    ``usfm_edge.calibration.make_quantizer`` exists): each run is a fresh interpreter that imports
    ``usfm_edge.runtime``, opens the bundle (SHA-256 verification + warm-up) and predicts a real frame;
    runs of the variants are interleaved round-robin; medians. RSS is ``VmRSS`` of ``/proc/self/status``.

All engines use 2 threads. The machine is shared (see the load average in the report): compare ratios.

Usage:
    python benchmarks/bench_runtime.py --out benchmarks/results [--rounds 40] [--cold-runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from usfm_edge.bench.sysinfo import load_note  # noqa: E402
from usfm_edge.models.registry import sizes  # noqa: E402

PRESETS = sizes()  # tiny / small / base -> preset name
SAMPLE = ROOT / "usfm_edge" / "assets" / "sample"


def rss_mb() -> float:
    """Resident set size of this process in MB (``VmRSS``).

    Deliberately not ``usfm_edge.bench.latency.rss_mb``: the cold-start child measures before importing any
    usfm_edge module."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def real_frames() -> dict[str, np.ndarray]:
    from usfm_edge.data.readers import read_image

    return {"hc18 540x800": read_image(sorted((SAMPLE / "hc18" / "training_set").glob("*_HC.png"))[0]),
            "busbra": read_image(sorted((SAMPLE / "busbra" / "Images").glob("*.png"))[0])}


def make_bundle(work: Path, preset: str, task: str, precision: str = "fp32") -> Path:
    """Export (once) a random-weight ``task`` bundle of ``preset`` for the ``onnx`` target."""
    out = work / f"{preset}-{task}-{precision}.usfm"
    if (out / "usfm.json").is_file():
        return out
    import torch

    from usfm_edge.export.exporter import export
    from usfm_edge.export.parity import default_frames
    from usfm_edge.models.tasks import build_task_model

    torch.manual_seed(0)
    labels = ["benign", "malignant", "normal"] if task == "cls" else ["background", "lesion"]
    model = build_task_model(task, PRESETS[preset], labels=labels, img_size=224)
    kw: dict = {}
    if precision == "int8":
        from usfm_edge.calibration import make_quantizer

        kw["quantizer"] = make_quantizer([f"busbra:{SAMPLE / 'busbra'}", f"hc18:{SAMPLE / 'hc18'}"], force=True)
        kw["force"] = True
    t = time.perf_counter()
    export(model, "onnx", precision=precision, out=out, verify_frames=default_frames(2), **kw)
    print(f"  exported {out.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


# -- (a) overhead ------------------------------------------------------------------------------------------
def overhead(bundle: Path, frames: dict[str, np.ndarray], rounds: int, threads: int) -> list[dict]:
    from usfm_edge.runtime import Engine

    rows = []
    with Engine.open(bundle, backend="onnxruntime", threads=threads) as engine:
        session, names, inp = engine.backend.session, engine.output_names, engine.backend.input_name
        inner: list[float] = []
        run = engine.backend.run

        def timed_run(x):  # the backend call inside Engine.predict, timed in the same call
            t = time.perf_counter()
            out = run(x)
            inner.append((time.perf_counter() - t) * 1000.0)
            return out

        engine.backend.run = timed_run
        for fname, frame in frames.items():
            feed = {inp: frame[None]}

            def bare(feed=feed):
                return session.run(names, feed)

            def full(frame=frame):
                return engine.predict(frame)

            for _ in range(5):
                bare(), full()
            t_bare, t_full, diffs, in_call = [], [], [], []
            for r in range(rounds):
                pair = {}
                for name, fn in ((("bare", bare), ("full", full)) if r % 2 == 0 else (("full", full), ("bare", bare))):
                    t = time.perf_counter()
                    fn()
                    pair[name] = (time.perf_counter() - t) * 1000.0
                t_bare.append(pair["bare"])
                t_full.append(pair["full"])
                diffs.append(pair["full"] - pair["bare"])
                in_call.append(pair["full"] - inner[-1])
            mb, mf, md = float(np.median(t_bare)), float(np.median(t_full)), float(np.median(diffs))
            mi = float(np.median(in_call))
            rows.append({"bundle": bundle.name, "task": engine.task, "frame": fname, "hw": list(frame.shape),
                         "bare_ms": mb, "predict_ms": mf, "overhead_ms": mf - mb, "overhead_pct": 100 * (mf - mb) / mb,
                         "paired_overhead_ms": md, "paired_overhead_pct": 100 * md / mb,
                         "in_call_overhead_ms": mi, "in_call_overhead_pct": 100 * mi / mb,
                         "in_call_overhead_max_ms": float(np.max(in_call)),
                         "bare_p10_p90": [float(np.percentile(t_bare, 10)), float(np.percentile(t_bare, 90))],
                         "predict_p10_p90": [float(np.percentile(t_full, 10)), float(np.percentile(t_full, 90))]})
            print(f"  {bundle.name} {fname}: bare {mb:.2f} ms, predict {mf:.2f} ms, overhead {mf - mb:+.3f} ms "
                  f"({100 * (mf - mb) / mb:+.2f}%), paired {md:+.3f} ms, in-call {mi:.3f} ms", flush=True)
    return rows


# -- (b) cold start and RSS in a fresh interpreter ---------------------------------------------------------
def child(bundle: str, frame_npy: str, threads: int) -> None:
    """Runs in a fresh interpreter; prints one JSON line."""
    out = {"rss_python_mb": rss_mb()}
    frame = np.load(frame_npy)
    out["rss_numpy_mb"] = rss_mb()
    t0 = time.perf_counter()
    from usfm_edge.runtime import Engine, verify_bundle

    out["import_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    verify_bundle(bundle)
    out["verify_s"] = time.perf_counter() - t
    t1 = time.perf_counter()
    engine = Engine.open(bundle, backend="onnxruntime", threads=threads)
    out["open_s"] = time.perf_counter() - t1
    out["rss_open_mb"] = rss_mb()
    engine.predict(frame)
    out["cold_start_s"] = time.perf_counter() - t1  # open (verify + load + warm-up) + first result
    for _ in range(20):
        engine.predict(frame)
    out["rss_steady_mb"] = rss_mb()
    out["engine_rss_mb"] = out["rss_steady_mb"] - out["rss_numpy_mb"]
    print(json.dumps(out))


def cold_starts(bundles: dict[str, Path], frame: np.ndarray, runs: int, threads: int, work: Path) -> dict:
    frame_npy = work / "frame.npy"
    np.save(frame_npy, frame)
    got: dict[str, list[dict]] = {k: [] for k in bundles}
    for r in range(runs):
        for name in (list(bundles) if r % 2 == 0 else list(bundles)[::-1]):
            cmd = [sys.executable, __file__, "--child", str(bundles[name]), str(frame_npy), "--threads", str(threads)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                raise SystemExit(p.stderr[-3000:])
            got[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"  run {r} {name}: cold start {got[name][-1]['cold_start_s']:.2f} s, "
                  f"RSS {got[name][-1]['rss_steady_mb']:.0f} MB", flush=True)
    res = {}
    for name, runs_ in got.items():
        res[name] = {k: float(np.median([x[k] for x in runs_])) for k in runs_[0]}
        res[name]["model_mb"] = sum(f.stat().st_size for f in bundles[name].iterdir()) / 1e6
        res[name]["runs"] = len(runs_)
    return res


def versions() -> dict:
    import importlib.metadata as md

    from usfm_edge.bench.sysinfo import machine_line

    out = {"python": platform.python_version(), "machine": machine_line(), "cpus": os.cpu_count()}
    for d in ("numpy", "onnxruntime", "openvino", "torch"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


def write_report(out: Path, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Runtime benchmark", "", f"Command: `{res['command']}`", "",
             f"Machine: {res['versions']}. Threads: {res['threads']}. Load average at start {res['load_start']}, "
             f"at end {res['load_end']} ({load_note([res['load_start'], res['load_end']])}).",
             "", "## (a) Runtime overhead: `Engine.predict` minus bare `session.run` on the same uint8 frame", "",
             "`usfm_vit_small_patch16_224` bundles with **random weights** (the work per frame does not depend on "
             f"them), ONNX Runtime CPU, {res['rounds']} interleaved rounds per row, medians (p10-p90).", "",
             "**in-call overhead** = `Engine.predict` wall time minus the time of the backend's `session.run` inside "
             "that same call (measured by wrapping it): the runtime's own work, free of the run-to-run noise of a "
             "shared machine. The between-call columns compare medians of separate calls (noisy here).", "",
             "| bundle | frame | bare session.run ms | Engine.predict ms | **in-call overhead ms (% of bare)** | "
             "between-call overhead ms (%) | paired between-call ms (%) |", "|---|---|---|---|---|---|---|"]
    for r in res["overhead"]:
        lines.append(f"| {r['bundle']} | {r['frame']} | {r['bare_ms']:.2f} ({r['bare_p10_p90'][0]:.1f}-"
                     f"{r['bare_p10_p90'][1]:.1f}) | {r['predict_ms']:.2f} ({r['predict_p10_p90'][0]:.1f}-"
                     f"{r['predict_p10_p90'][1]:.1f}) | **{r['in_call_overhead_ms']:.3f} "
                     f"({r['in_call_overhead_pct']:.2f}%)** | {r['overhead_ms']:+.2f} ({r['overhead_pct']:+.2f}%) | "
                     f"{r['paired_overhead_ms']:+.2f} ({r['paired_overhead_pct']:+.2f}%) |")
    lines += ["", "Goal: overhead <= 5% of the model time.", "",
              "## (b) Cold start (open = SHA-256 verify + load + warm-up, then the first result) and memory", "",
              f"Seg bundles, fp32 unless named int8, one fresh interpreter per run, {res['cold_runs']} runs per "
              "variant interleaved, medians. `engine RSS` = steady RSS after 20 predictions minus the RSS of "
              "Python + numpy.", "",
              "| bundle | files MB | import s | verify s | open s | cold start s | RSS after open MB | "
              "steady RSS MB | engine RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["cold"].items():
        lines.append(f"| {name} | {r['model_mb']:.1f} | {r['import_s']:.3f} | {r['verify_s']:.2f} | {r['open_s']:.2f} | "
                     f"{r['cold_start_s']:.2f} | {r['rss_open_mb']:.0f} | {r['rss_steady_mb']:.0f} | "
                     f"{r['engine_rss_mb']:.0f} |")
    lines += ["", f"INT8: {res['int8']}", ""]
    (out / "runtime.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/usfm-bench-runtime"))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", nargs="+", default=["tiny", "small", "base"], choices=list(PRESETS))
    ap.add_argument("--child", nargs=2, metavar=("BUNDLE", "FRAME_NPY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    res = {"command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)
                                                    if Path(sys.argv[0]).is_absolute() else sys.argv[0]), *sys.argv[1:]]),
           "versions": versions(), "threads": args.threads, "rounds": args.rounds, "cold_runs": args.cold_runs,
           "load_start": [round(x, 2) for x in os.getloadavg()]}
    print("bundles", flush=True)
    seg = {p: make_bundle(args.work, p, "seg") for p in args.presets}
    cls_small = make_bundle(args.work, "small", "cls")
    import importlib

    int8 = "not measured: usfm_edge.calibration.make_quantizer does not exist yet"
    if hasattr(importlib.import_module("usfm_edge.calibration"), "make_quantizer"):
        notes = []
        for p in args.presets:
            try:
                seg[f"{p} int8"] = make_bundle(args.work, p, "seg", "int8")
                notes.append(f"{p}: measured (row '{p} int8')")
            except Exception as exc:  # noqa: BLE001 - report, do not hide, a quantiser failure
                notes.append(f"{p}: export with make_quantizer failed: {type(exc).__name__}: {str(exc)[:300]}")
        int8 = "; ".join(notes)
    frames = real_frames()
    print("(a) overhead", flush=True)
    small_seg = seg.get("small") or make_bundle(args.work, "small", "seg")
    res["overhead"] = overhead(small_seg, frames, args.rounds, args.threads) + overhead(
        cls_small, frames, args.rounds, args.threads)
    print("(b) cold start and RSS", flush=True)
    res["cold"] = cold_starts({k if " " in k else f"{k} fp32": v for k, v in seg.items()}, frames["hc18 540x800"],
                              args.cold_runs, args.threads, args.work)
    res["int8"] = int8
    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(args.out, res)
    print(f"wrote {args.out / 'runtime.md'}")


if __name__ == "__main__":
    main()
