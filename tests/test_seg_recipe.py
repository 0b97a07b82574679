"""The segmentation recipe for small ultrasound datasets: hires head, ultrasound augmentation, EMA, budget schedule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("cv2")

from usfm_edge.core.preprocess import PreprocessSpec  # noqa: E402
from usfm_edge.data.augment import AUGMENT_PRESETS, AugmentConfig, UltrasoundAugment  # noqa: E402
from usfm_edge.data.readers import read_image  # noqa: E402
from usfm_edge.data.sources import load_records, read_record_mask  # noqa: E402
from usfm_edge.models.tasks import build_task_model, save_task_checkpoint  # noqa: E402
from usfm_edge.train.optim import budget_cosine_lr, cosine_lr  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def hc18_item(sample_dir):
    r = load_records(f"hc18:{sample_dir / 'hc18'}")[0]
    frame = read_image(r.image)
    return frame, read_record_mask(r)


# -- augmentation -------------------------------------------------------------------------------------------
def test_augment_is_seeded_and_keeps_the_mask_binary(hc18_item):
    frame, mask = hc18_item
    img = frame.astype(np.float32) / 255.0
    aug = UltrasoundAugment(AUGMENT_PRESETS["ultrasound"])
    a1, m1 = aug(img, mask, np.random.default_rng(7))
    a2, m2 = aug(img, mask, np.random.default_rng(7))
    a3, _ = aug(img, mask, np.random.default_rng(8))
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2) and not np.array_equal(a1, a3)
    assert a1.dtype == np.float32 and a1.shape == img.shape and 0.0 <= a1.min() and a1.max() <= 1.0
    assert set(np.unique(m1)) <= {0, 1} and m1.shape == mask.shape


def test_augment_geometry_moves_frame_and_mask_together(hc18_item):
    frame, mask = hc18_item
    img = frame.astype(np.float32) / 255.0
    flip_only = UltrasoundAugment(AugmentConfig(flip=1.0, p_affine=0.0, gain=(1.0, 1.0), p_tgc=0.0, gamma=(1.0, 1.0),
                                                p_speckle=0.0, p_blur=0.0, p_noise=0.0, p_marks=0.0))
    out, m = flip_only(img, mask, np.random.default_rng(0))
    assert np.allclose(out, img[:, ::-1]) and np.array_equal(m, mask[:, ::-1])
    # a pure rotation of the frame by the affine warp: the mask keeps its area and follows the frame
    rot = UltrasoundAugment(AugmentConfig(flip=0.0, p_affine=1.0, scale=(1.0, 1.0), rotate_deg=(20.0, 20.0),
                                          shift=(0.0, 0.0), gain=(1.0, 1.0), p_tgc=0.0, gamma=(1.0, 1.0),
                                          p_speckle=0.0, p_blur=0.0, p_noise=0.0, p_marks=0.0))
    marker = np.zeros_like(img)
    marker[mask > 0] = 1.0  # warp an image equal to the mask: it must land where the mask lands
    out, m = rot(marker, mask, np.random.default_rng(0))
    assert abs(int(m.sum()) - int(mask.sum())) < 0.02 * mask.sum()
    agree = ((out > 0.5) == (m > 0)).mean()
    assert agree > 0.999


def test_augment_marks_change_pixels_not_labels(hc18_item):
    frame, mask = hc18_item
    img = np.full(frame.shape, 0.3, np.float32)
    marks = UltrasoundAugment(AugmentConfig(flip=0.0, p_affine=0.0, gain=(1.0, 1.0), p_tgc=0.0, gamma=(1.0, 1.0),
                                            p_speckle=0.0, p_blur=0.0, p_noise=0.0, p_marks=1.0, max_marks=6))
    changed = 0
    for seed in range(5):
        out, m = marks(img, mask, np.random.default_rng(seed))
        assert np.array_equal(m, mask)
        changed += int((np.abs(out - 0.3) > 0.05).sum())
    assert changed > 50


def test_intensity_effects_stay_in_range(hc18_item):
    frame, _ = hc18_item
    img = frame.astype(np.float32) / 255.0
    strong = UltrasoundAugment(AugmentConfig(p_tgc=1.0, p_speckle=1.0, p_blur=1.0, p_noise=1.0, p_marks=1.0))
    for seed in range(4):
        out, m = strong(img, None, np.random.default_rng(seed))
        assert m is None and np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0


def test_task_dataset_ultrasound_recipe(sample_dir):
    from usfm_edge.train.task_data import TaskDataset

    recs = load_records(f"busbra:{sample_dir / 'busbra'}")[:4]
    ds = TaskDataset(recs, "seg", PreprocessSpec(img_size=64), train=True, augment="ultrasound")
    x, y = ds[(0, 3, 1)]
    x2, y2 = ds[(0, 3, 1)]
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2) and set(y.unique().tolist()) <= {0, 1}
    val = TaskDataset(recs, "seg", PreprocessSpec(img_size=64), train=False, augment="ultrasound")
    assert torch.equal(val[(0, 0, 2)][0], val[(5, 9, 2)][0])  # validation items are not augmented
    with pytest.raises(Exception, match="unknown augmentation"):
        TaskDataset(recs, "seg", PreprocessSpec(img_size=64), train=True, augment="strong")


# -- schedule -----------------------------------------------------------------------------------------------
def test_budget_cosine_follows_the_time_budget():
    peak, low = 1e-3, 1e-6
    assert budget_cosine_lr(5, 1000, 10, peak, low) == cosine_lr(5, 1000, 10, peak, low)  # warm-up unchanged
    assert budget_cosine_lr(500, 1000, 10, peak, low, 0.0) == pytest.approx(cosine_lr(500, 1000, 10, peak, low))
    # half the time spent after 10% of the steps: the lr is at the half-way value, not near the peak
    assert budget_cosine_lr(100, 1000, 0, peak, low, 0.5) == pytest.approx(low + (peak - low) * 0.5)
    assert budget_cosine_lr(100, 1000, 0, peak, low, 1.0) == pytest.approx(low)
    assert budget_cosine_lr(100, 1000, 0, peak, low, 3.0) == pytest.approx(low)
    lrs = [budget_cosine_lr(s, 1000, 0, peak, low, s / 200) for s in range(0, 250, 10)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# -- hires head ---------------------------------------------------------------------------------------------
def test_hires_head_shapes_and_gradients():
    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64, head="hires")
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_train(x, aux=True)
    assert out["out"].shape == (2, 2, 64, 64) and out["aux"].shape == (2, 2, 64, 64)
    assert model(x).shape == (2, 2, 64, 64) and model.aux_weight == pytest.approx(0.4)
    out["out"].sum().backward()
    stem = model.head.stem.stages[0][0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0  # the full-resolution branch is trained
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    again = build_task_model("seg", "usfm_vit_test", img_size=64, head="hires", head_args={"aux_weight": 0.0})
    assert again.aux_weight == 0.0 and "aux" not in again.forward_train(x, aux=False)


def test_hybrid_head_starts_as_a_unet_and_trains_the_vit():
    """The hybrid head's ViT context enters through a zero-initialised BN scale: the first forward pass does not
    depend on the ViT maps; after one step the ViT receives gradients through that gate."""
    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64, head="hybrid")
    assert model.head_args["widths"] == [8, 16, 32, 64, 128] and model.aux_weight == pytest.approx(0.4)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    out = model.forward_train(x, aux=True)
    assert out["out"].shape == (2, 2, 64, 64) and out["aux"].shape == (2, 2, 64, 64)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        feats = model.backbone.forward_intermediates(x, indices=model.out_indices)
        scrambled = model.head([f.flip(0) for f in feats], x)  # other ViT maps: the same output at init
    assert torch.allclose(scrambled, ref, atol=1e-5)  # stride-1 logits: already at the input size
    model.train()
    (model.forward_train(x, aux=False)["out"] * torch.randn(2, 2, 64, 64)).sum().backward()
    assert model.head.context_norm.weight.grad.abs().sum() > 0  # the gate opens
    assert model.head.enc[0][0][0].weight.grad.abs().sum() > 0  # the full-resolution conv path is trained


def test_hybrid_head_stem_stride_two_skips_the_full_size_level():
    """``stem_stride=2``: the first conv halves the input, the logits come out at half the input size and are
    upsampled to it; four widths put the bottleneck at the patch grid (no resampling of the ViT context)."""
    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64, head="hybrid",
                             head_args={"widths": [8, 16, 32, 64], "stem_stride": 2}).eval()
    assert model.head.enc[0][0][0].stride == (2, 2) and model.head_args["stem_stride"] == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone.forward_intermediates(x, indices=model.out_indices)
        logits, deep = model.head(feats, x, aux=True)
        out = model.forward_train(x, aux=True)
    assert logits.shape == (2, 2, 32, 32) and deep.shape == (2, 2, 8, 8)  # strides 2 and 8
    assert out["out"].shape == (2, 2, 64, 64) and out["aux"].shape == (2, 2, 64, 64)
    assert feats[0].shape[-2:] == (4, 4)  # the bottleneck (64 / 16) lines up with the patch grid
    torch.testing.assert_close(out["out"], F.interpolate(logits, size=(64, 64), mode="bilinear"))
    with pytest.raises(ValueError, match="stem_stride"):
        build_task_model("seg", "usfm_vit_test", img_size=64, head="hybrid", head_args={"stem_stride": 4})


def test_hybrid_stem_stride_two_round_trips_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    from usfm_edge.export import export
    from usfm_edge.models.tasks import load_task_model

    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64, head="hybrid",
                             head_args={"widths": [8, 16, 32, 64], "stem_stride": 2}).eval()
    path = save_task_checkpoint(model, tmp_path / "s2.safetensors")
    back = load_task_model(path)
    assert back.head.enc[0][0][0].stride == (2, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
    meta = json.loads((export(path, "onnx", out=tmp_path / "s2-onnx") / "usfm.json").read_text())
    assert meta["parity"]["passed"] and meta["model"]["head"] == "hybrid"


@pytest.mark.parametrize("head", ["hires", "hybrid"])
def test_hires_checkpoint_export_and_int8(tmp_path, sample_dir, monkeypatch, head):
    """The hires and hybrid heads export to raw-frame bundles that pass parity, and quantise behind the gate."""
    pytest.importorskip("onnxruntime")
    from usfm_edge.calibration import make_quantizer
    from usfm_edge.export import export
    from usfm_edge.models.tasks import load_task_model
    from usfm_edge.runtime import Engine

    monkeypatch.setenv("USFM_EDGE_MIN_CALIB_FRAMES", "8")
    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64, head=head)
    path = save_task_checkpoint(model.eval(), tmp_path / "hires.safetensors")
    back = load_task_model(path)
    assert back.head_name == head and back.config()["head_args"] == model.head_args
    fp32 = export(path, "onnx", out=tmp_path / "hires-onnx")
    meta = json.loads((fp32 / "usfm.json").read_text())
    assert meta["parity"]["passed"] and meta["model"]["head"] == head
    frame = read_image(sample_dir / "busbra" / "Images" / "bus_0090-l.png")
    with Engine.open(fp32) as engine:
        res = engine.predict(frame)
    assert res.mask.shape == frame.shape
    specs = [f"busbra:{sample_dir / 'busbra'}", f"hc18:{sample_dir / 'hc18'}"]
    # random weights: the parity of an untrained model's INT8 masks is not the point here (force keeps the bundle);
    # the ONNX Runtime CPU target keeps convolutions float by default, transformer-ort-convs quantises them
    int8 = export(path, "onnx", "int8", out=tmp_path / "hires-int8",
                  quantizer=make_quantizer(specs, force=True, recipe="transformer-ort-convs"),
                  force=True)
    meta = json.loads((int8 / "usfm.json").read_text())
    assert meta["parity"]["frames"] and len(meta["calibration"]["report"]["parity_frames"]) == 4
    assert meta["precision"] == "int8" and meta["calibration"]["report"]["gate"]["metric"] == "dice"
    import onnx

    g = onnx.load(str(int8 / "model.onnx"))
    dq = {n.output[0] for n in g.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in g.graph.node if n.op_type == "Conv" and n.name.startswith("/model/head/")]
    quantized = [n.name for n in convs if set(n.input) & dq]
    assert [n.name for n in convs if "cls_seg" in n.name] and not [n for n in quantized if "cls_seg" in n]
    # every head conv but the classifier runs in INT8 (the deep-supervision classifier is not in the graph)
    assert len(quantized) == len(convs) - 1, (len(quantized), len(convs))
    assert any(("/stem/" if head == "hires" else "/enc.0/") in n for n in quantized)
    assert any("/taps" in n for n in quantized)
    assert math.isfinite(meta["calibration"]["report"]["gate"]["int8"]["dice"])


def test_finetune_with_ema_saves_and_resumes(tmp_path, sample_dir):
    from usfm_edge.train.engine import load_training_state
    from usfm_edge.train.finetune import fit_finetune, load_finetune_config

    data = f"busbra:{sample_dir / 'busbra'}"
    over = {"task": "seg", "data": [data], "model": "usfm_vit_test", "img_size": 64, "head": "hires", "epochs": 2,
            "batch_size": 4, "eval_every": 1, "val_fraction": 0.3, "warmup_epochs": 0.0, "log_every": 1,
            "ema": 0.9, "augment": "ultrasound", "save_every": 1}
    cfg = load_finetune_config(None, {**over, "max_steps": 2})
    fit_finetune(cfg, tmp_path / "run", progress=False)
    state = load_training_state(tmp_path / "run" / "checkpoint.pt")
    assert "ema" in state["extra"] and state["extra"]["train_seconds"] > 0
    assert int(state["extra"]["ema"]["n_averaged"]) == 2
    res = fit_finetune(load_finetune_config(None, {**over, "max_steps": 4}), tmp_path / "run",
                       resume=tmp_path / "run", progress=False)
    state = load_training_state(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4 and int(state["extra"]["ema"]["n_averaged"]) == 4 and res.last.is_file()
    # the saved weights are the EMA's, not the raw model's
    from safetensors.torch import load_file

    saved = load_file(str(res.last))
    ema_w = state["extra"]["ema"]["module.head.cls_seg.weight"]
    raw_w = state["model"]["head.cls_seg.weight"]
    assert torch.allclose(saved["head.cls_seg.weight"].float(), ema_w.float())
    assert not torch.allclose(ema_w, raw_w)


def test_matmul_only_recipe_leaves_every_conv_float(tmp_path, sample_dir):
    # the ORT-CPU recipe measured in RESULTS.md §4.1: Q/DQ feeds MatMul/Gemm only, never a convolution
    import onnx
    import torch

    from usfm_edge.calibration.quantize import quantize_bundle
    from usfm_edge.calibration.recipe import get_recipe
    from usfm_edge.export.exporter import export
    from usfm_edge.export.parity import default_frames
    from usfm_edge.models.tasks import build_task_model

    assert get_recipe("transformer-matmul").ort_options()["op_types_to_quantize"] == ["MatMul", "Gemm"]
    torch.manual_seed(0)
    seg = build_task_model("seg", "usfm_vit_test", img_size=64, head="hybrid")
    fp32 = export(seg, "onnx", out=tmp_path / "seg-onnx", verify_frames=default_frames(1))
    int8 = quantize_bundle(fp32, [f"busbra:{sample_dir / 'busbra'}"], out=tmp_path / "seg-int8.usfm",
                           force=True, recipe="transformer-matmul", n=8)
    graph = onnx.load(str(int8 / "model.onnx")).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert convs and not any(made_by.get(i) == "DequantizeLinear" for n in convs for i in n.input)
    assert any(made_by.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)
