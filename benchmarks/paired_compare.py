"""Two segmentation models on the same held-out frames, frame by frame: is the difference real?

A mean Dice of 0.872 against 0.877 on 300 frames says little until the per-frame differences are looked at:
both models see the same frames, so the paired difference (B - A per frame) and its bootstrap confidence
interval tell whether one model is better or the gap is within what another draw of patients would change.
Each model runs through ``evaluation.TorchPredictor`` (the raw-frame graph, as ``usfm-edge evaluate``), on the
split ``usfm-edge evaluate`` scores. HC18-style records also give the per-frame absolute HC error, overall and
per size bin.

A model is a task checkpoint (``load_task_model``) or a ``benchmarks/unet_baseline.py`` run's file.

Usage::

    python benchmarks/paired_compare.py --a runs/busbra_unet/last.safetensors \\
        --b usfm_edge/assets/checkpoints/busbra_seg_tiny.safetensors --data busbra:../shared/data/busbra \\
        --out benchmarks/results/paired/busbra_unet_vs_hybrid.json
Prints a Markdown summary; writes the per-frame values and the summary as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from usfm_edge.core import metrics as M  # noqa: E402
from usfm_edge.core.geometry import HC_SIZE_BINS  # noqa: E402
from usfm_edge.evaluation.records import read_frame, read_mask, select_records  # noqa: E402


def load_model(path: str):
    """A task model from a usfm-edge task checkpoint or a U-Net baseline run's safetensors."""
    from usfm_edge.models.checkpoint import read_checkpoint

    sd, cfg = read_checkpoint(path)
    if isinstance(cfg, dict) and cfg.get("model") == "unet_baseline":
        from unet_baseline import UNetTaskModel

        model = UNetTaskModel(cfg["labels"], cfg["img_size"], cfg["head_args"]["widths"])
        model.load_state_dict(sd, strict=True)
        return model.eval()
    from usfm_edge.models.tasks import load_task_model

    return load_task_model(path).eval()


def per_frame(path: str, records) -> dict:
    """Per-frame Dice and (HC18 records) HC absolute error of one model, in record order."""
    from usfm_edge.evaluation import TorchPredictor

    predictor = TorchPredictor(load_model(path))
    dice, hc_err, hc_ref = [], [], []
    t0 = time.perf_counter()
    for r in records:
        mask = predictor.predict(read_frame(r)).mask
        dice.append(M.dice(mask > 0, read_mask(r) > 0))
        if r.hc_mm is not None and r.pixel_size_mm:
            hc_err.append(abs(M.head_circumference_mm(mask > 0, r.pixel_size_mm) - r.hc_mm))
            hc_ref.append(r.hc_mm)
    return {"dice": dice, "hc_abs_err_mm": hc_err, "hc_ref_mm": hc_ref, "seconds": time.perf_counter() - t0}


def paired(a, b, n_boot: int = 10000, seed: int = 0, higher_is_better: bool = True) -> dict:
    """Mean of ``b - a`` with a percentile bootstrap 95% interval over frames, and how often b beats a (a larger
    value, or a smaller one for an error with ``higher_is_better=False``)."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"a": float(np.mean(a)), "b": float(np.mean(b)), "diff": float(d.mean()), "ci95": [float(lo), float(hi)],
            "b_better_frames": int((d > 0).sum() if higher_is_better else (d < 0).sum()),
            "a_better_frames": int((d < 0).sum() if higher_is_better else (d > 0).sum()), "n": int(d.size)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="first model (the reference of the difference)")
    ap.add_argument("--b", required=True, help="second model (difference = b - a)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--boot", type=int, default=10000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    records = select_records(args.data, args.split, args.val_fraction, args.split_seed)
    ra, rb = per_frame(args.a, records), per_frame(args.b, records)
    summary = {"a": args.a, "b": args.b, "data": args.data, "split": args.split, "frames": len(records),
               "dice": paired(ra["dice"], rb["dice"], args.boot)}
    lines = [f"{len(records)} {args.split} frames of {args.data}; a = {args.a}, b = {args.b}; 95% bootstrap "
             f"intervals of the mean paired difference ({args.boot} resamples)", "",
             "| metric | a | b | b - a | 95% CI | frames b better / a better |", "|---|---|---|---|---|---|"]

    def row(name: str, s: dict, fmt: str) -> None:
        lines.append(f"| {name} | {s['a']:{fmt}} | {s['b']:{fmt}} | {s['diff']:+{fmt}} | "
                     f"[{s['ci95'][0]:+{fmt}}, {s['ci95'][1]:+{fmt}}] | {s['b_better_frames']} / {s['a_better_frames']} |")

    row("Dice", summary["dice"], ".4f")
    if ra["hc_abs_err_mm"]:
        ref = np.asarray(ra["hc_ref_mm"])
        summary["hc_abs_err_mm"] = paired(ra["hc_abs_err_mm"], rb["hc_abs_err_mm"], args.boot, higher_is_better=False)
        row("HC abs error mm (lower is better)", summary["hc_abs_err_mm"], ".2f")
        for name, lo, hi in HC_SIZE_BINS:
            sel = (ref >= lo) & (ref < hi)
            if sel.sum() >= 2:
                s = paired(np.asarray(ra["hc_abs_err_mm"])[sel], np.asarray(rb["hc_abs_err_mm"])[sel], args.boot,
                           higher_is_better=False)
                summary[f"hc_abs_err_mm_{name}"] = s
                row(f"HC abs error mm, {name} ({s['n']} frames)", s, ".2f")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"summary": summary, "a": ra, "b": rb}, indent=1))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
