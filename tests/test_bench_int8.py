"""benchmarks/bench_int8.py names the CPU class it detects (never a fixed ISA in its text)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("bench_int8", ROOT / "benchmarks" / "bench_int8.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_class_from_flags():
    mod = _module()
    assert mod.cpu_class({"avx2", "fma"}).startswith("AVX2 only")
    assert mod.cpu_class({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}).startswith("AVX-512 VNNI")
    assert "native bf16" in mod.cpu_class({"avx512_vnni", "avx512_bf16"})
    assert mod.cpu_class({"avx2", "avx512_vnni", "amx_int8", "amx_bf16"}).startswith("AMX")


def test_report_text_names_the_detected_class():
    mod = _module()
    m = mod.machine()
    result = {"machine": {**m, "load_avg_end": (0, 0, 0)}, "command": "x", "threads": 2, "runs": 1, "rounds": 1,
              "one_process": False, "data": "sample", "presets": []}
    text = mod.markdown(result)
    assert m["cpu_class"] in text and "this AVX2 CPU" not in text
