"""Pretraining throughput (images/s of full training steps) of the USFM presets on this machine.

A step is what the engine does per optimiser step: dual-masking corruption (band-stop FFT filter + mean
fill + mask token), encoder + decoder forward, spatial L1 + Fourier loss, backward, grad clip and AdamW.
Inputs are a fixed batch of real BUS-BRA/HC18 frames prepared by ``MimTransform`` (the data pipeline runs
in DataLoader workers during training; its own rate is reported separately, per process).

Variants (preset x fp32 / bf16 autocast) run interleaved, round after round, because times on a shared
machine drift between runs; the median over rounds is reported.

    python benchmarks/bench_pretrain.py                     # tiny, small, base; fp32 and bf16
    python benchmarks/bench_pretrain.py --presets usfm_vit_tiny_patch16_224 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.data import load_records, read_image, sample_dir
from usfm_edge.models.mim import MimConfig, build_mim
from usfm_edge.models.registry import sizes
from usfm_edge.train.engine import cpu_supports_bf16
from usfm_edge.train.masking import MimTransform
from usfm_edge.train.optim import build_optimizer

PRESETS = [n for k, n in sizes().items() if k in ("tiny", "small", "base")]  # the pretraining sizes
RESULTS = Path(__file__).resolve().parent / "results"


def _records(n: int) -> list:
    s = sample_dir()
    recs = load_records(f"busbra:{s / 'busbra'}") + load_records(f"hc18:{s / 'hc18'}")
    return recs[:: max(len(recs) // n, 1)][:n]


def _batch(frames, transform, seed=0):
    rng = np.random.default_rng(seed)
    s = [transform(f, rng) for f in frames]
    return [torch.from_numpy(np.stack(x)) for x in
            ([a.image for a in s], [a.spatial_mask for a in s], [a.freq_mask for a in s])]


def _step(model, opt, batch, dtype):
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss, _, _ = model(*batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_supports_bf16(),
            "load_average_1min": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--base-batch", type=int, default=8, help="batch of the base preset (memory/time on CPU)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--skip", nargs="*", default=[], metavar="PRESET:DTYPE",
                    help="variants not to run, e.g. usfm_vit_base_patch16_224:bf16 (emulated bf16 is very slow)")
    ap.add_argument("--out", type=Path, default=RESULTS / "pretrain_throughput")
    args = ap.parse_args(argv)

    mim = MimConfig()
    spec = PreprocessSpec(img_size=args.img_size)
    transform = MimTransform(spec, 16, mim.mask_patch_size, mim.mask_ratio, mim.freq_prob, mim.ring_params())
    records = _records(max(args.batch, args.base_batch))
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for r in records * 2:  # what one DataLoader worker does per sample: PNG decode + MimTransform
        transform(read_image(r.image), rng)
    data_ips = 2 * len(records) / (time.perf_counter() - t0)
    frames = [read_image(r.image) for r in records]

    load_before = os.getloadavg()[0]
    variants, models = [], {}
    for preset in args.presets:
        bs = args.base_batch if "base" in preset else args.batch
        torch.manual_seed(0)
        model = build_mim(preset, args.img_size, mim, drop_path_rate=0.1)
        models[preset] = (model, build_optimizer(model, 1e-4, 0.05), _batch(frames[:bs], transform))
        for d in args.dtypes:
            if f"{preset}:{d}" not in args.skip:
                variants.append((preset, d, bs))
    times: dict[tuple, list[float]] = {v: [] for v in variants}
    for preset, d, _ in variants:  # warm-up: first steps allocate optimizer state and caches
        model, opt, batch = models[preset]
        _step(model, opt, batch, torch.bfloat16 if d == "bf16" else None)
    for r in range(args.rounds):
        for v in variants:
            preset, d, bs = v
            model, opt, batch = models[preset]
            t = time.perf_counter()
            for _ in range(args.steps):
                _step(model, opt, batch, torch.bfloat16 if d == "bf16" else None)
            times[v].append(bs * args.steps / (time.perf_counter() - t))
            print(f"round {r + 1}/{args.rounds} {preset} {d} bs={bs}: {times[v][-1]:.2f} img/s", file=sys.stderr)

    rows = []
    for v in variants:
        preset, d, bs = v
        fp32 = statistics.median(times[(preset, "fp32", bs)]) if (preset, "fp32", bs) in times else None
        med = statistics.median(times[v])
        rows.append({"preset": preset, "dtype": d, "batch": bs, "images_per_s": med,
                     "s_per_step": bs / med, "min": min(times[v]), "max": max(times[v]),
                     "vs_fp32": med / fp32 if fp32 else None, "runs": times[v]})
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "img_size": args.img_size,
              "steps_per_round": args.steps, "rounds": args.rounds, "data_pipeline_images_per_s": data_ips,
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    lines = [
        "# Pretraining throughput (dual MIM training steps)", "",
        f"`{report['command']}` ({report['date']})", "",
        f"Machine: {m['cpu']}, {m['cores']} threads, torch {m['torch']} ({m['torch_cpu_capability']}), "
        f"native bf16: {m['native_bf16']}; load average {load_before:.1f} before / {m['load_average_1min']:.1f} "
        f"after (other jobs share the cores: compare rows, not runs). Image {args.img_size} px; median of "
        f"{args.rounds} interleaved rounds "
        f"of {args.steps} steps (min-max in brackets). A step = corruption + forward + spatial/Fourier loss + "
        "backward + clip + AdamW.", "",
        "| preset | precision | batch | images/s | s/step | vs fp32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_fp32']:.2f}x" if r["vs_fp32"] else "-"
        lines.append(f"| {r['preset']} | {r['dtype']} | {r['batch']} | {r['images_per_s']:.2f} "
                     f"({r['min']:.2f}-{r['max']:.2f}) | {r['s_per_step']:.2f} | {ratio} |")
    lines += ["", f"Data pipeline per DataLoader worker (PNG decode + crop + resize + flip + masks): "
              f"{data_ips:.0f} images/s.", ""]
    if any("base" in p for p in args.presets) and args.base_batch != args.batch:
        lines.append(f"The base preset uses batch {args.base_batch} (the others {args.batch}) to keep the run short "
                     "on a CPU; images/s is comparable across batch sizes at this scale.")
    if args.skip:
        lines.append(f"Not run: {', '.join(args.skip)}" + ("" if m["native_bf16"] else
                     " (this CPU has no native bf16, so autocast emulates it; see the tiny preset's bf16 ratio)."))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
