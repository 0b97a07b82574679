"""`usfm-edge bench` smoke run, and bundles exported from the bundled demo checkpoints on real frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from usfm_edge.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    from usfm_edge.bench.demo import DEMO_CHECKPOINTS, checkpoints_dir
    from usfm_edge.export import export

    ckpt = checkpoints_dir() / DEMO_CHECKPOINTS["busbra"]
    out = tmp_path_factory.mktemp("demo") / "busbra-onnx-fp32.usfm"
    return ckpt, export(ckpt, target="onnx", out=out)


def test_demo_checkpoints_are_small_task_models():
    from usfm_edge.bench.demo import DEMO_CHECKPOINTS, checkpoints_dir
    from usfm_edge.models.tasks import load_task_model

    for name in DEMO_CHECKPOINTS.values():
        path = checkpoints_dir() / name
        assert path.stat().st_size < 20e6
        model = load_task_model(path)
        assert model.task == "seg" and len(model.labels) == 2
        assert model.checkpoint_config["extra"]["metrics"]["dice"] > 0.3  # a trained model, not random weights


def test_demo_bundle_runs_on_real_frames_of_any_size(demo_bundle, sample_frames):
    from usfm_edge.runtime import Engine

    _, bundle = demo_bundle
    with Engine.open(bundle) as engine:
        for frame in sample_frames:  # BUS-BRA ~300x280 and HC18 540x800
            res = engine.predict(frame)
            assert res.mask.shape == frame.shape and res.probs.shape == (2, *frame.shape)
            assert np.allclose(res.probs.sum(0), 1.0, atol=1e-4)
        meta = json.loads((bundle / "usfm.json").read_text())
        assert meta["parity"]["passed"] and meta["task"] == "seg"


def test_bench_cli_smoke(demo_bundle, tmp_path, sample_dir):
    ckpt, bundle = demo_bundle
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(bundle), "--torch", str(ckpt), "--runs", "3", "--eval-frames", "3",
                                  "--threads", "1", "--data", f"busbra:{sample_dir / 'busbra'}", "--json", str(out),
                                  "--md", str(tmp_path / "bench.md"), "--plot", str(tmp_path / "bench.png")])
    assert r.exit_code == 0, r.output
    for col in ("p50 ms", "p90 ms", "p99 ms", "frames/s", "speed-up vs PyTorch fp32", "size MB", "peak RSS MB",
                "RSS added MB", "task metric"):
        assert col in r.output
    res = json.loads(out.read_text())
    rows = {row["name"]: row for row in res["rows"]}
    assert set(rows) == {"pytorch-fp32", bundle.name.removesuffix(".usfm")}
    for row in rows.values():
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["fps"] > 0
        assert row["metric"] == "dice" and 0.0 <= row["metric_value"] <= 1.0
        assert 50 < row["peak_rss_mb"] < 4000  # a fresh process holding the interpreter, the backend and the model
    assert rows["pytorch-fp32"]["ratio_vs_torch"] == pytest.approx(1.0)
    # fp32 bundle and PyTorch run the same graph: the same task metric on the same frames
    assert rows[bundle.name.removesuffix(".usfm")]["metric_value"] == pytest.approx(rows["pytorch-fp32"]["metric_value"],
                                                                                    abs=1e-3)
    assert res["machine"]["cores"] and (tmp_path / "bench.png").is_file()


def test_bench_needs_something():
    r = CliRunner().invoke(main, ["bench"])
    assert r.exit_code == 2 and "nothing to benchmark" in r.output


def test_evaluate_static_shape_bundle_on_frames_of_any_size(tmp_path, sample_dir):
    from usfm_edge.bench.demo import DEMO_CHECKPOINTS, checkpoints_dir
    from usfm_edge.evaluation.evaluate import evaluate
    from usfm_edge.export import export

    bundle = export(checkpoints_dir() / DEMO_CHECKPOINTS["busbra"], target="jetson", out=tmp_path / "j.usfm")
    res = evaluate(bundle, f"busbra:{sample_dir / 'busbra'}", split="all", limit=3)
    assert res["frames_resized_to"] == [128, 128] and res["precision"] == "fp16"
    assert 0.0 <= res["metrics"]["dice"] <= 1.0 and res["metrics"]["n"] == 3


def test_bench_on_a_missing_device_skips_with_reasons(demo_bundle, tmp_path, sample_dir):
    """`--device cuda` on a machine without CUDA: every variant is reported as skipped, none silently runs on CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the skip path is not reachable")
    ckpt, bundle = demo_bundle
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(bundle), "--torch", str(ckpt), "--device", "cuda", "--runs", "2",
                                  "--eval-frames", "0", "--no-memory", "--data", f"busbra:{sample_dir / 'busbra'}",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["rows"] == []
    reasons = {s["bundle"]: s["reason"] for s in res["skipped"]}
    assert "CUDA" in reasons[str(bundle)] and "sees no CUDA device" in reasons[f"{ckpt} (PyTorch fp32)"]
    assert "Skipped" in r.output
