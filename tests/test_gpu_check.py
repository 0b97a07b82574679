"""The prepared GPU run (benchmarks/gpu_check.sh) as a CPU dry run: the same steps and code, small sizes.

A lent GPU machine gives 15 minutes in all; a script that breaks there wastes them. On a CPU the script must
run every step to the end (rc=0) and write its JSON/Markdown results; only the CUDA-only pieces (the Triton
kernel) are recorded as failed with their reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "DEVICE": "cpu", "SMALL": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    for step in ("env", "kernels_test", "kernels_bench", "pretrain_gpu", "export", "bench"):
        assert f"end {step} rc=0" in log, log
    kernels = json.loads((tmp_path / "kernels_gpu.json").read_text())
    assert kernels["device"] == "cpu" and kernels["torch_fft_max_err"] < 1e-5 and kernels["torch_fft_ms"] > 0
    assert "CUDA" in kernels["torch_triton"]  # the GPU-only kernel says why it did not run
    pretrain = json.loads((tmp_path / "pretrain_gpu.json").read_text())
    assert {r["amp"] for r in pretrain} == {"fp32", "bf16"} and all(r["images_per_s"] > 0 for r in pretrain)
    bench = json.loads((tmp_path / "bench_gpu.json").read_text())
    names = {r["name"] for r in bench["rows"]}
    assert {"pytorch-fp32", "seg-onnx-fp32", "seg-trt-fp16"} <= names
    assert (tmp_path / "bench_gpu.md").is_file() and not (tmp_path / "b").exists()
