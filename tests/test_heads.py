"""Task heads and task models: shapes, gradients, ONNX parity, checkpoints, layer-wise lr decay."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from usfm_edge.core.errors import CheckpointError, ConfigError
from usfm_edge.models.heads import AreaPool
from usfm_edge.models.tasks import (
    TaskModel,
    build_task_model,
    default_head,
    load_task_model,
    save_task_checkpoint,
)
from usfm_edge.train.optim import param_groups

TEST, TINY = "usfm_vit_test", "usfm_vit_tiny_patch16_224"
CASES = [("seg", "upernet", {}), ("seg", "light", {}), ("cls", "auto", {"num_classes": 3}), ("enhance", "auto", {}),
         ("features", "auto", {})]


def _expected(task: str, s: int, d: int) -> tuple[int, ...]:
    return {"seg": (2, 2, s, s), "cls": (2, 3), "enhance": (2, 1, s, s), "features": (2, d)}[task]


def _randomise(model: TaskModel) -> TaskModel:
    """Non-trivial BN statistics and head outputs, so parity tests compare real signals."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        for name, p in model.named_parameters():
            if not name.startswith("backbone.") and p.ndim > 1 and (p.abs().max() == 0 or "cls_seg" in name or "fc." in name):
                p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("preset", [TEST, "mae_vit_test"])
@pytest.mark.parametrize("task,head,kw", CASES + [("seg", "hybrid", {}), ("seg", "hires", {})])
def test_shapes_test_preset(task, head, kw, preset):
    model = build_task_model(task, preset, head=head, img_size=64, **kw).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert tuple(y.shape) == _expected(task, 64, 64)
    if task == "enhance":
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


@pytest.mark.parametrize("task,head,kw", CASES)
def test_shapes_tiny_224(task, head, kw):
    model = build_task_model(task, TINY, head=head, img_size=224, **kw).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 224, 224))
    assert tuple(y.shape) == (1,) + _expected(task, 224, 192)[1:]


def test_auto_heads_and_labels():
    assert default_head("seg", 768) == "upernet" and default_head("seg", 384) == "upernet"
    assert default_head("seg", 192) == "light" and default_head("cls", 192) == "linear"
    seg = build_task_model("seg", TEST, img_size=64)
    assert seg.head_name == "light" and seg.labels == ["background", "foreground"] and seg.num_classes == 2
    cls = build_task_model("cls", TEST, labels=["benign", "malignant"], img_size=64)
    assert cls.labels == ["benign", "malignant"] and cls.head_name == "linear"
    assert build_task_model("enhance", TEST, img_size=64).labels == []
    with pytest.raises(ConfigError):
        build_task_model("cls", TEST, img_size=64)
    with pytest.raises(ConfigError):
        build_task_model("seg", TEST, num_classes=3, labels=["a", "b"], img_size=64)
    with pytest.raises(ConfigError):
        build_task_model("seg", TEST, head="linear", img_size=64)
    with pytest.raises(ConfigError):
        build_task_model("detect", TEST, img_size=64)


def test_area_pool_matches_adaptive_avg_pool():
    for h, w, s in [(7, 7, 2), (7, 7, 3), (7, 7, 6), (2, 2, 6), (14, 9, 6), (4, 4, 1)]:
        x = torch.randn(2, 5, h, w)
        torch.testing.assert_close(AreaPool(s)(x), nn.AdaptiveAvgPool2d(s)(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("preset", [TEST, "mae_vit_test"])
def test_gradients_reach_backbone_and_heads(preset):
    model = build_task_model("seg", preset, head="upernet", img_size=64).train()
    out = model.forward_train(torch.randn(2, 3, 64, 64))
    assert set(out) == {"out", "aux"} and out["aux"].shape == out["out"].shape
    target = torch.randint(0, 2, (2, 64, 64))
    loss = nn.functional.cross_entropy(out["out"], target) + model.aux_weight * nn.functional.cross_entropy(out["aux"], target)
    loss.backward()
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "head.fpn1.0.weight",
                 "head.cls_seg.weight", "aux_head.cls_seg.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == ["backbone.mask_token", "backbone.norm.bias", "backbone.norm.weight"]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # DDP needs no unused params
    for task, kw in (("cls", {"num_classes": 3}), ("enhance", {})):
        m = build_task_model(task, preset, img_size=64, **kw).train()
        if task == "enhance":  # the zero-initialised last conv passes no gradient back until its first update
            nn.init.normal_(m.head.refine[-1].weight, std=0.1)
        m(torch.randn(2, 3, 64, 64)).float().mean().backward()
        assert m.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
        assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("head."))


def _onnx_parity(model: TaskModel, size: int, tmp_path) -> float:
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(1, 3, size, size)
    path = tmp_path / f"{model.task}_{model.head_name}_{size}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert y.shape == ref.shape and np.abs(ref).max() > 1e-3
    return float(np.abs(y - ref).max())


@pytest.mark.parametrize("task,head,kw", CASES[:4])
def test_onnx_export_matches_torch(task, head, kw, tmp_path):
    pytest.importorskip("onnx")
    model = _randomise(build_task_model(task, TEST, head=head, img_size=64, **kw))
    assert _onnx_parity(model, 64, tmp_path) < 1e-4


def test_onnx_export_upernet_224(tmp_path):
    """At 224 px the stride-32 map is 7x7: PPM pools to 2, 3 and 6 do not divide it (AdaptiveAvgPool2d would
    not export); the narrow test preset keeps it fast, the head's shapes are those of every 224 px model."""
    pytest.importorskip("onnx")
    model = _randomise(build_task_model("seg", TEST, head="upernet", img_size=224))
    assert _onnx_parity(model, 224, tmp_path) < 1e-4


@pytest.mark.parametrize("half", [False, True])
def test_task_checkpoint_roundtrip(half, tmp_path):
    model = _randomise(build_task_model("seg", TEST, head="upernet", labels=["background", "lesion"], img_size=64))
    path = save_task_checkpoint(model, tmp_path / "seg.safetensors", extra={"dice": 0.8, "dataset": "busbra"}, half=half)
    loaded = load_task_model(path)
    assert loaded.labels == ["background", "lesion"] and loaded.head_name == "upernet" and loaded.task == "seg"
    assert loaded.checkpoint_config["extra"] == {"dice": 0.8, "dataset": "busbra"}
    assert loaded.checkpoint_config["preprocess"]["img_size"] == 64
    assert set(loaded.state_dict()) == set(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=5e-2 if half else 1e-6, rtol=1e-2 if half else 1e-5)
    cfg = json.loads(json.dumps(model.config()))  # JSON-serialisable and rebuildable
    assert set(TaskModel.from_config(cfg).state_dict()) == set(model.state_dict())


def test_load_task_model_rejects_wrong_files(tmp_path):
    from usfm_edge.models.checkpoint import save_checkpoint
    from usfm_edge.models.registry import create_model, model_args

    bb = create_model(TEST)
    path = save_checkpoint(tmp_path / "bb.safetensors", bb.state_dict(),
                           {"model": TEST, "model_args": model_args(TEST), "task": "backbone"})
    with pytest.raises(CheckpointError, match="not a usfm-edge task checkpoint"):
        load_task_model(path)
    model = build_task_model("cls", TEST, num_classes=3, img_size=64)
    good = save_task_checkpoint(model, tmp_path / "cls.safetensors")
    from usfm_edge.models.checkpoint import read_checkpoint

    sd, cfg = read_checkpoint(good)
    sd.pop("head.fc.bias")
    save_checkpoint(tmp_path / "broken.safetensors", sd, cfg)
    with pytest.raises(CheckpointError, match="head.fc.bias"):
        load_task_model(tmp_path / "broken.safetensors")


def test_backbone_checkpoint_initialises_backbone(tmp_path):
    from usfm_edge.models.checkpoint import save_checkpoint
    from usfm_edge.models.registry import create_model, model_args

    torch.manual_seed(1)
    bb = create_model(TEST)
    path = save_checkpoint(tmp_path / "pretrained.safetensors", bb.state_dict(),
                           {"model": TEST, "model_args": model_args(TEST), "task": "backbone"})
    model = build_task_model("seg", TEST, head="upernet", img_size=64, checkpoint=path)
    for k, v in bb.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)
    fresh = model.load_report.missing
    assert "head.cls_seg.weight" in fresh and "aux_head.cls_seg.weight" in fresh
    assert not any(k.startswith("backbone.") for k in fresh)
    # a different input size resizes the relative position table
    model96 = build_task_model("cls", TEST, num_classes=2, img_size=96, checkpoint=path)
    assert "rel_pos_bias.relative_position_bias_table" in model96.load_report.resized


def test_task_checkpoint_initialises_other_task(tmp_path):
    seg = _randomise(build_task_model("seg", TEST, head="light", img_size=64))
    path = save_task_checkpoint(seg, tmp_path / "seg.safetensors")
    same = build_task_model("seg", TEST, head="light", img_size=64, checkpoint=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(same(x), seg(x))
    assert same.load_report.missing == []
    cls = build_task_model("cls", TEST, num_classes=4, img_size=64, checkpoint=path)
    torch.testing.assert_close(cls.backbone.blocks[0].attn.qkv.weight, seg.backbone.blocks[0].attn.qkv.weight)
    assert {"head.fc.weight", "head.fc_norm.weight"} <= set(cls.load_report.missing)


def test_task_checkpoint_heads_load_across_head_argument_defaults(tmp_path):
    """A checkpoint written before a head argument existed (stored without it) still initialises the heads
    of a model that has the argument at its default; a real difference leaves the heads fresh and says why."""
    from usfm_edge.models.checkpoint import read_checkpoint, save_checkpoint

    seg = _randomise(build_task_model("seg", TEST, head="hybrid", img_size=64, head_args={"widths": [4, 8, 16, 32, 64]}))
    sd, cfg = read_checkpoint(save_task_checkpoint(seg, tmp_path / "new.safetensors"))
    assert cfg["head_args"]["stem_stride"] == 1
    del cfg["head_args"]["stem_stride"]  # as the checkpoints written before session 12 store it
    old = save_checkpoint(tmp_path / "old.safetensors", sd, cfg)
    again = build_task_model("seg", TEST, head="hybrid", img_size=64, head_args={"widths": [4, 8, 16, 32, 64]},
                             checkpoint=old).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), seg.eval()(x))
    assert again.load_report.missing == [] and again.load_report.heads_fresh is None
    other = build_task_model("seg", TEST, head="hybrid", img_size=64, labels=["background", "a", "b"],
                             head_args={"widths": [4, 8, 16, 32, 64], "stem_stride": 2}, checkpoint=old)
    assert "head.cls_seg.weight" in other.load_report.missing
    why = other.load_report.heads_fresh
    assert "head_args.stem_stride 1 != 2" in why and "2 classes != 3" in why
    assert "heads start fresh: " + why in other.load_report.summary()


def test_param_groups_layer_decay():
    model = build_task_model("cls", TEST, num_classes=3, img_size=64)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, lr=1e-3)
    names = [n for g in groups for n in g["names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(names) == len(set(names))
    by_name = {n: g for g in groups for n in g["names"]}
    depth = model.depth
    assert by_name["head.fc.weight"]["lr_scale"] == 1.0 and by_name["head.fc.weight"]["weight_decay"] == 0.05
    assert by_name["backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.5 ** (depth + 1))
    assert by_name["backbone.blocks.0.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.5 ** depth)
    assert by_name[f"backbone.blocks.{depth - 1}.attn.qkv.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    for n in ("backbone.cls_token", "backbone.rel_pos_bias.relative_position_bias_table", "head.fc.bias",
              "backbone.blocks.0.gamma_1", "head.fc_norm.weight"):
        assert by_name[n]["weight_decay"] == 0.0, n
    assert by_name["head.fc.weight"]["layer_id"] == depth + 1 and by_name["backbone.cls_token"]["layer_id"] == 0
    torch.optim.AdamW(groups, lr=1e-3)  # valid optimiser groups


@pytest.mark.parametrize("name, source", [
    ("busbra_seg_tiny", "pairs:{root}/busbra/Images,{root}/busbra/Masks?patient=bus_(\\d+)"),
    ("hc18_seg_tiny", "hc18:{root}/hc18"),
])
def test_shipped_models_start_finetune_with_their_heads(name, source):
    """The README's fine-tuning walkthrough starts from a shipped model, backbone and head: the labels that
    finetune derives from the data and the default head arguments must match the shipped checkpoint's."""
    from usfm_edge.bench.demo import checkpoints_dir
    from usfm_edge.data import load_records, sample_dir
    from usfm_edge.train.finetune import FinetuneConfig, _labels

    records = load_records(source.format(root=sample_dir()))
    labels = _labels(FinetuneConfig(task="seg"), records)
    model = build_task_model("seg", head="hybrid", img_size=256, labels=labels, checkpoint=checkpoints_dir() / f"{name}.safetensors")
    assert model.load_report.missing == [], model.load_report.summary()
