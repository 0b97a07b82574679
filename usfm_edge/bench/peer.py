"""Peer rows: the same weights through the INT8 paths a user builds by hand, timed beside our bundles.

* ``peer: by-hand OpenVINO+NNCF``: ``openvino.convert_model`` of the bare PyTorch task model (fixed ``3 x S x S``
  input at model size, dynamic batch) -> ``nncf.quantize(model_type=nncf.ModelType.TRANSFORMER)`` on the
  calibration frames preprocessed to model input -> ``ov.save_model`` -> ``core.compile_model(xml, "CPU")`` with
  OpenVINO's defaults (bf16 where the CPU has it; only the thread count is set, as for every row).
* ``peer: by-hand ORT quantize_static``: ``torch.onnx.export`` (TorchScript exporter, opset 17) of the bare model ->
  ``onnxruntime.quantization.quantize_static`` with its defaults (QDQ, int8 activations and weights, per tensor,
  MinMax) restricted to ``op_types_to_quantize=["MatMul", "Gemm"]`` -> a default CPU session.

Peers take normalised float input (no resize, no normalisation, no post-processing: the caller does those);
our bundles take the raw uint8 frame, so a peer row is the lower bound of what the by-hand path costs. The
calibration frames are the ones our quantiser draws (:func:`calibration_frames`: same sources, seed and held-out
patients excluded), preprocessed with ``core.preprocess`` (the numpy twin of the in-graph preprocessing).

Timing runs in fresh processes (``python -m usfm_edge.bench.peer``, one runtime per process, as for bundles).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import ConfigError, require

__all__ = ["PEER_NAMES", "OUR_BUNDLE", "PeerModel", "calibration_frames", "model_inputs", "build_peers", "open_peer",
           "prepare_peers", "peer_row", "bundle_calibration_frames", "bench_peer_rows",
           "time_peer_isolated", "peer_outputs", "peer_fidelity", "peer_markdown"]

PEER_NAMES = {"openvino": "peer: by-hand OpenVINO+NNCF", "onnxruntime": "peer: by-hand ORT quantize_static"}
#: benchmarks/bench_int8.py's row of our INT8 bundle on each backend
OUR_BUNDLE = {"openvino": "OpenVINO int8 (NNCF)", "onnxruntime": "ORT int8 (Q/DQ)"}


@dataclass
class PeerModel:
    """A by-hand INT8 model: its file (``.xml`` or ``.onnx``), backend, input shape and build time."""

    name: str
    backend: str
    path: Path
    input_shape: tuple[int, ...]
    build_seconds: float

    @property
    def size_mb(self) -> float:
        files = [self.path, self.path.with_suffix(".bin")] if self.backend == "openvino" else [self.path]
        return sum(f.stat().st_size for f in files if f.is_file()) / 1e6


def calibration_frames(specs: list[str], n: int, seed: int = 0) -> list[np.ndarray]:
    """The uint8 frames our quantiser calibrates on (``calibration.quantize``: held-out patients excluded)."""
    from usfm_edge.calibration.calibset import build_calibration_set
    from usfm_edge.calibration.quantize import held_out_split
    from usfm_edge.evaluation import select_records

    records = select_records(list(specs), split="all")
    _, excluded, _ = held_out_split(records, None, seed)
    calib = build_calibration_set(list(specs), n=n, seed=seed, exclude_patients=excluded, min_frames=1, strict=False,
                                  records=records)
    return list(calib.frames)


def model_inputs(frames, spec) -> list[np.ndarray]:
    """Raw frames -> ``(1, C, S, S)`` float32 model inputs (``core.preprocess``)."""
    from usfm_edge.core.preprocess import preprocess

    return [preprocess(f, spec)[None] for f in frames]


def _build_openvino(model, inputs: list[np.ndarray], workdir: Path) -> PeerModel:
    import torch

    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino")
    t0 = time.perf_counter()
    shape = inputs[0].shape
    ov_model = ov.convert_model(model, example_input=torch.from_numpy(inputs[0]), input=[(-1, *shape[1:])])
    q = nncf.quantize(ov_model, nncf.Dataset(inputs), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(inputs))
    xml = workdir / "peer_openvino_int8.xml"
    ov.save_model(q, str(xml))
    return PeerModel(PEER_NAMES["openvino"], "openvino", xml, tuple(shape), time.perf_counter() - t0)


def _build_ort(model, inputs: list[np.ndarray], workdir: Path) -> PeerModel:
    import torch

    q = require("onnxruntime.quantization", "onnxruntime")
    t0 = time.perf_counter()
    fp32, int8 = workdir / "peer_ort_fp32.onnx", workdir / "peer_ort_int8.onnx"
    torch.onnx.export(model, (torch.from_numpy(inputs[0]),), str(fp32), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter(inputs)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"x": x}

    q.quantize_static(str(fp32), str(int8), Reader(), quant_format=q.QuantFormat.QDQ,
                      op_types_to_quantize=["MatMul", "Gemm"])
    return PeerModel(PEER_NAMES["onnxruntime"], "onnxruntime", int8, tuple(inputs[0].shape), time.perf_counter() - t0)


def build_peers(model, calib_inputs: list[np.ndarray], workdir: str | Path,
                backends: tuple[str, ...] = ("openvino", "onnxruntime")) -> list[PeerModel]:
    """Build the by-hand INT8 models of a task model (eval mode) from preprocessed calibration inputs."""
    import warnings

    unknown = set(backends) - set(PEER_NAMES)
    if unknown:
        raise ConfigError(f"unknown peer backend(s) {sorted(unknown)}; choose from {', '.join(PEER_NAMES)}")
    if not calib_inputs:
        raise ConfigError("the peer models need calibration frames")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in backends:
            out.append((_build_openvino if b == "openvino" else _build_ort)(model, list(calib_inputs), workdir))
    return out


def open_peer(path: str | Path, backend: str, threads: int):
    """A callable ``x (B, C, S, S) float32 -> first output`` on the runtime's defaults (``threads`` set)."""
    if backend == "openvino":
        ov = require("openvino", "openvino")
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": int(threads)})
        req = compiled.create_infer_request()
        return lambda x: np.asarray(req.infer({0: x})[compiled.output(0)])
    if backend == "onnxruntime":
        ort = require("onnxruntime", "onnxruntime")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    raise ConfigError(f"unknown peer backend {backend!r}; choose from {', '.join(PEER_NAMES)}")


def peer_outputs(peer: PeerModel, inputs: list[np.ndarray], threads: int = 1) -> list[np.ndarray]:
    """The peer's first output for each ``(1, C, S, S)`` input (in this process)."""
    fn = open_peer(peer.path, peer.backend, threads)
    return [np.asarray(fn(x))[0] for x in inputs]


def peer_fidelity(model, peer: PeerModel, inputs: list[np.ndarray], threads: int = 1) -> dict:
    """Raw and centred cosine of the peer's output against the fp32 PyTorch model on the same inputs."""
    import torch

    from usfm_edge.calibration.gate import centred_cosines
    from usfm_edge.export.parity import cosine

    with torch.inference_mode():
        ref = [model(torch.from_numpy(x))[0].numpy() for x in inputs]
    got = peer_outputs(peer, inputs, threads)
    cc = centred_cosines(ref, got, int(inputs[0].shape[-1])) or [float("nan")]
    raw = [cosine(a, b) for a, b in zip(ref, got)]
    return {"cos_raw": float(np.mean(raw)), "cos_centred_mean": float(np.mean(cc)),
            "cos_centred_min": float(np.min(cc)), "finite": bool(all(np.isfinite(g).all() for g in got))}


def prepare_peers(model, specs: list[str], n_calib: int, eval_frames: list[np.ndarray], timing_frame: np.ndarray,
                  workdir: str | Path, threads: int = 1,
                  calib: list[np.ndarray] | None = None) -> tuple[list[PeerModel], dict[str, dict], Path]:
    """Build both peers from our quantiser's calibration frames (or ``calib``), score them against fp32 PyTorch on
    the held-out frames, and save the timing frame as model input: ``(peers, {name: fidelity}, input .npy)``."""
    workdir = Path(workdir)
    spec = model.preprocess
    calib = calib if calib is not None else calibration_frames(specs, n_calib)
    peers = build_peers(model, model_inputs(calib, spec), workdir)
    evals = model_inputs(eval_frames, spec)
    fid = {p.name: peer_fidelity(model, p, evals, threads) for p in peers}
    x = workdir / "timing_input.npy"
    np.save(x, model_inputs([timing_frame], spec)[0])
    return peers, fid, x


def peer_row(peer: PeerModel, times: dict[int, list[float]], fid: dict, bundle_times: dict[int, list[float]],
             torch_ms: float) -> dict:
    """A benchmark row of a peer: medians, speed-up over PyTorch fp32, fidelity and the ratio to our bundle of the
    same backend (``vs_bundle``: peer time / bundle time at batch 1; frames/s of both at the largest batch)."""
    med = float(np.median(times[1]))
    big = max(times)
    bundle_ms = float(np.median(bundle_times[1]))
    return {"variant": peer.name, "median_ms": round(med, 2), "p90_ms": round(float(np.percentile(times[1], 90)), 2),
            "speedup_vs_torch": round(torch_ms / med, 2), "cos_raw": round(fid["cos_raw"], 5),
            "cos_centred_mean": round(fid["cos_centred_mean"], 4), "cos_centred_min": round(fid["cos_centred_min"], 4),
            "mask_pixel_agreement": float("nan"), "size_mb": round(peer.size_mb, 2),
            "fps": {b: round(1000.0 * b / float(np.median(t)), 2) for b, t in times.items()},
            "bundle": OUR_BUNDLE[peer.backend], "bundle_ms": round(bundle_ms, 2), "vs_bundle": round(med / bundle_ms, 3),
            "fps_largest_batch": {"batch": big, "peer": 1000.0 * big / float(np.median(times[big])),
                                  "bundle": 1000.0 * big / float(np.median(bundle_times[big]))}}


def bundle_calibration_frames(bundle: str | Path) -> list[np.ndarray] | None:
    """The exact frames an INT8 bundle was calibrated on (its ``usfm.json`` calibration manifest, every file's
    SHA-256 checked), or None when the bundle records none."""
    import tempfile

    from usfm_edge.calibration.calibset import CalibrationSet

    meta = json.loads((Path(bundle) / "usfm.json").read_text())
    manifest = (((meta.get("calibration") or {}).get("report") or {}).get("manifest"))
    if not manifest:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibration_manifest.json"
        path.write_text(json.dumps(manifest))
        return list(CalibrationSet.from_manifest(path).frames)


def bench_peer_rows(torch_ckpt: str | Path, bundles, data: str, rows: list, batches=(1,), threads: int = 2,
                    runs: int = 30, warmup: int = 3, rounds: int = 2, n_calib: int = 300, eval_frames: int = 8) -> list:
    """``usfm-edge bench --peer``: both peers of the ``--torch`` checkpoint as ``bench.latency.BenchRow`` fields
    (keyword dicts; ``bench.latency`` builds the rows, so this module does not import it).

    Calibration frames: those of the first INT8 bundle given (its manifest), else ``n_calib`` frames of ``data``
    drawn as our quantiser draws them. Timing: the benchmark's first frame of ``data``, preprocessed, in
    ``rounds`` fresh processes per peer. ``extra`` holds the fidelity against fp32 PyTorch on held-out frames of
    ``data`` and ``vs_bundle`` (peer p50 / p50 of our INT8 bundle of the same backend and batch, when one is in
    ``rows``; > 1 = our bundle faster).
    """
    import tempfile

    from usfm_edge.evaluation import read_frame, select_records
    from usfm_edge.models.tasks import load_task_model

    if torch_ckpt is None:
        raise ConfigError("--peer builds the by-hand models from the weights: give the checkpoint with --torch CKPT")
    model = load_task_model(torch_ckpt).eval()
    frames = next((f for f in (bundle_calibration_frames(b) for b in bundles
                               if json.loads((Path(b) / "usfm.json").read_text()).get("precision") == "int8") if f), None)
    frames = frames or calibration_frames([data], n_calib)
    held = [read_frame(r) for r in select_records(data, split="val", limit=eval_frames)]
    timing_frame = read_frame(select_records(data, split="all")[0])
    torch_p50 = {r.batch: r.p50_ms for r in rows if r.name == "pytorch-fp32"}
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        peers, fid, x = prepare_peers(model, [data], 0, held, timing_frame, tmp, threads, calib=frames)
        for p in peers:
            times: dict[int, list[float]] = {int(b): [] for b in batches}
            n_rounds = max(1, min(rounds, runs))
            for r in range(n_rounds):
                n = runs // n_rounds + (r < runs % n_rounds)
                for b, t in time_peer_isolated(p, x, threads, batches, n, warmup).items():
                    times[b] += t
            for b, t in times.items():
                arr = np.asarray(t)
                p50 = float(np.median(arr))
                ours = next((r for r in rows if r.backend == p.backend and r.precision == "int8" and r.batch == b), None)
                extra = {**fid[p.name], "bundle": ours.name if ours else None,
                         "vs_bundle": p50 / ours.p50_ms if ours else None, "build_seconds": round(p.build_seconds, 1)}
                out.append(dict(name=p.name, backend=p.backend, precision="int8", target="peer (by hand)", device="cpu",
                                batch=b, p50_ms=p50, p90_ms=float(np.percentile(arr, 90)),
                                p99_ms=float(np.percentile(arr, 99)), fps=1000.0 * b / p50,
                                ratio_vs_torch=torch_p50[b] / p50 if b in torch_p50 else None, size_mb=p.size_mb,
                                rss_mb=float("nan"), extra=extra, p10_ms=float(np.percentile(arr, 10))))
    return out


def time_peer_isolated(peer: PeerModel, input_file: str | Path, threads: int, batches=(1,), runs: int = 30,
                       warmup: int = 3, timeout: float = 900.0) -> dict[int, list[float]]:
    """ms per call of a peer at each batch size, timed in a fresh interpreter on the saved input (one frame,
    repeated to the batch size)."""
    spec = {"path": str(peer.path), "backend": peer.backend, "input": str(input_file), "threads": int(threads),
            "batches": [int(b) for b in batches], "runs": int(runs), "warmup": int(warmup)}
    proc = subprocess.run([sys.executable, "-m", "usfm_edge.bench.peer", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"timing {peer.name} failed: {' | '.join(proc.stderr.strip().splitlines()[-3:])}")
    return {int(b): t for b, t in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def time_batches(fn, x1: np.ndarray, batches, warmup: int, runs: int) -> dict[str, list[float]]:
    """``{str(batch): [ms per call]}``: ``fn`` on ``x1`` repeated to each batch size, after ``warmup`` calls."""
    out = {}
    for b in batches:
        x = np.ascontiguousarray(np.repeat(x1, b, axis=0))
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(b)] = times
    return out


def _time_worker(spec: dict) -> dict[str, list[float]]:
    fn = open_peer(spec["path"], spec["backend"], spec["threads"])
    return time_batches(fn, np.load(spec["input"]), spec["batches"], spec["warmup"], spec["runs"])


def peer_markdown(rows: list[dict]) -> list[str]:
    """Lines of a Markdown table: each peer against our bundle of the same backend (``vs_bundle``: peer time /
    bundle time at batch 1, > 1 = our bundle faster; ``vs_bundle_fps``: bundle frames/s / peer frames/s at the
    largest batch)."""
    if not rows:
        return []
    lines = ["", "By-hand peers (bare model on normalised input, no pre/post-processing) against our INT8 bundle of "
             "the same backend (raw frame in, preprocessing in the graph):", "",
             "| peer | our bundle | peer ms (b1) | bundle ms (b1) | peer time / bundle time | frames/s peer / bundle "
             "(largest batch) | cos centred vs fp32 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        fps = r.get("fps_largest_batch") or {}
        fps_txt = f"{fps.get('peer', float('nan')):.1f} / {fps.get('bundle', float('nan')):.1f} (b{fps.get('batch', '?')})"
        lines.append(f"| {r['variant']} | {r.get('bundle', '-')} | {r['median_ms']} | {r.get('bundle_ms', '-')} | "
                     f"{r.get('vs_bundle', float('nan')):.2f} | {fps_txt} | {r.get('cos_centred_mean')} |")
    return lines


if __name__ == "__main__":
    print(json.dumps(_time_worker(json.loads(sys.argv[1]))))
