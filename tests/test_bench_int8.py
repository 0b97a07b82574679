"""benchmarks/bench_int8.py names the CPU class it detects (never a fixed ISA in its text)."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

pytest.importorskip("torch")


def _module():
    return load_benchmark("bench_int8")


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
