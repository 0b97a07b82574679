"""The U-Net baseline of benchmarks/unet_baseline.py trains through the same fine-tuning loop and is scored the same way."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

torch = pytest.importorskip("torch")


def _module():
    return load_benchmark("unet_baseline")


def test_unet_shapes():
    mod = _module()
    net = mod.UNetTaskModel(["background", "lesion"], 64, widths=(4, 8, 16))
    out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2, 64, 64) and net.forward_train(torch.randn(1, 3, 64, 64))["out"].shape == (1, 2, 64, 64)


def test_unet_baseline_runs_the_finetune_loop(tmp_path, sample_dir):
    mod = _module()
    torch.set_num_threads(1)
    out = tmp_path / "unet"
    rc = mod.main(["--out", str(out), "--data", f"busbra:{sample_dir / 'busbra'}", "--img-size", "64",
                   "--widths", "4,8,16", "--epochs", "1", "--batch-size", "4", "--eval-every", "1",
                   "--time-limit-min", "2"])
    assert rc == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n"] > 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log) and any(r.get("event") == "eval" for r in log)
