"""Benchmark the band-stop kernels: batched torch vs a numpy loop, and the in-graph forms in ORT/OpenVINO.

(a) 64 real ultrasound frames of 224x224, one random ring mask per frame: torch.fft and the MatMul form
    (batched) vs a per-image numpy loop. Goal: torch >= 5x faster than the numpy loop. Where the MKL AVX2
    shim applies (non-Intel x86-64 CPU, see usfm_edge/kernels/mkl_dispatch.py) the torch variants are
    timed again in a second process with USFM_EDGE_MKL_AVX2=1, beside their own numpy loops.
(b) one 224x224 frame (and batch 8) inside ONNX Runtime and OpenVINO (f32): our MatMul graph
    (``BandStopMatMul``: 4 MatMuls + Mul, pruned, and unpruned), the 12-MatMul complex half-spectrum form
    of perf-baseline.md §6, and the DFT-op graph (torch.fft exported by the dynamo exporter at opset 20).
    Goal: MatMul >= 10x faster than the DFT op; the DFT-op graph's error in OpenVINO is reported.

Each runtime is measured in its own subprocess (OpenVINO's and torch's idle worker threads slow the
others down when they share a process); inside a process the variants are interleaved round-robin
with a rotating order, after a warm-up, and the median is reported. In part (a) each variant runs in
blocks (``--block``, default 5): per round, one untimed call and then N timed calls back to back, so every
variant is timed in its steady state. Alternating single calls (``--block 1``) time each call right after
another variant's: after the ~70 ms single-threaded numpy loop the second core has been idle, and on this
shared VM a two-thread call that wakes it costs ~1.5x (measured here, see ``idle_probe``). Part (a) is
run in both modes and both are reported; the in-graph part (b) alternates single calls.

Usage:
    python benchmarks/bench_kernels.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from usfm_edge.bench.sysinfo import load_note  # noqa: E402
from usfm_edge.kernels import BandStopMaskGenerator, band_stop_filter_np  # noqa: E402
from usfm_edge.kernels.mkl_dispatch import ENV_VAR as MKL_ENV  # noqa: E402
from usfm_edge.kernels.mkl_dispatch import shim_applicable  # noqa: E402

REFERENCE_VARIANT = "numpy loop (reference: fft2/ifft2, float64)"
DEFAULT_VARIANT = "torch fft (default: chunks of 8 frames on a thread pool, fp32)"

IMAGE_DIRS = [
    Path("/work/shared/data/busbra/Images"),
    Path("/work/shared/data/hc18/training_set"),
    ROOT / "usfm_edge/assets/sample/busbra/Images",
    ROOT / "usfm_edge/assets/sample/hc18/training_set",
]


def load_frames(n: int, size: int = 224) -> tuple[np.ndarray, str]:
    """``n`` real grey frames (float32 in [0, 1], ``(n, size, size)``), alternating breast and fetal head."""
    from PIL import Image

    per_dir = [[p for p in sorted(d.glob("*.png")) if "Annotation" not in p.name] for d in IMAGE_DIRS if d.is_dir()]
    per_dir = [p for p in per_dir if p]
    if not per_dir:
        raise SystemExit(f"no ultrasound PNGs in {IMAGE_DIRS}")
    paths = [per_dir[i % len(per_dir)][(i // len(per_dir)) % len(per_dir[i % len(per_dir)])] for i in range(n)]
    frames = [np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR), np.float32) / 255 for p in paths]
    return np.stack(frames), f"{len(set(paths))} distinct PNGs from {sorted({str(p.parent) for p in paths})}"


def interleave(fns: dict, runs: int, warmup: int, block: int = 1) -> dict[str, list[float]]:
    """Time each callable ``runs`` times, round-robin with a rotating start, after ``warmup`` calls each.

    ``block > 1``: per round, each callable runs once untimed and then ``block`` times timed, back to back
    (``ceil(runs / block)`` rounds); ``block == 1``: one timed call per callable per round.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(-(-runs // block)):
        for k in names[r % len(names):] + names[: r % len(names)]:
            if block > 1:
                fns[k]()
            for _ in range(block):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    return times


def idle_probe(fn, calls: int = 20, idle_s: float = 0.07) -> dict:
    """Median ms of ``fn`` called back to back vs each call after ``idle_s`` of sleep (both cores idle)."""
    out = {}
    for name, pause in (("back_to_back_ms", 0.0), ("after_idle_ms", idle_s)):
        fn()
        t = []
        for _ in range(calls):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        out[name] = float(np.median(t) * 1e3)
    return {**out, "idle_ms": idle_s * 1e3, "calls": calls}


def summary(times: list[float], per: int) -> dict:
    t = np.asarray(times) * 1e3
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)), "per_image_ms": float(np.median(t)) / per, "runs": len(t)}


# ----------------------------------------------------------------------------- workers (own process each)


def _with_chunking(fn, chunks: bool, pool: bool):
    """Run ``fn`` with the torch path's chunking (``chunks``) and its thread-pool form (``pool``) on or off."""
    import usfm_edge.kernels.torch_fft as tf

    saved = tf._CHUNK_ELEMENTS, tf._USE_POOL
    if not chunks:
        tf._CHUNK_ELEMENTS = 1 << 62
    tf._USE_POOL = pool
    try:
        return fn()
    finally:
        tf._CHUNK_ELEMENTS, tf._USE_POOL = saved


def worker_torch(cfg: dict) -> dict:
    import torch

    from usfm_edge.kernels import band_stop_filter

    torch.set_num_threads(cfg["threads"])
    x = np.load(cfg["frames"])
    masks = np.load(cfg["masks"])
    xt, mt = torch.from_numpy(x[:, None]), torch.from_numpy(masks[:, None])
    half = masks[:, :, : x.shape[-1] // 2 + 1]

    from usfm_edge.kernels.mkl_dispatch import shim_loaded

    if os.environ.get(MKL_ENV) == "1" and not shim_loaded():
        raise SystemExit(f"{MKL_ENV}=1 but the MKL shim is not loaded in this worker")

    def numpy_loop():
        return [band_stop_filter_np(x[i], masks[i]) for i in range(len(x))]

    def numpy_rfft_loop():
        return [np.fft.irfft2(np.fft.rfft2(x[i]) * half[i], s=x.shape[-2:]) for i in range(len(x))]

    fns = {
        REFERENCE_VARIANT: numpy_loop,
        "numpy loop (rfft2/irfft2, half mask)": numpy_rfft_loop,
        DEFAULT_VARIANT: lambda: band_stop_filter(xt, mt, impl="fft", symmetric=True),
        "torch fft, chunks of 8 frames, serial": lambda: _with_chunking(
            lambda: band_stop_filter(xt, mt, impl="fft", symmetric=True), chunks=True, pool=False),
        "torch fft, one call for the batch (no chunks)": lambda: _with_chunking(
            lambda: band_stop_filter(xt, mt, impl="fft", symmetric=True), chunks=False, pool=False),
        "torch matmul (batched, fp32)": lambda: band_stop_filter(xt, mt, impl="matmul"),
    }
    ref = np.stack(numpy_loop())
    errors = {k: float(np.abs(np.asarray(fn()).reshape(ref.shape) - ref).max()) for k, fn in fns.items()}
    with torch.no_grad():
        times = interleave(fns, cfg["runs"], cfg["warmup"], cfg.get("block", 1))
        probe = idle_probe(fns[DEFAULT_VARIANT]) if cfg.get("idle_probe") else None
    ref_times = np.asarray(times[REFERENCE_VARIANT])
    # per-round ratio: round r times every variant close together, so a slow spell of the shared machine
    # cancels out of the ratio; its median is reported beside the ratio of medians
    out = {k: {**summary(v, len(x)), "max_abs_err": errors[k],
               "paired_ratio_median": float(np.median(ref_times / np.asarray(v)))} for k, v in times.items()}
    return {"variants": out, "idle_probe": probe}


def _runtime_fns(cfg: dict, which: str, x: np.ndarray) -> dict:
    fns = {}
    if which == "ort":
        import onnxruntime as ort

        for name, path in cfg["models"].items():
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = cfg["threads"], 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning collapses on a busy CPU
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            fns[name] = lambda s=sess: s.run(None, {"x": x})[0]
    else:
        import openvino as ov

        core = ov.Core()
        props = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": cfg["threads"], "PERFORMANCE_HINT": "LATENCY"}
        for name, path in cfg["models"].items():
            compiled = core.compile_model(core.read_model(path), "CPU", props)
            request = compiled.create_infer_request()
            fns[name] = lambda r=request: r.infer({0: x})[0].copy()
    return fns


def worker_runtime(cfg: dict, which: str) -> dict:
    frames = np.load(cfg["frames"])
    mask = np.load(cfg["masks"])[0]
    out = {}
    for batch in cfg["batches"]:
        x = np.ascontiguousarray(frames[:batch, None])
        ref = band_stop_filter_np(x.astype(np.float64), mask)
        fns, errors, failed = _runtime_fns(cfg, which, x), {}, {}
        for k in cfg.get("skip", {}).get(f"{which}/{batch}", []):
            del fns[k]
            failed[k] = {"skipped": "not timed at this batch (seconds per call); see batch 1"}
        for k, fn in list(fns.items()):
            try:
                errors[k] = float(np.abs(fn() - ref).max())
            except Exception as exc:  # noqa: BLE001 - a runtime that cannot run a graph is a result
                failed[k] = {"error": str(exc).strip().splitlines()[-1][:200]}
                del fns[k]
        times = interleave(fns, cfg["runs"], cfg["warmup"])
        out[str(batch)] = {**{k: {**summary(v, batch), "max_abs_err": errors[k]} for k, v in times.items()}, **failed}
    return out


# ----------------------------------------------------------------------------- model export (main process)


def export_models(mask: np.ndarray, folder: Path) -> tuple[dict, dict]:
    """Write the ONNX graphs compared in (b); returns ``({name: path}, {name: description})``."""
    import onnx
    import torch
    from torch import nn

    from usfm_edge.kernels.dft_matmul import BandStopMatMul, export_band_stop_onnx

    h, w = mask.shape

    class FFTBandStop(nn.Module):  # torch.fft form: the dynamo exporter emits ONNX DFT ops
        # FFT over (N, H, W): with (N, 1, H, W) OpenVINO's RDFT refuses to run ("Signal size greater
        # than input size"); with 3-D it runs, like perf-baseline.md §6, and gives wrong output.
        def __init__(self):
            super().__init__()
            self.register_buffer("half_mask", torch.as_tensor(mask[:, : w // 2 + 1], dtype=torch.float32))

        def forward(self, x):
            return torch.fft.irfft2(torch.fft.rfft2(x[:, 0]) * self.half_mask, s=(h, w))[:, None]

    class TwelveMatMul(nn.Module):  # perf-baseline.md §6: complex half spectrum as 12 real MatMuls
        def __init__(self):
            super().__init__()
            ih, iw, kw = np.arange(h), np.arange(w), np.arange(w // 2 + 1)
            ah = 2 * np.pi * (np.outer(ih, ih) % h) / h
            aw = 2 * np.pi * (np.outer(iw, kw) % w) / w
            wgt = np.where((kw == 0) | (2 * kw == w), 1.0, 2.0)
            for name, v in {"cw": np.cos(aw), "sw": -np.sin(aw), "ch": np.cos(ah), "sh": np.sin(ah),
                            "icw": (np.cos(aw) * wgt).T / (h * w), "isw": (np.sin(aw) * wgt).T / (h * w),
                            "m": mask[:, : w // 2 + 1]}.items():
                self.register_buffer(name, torch.as_tensor(v, dtype=torch.float32))

        def forward(self, x):
            ar, ai = x @ self.cw, x @ self.sw
            yr, yi = (self.ch @ ar + self.sh @ ai) * self.m, (self.ch @ ai - self.sh @ ar) * self.m
            return (self.ch @ yr - self.sh @ yi) @ self.icw - (self.ch @ yi + self.sh @ yr) @ self.isw

    paths, notes = {}, {}
    pruned = BandStopMatMul(mask)
    for name, prune in (("matmul (ours, 4 MatMul, pruned)", True), ("matmul (ours, 4 MatMul, no pruning)", False)):
        paths[name] = str(export_band_stop_onnx(mask, folder / f"mm_{prune}.onnx", prune=prune))
    notes["matmul (ours, 4 MatMul, pruned)"] = f"active quadrant {pruned.active}, complement={pruned.complement}"
    dummy = torch.zeros(2, 1, h, w)
    dyn = {"x": {0: "batch"}, "y": {0: "batch"}}
    name = "matmul (12 MatMul baseline form)"
    paths[name] = str(folder / "mm12.onnx")
    torch.onnx.export(TwelveMatMul(), (dummy,), paths[name], input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False, dynamic_axes=dyn)
    name = "DFT op (torch.fft, dynamo, opset 20)"
    paths[name] = str(folder / "dft20.onnx")
    torch.onnx.export(FFTBandStop(), (dummy,), paths[name], input_names=["x"], output_names=["y"], opset_version=20,
                      dynamo=True, external_data=False, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    for name, path in paths.items():
        ops = sorted({n.op_type for n in onnx.load(path).graph.node})
        notes[name] = "; ".join(filter(None, [notes.get(name), "ops: " + ", ".join(ops)]))
    return paths, notes


# ----------------------------------------------------------------------------- report


def machine_info() -> dict:
    import onnx
    import onnxruntime
    import openvino
    import torch

    from usfm_edge.bench.sysinfo import machine_info as detected

    m = detected()
    return {"cpu": m["cpu"], "logical_cpus": m["cores"], "isa": " ".join(m["isa"]),
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__}


def _ratio(base: dict, v: dict) -> str:
    """Speed-up of ``v`` over ``base`` per image: medians, and p10s (the least disturbed runs)."""
    if "median_ms" not in base:
        return "n/a"
    per_b, per_v = base["median_ms"] / base["per_image_ms"], v["median_ms"] / v["per_image_ms"]
    return (f"{base['median_ms'] / per_b / (v['median_ms'] / per_v):.1f}x "
            f"({base['p10_ms'] / per_b / (v['p10_ms'] / per_v):.1f}x)")


def _mode(block: int) -> str:
    return "alternating single calls" if block == 1 else f"blocks of {block} calls after an untimed one"


def render(res: dict) -> str:
    lines = ["# Band-stop kernels benchmark", "", f"Command: `{res['command']}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in res["machine"].items()), "",
             f"Frames: {res['frames']}. Threads: {res['threads']}; {res['runs']} timed runs after {res['warmup']} "
             f"warm-up calls, variants interleaved (part a: {_mode(res.get('block', 1))}, rows marked "
             "[alternating] alternate single calls); times are medians (p10-p90 in brackets). Load average "
             f"(1, 5, 15 min) at start {res['load_average_start']}, at end {res['load_average_end']} "
             f"({load_note([res['load_average_start'], res['load_average_end']])}).", "",
             f"## (a) {res['batch']} frames of 224x224, one random ring mask each", "",
             "| variant | median ms / batch | ms / image | speed-up vs numpy reference loop, median (p10) "
             "| same, median of per-round ratios | vs numpy rfft loop, median (p10) | max abs err |",
             "|---|---|---|---|---|---|---|"]
    for which, suffix in (("torch", ""), ("torch_mkl_avx2", f" [{MKL_ENV}=1]"),
                          ("torch_alternating", " [alternating]"),
                          ("torch_mkl_avx2_alternating", f" [{MKL_ENV}=1, alternating]")):
        a = res.get(which)
        if not a:
            continue
        base, base_r = (a[k] for k in list(a)[:2])
        for k, v in a.items():
            lines.append(f"| {k}{suffix} | {v['median_ms']:.2f} ({v['p10_ms']:.2f}-{v['p90_ms']:.2f}) | "
                         f"{v['per_image_ms']:.3f} | {_ratio(base, v)} | {v['paired_ratio_median']:.1f}x | "
                         f"{_ratio(base_r, v)} | {v['max_abs_err']:.1e} |")
    if "torch" not in res:
        lines.append("| not run (--part b) | | | | | | |")
    if len(res.get("repeats", [])) > 1:
        lines += ["", f"Default path ('{DEFAULT_VARIANT}') vs the numpy reference loop, every repeat "
                  "and timing mode (own processes, in this order): ratio of medians / median of per-round ratios.", "",
                  "| torch process | timing | repeats | ratio of medians, each | median | per-round ratio, each | median |",
                  "|---|---|---|---|---|---|---|"]
        for which in ("torch", "torch_mkl_avx2"):
            for block in sorted({r.get("block", 1) for r in res["repeats"]}, reverse=True):
                reps = [r for r in res["repeats"] if r["which"] == which and r.get("block", 1) == block]
                if not reps:
                    continue
                a, b = [r["ratio_of_medians"] for r in reps], [r["paired_ratio_median"] for r in reps]
                name = "MKL as shipped" if which == "torch" else f"{MKL_ENV}=1"
                lines.append(f"| {name} | {_mode(block)} | {len(reps)} | {', '.join(f'{v:.1f}' for v in a)} | "
                             f"**{np.median(a):.1f}x** | {', '.join(f'{v:.1f}' for v in b)} | **{np.median(b):.1f}x** |")
    if res.get("idle_probe"):
        pr = res["idle_probe"]
        lines += ["", f"Idle probe (MKL as shipped, same process): the default path takes {pr['back_to_back_ms']:.1f} ms "
                  f"per call back to back and {pr['after_idle_ms']:.1f} ms per call after {pr['idle_ms']:.0f} ms of "
                  f"sleep (medians of {pr['calls']} calls): the cost of waking idle cores."]
    lines += ["", f"MKL AVX2 shim rows (`{MKL_ENV}=1`, usfm_edge/kernels/mkl_dispatch.py): "
              f"{res.get('mkl_shim', 'not run')}. Each block's ratios are against the numpy loops timed in "
              "the same process (numpy's FFT is its own pocketfft, not MKL)."]
    lines += ["", "## (b) in-graph band-stop, ONNX Runtime and OpenVINO (f32), ms per image", "",
              "| runtime | batch | variant | median ms / image (p10-p90) | speed-up vs DFT op, median (p10) | max abs err |",
              "|---|---|---|---|---|---|"]
    dft = "DFT op (torch.fft, dynamo, opset 20)"
    if "ort" not in res:
        lines.append("| not run (--part a) | | | | | |")
    for rt in ("ort", "ov"):
        label = {"ort": "ONNX Runtime", "ov": "OpenVINO"}[rt]
        for batch, rows in res.get(rt, {}).items():
            ref, star = rows.get(dft, {}), ""
            if "median_ms" not in ref:
                ref, star = res[rt]["1"].get(dft, {}), " (vs batch 1)"
            for k, v in rows.items():
                if "median_ms" not in v:
                    lines.append(f"| {label} | {batch} | {k} | {v.get('error') or v.get('skipped')} | | |")
                    continue
                lines.append(f"| {label} | {batch} | {k} | "
                             f"{v['per_image_ms']:.3f} ({v['p10_ms'] / int(batch):.3f}-{v['p90_ms'] / int(batch):.3f}) | "
                             f"{_ratio(ref, v)}{star} | {v['max_abs_err']:.1e} |")
    lines += ["", "Graphs:", ""] + [f"- {k}: {v}" for k, v in res["graph_notes"].items()]
    lines += ["", "Max abs err is against the float64 numpy reference on images in [0, 1]."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for kernels.md/.json")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per variant (>= 20)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="frames in part (a)")
    ap.add_argument("--part", choices=["all", "a", "b"], default="all",
                    help="a: batched torch vs numpy loop only; b: in-graph ORT/OpenVINO only")
    ap.add_argument("--repeats", type=int, default=1,
                    help="part (a): run the torch process(es) this many times, alternating, and report every "
                         "repeat's default-path ratio (the tables show the last repeat)")
    ap.add_argument("--block", type=int, default=5,
                    help="part (a): per round, each variant runs one untimed call then this many timed calls "
                         "(steady state); 1 = alternate single calls only. With > 1 part (a) is also run "
                         "with alternating single calls, and both are reported")
    ap.add_argument("--no-mkl-shim", action="store_true",
                    help=f"do not time torch a second time with {MKL_ENV}=1 (where the shim applies)")
    ap.add_argument("--worker", choices=["torch", "ort", "ov"], help=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.config.read_text())
        result = worker_torch(cfg) if args.worker == "torch" else worker_runtime(cfg, args.worker)
        Path(cfg["result"]).write_text(json.dumps(result))
        return

    frames, source = load_frames(args.batch)
    gen = BandStopMaskGenerator(224)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng) for _ in range(args.batch)])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "frames.npy", frames)
        np.save(tmp / "masks.npy", masks)
        models, notes = export_models(masks[0], tmp) if args.part != "a" else ({}, {})
        res = {"command": "python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "machine": machine_info(), "frames": source, "threads": args.threads, "runs": args.runs,
               "warmup": args.warmup, "batch": args.batch, "mask_rings_dropped_b": gen.draw(np.random.default_rng(0)).tolist(),
               "graph_notes": notes, "load_average_start": os.getloadavg()}
        shim_ok, shim_why = shim_applicable()
        res["mkl_shim"] = ("run in a second torch process" if shim_ok and not args.no_mkl_shim else
                           "skipped (--no-mkl-shim)" if shim_ok else f"not applicable: {shim_why}")
        modes = [args.block] + ([1] if args.block > 1 else [])
        todo = [(w, b) for w in ("torch", "torch_mkl_avx2") if args.part != "b"
                and (w == "torch" or (shim_ok and not args.no_mkl_shim)) for b in modes] * args.repeats
        todo += [(w, 1) for w in ("ort", "ov") if args.part != "a"]
        res["repeats"], res["repeats_requested"], res["block"] = [], args.repeats, args.block
        for i, (which, block) in enumerate(todo):
            cfg = {"frames": str(tmp / "frames.npy"), "masks": str(tmp / "masks.npy"), "models": models,
                   "threads": args.threads, "runs": args.runs, "warmup": args.warmup, "batches": [1, 8],
                   "result": str(tmp / f"{which}.json"), "block": block,
                   "idle_probe": which == "torch" and "idle_probe" not in res,
                   "skip": {"ov/8": ["DFT op (torch.fft, dynamo, opset 20)"]}}
            (tmp / f"{which}.cfg.json").write_text(json.dumps(cfg))
            print(f"[bench_kernels] measuring {which}, {_mode(block)} ({i + 1}/{len(todo)}) ...", flush=True)
            env = {**os.environ, MKL_ENV: "1" if which == "torch_mkl_avx2" else "0"}
            subprocess.run([sys.executable, __file__, "--worker", which.split("_")[0], "--config",
                            str(tmp / f"{which}.cfg.json")], check=True, env=env)
            result = json.loads((tmp / f"{which}.json").read_text())
            if not which.startswith("torch"):
                res[which] = result
                continue
            if result["idle_probe"]:
                res["idle_probe"] = result["idle_probe"]
            res[which + ("" if block == args.block else "_alternating")] = rows = result["variants"]
            ref, default = rows[REFERENCE_VARIANT], rows[DEFAULT_VARIANT]
            res["repeats"].append({"which": which, "block": block,
                                   "ratio_of_medians": ref["median_ms"] / default["median_ms"],
                                   "paired_ratio_median": default["paired_ratio_median"]})
    res["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(res, indent=2))
    (args.out / "kernels.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
