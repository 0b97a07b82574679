"""Measure bundles and the PyTorch fp32 model in one process, interleaved, on real ultrasound frames.

Every variant (each bundle, and the checkpoint in PyTorch through the same raw-frame graph) is opened
once, warmed up, then timed in round-robin order: repetition ``r`` times every variant once before
repetition ``r + 1`` starts, so a slow spell of a shared machine hits all variants alike. Ratios against
PyTorch fp32 are therefore meaningful even where absolute times drift (they do by 15-60% here).

Latency is end to end for one call: raw uint8 frame(s) in, task outputs at the frame's size out
(``Engine.predict_batch``), i.e. what scanner software pays. Memory is the resident-set growth when the
variant is opened (one process holds all variants and reuses memory freed by earlier ones, so this is a
lower bound), and, with ``memory=True``, each variant's peak resident set in a process of its own
(``bench.memprobe``: interpreter and libraries included, what an embedding application holds). The task
metric is computed with ``evaluation.evaluate_predictor`` on held-out real frames: the same code path for
every variant.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import BackendUnavailableError, ConfigError

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


def process_rss_mb(key: str = "VmRSS") -> float:
    """Resident set size (``VmRSS``) or its peak (``VmHWM``) of this process in MB; nan where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def machine_info() -> dict:
    """CPU model, ISA flags that matter for inference, core count and library versions."""
    from importlib import metadata

    cpu, flags = platform.processor() or "?", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                         if f in have]
                break
    except OSError:
        pass
    versions = {}
    for dist in ("usfm-edge", "torch", "onnxruntime", "openvino", "nncf", "tensorrt", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpus = []
    try:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {"cpu": cpu, "isa": flags, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "gpus": gpus, "versions": versions}


def _dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


class _Variant:
    def __init__(self, name, predictor, backend, precision, target, device, size_mb, rss_mb, static_hw, path=None):
        self.name, self.predictor, self.backend, self.precision = name, predictor, backend, precision
        self.target, self.device, self.size_mb, self.rss_mb, self.static_hw = target, device, size_mb, rss_mb, static_hw
        self.path = path


def _frames_for(variant: _Variant, frames: list[np.ndarray]) -> list[np.ndarray]:
    """Static-shape bundles (jetson/tensorrt) accept only their frame size: resize to it as evaluation does
    (``core.preprocess.fit_frame``)."""
    if variant.static_hw is None:
        return frames
    from usfm_edge.core.preprocess import fit_frame

    return [fit_frame(f, variant.static_hw) for f in frames]


def _open_bundle(path: Path, threads: int, device: str, backend: str) -> _Variant:
    from usfm_edge.runtime import Engine

    before = process_rss_mb()
    eng = Engine.open(path, backend=backend, device=device, threads=threads)
    meta = eng.meta
    static = tuple(meta.input.static_hw) if meta.input.static_hw else None
    return _Variant(path.name.removesuffix(".usfm"), eng, getattr(eng.backend, "name", backend), meta.precision,
                    meta.target, device, _dir_size_mb(path), process_rss_mb() - before, static, path)


def _open_torch(ckpt: Path, threads: int, device: str, bf16: bool = False) -> _Variant:
    import torch

    from usfm_edge.evaluation.evaluate import TorchPredictor
    from usfm_edge.models.tasks import load_task_model

    if device != "cpu" and not (device == "cuda" and torch.cuda.is_available()):
        why = (f"torch {torch.__version__} sees no CUDA device" if device == "cuda" else
               f"the PyTorch reference runs on cpu or cuda, not on OpenVINO's {device!r}")
        raise BackendUnavailableError(f"PyTorch on {device!r}: {why}", hint="use --device cpu for the CPU rows")
    torch.set_num_threads(threads)
    before = process_rss_mb()
    model = load_task_model(ckpt)
    pred = TorchPredictor(model, device=device)
    if bf16:
        pred.graph.model = pred.graph.model.to(torch.bfloat16)
        pred.graph.half = False
        inner = pred.graph._model
        pred.graph._model = lambda x: inner(x.to(torch.bfloat16)).float()  # noqa: E731
    name = f"pytorch-{'bf16' if bf16 else 'fp32'}"
    return _Variant(name, pred, "torch", "bf16" if bf16 else "fp32", "pytorch", device, ckpt.stat().st_size / 1e6,
                    process_rss_mb() - before, None, ckpt)


def _time_once(v: _Variant, frames: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    if len(frames) == 1 or not hasattr(v.predictor, "predict_batch"):
        for f in frames:
            v.predictor.predict(f)
    else:
        v.predictor.predict_batch(frames, batch_size=len(frames))
    return (time.perf_counter() - t0) * 1000.0


def run_bench(bundles: list[str | Path], torch_ckpt: str | Path | None = None, data: str | None = None,
              batches: tuple[int, ...] = (1,), threads: int = 2, runs: int = 30, warmup: int = 3,
              eval_frames: int = 16, device: str = "cpu", backend: str = "auto", torch_bf16: bool = False,
              progress=None, memory: bool = True) -> dict:
    """Benchmark bundles (and a PyTorch checkpoint) side by side; returns {"machine", "rows", "settings"}.

    Args:
        bundles: bundle folders (``NAME.usfm``).
        torch_ckpt: task checkpoint run in PyTorch fp32 as the reference row (ratios are against it).
        data: data source for frames and the task metric (default: the bundled BUS-BRA sample).
        batches: batch sizes to time (same-size frames are batched where the graph allows it).
        threads: intra-op threads of every backend (and torch).
        runs, warmup: timed and untimed repetitions per variant and batch size.
        eval_frames: held-out frames for the task metric (0 = skip accuracy).
        device: ``cpu`` or an accelerator (``cuda`` for ORT CUDA / TensorRT and PyTorch, ``GPU`` / ``NPU`` for
            OpenVINO); variants that cannot use it are reported as skipped.
        torch_bf16: add a PyTorch bf16 row (useful on GPUs and CPUs with native bf16).
        memory: measure each variant's peak RSS in a process of its own (``bench.memprobe``, a few s each).
    """
    from usfm_edge.data.readers import read_image
    from usfm_edge.evaluation.evaluate import StaticSizeAdapter, evaluate_predictor, select_records

    if not bundles and torch_ckpt is None:
        raise ConfigError("nothing to benchmark: give bundles and/or --torch CKPT")
    if data is None:
        from usfm_edge.data import sample_dir

        data = f"busbra:{sample_dir() / 'busbra'}"
    records = select_records(data, split="all")
    frames_all = [read_image(r.image) for r in records[:8]]
    variants, skipped = [], []
    if torch_ckpt is not None:
        for bf16 in (False, True) if torch_bf16 else (False,):
            try:  # never a silent fallback to the CPU: a device torch cannot use is reported as skipped
                variants.append(_open_torch(Path(torch_ckpt), threads, device, bf16=bf16))
            except BackendUnavailableError as exc:
                skipped.append({"bundle": f"{torch_ckpt} (PyTorch {'bf16' if bf16 else 'fp32'})",
                                "reason": f"{type(exc).__name__}: {exc}"})
    for b in bundles:
        try:
            variants.append(_open_bundle(Path(b), threads, device, backend))
        except Exception as exc:  # a backend or device that is not here: report, do not abort the others
            skipped.append({"bundle": str(b), "reason": f"{type(exc).__name__}: {exc}"})
    rows: list[BenchRow] = []
    for batch in batches:
        # the same real frame repeated: batching needs same-size frames
        inputs = {v.name: _frames_for(v, [frames_all[0]] * batch) for v in variants}
        for v in variants:
            for _ in range(warmup):
                _time_once(v, inputs[v.name])
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        it = range(runs) if progress is None else progress(range(runs), f"batch {batch}")
        for _ in it:
            for v in variants:
                times[v.name].append(_time_once(v, inputs[v.name]))
        ref = np.median(times["pytorch-fp32"]) if "pytorch-fp32" in times else None
        for v in variants:
            t = np.asarray(times[v.name])
            p50 = float(np.median(t))
            rows.append(BenchRow(v.name, v.backend, v.precision, v.target, v.device, batch, p50,
                                 float(np.percentile(t, 90)), float(np.percentile(t, 99)), 1000.0 * batch / p50,
                                 float(ref / p50) if ref is not None else None, v.size_mb, v.rss_mb))
    if memory:
        from usfm_edge.bench.memprobe import isolated_peak_rss_mb

        for v in variants:
            kind = "torch" if v.backend == "torch" else "bundle"
            peak = None if v.precision == "bf16" else isolated_peak_rss_mb(kind, v.path, records[0].image, threads,
                                                                           device, backend)
            for r in rows:
                if r.name == v.name:
                    r.peak_rss_mb = peak
    if eval_frames:
        held = select_records(data, split="val", limit=eval_frames)
        for v in variants:
            task = getattr(v.predictor, "task", None)
            metric = PRIMARY.get(task)
            if metric is None:
                continue
            try:
                pred = v.predictor if v.static_hw is None else StaticSizeAdapter(v.predictor, v.static_hw)
                res = evaluate_predictor(pred, held, task)
            except Exception as exc:
                skipped.append({"bundle": v.name, "reason": f"accuracy: {type(exc).__name__}: {exc}"})
                continue
            for r in rows:
                if r.name == v.name:
                    r.metric, r.metric_value = metric, float(res[metric])
                    r.extra = {k: res[k] for k in ("iou", "hd95", "accuracy", "ssim", "hc_mae_mm") if k in res}
    return {"machine": machine_info(), "rows": [asdict(r) for r in rows], "skipped": skipped,
            "settings": {"threads": threads, "runs": runs, "warmup": warmup, "batches": list(batches), "data": data,
                         "eval_frames": eval_frames, "device": device, "peak_rss_mb": process_rss_mb("VmHWM")}}
