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

``--peer`` adds the by-hand rows (``usfm_edge.bench.peer``: the bare model through ``openvino.convert_model`` +
``nncf.quantize(model_type=TRANSFORMER)`` and through ``torch.onnx.export`` + ORT ``quantize_static`` restricted to
MatMul/Gemm, on the same calibration frames), timed in the same rotation, with their ratio to our INT8 bundle of the
same backend. ``--batches 1 4`` also times batch 4 (frames/s). The report adds the preprocessing share (OpenVINO
int8 counters by stage) and the fused-attention count of each runtime (``usfm_edge.bench.opcount``).

Usage:
    python benchmarks/bench_int8.py [--presets tiny] [--checkpoint seg.safetensors] [--runs 30] [--peer]
Writes OUT/int8.md and OUT/int8.json (--out, default benchmarks/results).
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
from usfm_edge.bench.int8_report import markdown  # noqa: E402, F401 - the report of this script
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


def perf_counters(xml: Path, frame: np.ndarray, threads: int, runs: int = 20) -> tuple[list[dict], dict]:
    """OpenVINO PERF_COUNT of an IR: the top op types (ms, share) and the pre-processing / model /
    post-processing split (``bench.opcount.stage_shares``: the preprocessing share)."""
    from usfm_edge.bench.opcount import perf_counters as node_counters
    from usfm_edge.bench.opcount import stage_shares

    nodes = node_counters(xml, frame, threads, runs, top=None)
    totals: dict[tuple[str, str], float] = {}
    for n in nodes:
        totals[(n["op"], n["kernel"])] = totals.get((n["op"], n["kernel"]), 0.0) + n["ms"]
    total = sum(totals.values()) or 1.0
    rows = [{"op": k[0], "kernel": k[1], "ms": round(v, 3), "share": round(v / total, 3)} for k, v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:12], stage_shares(nodes)


def time_in_own_process(spec: dict) -> dict[str, list[float]]:
    """ms per call of one variant, timed in a fresh interpreter (``--time-worker``)."""
    proc = subprocess.run([sys.executable, __file__, "--time-worker", json.dumps(spec)], capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"timing {spec['name']} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_worker(spec: dict) -> dict[str, list[float]]:
    """``{batch: [ms, ...]}`` of one variant (a bundle, PyTorch, or a by-hand peer on its model input)."""
    from usfm_edge.bench.peer import open_peer, time_batches

    if spec.get("peer"):
        fn, close, x1 = open_peer(spec["bundle"], spec["peer"], spec["threads"]), (lambda: None), np.load(spec["input"])
    else:
        model = build_model(spec["preset"], spec["checkpoint"], spec["task"]) if spec["bundle"] is None else None
        bundle = Path(spec["bundle"]) if spec["bundle"] else None
        fn, close = run_variant_fn(spec["name"], bundle, model, spec["threads"])
        x1 = np.load(spec["frame"])[None]
    out = time_batches(fn, x1, spec.get("batches", [1]), spec["warmup"], spec["runs"])
    close()
    return out


def time_variants(order: list[str], args, preset: str, bundles: dict, peers: dict, frame: np.ndarray,
                  peer_input: Path | None, work: Path) -> dict[str, dict[int, list[float]]]:
    """``{variant: {batch: [ms, ...]}}``: each variant in ``--rounds`` fresh processes, rotating order (or, with
    ``--one-process``, call by call in this one, batch 1 only, no peers)."""
    from usfm_edge.bench.latency import rotating_rounds

    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.batches} for name in order}
    if args.one_process:
        model = build_model(preset, args.checkpoint, args.task)
        fns = {name: run_variant_fn(name, bundles.get(name), model, args.threads) for name in order}
        x = frame[None]
        for _ in range(args.warmup):
            for name in order:
                fns[name][0](x)
        for r in range(args.runs):
            for name in order[r % len(order):] + order[: r % len(order)]:
                t0 = time.perf_counter()
                fns[name][0](x)
                times[name][1].append((time.perf_counter() - t0) * 1e3)
        for _fn, close in fns.values():
            close()
        return times
    frame_file = work / preset / "timing_frame.npy"
    np.save(frame_file, frame)
    for n, name in rotating_rounds(order, args.runs, args.rounds):
        peer = peers.get(name)
        path = peer.path if peer else bundles.get(name)
        spec = {"name": name, "bundle": str(path) if path else None, "preset": preset, "checkpoint": args.checkpoint,
                "task": args.task, "threads": args.threads, "frame": str(frame_file), "runs": n, "warmup": args.warmup,
                "batches": args.batches, "peer": peer.backend if peer else None, "input": str(peer_input)}
        for b, t in time_in_own_process(spec).items():
            times[name][int(b)] += t
    return times


def bench_preset(preset: str, args, specs: list[str], work: Path) -> dict:
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
    for _fn, close in fns.values():
        close()
    peers, peer_fid, peer_input = [], {}, None
    if args.peer:
        from usfm_edge.bench.peer import prepare_peers

        print(f"[{preset}] building the by-hand peers ...", flush=True)
        peers, peer_fid, peer_input = prepare_peers(model, specs, args.calib_frames, frames, timing_frame,
                                                    work / preset / "peers", args.threads)
    order = list(fns) + [p.name for p in peers]
    times = time_variants(order, args, preset, bundles, {p.name: p for p in peers}, timing_frame, peer_input, work)
    ref = outs["PyTorch eager fp32"]
    grid = int(model.img_size)
    base = float(np.median(times["PyTorch eager fp32"][1]))
    rows = []
    for name, _, _ in VARIANTS:
        raw, cc = centred([o[main][0] for o in ref], [o[main][0] for o in outs[name]], grid)
        agree = float(np.mean([np.mean(a["mask"] == b["mask"]) for a, b in zip(ref, outs[name])])) \
            if main == "probs" else float("nan")
        med = float(np.median(times[name][1]))
        size = sum(f.stat().st_size for f in bundles[name].iterdir() if f.suffix in (".onnx", ".bin")) / 1e6 \
            if name in bundles else sum(p.numel() * 4 for p in model.parameters()) / 1e6
        row = {"variant": name, "median_ms": round(med, 2), "p90_ms": round(float(np.percentile(times[name][1], 90)), 2),
               "speedup_vs_torch": round(base / med, 2), "cos_raw": round(float(np.mean(raw)), 5),
               "cos_centred_mean": round(float(np.mean(cc)), 4), "cos_centred_min": round(float(np.min(cc)), 4),
               "mask_pixel_agreement": round(agree, 4), "size_mb": round(size, 2),
               "fps": {b: round(1000.0 * b / float(np.median(t)), 2) for b, t in times[name].items()}}
        if name in bundles:
            meta = json.loads((bundles[name] / "usfm.json").read_text())
            gate = ((meta.get("calibration") or {}).get("report") or {}).get("gate")
            if gate:
                row["gate"] = {k: gate.get(k) for k in ("passed", "metric", "fp32", "int8", "drop", "failures")}
        rows.append(row)
    from usfm_edge.bench.peer import OUR_BUNDLE, peer_row

    peer_rows = [peer_row(p, times[p.name], peer_fid[p.name], times[OUR_BUNDLE[p.backend]], base) for p in peers]
    dice = {}
    if args.checkpoint and model.task == "seg":
        for name in ("OpenVINO fp32 (f32 hint)", "ORT int8 (Q/DQ)", "OpenVINO int8 (NNCF)"):
            with Engine.open(bundles[name], device="cpu", threads=args.threads) as eng:
                dice[name] = evaluate_predictor(eng, [r for r in records if r.mask is not None], "seg")["dice"]
    counters, stages = perf_counters(bundles["OpenVINO int8 (NNCF)"] / "model.xml", timing_frame, args.threads)
    from usfm_edge.bench.opcount import bundle_op_counts

    fused = {name: {k: v for k, v in bundle_op_counts(bundles[name]).items() if k != "op_types"}
             for name in ("ORT fp32", "ORT int8 (Q/DQ)", "OpenVINO fp32 (f32 hint)", "OpenVINO int8 (NNCF)")}
    return {"preset": preset, "model": PRESETS[preset], "task": model.task, "output": main,
            "weights": args.checkpoint or "random (seed 0)", "timing_frame_hw": list(timing_frame.shape),
            "eval_frames": len(frames), "rows": rows + peer_rows, "peer_rows": peer_rows, "dice_vs_ground_truth": dice,
            "openvino_int8_perf_counters": counters, "openvino_int8_stage_shares": stages, "fused_attention": fused}


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
    ap.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes timed (e.g. 1 4: frames/s at 4)")
    ap.add_argument("--peer", action="store_true", help="add the by-hand OpenVINO+NNCF and ORT quantize_static rows "
                    "(usfm_edge.bench.peer: same weights and calibration frames, bare model)")
    ap.add_argument("--time-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_worker:
        warnings.simplefilter("ignore")
        print(json.dumps(time_worker(json.loads(args.time_worker))))
        return
    warnings.simplefilter("ignore")
    args.batches = sorted({1, *args.batches})
    if args.one_process and (args.peer or args.batches != [1]):
        raise SystemExit("--one-process times batch 1 without peers; drop --peer/--batches or --one-process")
    specs, desc = data_specs()
    t0 = time.time()
    result = {"command": "python benchmarks/bench_int8.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "threads": args.threads, "runs": args.runs, "data": desc, "presets": [],
              "rounds": args.rounds, "one_process": args.one_process, "batches": args.batches, "peer": args.peer}
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
