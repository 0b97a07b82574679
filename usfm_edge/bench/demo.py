"""``usfm-edge demo``: the whole pipeline on the bundled real sample, in a few minutes on 2 CPU cores.

1. the bundled demo checkpoints (tiny USFM backbones fine-tuned on BUS-BRA lesions and HC18 fetal heads,
   fp16 safetensors in ``usfm_edge/assets/checkpoints``; the README says how they were made);
2. export the BUS-BRA model to ONNX Runtime and OpenVINO (fp32), to the Jetson target (TensorRT-ready ONNX
   and its ``build_engine.sh``), and to INT8 (OpenVINO + NNCF, ONNX Runtime Q/DQ) calibrated on the bundled
   real frames behind the accuracy gate; the HC18 model to OpenVINO INT8; the BUS-BRA edge student (distilled
   from the BUS-BRA model) to OpenVINO INT8;
3. predict the sample frames with the bundles (overlay PNGs, results.json/csv, head circumference in mm);
4. benchmark every bundle against PyTorch fp32 (each in processes of its own) and print the table.

Every output path is printed at the end.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

DEMO_CHECKPOINTS = {"busbra": "busbra_seg_tiny.safetensors", "hc18": "hc18_seg_tiny.safetensors"}
# the edge students distilled from them (``usfm-edge distill``; benchmarks/RESULTS.md §9)
DEMO_STUDENTS = {"busbra": "busbra_seg_nano.safetensors", "hc18": "hc18_seg_nano.safetensors"}


def checkpoints_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / "checkpoints"


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def head_circumference_table(bundle: Path, data: str) -> list[dict]:
    """Predict each HC18 sample frame and compare the head circumference (ellipse fit, mm) with the reference."""
    from usfm_edge.core.geometry import head_circumference_mm, size_bin
    from usfm_edge.data.readers import read_image
    from usfm_edge.data.sources import load_records
    from usfm_edge.runtime import Engine

    rows = []
    with Engine.open(bundle) as engine:
        for r in load_records(data):
            if r.hc_mm is None or not r.pixel_size_mm:
                continue
            res = engine.predict(read_image(r.image), pixel_spacing_mm=r.pixel_size_mm)
            hc = head_circumference_mm(res.mask > 0, r.pixel_size_mm)
            rows.append({"frame": r.image.name, "pixel_mm": r.pixel_size_mm, "hc_pred_mm": round(hc, 1),
                         "hc_ref_mm": r.hc_mm, "abs_diff_mm": round(abs(hc - r.hc_mm), 1), "bin": size_bin(r.hc_mm)})
    return rows


def _write_hc(path: Path, rows: list[dict]) -> Path:
    from usfm_edge.core.io import atomic_write_text

    lines = ["| frame | pixel mm | size bin | predicted HC mm | reference HC mm | abs. difference mm |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['frame']} | {r['pixel_mm']:.3f} | {r['bin']} | {r['hc_pred_mm']} | {r['hc_ref_mm']} | "
              f"{r['abs_diff_mm']} |" for r in rows]
    if rows:
        mae = sum(r["abs_diff_mm"] for r in rows) / len(rows)
        bins = {}
        for r in rows:
            bins.setdefault(r["bin"], []).append(r["abs_diff_mm"])
        per_bin = ", ".join(f"{b} mm: {sum(v) / len(v):.1f} ({len(v)})" for b, v in sorted(bins.items()))
        lines.append(f"\nMean absolute difference over {len(rows)} frames: {mae:.1f} mm; by head size {per_bin} "
                     "(some sample frames may be in the demo model's training split: this shows the pipeline, "
                     "not the model's accuracy; see benchmarks/RESULTS.md for held-out numbers).")
    text = "\n".join(lines) + "\n"
    print(text)
    return atomic_write_text(path, text)


def run_demo(out: str | Path = "demo_out", runs: int = 20, int8: bool = True) -> dict:
    """Run the demo; returns {"bundles": [...], "predictions": [...], "bench": {...}, "outputs": [...]}."""
    from usfm_edge.core.errors import ConfigError
    from usfm_edge.data import sample_dir
    from usfm_edge.export import export

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ck = {k: checkpoints_dir() / v for k, v in DEMO_CHECKPOINTS.items()}
    ck["busbra-student"] = checkpoints_dir() / DEMO_STUDENTS["busbra"]
    missing = [str(p) for p in ck.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"demo checkpoints missing: {', '.join(missing)}")
    sample = sample_dir()
    busbra, hc18 = f"busbra:{sample / 'busbra'}", f"hc18:{sample / 'hc18'}"
    t_start = time.time()
    outputs: list[Path] = []
    bundles: dict[str, Path] = {}
    jobs = [("busbra-onnx-fp32", ck["busbra"], "onnx", "fp32", None),
            ("busbra-openvino-fp32", ck["busbra"], "openvino", "fp32", None),
            ("busbra-jetson-fp16", ck["busbra"], "jetson", "fp16", None)]
    frame_size = {"busbra-jetson-fp16": (416, 512)}  # a static scanner frame size; the runtime fits other frames
    if int8:
        jobs += [("busbra-openvino-int8", ck["busbra"], "openvino", "int8", busbra),
                 ("busbra-onnx-int8", ck["busbra"], "onnx", "int8", busbra),
                 ("hc18-openvino-int8", ck["hc18"], "openvino", "int8", hc18),
                 ("busbra-student-openvino-int8", ck["busbra-student"], "openvino", "int8", busbra)]
    for i, (name, ckpt, target, precision, calib) in enumerate(jobs, 1):
        _say(f"export {i}/{len(jobs)}: {name} ...")
        kw = {"frame_size": frame_size[name]} if name in frame_size else {}
        if calib:
            from usfm_edge.calibration import make_quantizer

            # the bundled sample is small (22 BUS-BRA / 17 HC18 frames, a few of them held out for the gate): accept
            # it, with the warning it earns, and gate at 5 Dice points instead of 1; calibrated on the full data the
            # same models stay within 0.15 (BUS-BRA) and 0.54 (HC18) Dice points (benchmarks/RESULTS.md §2)
            _say(f"  {name}: calibrated on the bundled sample only; accuracy gate limit 0.05 Dice (full data: 0.01)")
            kw["quantizer"] = make_quantizer([calib], n=300, min_frames=8, seed=0, max_drop=0.05)
        path = export(ckpt, target=target, precision=precision, out=out / f"{name}.usfm", **kw)
        bundles[name] = path
        outputs.append(path)
    _say("predict the sample frames ...")
    from usfm_edge.runtime.predict_cli import run_predict

    preds = []
    for name, frames in (("busbra-openvino-fp32", sample / "busbra" / "Images"),
                         ("hc18-openvino-int8" if int8 else None, sample / "hc18" / "training_set")):
        if name is None or name not in bundles:
            continue
        files = sorted(p for p in frames.glob("*.png") if "Annotation" not in p.name)[:6]
        pred_dir = out / f"predict-{name}"
        res = run_predict(bundles[name], files, pred_dir, pixel_spacing=None, progress=False)
        preds.append({"bundle": name, "out": str(pred_dir), "frames": len(res.get("records", res.get("frames", [])))})
        outputs.append(pred_dir)
    if "hc18-openvino-int8" in bundles:
        hc_rows = head_circumference_table(bundles["hc18-openvino-int8"], hc18)
        outputs.append(_write_hc(out / "hc18_head_circumference.md", hc_rows))
    _say(f"benchmark {len([b for b in bundles if b.startswith('busbra')])} bundles against PyTorch fp32 ...")
    from usfm_edge.bench.latency import run_bench
    from usfm_edge.bench.report import markdown, write_all

    result = run_bench([p for n, p in bundles.items() if n.startswith("busbra")], ck["busbra"], data=busbra,
                       batches=(1,), threads=2, runs=runs, warmup=3, eval_frames=8)
    command = "usfm-edge demo"
    outputs += write_all(result, out / "bench.json", out / "bench.md", out / "bench.png", command)
    print(markdown(result, command))
    _say(f"done in {time.time() - t_start:.0f} s; outputs:")
    for p in outputs:
        print(f"  {p}")
    return {"bundles": {k: str(v) for k, v in bundles.items()}, "predictions": preds, "bench": result,
            "outputs": [str(p) for p in outputs]}
