"""INT8 side by side: PyTorch eager fp32, ORT fp32, ORT int8 (Q/DQ), OpenVINO fp32 / fp16 / int8 (NNCF).

For one seg task model per preset (random weights unless ``--checkpoint``), every variant is a raw-frame bundle
made by ``usfm_edge.export.export`` (INT8 through ``usfm_edge.calibration.make_quantizer``: real calibration
frames, accuracy gate). Each variant is timed in ``--rounds`` fresh processes of its own (variant order rotating
between rounds: in one process, call by call, the variants' idle worker threads slow each other, see
benchmarks/RESULTS.md §3.3; ``--one-process`` times them that way), batch 1, ``--threads`` threads,
on the same real uint8 frame fed to the graph (``run_raw``: the graph incl. its in-graph resize/normalisation
and post-processing; PyTorch runs the same ``RawFrameModel``, rebuilt in its process from the same seed or
checkpoint).
Reported: median / p90 ms, ratio vs PyTorch fp32, raw and centred cosine of ``probs`` vs PyTorch fp32 on
held-out real frames (patients not used for calibration), mask agreement, Dice vs ground truth (meaningful with
``--checkpoint`` only), model size, and OpenVINO's per-layer performance counters (PERF_COUNT) for the int8 IR.

Usage:
    python benchmarks/bench_int8.py [--presets tiny] [--checkpoint seg.safetensors] [--runs 30]
Writes benchmarks/results/int8.md and int8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from usfm_edge.bench.sysinfo import load_note  # noqa: E402
from usfm_edge.models.registry import sizes  # noqa: E402

PRESETS = sizes()  # tiny / small / base -> preset name
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "usfm_edge" / "assets" / "sample"
VARIANTS = [("PyTorch eager fp32", None, None), ("ORT fp32", "onnx", "fp32"), ("ORT int8 (Q/DQ)", "onnx", "int8"),
            ("OpenVINO fp32 (f32 hint)", "openvino", "fp32"), ("OpenVINO fp16", "openvino", "fp16"),
            ("OpenVINO int8 (NNCF)", "openvino", "int8")]


def cpu_class(flags: set[str]) -> str:
    """What this CPU offers INT8 and reduced-precision inference, from its /proc/cpuinfo flags (never assumed)."""
    if {"amx_int8", "amx_bf16"} & flags:
        return "AMX (int8 and bf16 tiles; OpenVINO runs bf16 by default, fp16 weights compute in bf16)"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        bf16 = "avx512_bf16" in flags
        return ("AVX-512 VNNI (int8 dot products)" + (" + AVX512_BF16 (native bf16)" if bf16 else "; no native bf16")
                if "avx512_vnni" in flags else "AVX-VNNI (int8 dot products); no native bf16")
    if "avx2" in flags:
        return "AVX2 only (int8 GEMMs via vpmaddubsw, no VNNI; fp16/bf16 computed in f32)"
    return "no AVX2"


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in text.splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["isa"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")))
            info["vnni"] = bool(flags & {"avx512_vnni", "avx_vnni"})
            info["cpu_class"] = cpu_class(flags)
            break
    from importlib import metadata

    for dist in ("torch", "onnx", "onnxruntime", "openvino", "nncf"):
        info[dist] = metadata.version(dist)
    return info


def data_specs() -> tuple[list[str], str]:
    if (SHARED / "busbra").is_dir() and (SHARED / "hc18").is_dir():
        return [f"busbra:{SHARED / 'busbra'}", f"hc18:{SHARED / 'hc18'}"], "shared BUS-BRA + HC18"
    return [f"busbra:{SAMPLE / 'busbra'}", f"hc18:{SAMPLE / 'hc18'}"], "bundled sample (small)"


def build_model(preset: str, checkpoint: str | None, task: str = "seg"):
    import torch

    from usfm_edge.models.tasks import build_task_model, load_task_model

    if checkpoint:
        return load_task_model(checkpoint)
    torch.manual_seed(0)
    kw = {"num_classes": 2} if task == "seg" else {}
    return build_task_model(task, PRESETS[preset], img_size=224, **kw).eval()


def make_bundles(model, work: Path, specs: list[str], n_calib: int, force: bool,
                 reuse: bool = False) -> dict[str, Path]:
    from usfm_edge.calibration import make_quantizer
    from usfm_edge.export import export

    out = {}
    for name, target, precision in VARIANTS[1:]:
        if reuse and (work / f"{target}-{precision}.usfm" / "usfm.json").is_file():
            out[name] = work / f"{target}-{precision}.usfm"
            continue
        t0 = time.perf_counter()
        kw = {}
        if precision == "int8":
            kw["quantizer"] = make_quantizer(specs, n=n_calib, seed=0, force=force, min_frames=8)
            kw["force"] = force
        out[name] = export(model, target, precision, out=work / f"{target}-{precision}", **kw)
        print(f"  exported {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def held_out(specs: list[str], n: int) -> list:
    from usfm_edge.calibration.quantize import held_out_split
    from usfm_edge.data.sources import load_records

    records = [r for s in specs for r in load_records(s)]
    val, _, _ = held_out_split(records, seed=0)  # the same patients the quantiser kept out of calibration
    idx = np.linspace(0, len(val) - 1, min(n, len(val))).round().astype(int)
    return [val[i] for i in idx]


def centred(ref: list[np.ndarray], got: list[np.ndarray], grid: int) -> tuple[list[float], list[float]]:
    from usfm_edge.calibration.gate import centred_cosines
    from usfm_edge.export.parity import cosine

    raw = [cosine(a, b) for a, b in zip(ref, got)]
    return raw, centred_cosines(ref, got, grid) or [float("nan")]


def run_variant_fn(name: str, bundle: Path | None, model, threads: int):
    """A callable frame -> {"probs", "mask"} and a closer."""
    if bundle is None:
        import torch

        from usfm_edge.models.raw_frame import RawFrameModel

        torch.set_num_threads(threads)
        graph = RawFrameModel(model, model.preprocess).eval()

        def fn(x):
            with torch.inference_mode():
                out = graph(torch.from_numpy(x))
            if model.task == "features":
                return {"features": out.numpy()}
            probs, mask = out
            return {"probs": probs.numpy(), "mask": mask.numpy()}

        return fn, lambda: None
    from usfm_edge.runtime import Engine

    eng = Engine.open(bundle, backend="openvino" if "OpenVINO" in name else "onnxruntime", device="cpu",
                      threads=threads, warmup=2)
    return eng.run_raw, eng.close


def perf_counters(xml: Path, frame: np.ndarray, threads: int, runs: int = 20) -> list[dict]:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS":
                                                                     threads, "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    totals: dict[tuple[str, str], float] = {}
    for _ in range(runs):
        req.infer({0: frame[None]})
        for p in req.get_profiling_info():
            if "EXECUTED" in str(p.status) and "NOT" not in str(p.status):
                key = (p.node_type, p.exec_type)
                totals[key] = totals.get(key, 0.0) + p.real_time.total_seconds() * 1e3 / runs
    total = sum(totals.values()) or 1.0
    rows = [{"op": k[0], "kernel": k[1], "ms": round(v, 3), "share": round(v / total, 3)} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:12]


def time_in_own_process(spec: dict) -> list[float]:
    """ms per call of one variant, timed in a fresh interpreter (``--time-worker``)."""
    proc = subprocess.run([sys.executable, __file__, "--time-worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"timing {spec['name']} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_worker(spec: dict) -> list[float]:
    model = build_model(spec["preset"], spec["checkpoint"], spec["task"]) if spec["bundle"] is None else None
    bundle = Path(spec["bundle"]) if spec["bundle"] else None
    fn, close = run_variant_fn(spec["name"], bundle, model, spec["threads"])
    x = np.load(spec["frame"])[None]
    for _ in range(spec["warmup"]):
        fn(x)
    times = []
    for _ in range(spec["runs"]):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    close()
    return times


def bench_preset(preset: str, args, specs: list[str], work: Path) -> dict:
    from usfm_edge.bench.latency import rotating_rounds
    from usfm_edge.data.readers import read_image
    from usfm_edge.evaluation.evaluate import evaluate_predictor
    from usfm_edge.runtime import Engine

    print(f"[{preset}] building bundles ...", flush=True)
    model = build_model(preset, args.checkpoint, args.task)
    main = "probs" if model.task == "seg" else "features"
    bundles = make_bundles(model, work / preset, specs, args.calib_frames, args.force, args.reuse)
    records = held_out(specs, args.eval_frames)
    frames = [read_image(r.image) for r in records]
    timing_frame = frames[0]
    fns = {name: run_variant_fn(name, bundles.get(name), model, args.threads) for name, _, _ in VARIANTS}
    outs = {name: [fn(f[None]) for f in frames] for name, (fn, _) in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    x = timing_frame[None]
    if args.one_process:
        for _ in range(args.warmup):
            for name in order:
                fns[name][0](x)
        for r in range(args.runs):
            for name in order[r % len(order):] + order[: r % len(order)]:
                t0 = time.perf_counter()
                fns[name][0](x)
                times[name].append((time.perf_counter() - t0) * 1e3)
    for _fn, close in fns.values():
        close()
    if not args.one_process:
        frame_file = work / preset / "timing_frame.npy"
        np.save(frame_file, timing_frame)
        for n, name in rotating_rounds(order, args.runs, args.rounds):
            spec = {"name": name, "bundle": str(bundles[name]) if name in bundles else None, "preset": preset,
                    "checkpoint": args.checkpoint, "task": args.task, "threads": args.threads,
                    "frame": str(frame_file), "runs": n, "warmup": args.warmup}
            times[name] += time_in_own_process(spec)
    ref = outs["PyTorch eager fp32"]
    grid = int(model.img_size)
    base = float(np.median(times["PyTorch eager fp32"]))
    rows = []
    for name, _, _ in VARIANTS:
        raw, cc = centred([o[main][0] for o in ref], [o[main][0] for o in outs[name]], grid)
        agree = float(np.mean([np.mean(a["mask"] == b["mask"]) for a, b in zip(ref, outs[name])])) \
            if main == "probs" else float("nan")
        med = float(np.median(times[name]))
        size = sum(f.stat().st_size for f in bundles[name].iterdir() if f.suffix in (".onnx", ".bin")) / 1e6 \
            if name in bundles else sum(p.numel() * 4 for p in model.parameters()) / 1e6
        row = {"variant": name, "median_ms": round(med, 2), "p90_ms": round(float(np.percentile(times[name], 90)), 2),
               "speedup_vs_torch": round(base / med, 2), "cos_raw": round(float(np.mean(raw)), 5),
               "cos_centred_mean": round(float(np.mean(cc)), 4), "cos_centred_min": round(float(np.min(cc)), 4),
               "mask_pixel_agreement": round(agree, 4), "size_mb": round(size, 2)}
        if name in bundles:
            meta = json.loads((bundles[name] / "usfm.json").read_text())
            gate = ((meta.get("calibration") or {}).get("report") or {}).get("gate")
            if gate:
                row["gate"] = {k: gate.get(k) for k in ("passed", "metric", "fp32", "int8", "drop", "failures")}
        rows.append(row)
    dice = {}
    if args.checkpoint and model.task == "seg":
        for name in ("OpenVINO fp32 (f32 hint)", "ORT int8 (Q/DQ)", "OpenVINO int8 (NNCF)"):
            with Engine.open(bundles[name], device="cpu", threads=args.threads) as eng:
                dice[name] = evaluate_predictor(eng, [r for r in records if r.mask is not None], "seg")["dice"]
    counters = perf_counters(bundles["OpenVINO int8 (NNCF)"] / "model.xml", timing_frame, args.threads)
    return {"preset": preset, "model": PRESETS[preset], "task": model.task, "output": main, "weights": args.checkpoint or "random (seed 0)",
            "timing_frame_hw": list(timing_frame.shape), "eval_frames": len(frames), "rows": rows,
            "dice_vs_ground_truth": dice, "openvino_int8_perf_counters": counters}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# INT8 benchmark (usfm-edge)", "", f"Command: `{result['command']}`", "",
             f"Machine: {m.get('cpu')} x{m['cpus']} vCPU; ISA: {', '.join(m.get('isa', []))}; class (detected): "
             f"{m.get('cpu_class', '?')}; "
             f"load average at start {m['load_avg_start']}, end {m.get('load_avg_end')} "
             f"({load_note([m['load_avg_start'], m.get('load_avg_end')], m['cpus'])}).",
             f"Versions: torch {m['torch']}, onnxruntime {m['onnxruntime']}, openvino {m['openvino']}, nncf "
             f"{m['nncf']}, onnx {m['onnx']}. Threads {result['threads']}, batch 1, {result['runs']} runs per variant ("
             + (f"in {result['rounds']} fresh processes of its own per variant, rotating order"
                if not result.get("one_process", True) else "all in one process, interleaved call by call")
             + f"). Calibration/held-out data: {result['data']}.", ""]
    for p in result["presets"]:
        lines += [f"## {p['model']} {p.get('task', 'seg')} (weights: {p['weights']}), frame {p['timing_frame_hw'][0]}x"
                  f"{p['timing_frame_hw'][1]}, fidelity on {p['eval_frames']} held-out real frames", "",
                  "| variant | median ms | p90 ms | speed-up vs PyTorch fp32 | cos raw | cos centred mean / min | "
                  "mask agreement | model MB | INT8 gate |", "|---|---|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            g = r.get("gate")
            gate = "" if not g else (f"{'pass' if g['passed'] else 'FAIL'}: {g['metric']} {g['fp32'].get(g['metric'])}"
                                     f" -> {g['int8'].get(g['metric'])}" if g.get("metric") else
                                     ("pass" if g["passed"] else "FAIL"))
            lines.append(f"| {r['variant']} | {r['median_ms']} | {r['p90_ms']} | {r['speedup_vs_torch']}x | "
                         f"{r['cos_raw']} | {r['cos_centred_mean']} / {r['cos_centred_min']} | "
                         f"{r['mask_pixel_agreement']} | {r['size_mb']} | {gate} |")
        if p["dice_vs_ground_truth"]:
            lines += ["", "Dice vs ground truth: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                               p["dice_vs_ground_truth"].items())]
        lines += ["", "OpenVINO int8 per-layer counters (PERF_COUNT, mean ms per inference, top op types):", "",
                  "| op | kernel | ms | share |", "|---|---|---|---|"]
        lines += [f"| {c['op']} | {c['kernel']} | {c['ms']} | {c['share']:.1%} |" for c in
                  p["openvino_int8_perf_counters"]]
        lines.append("")
    lines += [f"Notes: OpenVINO fp16 = fp16-compressed weights, computed as this CPU allows ({m.get('cpu_class', '?')}). "
              "With random weights Dice is meaningless and centred cosine is harsh (perf-baseline.md §2); "
              "use `--checkpoint` for accuracy.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny"], choices=list(PRESETS))
    ap.add_argument("--task", default="seg", choices=["seg", "features"],
                    help="seg: ViT + official-width UperNet head; features: the bare backbone (cls-token embedding), "
                         "the model the perf-baseline targets are set for")
    ap.add_argument("--checkpoint", default=None, help="seg task checkpoint (accuracy needs trained weights)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-frames", type=int, default=300)
    ap.add_argument("--eval-frames", type=int, default=16)
    ap.add_argument("--force", action="store_true", help="keep INT8 bundles that fail the gate (random weights)")
    ap.add_argument("--work", default="/tmp/usfm_bench_int8")
    ap.add_argument("--reuse", action="store_true", help="reuse bundles already in --work (same model/weights)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--rounds", type=int, default=2, help="fresh timing processes per variant (runs split over them)")
    ap.add_argument("--one-process", action="store_true",
                    help="time all variants in this process, call by call (the older schedule: idle worker threads of the other variants compete)")
    ap.add_argument("--time-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_worker:
        warnings.simplefilter("ignore")
        print(json.dumps(time_worker(json.loads(args.time_worker))))
        return
    warnings.simplefilter("ignore")
    specs, desc = data_specs()
    t0 = time.time()
    result = {"command": "python benchmarks/bench_int8.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "threads": args.threads, "runs": args.runs, "data": desc, "presets": [],
              "rounds": args.rounds, "one_process": args.one_process}
    for preset in args.presets:
        result["presets"].append(bench_preset(preset, args, specs, Path(args.work)))
    result["machine"]["load_avg_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int8.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    (out / "int8.md").write_text(text)
    print(text)
    print(f"wrote {out / 'int8.md'} and {out / 'int8.json'} in {result['seconds']} s")


if __name__ == "__main__":
    main()
