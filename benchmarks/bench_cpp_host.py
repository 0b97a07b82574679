"""Per-frame latency of the C++ host (examples/cpp_host) vs ``Engine.predict`` vs the bare OpenVINO call.

On the same OpenVINO bundles (the shipped ``busbra_seg_tiny`` demo checkpoint exported for openvino fp32 and
int8, or ``--bundle`` folders) and the same real frames (the bundled BUS-BRA + HC18 sample, ``--frames`` of them,
sizes 200-800 px), in one run, per frame:

* **host total**: the C++ host's whole per-frame work (wrap the frame held in memory, set the tensor, infer,
  read the mask, count the class areas), as it writes to ``frames.csv`` (``total_ms``);
* **host infer**: the host's ``request.infer()`` alone (``infer_ms``);
* **bare**: the least a Python caller can do: ``InferRequest.infer({0: x}, share_inputs=True,
  share_outputs=True)`` on the Engine's own compiled model, ``x`` = the Engine's prepared input for the frame;
* **Engine.predict**: the Python runtime end to end (checks, inference, probs + mask copies, areas).

Rounds rotate (even rounds the host first, odd rounds Python first): the host runs the cine in its own process
(``--warmup 2 --passes 2``: the cine twice, the second pass timed); the Python process times Engine.predict and the
bare call on the same frames, alternating which goes first, after one untimed pass of both over every frame. The
untimed passes matter: the sample's frames all differ in size, and OpenVINO's first call on a new input shape
prepares that shape (a scanner's cine has one size). Each frame's time is its median over the rounds; a ratio is
the median over frames of the per-frame ratio. Host overhead = (host total - host infer) / host infer; host vs
bare = host total / bare (goal <= 1.05).
All engines use the same OpenVINO settings (LATENCY hint, f32 for fp32 bundles, ``--threads``).

Usage:
    python benchmarks/bench_cpp_host.py [--frames 30] [--rounds 2] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from usfm_edge.bench.sysinfo import load_note, machine_info, machine_line  # noqa: E402

HOST_DIR = ROOT / "examples" / "cpp_host"
CKPT = ROOT / "usfm_edge" / "assets" / "checkpoints" / "busbra_seg_tiny.safetensors"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HOST_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def export_bundles(work: Path) -> list[Path]:
    """openvino fp32 and int8 bundles of the demo checkpoint (INT8 calibrated on the bundled BUS-BRA sample)."""
    from usfm_edge.calibration import make_quantizer
    from usfm_edge.data import sample_dir
    from usfm_edge.export import export

    os.environ.setdefault("USFM_EDGE_MIN_CALIB_FRAMES", "8")  # the bundled sample holds 22 BUS-BRA frames
    fp32 = export(CKPT, "openvino", "fp32", out=work / "busbra_seg_tiny-openvino-fp32.usfm")
    q = make_quantizer([f"busbra:{sample_dir()}/busbra"], force=True)  # timing only: the gate is not the question
    int8 = export(CKPT, "openvino", "int8", out=work / "busbra_seg_tiny-openvino-int8.usfm", quantizer=q)
    return [fp32, int8]


def run_host(exe: Path, bundle: Path, frames_dir: Path, out: Path, threads: int | None) -> dict[str, list[float]]:
    cmd = [str(exe), str(bundle), "--out", str(out), "--warmup", "2", "--passes", "2", str(frames_dir)]
    if threads:
        cmd[3:3] = ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"usfm_host failed ({res.returncode}): {res.stderr[-2000:]}")
    rows = list(csv.DictReader((out / "frames.csv").open()))
    return {"host_total": [float(r["total_ms"]) for r in rows], "host_infer": [float(r["infer_ms"]) for r in rows]}


def time_python(engine, frames: list[np.ndarray], inputs: list[np.ndarray], request, flip: bool) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"engine": [], "bare": []}
    for i, (frame, x) in enumerate(zip(frames, inputs)):
        order = ("engine", "bare") if (i + flip) % 2 == 0 else ("bare", "engine")
        for what in order:
            t0 = time.perf_counter()
            if what == "engine":
                engine.predict(frame)
            else:
                request.infer({0: x}, share_inputs=True, share_outputs=True)
            out[what].append((time.perf_counter() - t0) * 1000.0)
    return out


def bench_bundle(exe: Path, bundle: Path, frames_dir: Path, frames: list[np.ndarray], rounds: int,
                 threads: int | None, work: Path) -> dict:
    from usfm_edge.runtime import Engine

    times: dict[str, list[list[float]]] = {k: [] for k in ("host_total", "host_infer", "bare", "engine")}
    with Engine.open(bundle, threads=threads, warmup=2) as engine:
        request = engine.backend.compiled.create_infer_request()
        inputs = [engine.prepare([f]) for f in frames]
        for frame, x in zip(frames, inputs):  # untimed pass: every frame size prepared once, as in the host
            engine.predict(frame)
            request.infer({0: x}, share_inputs=True, share_outputs=True)
        for r in range(rounds):  # odd rounds: Python first
            for part in ("host", "python") if r % 2 == 0 else ("python", "host"):
                res = run_host(exe, bundle, frames_dir, work / f"host_out_{bundle.stem}_{r}", threads) \
                    if part == "host" else time_python(engine, frames, inputs, request, bool(r % 2))
                for k, v in res.items():
                    times[k].append(v)
        precision = engine.meta.precision
    per_frame = {k: np.median(np.array(v), axis=0) for k, v in times.items()}  # median over rounds, per frame
    med = {k: float(np.median(v)) for k, v in per_frame.items()}
    ratio = {
        "host_total/bare": float(np.median(per_frame["host_total"] / per_frame["bare"])),
        "host_infer/bare": float(np.median(per_frame["host_infer"] / per_frame["bare"])),
        "host_overhead": float(np.median((per_frame["host_total"] - per_frame["host_infer"]) / per_frame["host_infer"])),
        "engine/bare": float(np.median(per_frame["engine"] / per_frame["bare"])),
    }
    return {"bundle": bundle.name, "precision": precision, "frames": len(frames), "rounds": rounds,
            "median_ms": med, "ratios": ratio}


def report(results: list[dict], info: dict, loads: list[float], command: str) -> str:
    lines = [f"# C++ host vs Engine.predict vs bare OpenVINO call ({time.strftime('%Y-%m-%d')})", "",
             f"`{command}`", "",
             f"Machine: {machine_line(info)}; OpenVINO {info['versions'].get('openvino')}. "
             f"Load {loads[0]:.1f} -> {loads[-1]:.1f}: {load_note(loads, info['cores'])}.", "",
             "| bundle | frames x rounds | host total ms | host infer ms | bare ms | Engine.predict ms | "
             "host total / bare | host infer / bare | host overhead | Engine / bare |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, q = r["median_ms"], r["ratios"]
        lines.append(f"| {r['bundle']} | {r['frames']} x {r['rounds']} | {m['host_total']:.2f} | {m['host_infer']:.2f} | "
                     f"{m['bare']:.2f} | {m['engine']:.2f} | {q['host_total/bare']:.3f} | {q['host_infer/bare']:.3f} | "
                     f"{100 * q['host_overhead']:.2f}% | {q['engine/bare']:.3f} |")
    lines += ["", "Times are medians over frames of each frame's median over rounds; ratios are medians of per-frame "
              "ratios. host overhead = (host total - host infer) / host infer. bare = `InferRequest.infer(..., "
              "share_inputs=True, share_outputs=True)` in Python on the Engine's compiled model."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="OpenVINO inference threads (default: OpenVINO's)")
    ap.add_argument("--bundle", action="append", type=Path, help="openvino bundle(s); default: export fp32 + int8")
    ap.add_argument("--build-dir", type=Path, default=ROOT / "build" / "cpp_host")
    ap.add_argument("--out", type=Path, default=None, help="write cpp_host.json / cpp_host.md here")
    args = ap.parse_args(argv)

    build, make_frames = _load("build_host"), _load("make_frames")
    reason = build.missing_tools()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    exe = build.build_host(args.build_dir)
    info = machine_info()
    print(machine_line(info), file=sys.stderr)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundles = args.bundle or export_bundles(work)
        frames_dir = work / "frames"
        paths = make_frames.make_frames(frames_dir, count=args.frames)
        frames = [make_frames.read_pgm(p) for p in paths]
        results = []
        for b in bundles:
            results.append(bench_bundle(exe, Path(b), frames_dir, frames, args.rounds, args.threads, work))
            loads.append(os.getloadavg()[0])
    command = "python benchmarks/bench_cpp_host.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, info, loads, command.strip())
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpp_host.md").write_text(text)
        payload = {"machine": info, "loads": loads, "median_load": statistics.median(loads), "results": results}
        (args.out / "cpp_host.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
