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

    floor = {"busbra": 0.8, "hc18": 0.95}  # held-out Dice of the shipped models (RESULTS.md): 0.810 and 0.956
    for key, name in DEMO_CHECKPOINTS.items():
        path = checkpoints_dir() / name
        assert path.stat().st_size < 20e6
        model = load_task_model(path)
        assert model.task == "seg" and len(model.labels) == 2 and model.head_name == "hybrid"
        extra = model.checkpoint_config["extra"]
        assert extra["metrics"]["dice"] > floor[key] and extra["split"]["val_images"] >= 150
    hc = load_task_model(checkpoints_dir() / DEMO_CHECKPOINTS["hc18"]).checkpoint_config["extra"]["metrics"]
    assert hc["hc_mae_mm"] < 3.5


def test_demo_students_are_distilled_from_the_demo_models_on_their_split():
    """The shipped edge students: nano backbone + thin stride-2 hybrid head, distilled (task mode) from the shipped
    models, scored on the teachers' held-out patients (RESULTS.md §9)."""
    from usfm_edge.bench.demo import DEMO_CHECKPOINTS, DEMO_STUDENTS, checkpoints_dir
    from usfm_edge.models.tasks import load_task_model

    for key, name in DEMO_STUDENTS.items():
        path = checkpoints_dir() / name
        assert path.stat().st_size < 4e6
        student = load_task_model(path)
        teacher = load_task_model(checkpoints_dir() / DEMO_CHECKPOINTS[key])
        assert student.preset == "usfm_vit_nano_patch16_224" and student.head_name == "hybrid"
        assert student.head_args["stem_stride"] == 2  # no full-size level (RESULTS.md §9)
        assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 5
        s_extra, t_extra = student.checkpoint_config["extra"], teacher.checkpoint_config["extra"]
        assert s_extra["distill"]["mode"] == "task" and s_extra["distill"]["teacher"] == DEMO_CHECKPOINTS[key]
        assert s_extra["split"]["val_images"] == t_extra["split"]["val_images"]
        assert student.labels == teacher.labels and s_extra["metrics"]["dice"] > 0.9 * t_extra["metrics"]["dice"]


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
    assert res["settings"]["isolate"] is True and res["settings"]["rounds"] == 2
    assert "fresh process(es) of its own" in r.output


def test_isolated_timing_process_on_a_real_frame(demo_bundle, sample_dir):
    """One variant in a process of its own: the timings asked for, the paced calls and its peak memory."""
    from usfm_edge.bench.memprobe import run_isolated

    ckpt, bundle = demo_bundle
    frame = next(p for p in sorted((sample_dir / "busbra" / "Images").glob("*.png")))
    res = run_isolated("bundle", bundle, frame, threads=1,
                       timing={"batches": [1, 2], "runs": 3, "warmup": 1, "fps": 100.0})
    assert {k: len(v) for k, v in res["times"].items()} == {"1": 3, "2": 3}
    assert all(t > 0 for t in res["times"]["1"]) and len(res["paced"]["times_ms"]) == 3
    assert 50 < res["peak_rss_mb"] < 4000
    with pytest.raises(RuntimeError, match="exited with"):
        run_isolated("bundle", sample_dir / "no-such.usfm", frame, threads=1, timing={"batches": [1], "runs": 1})


def test_bench_one_process_mode(demo_bundle, tmp_path, sample_dir):
    ckpt, bundle = demo_bundle
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(bundle), "--torch", str(ckpt), "--runs", "4", "--eval-frames", "0",
                                  "--threads", "1", "--one-process", "--no-memory", "--fps", "200",
                                  "--data", f"busbra:{sample_dir / 'busbra'}", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["settings"]["isolate"] is False and "all variants in one process" in r.output
    assert {row["name"] for row in res["rows"]} == {"pytorch-fp32", bundle.name.removesuffix(".usfm")}
    assert all(row["peak_rss_mb"] is None for row in res["rows"])  # --no-memory
    assert [p["runs"] for p in res["paced"]] == [4, 4]


class _FakeClock:
    """A clock that only moves when the code under test sleeps or a fake call takes time."""

    def __init__(self):
        self.t, self.sleeps = 100.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_paced_latency_waits_for_each_frame_slot_and_counts_overruns():
    from usfm_edge.bench.latency import paced_latency

    clock = _FakeClock()
    durations = iter([0.010, 0.080, 0.010, 0.010])  # s; the frame period at 20 fps is 50 ms

    def call():
        clock.t += next(durations)

    res = paced_latency(call, fps=20, runs=4, clock=clock, sleep=clock.sleep)
    assert res["runs"] == 4 and res["over_budget"] == 1 and res["period_ms"] == pytest.approx(50.0)
    assert res["p50_ms"] == pytest.approx(10.0) and res["p99_ms"] > 70
    # frames arrive at 50, 100, 150, 200 ms: idle 50 ms, then 40 ms after the 10 ms call; the 80 ms call
    # ends at 180 ms with frame 3 waiting (no idle); frame 4 arrives 10 ms after frame 3's call returns
    assert clock.sleeps == pytest.approx([0.050, 0.040, 0.010])


def test_rotating_rounds_split_the_runs_and_rotate_the_order():
    from usfm_edge.bench.latency import rotating_rounds

    jobs = rotating_rounds(["a", "b", "c"], runs=5, rounds=2)
    assert jobs == [(3, "a"), (3, "b"), (3, "c"), (2, "b"), (2, "c"), (2, "a")]
    assert rotating_rounds(["a", "b"], runs=1, rounds=3) == [(1, "a"), (1, "b")]  # never a round without runs


def test_paced_latency_rejects_bad_rates():
    from usfm_edge.bench.latency import paced_latency
    from usfm_edge.core.errors import ConfigError

    with pytest.raises(ConfigError, match="fps"):
        paced_latency(lambda: None, fps=0, runs=3)
    with pytest.raises(ConfigError, match="runs"):
        paced_latency(lambda: None, fps=10, runs=0)


def test_bench_cli_paced_rows(demo_bundle, tmp_path, sample_dir):
    ckpt, bundle = demo_bundle
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(bundle), "--runs", "3", "--eval-frames", "0", "--no-memory",
                                  "--threads", "1", "--fps", "50", "--no-spin", "--data", f"busbra:{sample_dir / 'busbra'}",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "At 50 frames/s" in r.output and "calls over the frame period" in r.output
    res = json.loads(out.read_text())
    (paced,) = res["paced"]
    assert paced["name"] == bundle.name.removesuffix(".usfm") and paced["runs"] == 3 and paced["fps"] == 50
    assert 0 < paced["p50_ms"] <= paced["p99_ms"] and paced["p50_vs_back_to_back"] > 0
    assert res["settings"]["fps"] == 50 and res["settings"]["spin"] is False
    r = CliRunner().invoke(main, ["bench", str(bundle), "--fps", "0"])
    assert r.exit_code == 2 and "--fps" in r.output


def test_bench_needs_something():
    r = CliRunner().invoke(main, ["bench"])
    assert r.exit_code == 2 and "nothing to benchmark" in r.output


def test_evaluate_static_shape_bundle_on_frames_of_any_size(tmp_path, sample_dir):
    from usfm_edge.bench.demo import DEMO_CHECKPOINTS, checkpoints_dir
    from usfm_edge.evaluation.evaluate import evaluate
    from usfm_edge.export import export

    bundle = export(checkpoints_dir() / DEMO_CHECKPOINTS["busbra"], target="jetson", out=tmp_path / "j.usfm")
    res = evaluate(bundle, f"busbra:{sample_dir / 'busbra'}", split="all", limit=3)
    assert res["frames_resized_to"] == [256, 256] and res["precision"] == "fp16"
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
    assert r.exit_code == 4, r.output  # nothing ran: a missing backend/device, never an empty table and exit 0
    assert "nothing was benchmarked" in r.output and "sees no CUDA device" in r.output
    assert "no CUDA provider" in r.output and "usfm-edge[onnx]" not in r.output  # onnxruntime IS installed
    assert not out.exists()


def test_unstable_rows_are_marked_and_the_plot_axis_shows_the_real_spread(tmp_path):
    """p90 > 2x p50, or a load above the core count, marks a row unstable in the table; the Dice axis of the
    plot spans at least 5 points, so INT8 cannot look better than fp32 by a thousandth."""
    from usfm_edge.bench.latency import stability
    from usfm_edge.bench.report import markdown, metric_axis, plot

    assert stability(124.0, 926.0, 1.0, 2) == ["p90 926.0 ms > 2x p50 124.0 ms"]
    assert stability(20.0, 25.0, 4.5, 2) == ["load 4.5 > 2 cores"]
    assert stability(20.0, 25.0, 1.9, 2) == []
    row = {"backend": "onnxruntime", "target": "jetson", "device": "cpu", "batch": 1, "p99_ms": 30.0, "fps": 40.0,
           "ratio_vs_torch": 1.0, "size_mb": 5.0, "rss_mb": 10.0, "peak_rss_mb": 300.0, "metric": "dice"}
    rows = [{**row, "name": "seg-jetson-fp16", "precision": "fp16", "p10_ms": 20.0, "p50_ms": 22.0, "p90_ms": 25.0,
             "metric_value": 0.951, "unstable": []},
            {**row, "name": "seg-jetson-int8", "precision": "int8", "p10_ms": 11.0, "p50_ms": 12.0, "p90_ms": 40.0,
             "metric_value": 0.952, "unstable": stability(12.0, 40.0, None, 2)}]
    result = {"machine": {"cpu": "x", "cores": 2, "isa": ["avx2"], "gpus": [], "versions": {}},
              "settings": {"threads": 2, "runs": 5, "warmup": 1, "device": "cpu", "isolate": True, "rounds": 2},
              "rows": rows, "skipped": []}
    text = markdown(result)
    assert "| seg-jetson-int8 (unstable) |" in text and "| seg-jetson-fp16 |" in text
    assert "**Unstable rows**" in text and "seg-jetson-int8, batch 1: p90 40.0 ms > 2x p50 12.0 ms" in text
    lo, hi = metric_axis([0.951, 0.952], "dice")
    assert hi - lo >= 0.05 and lo < 0.951 and hi > 0.952
    assert plot(result, tmp_path / "b.png").stat().st_size > 1000
