"""Fine-tuning end to end at test size on bundled real frames, and `evaluate` reproducing the run's metrics."""

from __future__ import annotations

import json

import pytest
import torch

from usfm_edge.evaluation.evaluate import evaluate
from usfm_edge.train.finetune import fit_finetune, load_finetune_config

torch.set_num_threads(1)  # shared CI cores: spinning OpenMP threads make tiny models much slower


@pytest.mark.parametrize("task,source,metric", [("seg", "busbra", "dice"), ("cls", "busbra", "auc"),
                                                ("enhance", "hc18", "psnr")])
def test_finetune_then_evaluate_reproduces(tmp_path, sample_dir, task, source, metric):
    data = f"{source}:{sample_dir / source}"
    cfg = load_finetune_config(None, {"task": task, "data": [data], "model": "usfm_vit_test", "img_size": 64,
                                      "epochs": 1, "batch_size": 4, "max_steps": 3, "eval_every": 1,
                                      "val_fraction": 0.3, "warmup_epochs": 0.0, "log_every": 1})
    res = fit_finetune(cfg, tmp_path / "run", progress=False)
    assert res.best.is_file() and res.last.is_file()
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["primary"] == metric and metric in res.metrics
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log) and any(r.get("event") == "eval" for r in log)
    # the saved checkpoint carries task, labels and preprocessing: evaluate needs nothing else
    again = evaluate(res.last, data, split="val", val_fraction=0.3)
    assert again["task"] == task
    assert again["metrics"][metric] == pytest.approx(res.metrics[metric], rel=1e-5, abs=1e-6)


def test_label_fraction_is_patient_level_and_seeded(sample_dir):
    from usfm_edge.train.finetune import _splits

    cfg = load_finetune_config(None, {"task": "seg", "data": [f"busbra:{sample_dir / 'busbra'}"],
                                      "label_fraction": 0.5, "val_fraction": 0.25})
    _, train_a, val_a = _splits(cfg)
    _, train_b, val_b = _splits(cfg)
    assert [r.image for r in train_a] == [r.image for r in train_b]
    assert not {r.patient for r in train_a} & {r.patient for r in val_a}
    full = load_finetune_config(None, {"task": "seg", "data": [f"busbra:{sample_dir / 'busbra'}"], "val_fraction": 0.25})
    _, train_full, _ = _splits(full)
    assert {r.patient for r in train_a} < {r.patient for r in train_full}


@pytest.mark.parametrize("name, source, head", [
    ("busbra_seg_nano", "busbra", "auto"),   # a student: widths 16-128 and a stride-2 stem come from the file
    ("busbra_seg_nano", "busbra", "hybrid"),
    ("hc18_seg_tiny", "busbra", "auto"),     # another organ's 2-class model: class names differ, heads still load
])
def test_init_from_a_task_checkpoint_starts_from_its_whole_network(sample_dir, name, source, head):
    from types import SimpleNamespace

    from usfm_edge.bench.demo import checkpoints_dir
    from usfm_edge.models.checkpoint import read_checkpoint_config
    from usfm_edge.train.finetune import _labels, _model, _splits

    path = checkpoints_dir() / f"{name}.safetensors"
    ck = read_checkpoint_config(path)
    cfg = load_finetune_config(None, {"task": "seg", "data": [f"{source}:{sample_dir / source}"], "init": str(path),
                                      "model": ck["model"], "head": head, "img_size": ck["img_size"]})
    records, _, _ = _splits(cfg)
    model = _model(cfg, _labels(cfg, records), None, SimpleNamespace(device="cpu"), None)
    assert model.load_report.missing == [] and model.load_report.heads_fresh is None, model.load_report.summary()
    assert model.head_name == ck["head"] and model.head_args["widths"] == ck["head_args"]["widths"]
    assert model.labels == ["background", "lesion"]  # the data's classes, the checkpoint's weights
    # another head by name: that head, fresh, and the report says why
    other = _model(load_finetune_config(None, {**cfg.__dict__, "head": "light"}), model.labels, None,
                   SimpleNamespace(device="cpu"), None)
    assert other.head_name == "light" and "head 'hybrid' != 'light'" in other.load_report.heads_fresh


def test_init_from_a_task_checkpoint_of_another_preset_names_it(sample_dir):
    from types import SimpleNamespace

    from usfm_edge.bench.demo import checkpoints_dir
    from usfm_edge.core.errors import CheckpointError
    from usfm_edge.train.finetune import _model

    path = checkpoints_dir() / "busbra_seg_nano.safetensors"
    cfg = load_finetune_config(None, {"task": "seg", "data": [f"busbra:{sample_dir / 'busbra'}"], "init": str(path),
                                      "img_size": 160})  # --model left at its default, the tiny preset
    with pytest.raises(CheckpointError, match=r"finetune --model usfm_vit_nano_patch16_224") as err:
        _model(cfg, ["background", "lesion"], None, SimpleNamespace(device="cpu"), None)
    assert str(path) in str(err.value)
