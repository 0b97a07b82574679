"""Distillation at test size on the bundled real frames: feature mode (masked student, teacher on another grid),
task mode from a seg teacher fine-tuned here (export + parity), exact resume, wrong teachers, 2-process Gloo DDP."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

from usfm_edge.core.errors import CheckpointError, ConfigError
from usfm_edge.data import sample_dir
from usfm_edge.models.checkpoint import read_checkpoint, save_checkpoint
from usfm_edge.models.distill import (
    DistillLossConfig,
    FeatureProjector,
    evenly_spaced_blocks,
    mean_fill,
    resize_map,
)
from usfm_edge.models.registry import create_model, model_args
from usfm_edge.train.distill import fit_distill, load_distill_config, load_teacher, run_distill

PRESET, SIZE = "usfm_vit_test", 64
SAMPLE = sample_dir()
FRAMES = [f"busbra:{SAMPLE / 'busbra'}", f"hc18:{SAMPLE / 'hc18'}"]
BUSBRA = f"busbra:{SAMPLE / 'busbra'}"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backbone_teacher(tmp_path_factory):
    """A seeded test-preset backbone at 96 px (grid 6x6): the student at 64 px (grid 4x4) gets resized targets."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    net = create_model(PRESET, img_size=96)
    save_checkpoint(path, net.state_dict(), {"model": PRESET, "model_args": model_args(PRESET, img_size=96),
                                             "task": "backbone"})
    return path


@pytest.fixture(scope="module")
def seg_teacher(tmp_path_factory):
    """A tiny hybrid-head seg teacher fine-tuned on the BUS-BRA sample with the finetune API."""
    from usfm_edge.train.finetune import fit_finetune, load_finetune_config

    cfg = load_finetune_config(None, {"task": "seg", "data": [BUSBRA], "model": PRESET, "img_size": SIZE,
                                      "head": "hybrid", "epochs": 1, "batch_size": 4, "max_steps": 3,
                                      "val_fraction": 0.3, "warmup_epochs": 0.0, "ema": 0.0, "amp": "off"})
    return fit_finetune(cfg, tmp_path_factory.mktemp("seg_teacher"), progress=False).last


def _feature_cfg(teacher, **kw):
    base = dict(teacher=str(teacher), model=PRESET, data=FRAMES, img_size=SIZE, batch_size=4, epochs=20,
                samples_per_epoch=16, lr=0.01, warmup_epochs=0.0, drop_path=0.0, workers=0, amp="off",
                save_every=0, log_every=1, device="cpu")
    base.update(kw)
    return load_distill_config(base)


def _log(run) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


# -- pieces ---------------------------------------------------------------------------------------------------
def test_blocks_masks_and_projection_pieces():
    assert evenly_spaced_blocks(12, 4) == (2, 5, 8, 11) and evenly_spaced_blocks(4, 4) == (0, 1, 2, 3)
    with pytest.raises(ConfigError):
        evenly_spaced_blocks(4, 6)
    x = torch.randn(2, 3, 32, 32)
    m = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])
    y = mean_fill(x, m, 16)
    assert torch.equal(y[1], x[1]) and torch.equal(y[0, :, 16:], x[0, :, 16:])
    assert torch.allclose(y[0, :, :16, :16], x[0].mean((1, 2))[:, None, None].expand(3, 16, 16))
    grid = torch.randn(1, 4, 14, 14)
    assert torch.allclose(resize_map(grid, (7, 7)), torch.nn.functional.avg_pool2d(grid, 2))  # area when shrinking
    assert resize_map(grid, (16, 16)).shape[-2:] == (16, 16) and resize_map(grid, (14, 14)) is grid
    proj = FeatureProjector(8, 16, 2, "cosine")
    s = [torch.randn(2, 8, 4, 4) for _ in range(2)]
    t = [torch.randn(2, 16, 6, 6) for _ in range(2)]  # another grid: resized to 4x4
    loss = proj(s, t)
    assert loss.ndim == 0 and 0 < float(loss.detach()) < 2
    with pytest.raises(ConfigError):
        DistillLossConfig(feature_loss="l2")


def test_config_flags_yaml_and_checks(tmp_path):
    import argparse

    from usfm_edge.train.distill import DistillConfig
    from usfm_edge.train.options import add_argparse_options, distill_options, overrides_from

    p = add_argparse_options(argparse.ArgumentParser(), distill_options)
    args = p.parse_args(["--out", "x", "--teacher", "t.safetensors", "--student", PRESET, "--data", "a",
                         "--mask-ratio", "0.3", "--head-widths", "4,8,16,32,64", "--alpha", "0.7", "--head-stride", "2"])
    yml = tmp_path / "kd.yaml"
    yml.write_text("batch_size: 8\nloss:\n  temperature: 4.0\n  mask_ratio: 0.5\n")
    cfg = load_distill_config(yml, overrides_from(args, distill_options))
    assert (cfg.model, cfg.data, cfg.batch_size, cfg.head_widths) == (PRESET, ["a"], 8, [4, 8, 16, 32, 64])
    assert cfg.head_stride == 2
    assert (cfg.loss.mask_ratio, cfg.loss.temperature, cfg.loss.alpha) == (0.3, 4.0, 0.7)
    assert {o.field.split(".")[-1] for o in distill_options} <= set(DistillConfig.__dataclass_fields__) | set(
        DistillLossConfig.__dataclass_fields__)
    for bad in ({"mode": "both"}, {"loss": {"alpha": 2.0}}, {"loss": {"mask_ratio": 1.0}}, {"head_widths": "4,x"},
                {"loss": {"temprature": 2.0}}, {"head_stride": 4}):
        with pytest.raises(ConfigError):
            load_distill_config({"teacher": "t", **bad})


# -- feature mode ---------------------------------------------------------------------------------------------
def test_feature_distillation_learns_and_writes_a_strict_backbone(tmp_path, backbone_teacher):
    run = tmp_path / "kd"
    res = fit_distill(_feature_cfg(backbone_teacher, max_steps=20), run, progress=False)
    assert res.mode == "features" and res.steps == 20
    losses = [r["loss"] for r in _log(run)]
    assert len(losses) == 20 and np.mean(losses[-5:]) < 0.85 * np.mean(losses[:3]), losses
    student = create_model(PRESET, checkpoint=res.student)  # strict: the projections are not in the file
    assert student.load_report.missing == []
    _, meta = read_checkpoint(res.student)
    assert meta["task"] == "backbone" and meta["distill"]["mode"] == "features"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(k.startswith(("student.", "projector.")) for k in state["model"])  # never the teacher
    assert not res.model.teacher.training and not any(p.requires_grad for p in res.model.teacher.parameters())
    teacher = create_model(PRESET, checkpoint=backbone_teacher, img_size=96)
    for k, v in teacher.state_dict().items():  # the teacher did not move
        assert torch.equal(v, res.model.teacher.state_dict()[k]), k
    assert (run / "config.yaml").is_file()


def test_resume_continues_from_the_checkpoint_step(tmp_path, backbone_teacher):
    straight = fit_distill(_feature_cfg(backbone_teacher, max_steps=5), tmp_path / "a", progress=False)
    fit_distill(_feature_cfg(backbone_teacher, max_steps=3), tmp_path / "b", progress=False)
    resumed = fit_distill(_feature_cfg(backbone_teacher, max_steps=5), tmp_path / "b", resume=tmp_path / "b",
                          progress=False)
    assert resumed.steps == 5 and [r["step"] for r in _log(tmp_path / "b")] == [1, 2, 3, 4, 5]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    # the saved student is the EMA of the student's weights (default --ema 0.999), restored exactly on resume
    ema_a, _ = read_checkpoint(straight.student)
    ema_b, _ = read_checkpoint(resumed.student)
    raw = straight.model.student.state_dict()
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], msg=k)
    assert any(not torch.equal(ema_a[k], raw[k]) for k in ema_a if k.endswith("weight"))
    with pytest.raises(ConfigError, match="ema"):
        load_distill_config(None, {"teacher": str(backbone_teacher), "model": PRESET, "ema": 1.0})
    with pytest.raises(ConfigError, match="loss.mask_ratio"):
        fit_distill(_feature_cfg(backbone_teacher, max_steps=6, loss={"mask_ratio": 0.2}), tmp_path / "b",
                    resume=tmp_path / "b", progress=False)


# -- task mode ------------------------------------------------------------------------------------------------
def test_task_distillation_writes_an_exportable_task_checkpoint(tmp_path, seg_teacher):
    pytest.importorskip("onnxruntime")
    from usfm_edge.export.exporter import export
    from usfm_edge.export.parity import default_frames
    from usfm_edge.models.tasks import load_task_model

    run = tmp_path / "kd_seg"
    res = run_distill(seg_teacher, PRESET, BUSBRA, run, head_widths="4,8,16,32", head_stride=2, batch_size=4, epochs=2,
                      warmup_epochs=0.0, workers=0, amp="off", log_every=1, max_steps=4, label_fraction=0.5,
                      loss={"feature_weight": 0.5, "temperature": 3.0})
    assert res.mode == "task" and res.steps == 4 and "dice" in res.metrics
    log = _log(run)
    assert all({"loss_kd", "loss_sup", "loss_feat"} <= set(r) for r in log if "loss" in r)
    student = load_task_model(res.student)  # the loader export/quantize/evaluate use
    teacher = load_task_model(seg_teacher)
    assert student.head_name == "hybrid" and student.head_args["widths"] == [4, 8, 16, 32]
    assert student.head_args["stem_stride"] == 2 and student.head.enc[0][0][0].stride == (2, 2)  # the edge layout
    assert student.labels == teacher.labels and student.img_size == teacher.img_size
    split = student.checkpoint_config["extra"]["split"]
    assert split["val_fraction"] == 0.3 and split["labelled_images"] < split["train_images"]  # the teacher's split
    bundle = export(res.student, "onnx", out=tmp_path / "student", verify_frames=default_frames(1))
    meta = json.loads((bundle / "usfm.json").read_text())
    assert meta["task"] == "seg" and meta["parity"]["passed"]
    with pytest.raises(ConfigError, match="--head-stride"):
        run_distill(seg_teacher, PRESET, BUSBRA, tmp_path / "kd_light", head="light", head_stride=2, max_steps=1)


def test_unlabelled_samples_learn_from_soft_targets_only(seg_teacher):
    from usfm_edge.models.distill import TaskDistiller
    from usfm_edge.models.tasks import build_task_model, load_task_model

    teacher = load_task_model(seg_teacher)
    torch.manual_seed(0)
    student = build_task_model("seg", PRESET, labels=teacher.labels, head="light", img_size=SIZE)
    net = TaskDistiller(student, teacher, DistillLossConfig(alpha=0.3)).train()
    assert not net.teacher.training  # train() never reaches the teacher
    x = torch.randn(2, 3, SIZE, SIZE)
    loss, logits, parts = net(x, torch.full((2, SIZE, SIZE), -1))
    assert logits.shape == (2, 2, SIZE, SIZE) and float(parts["sup"]) == 0.0
    torch.testing.assert_close(loss, 0.3 * parts["kd"])
    loss.backward()
    assert all(p.grad is None for p in net.teacher.parameters())


# -- wrong teachers -------------------------------------------------------------------------------------------
def test_wrong_teachers_raise_typed_errors_naming_the_file(tmp_path, backbone_teacher):
    from usfm_edge.models.tasks import build_task_model, save_task_checkpoint

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_teacher(text)
    cls = save_task_checkpoint(build_task_model("cls", PRESET, num_classes=2, img_size=SIZE), tmp_path / "cls.safetensors")
    with pytest.raises(ConfigError, match="cls.safetensors.*'cls' teacher"):
        fit_distill(_feature_cfg(cls, max_steps=1), tmp_path / "run", progress=False)
    foreign = tmp_path / "foreign.pth"  # a plain state dict (the official USFM layout): preset from its width
    torch.save(create_model(PRESET).state_dict(), foreign)
    mode, teacher, _ = load_teacher(foreign)
    assert mode == "features" and teacher.preset == PRESET and not teacher.training
    mode, teacher, _ = load_teacher(cls, "features")  # its backbone, on request
    assert mode == "features" and teacher.embed_dim == 64
    with pytest.raises(ConfigError, match="teacher.safetensors.*backbone"):
        load_teacher(backbone_teacher, "task")
    with pytest.raises(ConfigError, match="--head"):
        fit_distill(_feature_cfg(backbone_teacher, head="hybrid"), tmp_path / "run2", progress=False)
    with pytest.raises(ConfigError, match="--head-stride"):
        fit_distill(_feature_cfg(backbone_teacher, head_stride=2), tmp_path / "run3", progress=False)
    with pytest.raises(ConfigError, match="teacher"):
        load_distill_config({"model": PRESET})


def test_cli_and_python_api(tmp_path, backbone_teacher):
    from click.testing import CliRunner

    import usfm_edge.train as train
    from usfm_edge.cli import main

    assert train.run_distill is run_distill and train.DistillConfig.__name__ == "DistillConfig"
    out = tmp_path / "cli"
    args = ["distill", "--teacher", str(backbone_teacher), "--student", PRESET, "--data", FRAMES[0], "--out", str(out),
            "--img-size", str(SIZE), "--batch-size", "2", "--max-steps", "2", "--workers", "0", "--amp", "off",
            "--device", "cpu", "--mask-ratio", "0.5", "--feature-loss", "cosine"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "student.safetensors").is_file() and "features distillation, 2 steps" in result.output
    bad = CliRunner().invoke(main, [*args[:2], str(tmp_path), *args[3:]])  # a folder as the teacher
    assert bad.exit_code == 1 and str(tmp_path) in bad.output


# -- DDP ------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, teacher: str, out: str, task: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    extra = dict(data=[BUSBRA], samples_per_epoch=None, head_widths=[4, 8, 16, 32, 64], label_fraction=0.5,
                 eval_limit=2) if task else {}
    res = fit_distill(_feature_cfg(teacher, batch_size=2, max_steps=3, **extra), out, progress=False)
    torch.save(res.model.state_dict(), os.path.join(out, f"weights_rank{rank}.pt"))


@pytest.mark.parametrize("mode", ["features", "task"])
def test_two_process_gloo_ddp(tmp_path, backbone_teacher, seg_teacher, mode):
    import torch.multiprocessing as mp

    teacher = seg_teacher if mode == "task" else backbone_teacher
    mp.spawn(_worker, args=(2, _free_port(), str(teacher), str(tmp_path), mode == "task"), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    for k in w0:  # BatchNorm statistics are each rank's own after its last step (DDP broadcasts rank 0's before)
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(w0[k], w1[k]), f"ranks diverged at {k}"
    assert [r["step"] for r in _log(tmp_path) if "loss" in r] == [1, 2, 3]  # rank 0 logs, once per step
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["extra"]["world_size"] == 2
