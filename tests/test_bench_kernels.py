"""The band-stop benchmark's timing schedule and a tiny end-to-end run on real sample frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_kernels")


def _recorder(log, name):
    return lambda: log.append(name)


def test_interleave_alternates_single_calls(bench):
    log = []
    times = bench.interleave({"a": _recorder(log, "a"), "b": _recorder(log, "b")}, runs=3, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    # warm-up a, b; then rounds with a rotating start: ab, ba, ab
    assert log == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_interleave_blocks_have_an_untimed_call_first(bench):
    log = []
    times = bench.interleave({"a": _recorder(log, "a"), "b": _recorder(log, "b")}, runs=4, warmup=0, block=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    # two rounds; per variant one untimed + two timed calls, back to back
    assert log == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3


def test_idle_probe_reports_both_medians(bench):
    probe = bench.idle_probe(lambda: None, calls=2, idle_s=0.001)
    assert set(probe) == {"back_to_back_ms", "after_idle_ms", "idle_ms", "calls"}
    assert probe["after_idle_ms"] >= 0 and probe["calls"] == 2


def test_part_a_end_to_end_reports_both_timing_modes(bench, tmp_path):
    bench.main(["--part", "a", "--batch", "4", "--runs", "2", "--warmup", "0", "--block", "2",
                "--no-mkl-shim", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert {r["block"] for r in res["repeats"]} == {1, 2}
    for key in ("torch", "torch_alternating"):
        rows = res[key]
        assert rows[bench.DEFAULT_VARIANT]["max_abs_err"] < 1e-5  # fp32 vs the float64 numpy reference
        assert rows[bench.REFERENCE_VARIANT]["runs"] == 2
    assert res["idle_probe"]["back_to_back_ms"] > 0
    md = (tmp_path / "kernels.md").read_text()
    assert "blocks of 2 calls after an untimed one" in md and "alternating single calls" in md
    assert "Idle probe" in md
