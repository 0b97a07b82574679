"""Soak test of the runtime: many real frames through one engine; resident memory must stay flat.

Frames are the real ultrasound images of the bundled sample (BUS-BRA and HC18, several sizes), cycled. They go
through one ``Engine`` in blocks of ``--every`` frames that alternate between ``predict`` and ``stream`` (so both
paths soak); ``VmRSS`` of ``/proc/self/status`` is recorded after every block. Pass: after the warm-up blocks,
RSS stays within 5% of its value at the end of warm-up. Then 4 threads predict the frame set concurrently
(``--thread-rounds`` times each) and every result must be bit-identical to the serial results.

The bundle is a random-weight ``usfm_vit_test`` seg bundle (``--preset``; 64 px model, outputs at frame size),
exported once in a child process: the soak process itself never imports torch.

Usage:
    python benchmarks/soak_runtime.py --frames 10000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from usfm_edge.bench.latency import process_rss_mb as rss_mb  # noqa: E402
from usfm_edge.bench.sysinfo import machine_info, machine_line  # noqa: E402

SAMPLE = ROOT / "usfm_edge" / "assets" / "sample"


def make_bundle(work: Path, preset: str) -> Path:
    """Export (once, in a child process so this one never loads torch) a random-weight seg bundle of ``preset``."""
    out = work / f"{preset}-seg-fp32.usfm"
    if not (out / "usfm.json").is_file():
        import subprocess

        subprocess.run([sys.executable, __file__, "--export", str(work), "--preset", preset], check=True)
    return out


def export_bundle(work: Path, preset: str) -> Path:
    out = work / f"{preset}-seg-fp32.usfm"
    import torch

    from usfm_edge.export.exporter import export
    from usfm_edge.export.parity import default_frames
    from usfm_edge.models.tasks import build_task_model

    torch.manual_seed(0)
    size = 64 if preset == "usfm_vit_test" else 224
    model = build_task_model("seg", preset, labels=["background", "lesion"], img_size=size)
    return export(model, "onnx", out=out, verify_frames=default_frames(2))


def sample_frames() -> tuple[list[np.ndarray], list[str]]:
    from usfm_edge.data.readers import read_image

    paths = sorted((SAMPLE / "busbra" / "Images").glob("*.png")) + sorted(
        p for p in (SAMPLE / "hc18" / "training_set").glob("*.png") if "Annotation" not in p.name)
    return [read_image(p) for p in paths], [p.name for p in paths]


def same(a, b) -> bool:
    return np.array_equal(a.mask, b.mask) and np.array_equal(a.probs, b.probs) and a.areas_px == b.areas_px


def soak(engine, frames: list[np.ndarray], n: int, every: int) -> tuple[list[dict], float]:
    samples = [{"frames": 0, "rss_mb": rss_mb(), "t_s": 0.0, "mode": "start"}]
    t0 = time.perf_counter()
    done, block = 0, 0
    while done < n:
        k = min(every, n - done)
        batch = (frames[(done + i) % len(frames)] for i in range(k))
        mode = "predict" if block % 2 == 0 else "stream"
        if mode == "predict":
            for f in batch:
                engine.predict(f)
        else:
            for _ in engine.stream(batch):
                pass
        done += k
        block += 1
        samples.append({"frames": done, "rss_mb": rss_mb(), "t_s": time.perf_counter() - t0, "mode": mode})
        s = samples[-1]
        print(f"  {done:6d} frames  RSS {s['rss_mb']:.1f} MB  {s['t_s']:.0f} s  ({mode})", flush=True)
    return samples, time.perf_counter() - t0


def threads_identical(engine, frames: list[np.ndarray], rounds: int) -> dict:
    serial = [engine.predict(f) for f in frames]
    work = [i for _ in range(rounds) for i in range(len(frames))]
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: (i, engine.predict(frames[i])), work))
    bad = [i for i, r in got if not same(serial[i], r)]
    return {"threads": 4, "predictions": len(work), "identical": not bad, "mismatches": len(bad),
            "seconds": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=10000)
    ap.add_argument("--every", type=int, default=500, help="record RSS every this many frames")
    ap.add_argument("--warmup-blocks", type=int, default=2, help="blocks before the RSS reference point")
    ap.add_argument("--preset", default="usfm_vit_test", help="model preset (random weights)")
    ap.add_argument("--export", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thread-rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/usfm-bench-runtime"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.export:
        export_bundle(args.export, args.preset)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(args.work, args.preset)
    frames, names = sample_frames()
    from usfm_edge.runtime import Engine

    assert "torch" not in sys.modules, "the soak process must run without torch"
    load_start = os.getloadavg()
    with Engine.open(bundle, threads=args.threads) as engine:
        samples, seconds = soak(engine, frames, args.frames, args.every)
        conc = threads_identical(engine, frames, args.thread_rounds)
    ref = samples[min(args.warmup_blocks, len(samples) - 1)]
    after = [s["rss_mb"] for s in samples[samples.index(ref):]]
    growth = 100.0 * (max(after) - ref["rss_mb"]) / ref["rss_mb"]
    final = 100.0 * (after[-1] - ref["rss_mb"]) / ref["rss_mb"]
    res = {"command": "python benchmarks/soak_runtime.py " + " ".join(sys.argv[1:]), "bundle": bundle.name,
           "preset": args.preset, "weights": "random", "backend": "onnxruntime", "threads": args.threads,
           "frames": args.frames, "distinct_frames": len(frames), "frame_shapes": sorted({f.shape for f in frames}),
           "seconds": seconds, "ms_per_frame": 1000 * seconds / max(1, args.frames), "samples": samples,
           "reference": ref, "max_growth_pct": growth, "final_growth_pct": final, "flat_within_5pct": growth <= 5.0,
           "torch_loaded": "torch" in sys.modules, "concurrency": conc, "load_start": load_start, "load_end": os.getloadavg(),
           "machine": machine_info()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(res, indent=2, default=list) + "\n")
    lines = ["# Runtime soak", "", f"Command: `{res['command']}`", "", f"Machine: {machine_line(res['machine'])}", "",
             f"Bundle: `{bundle.name}` ({args.preset}, random weights, seg, ONNX Runtime CPU, {args.threads} threads). "
             f"{args.frames} real frames ({len(frames)} distinct sample images, {len(res['frame_shapes'])} sizes) "
             f"through one engine in blocks of {args.every}, alternating `predict` and `stream`; "
             f"{res['ms_per_frame']:.1f} ms/frame on average ({seconds:.0f} s). Load average at start "
             f"{tuple(round(x, 2) for x in load_start)}, at end {tuple(round(x, 2) for x in res['load_end'])}.", "",
             f"**Resident memory**: reference {ref['rss_mb']:.1f} MB after {ref['frames']} frames (warm-up); "
             f"largest later value {max(after):.1f} MB (**{growth:+.2f}%**), last {after[-1]:.1f} MB ({final:+.2f}%): "
             f"{'flat within 5%' if growth <= 5 else 'NOT flat within 5%'}.", "",
             f"**4 threads**: {conc['predictions']} concurrent predictions, "
             f"{'all bit-identical to the serial results' if conc['identical'] else str(conc['mismatches']) + ' MISMATCHES'}.",
             "", "| frames | mode of the block | RSS MB | elapsed s |", "|---|---|---|---|"]
    lines += [f"| {s['frames']} | {s['mode']} | {s['rss_mb']:.1f} | {s['t_s']:.0f} |" for s in samples]
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print(f"RSS growth after warm-up {growth:+.2f}% (max), threads identical: {conc['identical']}; wrote {args.out}")


if __name__ == "__main__":
    main()
