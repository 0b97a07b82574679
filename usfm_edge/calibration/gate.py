"""The INT8 accuracy gate: the quantised artifact against its fp32 source on held-out real frames.

Both models run through the same runtime code (``runtime.backends`` + ``runtime.Engine`` result types) and
are scored by the one evaluation path, ``usfm_edge.evaluation.evaluate_predictor``, with the task metric:
Dice (seg), AUC (cls; accuracy when the held-out set has one class) or PSNR (enhance). On top, per output:
raw cosine and **centred** cosine (the fp32 mean output over the evaluation frames is subtracted from both
sides first: raw cosine hides damage, reference/perf-baseline.md §2), and for seg the agreement (Dice) of the
int8 mask with the fp32 mask.

The gate fails when the primary metric drops by more than ``max_drop`` (fp32 - int8, absolute), the mean
centred cosine of the main output falls below ``recipe.min_centred_cosine``, or (HC18-style records with a
reference head circumference, when ``recipe.max_hc_increase_mm`` is set) the mean absolute head-circumference
error grows by more than that many mm; the HC change is always reported as ``hc_increase_mm``. On failure,
:func:`sensitivity_report` lists the layers that add most error (int8 vs fp32 intermediate outputs, one run
of each graph on a few frames): the first candidates to keep in float.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from usfm_edge.calibration.backends.common import GraphInfo, fit_frame
from usfm_edge.core.bundle_schema import BundleMeta, InputContract, TensorSpec
from usfm_edge.data.readers import read_image
from usfm_edge.runtime.results import resize_maps, result_at_size

__all__ = ["GatePredictor", "accuracy_gate", "sensitivity_report", "fidelity", "centred_cosines"]

log = logging.getLogger(__name__)
_MAIN = {"seg": "probs", "cls": "probs", "enhance": "restored", "features": "features"}


class GatePredictor:
    """A model file run like a bundle: ``predict(frame) -> Result`` and a record of every output.

    Args:
        path: ``.onnx`` (ONNX Runtime) or ``.xml``/``.onnx`` (OpenVINO) model file.
        info: the graph contract.
        backend: ``onnxruntime`` or ``openvino`` (TensorRT Q/DQ graphs are checked in ONNX Runtime).
        precision: ``fp32`` (OpenVINO then computes in f32, never bf16) or ``int8``.
        threads: CPU threads (None = backend default).
    """

    def __init__(self, path: str | Path, info: GraphInfo, backend: str = "onnxruntime", precision: str = "fp32",
                 threads: int | None = None):
        from usfm_edge.runtime.backends import OnnxRuntimeBackend, OpenVINOBackend
        from usfm_edge.runtime.engine import Engine

        path = Path(path)
        names = list(info.output_names)
        if backend == "openvino":
            be = OpenVINOBackend(path, names, "cpu", "fp32" if precision == "fp32" else "int8", threads)
        else:
            be = OnnxRuntimeBackend(path, names, "cpu", threads)
        hw = list(info.static_hw) if info.static_hw else None
        spec = info.spec
        tensor = TensorSpec(info.input_name, "uint8" if info.raw else "float32",
                            [1, *(hw or ["height", "width"])] if info.raw else [1, spec.in_chans, spec.img_size,
                                                                                 spec.img_size])
        meta = BundleMeta(task=info.task, input=InputContract(tensor=tensor, layout="BHW" if info.raw else "BCHW",
                                                              raw_frame=info.raw, static_hw=hw, max_side=spec.max_side),
                          outputs=[TensorSpec(n, "float32", []) for n in names], preprocessing=info.preprocess,
                          precision=precision, backend=be.name, target="calibration", files={"model": path.name},
                          labels=list(info.labels))
        self.engine = Engine(path.parent, meta, be)
        self.info = info
        self.task = info.task
        self.outputs: list[dict[str, np.ndarray]] = []

    def predict(self, frame: np.ndarray):
        """Predict one frame (resized to the static size of static graphs, results mapped back with
        ``runtime.results.result_at_size``, as ``usfm-edge evaluate`` does)."""
        res = self.engine.predict(fit_frame(frame, self.info.static_hw))
        if self.info.static_hw is not None:
            res = result_at_size(res, frame.shape[:2])
        self.outputs.append(_arrays(res))
        return res

    def close(self) -> None:
        self.engine.close()


def _arrays(res) -> dict[str, np.ndarray]:
    if res.task == "seg":
        return {"probs": res.probs, "mask": res.mask}
    if res.task == "cls":
        return {"probs": res.probs}
    if res.task == "enhance":
        return {"restored": res.image}
    return {"features": res.features}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def _mask_agreement(a: np.ndarray, b: np.ndarray) -> float:
    scores = [2.0 * np.count_nonzero((a == c) & (b == c)) / (np.count_nonzero(a == c) + np.count_nonzero(b == c))
              for c in np.union1d(np.unique(a), np.unique(b))]
    return float(np.mean(scores)) if scores else 1.0


def centred_cosines(ref: Sequence[np.ndarray], got: Sequence[np.ndarray], grid: int) -> list[float] | None:
    """Per-frame cosine after subtracting the mean fp32 output over all frames (maps resampled to ``grid``²).

    Returns None for fewer than two frames (the centred value is undefined).
    """
    if len(ref) < 2:
        return None

    def g(a):
        a = np.asarray(a, np.float64)
        return resize_maps(a, (grid, grid)) if a.ndim >= 2 else a

    r, q = [g(a) for a in ref], [g(a) for a in got]
    mean = np.mean(r, axis=0)
    return [_cos(a - mean, b - mean) for a, b in zip(r, q)]


def fidelity(ref: list[dict], got: list[dict], grid: int) -> dict:
    """Raw/centred cosine per float output and mask agreement (seg) of int8 vs fp32 outputs."""
    out = {}
    for name in ref[0] if ref else []:
        if name == "mask":
            ag = [_mask_agreement(a["mask"], b["mask"]) for a, b in zip(ref, got)]
            out["mask"] = {"agreement_mean": round(float(np.mean(ag)), 5), "agreement_min": round(float(min(ag)), 5)}
            continue
        raw = [_cos(a[name], b[name]) for a, b in zip(ref, got)]
        cc = centred_cosines([a[name] for a in ref], [b[name] for b in got], grid)
        out[name] = {"cosine_mean": round(float(np.mean(raw)), 5), "cosine_min": round(float(min(raw)), 5),
                     "centred_cosine_mean": None if cc is None else round(float(np.mean(cc)), 5),
                     "centred_cosine_min": None if cc is None else round(float(min(cc)), 5)}
    return out


def _has_target(task: str, r) -> bool:
    return {"seg": r.mask is not None, "cls": r.label is not None, "enhance": True}.get(task, False)


def accuracy_gate(fp32_path: str | Path, int8_path: str | Path, info: GraphInfo, records: Sequence,
                  recipe, backend: str = "onnxruntime", max_drop: float | None = None,
                  fp32_backend: str | None = None) -> dict:
    """Score the INT8 artifact against its fp32 source on held-out records; never raises on failure.

    Args:
        fp32_path: the fp32 graph (ONNX, or fp32 IR).
        int8_path: the quantised artifact.
        info: graph contract.
        records: held-out records (patients not used for calibration); labels/masks enable the task metric.
        recipe: the ``QuantRecipe`` (``min_centred_cosine``, ``gate_frames``).
        backend: runtime backend of the INT8 artifact (``tensorrt`` Q/DQ runs in ONNX Runtime here).
        max_drop: allowed primary-metric drop (None = recipe/task default).
        fp32_backend: backend for the fp32 model (default: the same as the INT8 one).

    Returns:
        ``{"passed", "failures", "metric", "fp32", "int8", "drop", "max_drop", "fidelity", "frames", ...}``.
    """
    t0 = time.perf_counter()
    run_backend = "openvino" if backend == "openvino" else "onnxruntime"
    records = list(records)
    if len(records) > recipe.gate_frames:
        idx = np.linspace(0, len(records) - 1, recipe.gate_frames).round().astype(int)
        records = [records[i] for i in idx]
    task = info.task
    max_drop = recipe.max_drop_for(task) if max_drop is None else float(max_drop)
    preds = [GatePredictor(fp32_path, info, fp32_backend or run_backend, "fp32"),
             GatePredictor(int8_path, info, run_backend, "int8")]
    scored = [r for r in records if _has_target(task, r)]
    metric, scores, notes = None, [{}, {}], []
    try:
        if task in ("seg", "cls", "enhance") and scored:
            from usfm_edge.evaluation.evaluate import PRIMARY, evaluate_predictor  # the one scoring path

            scores = [evaluate_predictor(p, scored, task) for p in preds]
            metric = PRIMARY[task]
            if task == "cls" and any(math.isnan(float(s.get("auc", float("nan")))) for s in scores):
                metric = "accuracy"
                notes.append("AUC undefined on the held-out frames (one class): accuracy used")
        else:
            notes.append("no held-out labels for the task metric: fidelity only")
            for p in preds:
                for r in records:
                    p.predict(read_image(r.image))
    finally:
        for p in preds:
            p.close()
    fid = fidelity(preds[0].outputs, preds[1].outputs, int(info.spec.img_size))
    failures = []
    drop = None
    if metric is not None:
        drop = float(scores[0][metric]) - float(scores[1][metric])
        if max_drop is not None and drop > max_drop:
            failures.append(f"{metric} drop {drop:.4f} > max_drop {max_drop} "
                            f"(fp32 {scores[0][metric]:.4f}, int8 {scores[1][metric]:.4f})")
    hc_increase = None
    if all("hc_mae_mm" in sc for sc in scores):  # fetal-head records with a reference circumference (HC18)
        hc_increase = float(scores[1]["hc_mae_mm"]) - float(scores[0]["hc_mae_mm"])
        limit = recipe.max_hc_increase_mm
        if limit is not None and hc_increase > limit:
            failures.append(f"head-circumference error up {hc_increase:.2f} mm > {limit} mm "
                            f"(fp32 {scores[0]['hc_mae_mm']:.2f}, int8 {scores[1]['hc_mae_mm']:.2f} mm)")
    main = fid.get(_MAIN.get(task, ""), {})
    cc = main.get("centred_cosine_mean")
    if cc is not None and cc < recipe.min_centred_cosine:
        failures.append(f"{_MAIN[task]}: mean centred cosine {cc:.4f} < {recipe.min_centred_cosine}")
    keep = ("dice", "iou", "hd95", "auc", "accuracy", "balanced_accuracy", "psnr", "ssim", "hc_mae_mm")

    def pick(s: dict) -> dict:
        return {k: (round(float(v), 5) if math.isfinite(float(v)) else None) for k, v in s.items()
                if k in keep and v is not None}

    return {"passed": not failures, "failures": failures, "task": task, "metric": metric,
            "fp32": pick(scores[0]), "int8": pick(scores[1]), "drop": None if drop is None else round(drop, 5),
            "hc_increase_mm": None if hc_increase is None else round(hc_increase, 3),
            "max_drop": max_drop, "min_centred_cosine": recipe.min_centred_cosine, "fidelity": fid,
            "frames": len(preds[0].outputs), "scored_frames": len(scored) if metric else 0,
            "held_out_patients": len({(r.organ, r.patient) for r in records}),
            "backend": run_backend, "notes": notes, "seconds": round(time.perf_counter() - t0, 2)}


def sensitivity_report(fp32_path: str | Path, int8_path: str | Path, info: GraphInfo, frames: Sequence[np.ndarray],
                       backend: str, workdir: str | Path, top_k: int = 5) -> dict:
    """The ``top_k`` layers whose quantisation adds most error (int8 vs fp32 intermediate outputs).

    ``added`` = relative L2 error of the layer's output minus the largest error on its float inputs.
    """
    t0 = time.perf_counter()
    frames = list(frames)[:4]
    try:
        if backend == "openvino":
            from usfm_edge.calibration.backends.nncf_openvino import openvino_layer_errors

            rows = openvino_layer_errors(fp32_path, int8_path, frames, info)
        else:
            from usfm_edge.calibration.backends.ort_qdq import onnx_layer_errors

            rows = onnx_layer_errors(fp32_path, int8_path, frames, workdir)
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the gate's own result
        log.warning("sensitivity analysis failed: %s", exc)
        return {"method": "intermediate outputs", "error": f"{type(exc).__name__}: {exc}", "layers": []}
    rows.sort(key=lambda r: r["added"], reverse=True)
    return {"method": "int8 vs fp32 intermediate outputs (relative L2), error added per layer",
            "frames": len(frames), "layers": rows[:top_k], "quantized_layers": len(rows),
            "hint": "keep these layers in float (nodes_to_exclude / nncf.IgnoredScope) or improve the calibration set",
            "seconds": round(time.perf_counter() - t0, 2)}
