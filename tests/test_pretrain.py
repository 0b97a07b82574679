"""Pretraining: masks, model, loss, optimiser, exact resume, continued pretraining, config (tiny preset, real frames)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from usfm_edge.core.errors import ConfigError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.data import load_records, read_image, sample_dir
from usfm_edge.models.checkpoint import load_into, read_checkpoint
from usfm_edge.models.mim import MimConfig, UsfmMim, build_mim
from usfm_edge.models.registry import create_model
from usfm_edge.train.config import PretrainConfig, load_pretrain_config, pretrain_options
from usfm_edge.train.engine import NonFiniteLossError, TrainState, autocast_dtype, train_one_epoch
from usfm_edge.train.masking import MimTransform, SpatialMaskGenerator, mask_to_pixels, mean_pad
from usfm_edge.train.optim import build_optimizer, cosine_lr, param_groups
from usfm_edge.train.pretrain import _parser, fit_pretrain

PRESET, SIZE = "usfm_vit_test", 64
SAMPLE = sample_dir()
DATA = [f"busbra:{SAMPLE / 'busbra'}", f"hc18:{SAMPLE / 'hc18'}"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from 2 OpenMP threads, and on a shared machine spinning threads cost 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    records = load_records(DATA[0])[:4] + load_records(DATA[1])[:4]
    return [read_image(r.image) for r in records]


def _batch(frames, mim: MimConfig, seed: int = 0, freq_prob: float = 1.0):
    t = MimTransform(PreprocessSpec(img_size=SIZE), 16, mim.mask_patch_size, mim.mask_ratio, freq_prob, mim.ring_params())
    rng = np.random.default_rng(seed)
    s = [t(f, rng) for f in frames]
    return tuple(torch.from_numpy(np.stack(x)) for x in
                 ([a.image for a in s], [a.spatial_mask for a in s], [a.freq_mask for a in s]))


def _cfg(**kw) -> PretrainConfig:
    base = dict(data=DATA, model=PRESET, img_size=SIZE, epochs=2, samples_per_epoch=24, batch_size=2,
                accum_steps=2, lr=0.05, warmup_epochs=0.5, workers=0, amp="off", save_every=0, log_every=1,
                mim=dict(mask_patch_size=16))
    base.update(kw)
    return load_pretrain_config(base)


# -- masks ------------------------------------------------------------------------------------------------
def test_spatial_mask_ratio_blocks_and_determinism():
    gen = SpatialMaskGenerator(224, patch_size=16, mask_patch_size=32, mask_ratio=0.6)
    m = gen(np.random.default_rng(1))
    assert m.shape == (196,) and m.dtype == np.uint8
    assert m.sum() == math.ceil(49 * 0.6) * 4  # whole 2x2-patch blocks
    grid = gen(np.random.default_rng(1), flat=False)
    np.testing.assert_array_equal(grid.reshape(-1), m)
    blocks = grid.reshape(7, 2, 7, 2)
    assert (blocks == blocks[:, :1, :, :1]).all()  # constant inside each 32 px block
    assert not np.array_equal(m, gen(np.random.default_rng(2)))
    with pytest.raises(ConfigError):
        SpatialMaskGenerator(224, 16, 24)


def test_mean_pad_fills_masked_pixels_with_channel_mean():
    img = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    pix = mask_to_pixels(np.array([1, 0, 0, 1], np.uint8), 16)
    out = mean_pad(img, pix)
    for c in range(3):
        np.testing.assert_allclose(out[c][pix == 1], img[c].mean(), rtol=1e-6)
        np.testing.assert_array_equal(out[c][pix == 0], img[c][pix == 0])


def test_transform_is_deterministic_and_never_flips_vertically(frames):
    spec = PreprocessSpec(img_size=SIZE)
    t = MimTransform(spec, 16, 16, 0.6, freq_prob=1.0)
    a, b = t(frames[0], np.random.default_rng(5)), t(frames[0], np.random.default_rng(5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.spatial_mask, b.spatial_mask)
    assert a.image.shape == (3, SIZE, SIZE) and a.image.dtype == np.float32
    assert a.freq_mask.shape == (SIZE, SIZE) and (a.freq_mask == 0).any() and a.freq_mask[0, 0] == 1  # DC kept
    ramp = np.repeat(np.linspace(255, 0, 120)[:, None], 90, axis=1).astype(np.uint8)  # bright at the transducer
    rng = np.random.default_rng(0)
    for _ in range(20):
        img = t.augment(ramp, rng)
        assert img[0].mean() > img[-1].mean()
    off = MimTransform(spec, 16, 16, 0.6, freq_prob=0.0)(frames[0], rng)
    assert (off.freq_mask == 1).all()


# -- model ------------------------------------------------------------------------------------------------
def test_corruption_and_forward(frames):
    mim = MimConfig(mask_patch_size=16)
    img, sm, fm = _batch(frames, mim)
    fm[1] = 1.0  # sample 1: spatial masking only
    torch.manual_seed(0)
    model = build_mim(PRESET, SIZE, mim)
    x, pix = model.corrupt(img, sm, fm)
    assert pix.shape == (8, 1, SIZE, SIZE) and torch.equal(pix[:, 0, ::16, ::16].flatten(1), sm.float())
    vis = pix[1, 0] == 0
    torch.testing.assert_close(x[1][:, vis], img[1][:, vis])  # no frequency masking: visible pixels untouched
    assert not torch.allclose(x[0][:, pix[0, 0] == 0], img[0][:, pix[0, 0] == 0], atol=1e-3)
    masked = x[0][:, pix[0, 0] == 1]
    assert torch.allclose(masked, masked[:, :1].expand_as(masked))  # flat mean fill
    loss, pred, parts = model(img, sm, fm)
    assert pred.shape == img.shape and loss.ndim == 0 and set(parts) == {"spatial", "freq"}
    torch.testing.assert_close(loss, parts["spatial"] + mim.lambda_freq * parts["freq"])
    assert model.no_weight_decay() == {"encoder.cls_token", "encoder.mask_token",
                                       "encoder.rel_pos_bias.relative_position_bias_table"}


def test_gradients_reach_every_encoder_parameter(frames):
    torch.manual_seed(0)
    model = build_mim(PRESET, SIZE, MimConfig(mask_patch_size=16))
    loss, _, _ = model(*_batch(frames, model.cfg))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# raw pixels: most of the early loss is each patch's mean grey, learned fast; the normalised target (the
# default) has no such shortcut, so its loss falls more slowly (measured 1.56 -> 1.22 over these 30 steps)
@pytest.mark.parametrize("norm_target, max_ratio", [(True, 0.85), (False, 0.7)])
def test_loss_decreases_on_real_frames(frames, norm_target, max_ratio):
    torch.manual_seed(0)
    model = build_mim(PRESET, SIZE, MimConfig(mask_patch_size=16, norm_target=norm_target))
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.05)
    losses = []
    for step in range(30):
        loss, _, _ = model(*_batch(frames, model.cfg, seed=step, freq_prob=0.5))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < max_ratio * np.mean(losses[:3]), losses


def test_normalised_target_option(frames):
    """MAE-style target: every patch of the target at zero mean / unit variance; a prediction equal to it has
    zero loss; ``denormalize`` maps it back to the clean image; the option is a config key and a flag."""
    from usfm_edge.models.mim import patch_normalize

    mim = MimConfig(mask_patch_size=16, norm_target=True)
    img, sm, fm = _batch(frames, mim)
    t = patch_normalize(img, 16).reshape(8, 3, SIZE // 16, 16, SIZE // 16, 16)
    mean, var = t.mean(dim=(1, 3, 5)), t.var(dim=(1, 3, 5), unbiased=False)
    textured = var > 0.5  # flat patches (the black surround) normalise to 0
    assert textured.float().mean() > 0.5
    assert mean.abs().max() < 1e-4 and (var[textured] - 1).abs().max() < 1e-3
    torch.manual_seed(0)
    model = build_mim(PRESET, SIZE, mim)
    loss, pred, parts = model(img, sm, fm)
    assert torch.isfinite(loss) and parts["spatial"] > 0
    torch.testing.assert_close(model.denormalize(patch_normalize(img, 16), img), img, atol=1e-3, rtol=1e-3)
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    assert _cfg(mim=dict(mask_patch_size=16, norm_target=True)).mim.norm_target
    assert _parser().parse_args(["--norm-target", "--data", DATA[0], "--out", "x"]) is not None


def test_non_finite_loss_stops_with_clear_error():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.w * x.sum() * float("nan"), None, {}

    model = Bad()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(NonFiniteLossError, match="lower --lr"):
        train_one_epoch(model, [(torch.ones(2),)], opt, state=TrainState(), device=torch.device("cpu"),
                        lr_at=lambda s: 1e-3, steps_in_epoch=1)


# -- optimiser --------------------------------------------------------------------------------------------
def test_param_groups_and_schedule():
    model = build_mim(PRESET, SIZE, MimConfig(mask_patch_size=16))
    groups = param_groups(model, 0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert model.no_weight_decay() <= no_decay
    assert "encoder.blocks.0.norm1.weight" in no_decay and "encoder.blocks.0.gamma_1" in no_decay
    assert "encoder.blocks.0.attn.qkv.weight" not in no_decay
    ld = param_groups(model, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in ld for n in g["names"]}
    assert scale["decoder.0.weight"] == 1.0 and scale["encoder.blocks.3.mlp.fc1.weight"] == 0.5
    assert scale["encoder.patch_embed.proj.weight"] == 0.5**5
    lrs = [cosine_lr(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert autocast_dtype("off", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


# -- runs: resume, continued pretraining, export ---------------------------------------------------------
def test_exact_resume_matches_uninterrupted_run(tmp_path):
    cfg = _cfg(max_steps=8)  # 6 steps/epoch: resume at step 4 is mid-epoch and crosses into epoch 1
    full = fit_pretrain(cfg, tmp_path / "full", progress=False)
    half = fit_pretrain(_cfg(max_steps=4), tmp_path / "split", progress=False)
    assert half.steps == 4
    resumed = fit_pretrain(cfg, tmp_path / "split", resume=tmp_path / "split", progress=False)
    assert full.steps == resumed.steps == 8
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    ref = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    # a crash after logging past the checkpoint: resuming drops the stale lines, no duplicate steps
    with open(tmp_path / "split" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 99, "loss": 0.0}) + "\n")
    fit_pretrain(_cfg(max_steps=9), tmp_path / "split", resume=tmp_path / "split" / "checkpoint.pt", progress=False)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 10))
    with pytest.raises(ConfigError, match="batch_size"):
        fit_pretrain(_cfg(max_steps=9, batch_size=3), tmp_path / "split", resume=tmp_path / "split", progress=False)
    # a run made with the other objective (e.g. before the normalised target became the default) is named
    with pytest.raises(ConfigError, match=r"mim\.norm_target \(True in the checkpoint, False now\)") as err:
        fit_pretrain(_cfg(max_steps=9, mim=dict(mask_patch_size=16, norm_target=False)), tmp_path / "split",
                     resume=tmp_path / "split", progress=False)
    assert "--no-norm-target" in str(err.value.hint)


def test_encoder_exports_load_strictly(tmp_path):
    result = fit_pretrain(_cfg(max_steps=2), tmp_path, progress=False)
    enc = create_model(PRESET, checkpoint=result.encoder, img_size=SIZE)
    for k, v in result.model.encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v, rtol=0, atol=0)
    _, meta = read_checkpoint(result.encoder)
    assert meta["model"] == PRESET and meta["task"] == "backbone" and meta["pretrain"]["step"] == 2
    # the training checkpoint (encoder.* + decoder.*) goes through the SimMIM branch of the filter
    enc2 = create_model(PRESET, img_size=SIZE)
    report = load_into(enc2, result.checkpoint)
    assert report.source_format == "simmim" and any(k.startswith("decoder.") for k in report.dropped)
    torch.testing.assert_close(enc2.state_dict(), enc.state_dict())


def test_time_limit_stops_cleanly_with_checkpoint(tmp_path):
    result = fit_pretrain(_cfg(time_limit_min=1e-6), tmp_path, progress=False)
    assert result.steps == 1 and result.checkpoint.is_file() and result.encoder.is_file()
    from usfm_edge.train.engine import load_training_state

    assert load_training_state(result.checkpoint)["extra"]["train_seconds"] > 0  # the budget spans resumes


def test_time_budget_drives_the_cosine_and_is_kept_across_resume(tmp_path):
    """A budget that ends long before the step schedule still ends at min_lr (the cosine follows the budget
    fraction), and a resumed run that already spent its budget says so instead of training on."""
    import json

    cfg = _cfg(epochs=50, time_limit_min=0.05, min_lr=1e-6)
    fit_pretrain(cfg, tmp_path, progress=False)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"lr"' in line]
    assert lrs and lrs[-1] < 0.2 * max(lrs), lrs  # far down the cosine although only a few of 600 steps ran
    with pytest.raises(ConfigError, match="budget"):
        fit_pretrain(cfg, tmp_path, resume=tmp_path / "checkpoint.pt", progress=False)


def test_continued_pretraining_from_official_layout(tmp_path):
    torch.manual_seed(3)
    fresh = create_model(PRESET, img_size=SIZE)
    official = dict(fresh.state_dict())
    official["rel_pos_bias.relative_position_index"] = fresh.rel_pos_bias.relative_position_index.clone()
    path = tmp_path / "USFM_latest.pth"
    torch.save(official, path)
    model = build_mim(PRESET, SIZE, MimConfig(mask_patch_size=16), init=str(path))
    assert model.encoder.load_report.source_format == "usfm_official"
    torch.testing.assert_close(model.encoder.state_dict(), fresh.state_dict())
    result = fit_pretrain(_cfg(max_steps=2, init=str(path)), tmp_path / "run", progress=False)
    assert result.steps == 2
    moved = result.model.encoder.state_dict()["blocks.0.attn.qkv.weight"] - fresh.state_dict()["blocks.0.attn.qkv.weight"]
    assert 0 < moved.abs().max() < 1.0  # started from the checkpoint and trained


# -- config -----------------------------------------------------------------------------------------------
def test_config_unknown_keys_yaml_and_flags(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_pretrain_config({"bach_size": 4})
    with pytest.raises(ConfigError, match="did you mean 'mask_ratio'"):
        load_pretrain_config({"mim": {"mask_ration": 0.5}})
    with pytest.raises(ConfigError):
        load_pretrain_config({"amp": "fp16"})
    yml = tmp_path / "c.yaml"
    yml.write_text("batch_size: 8\nmim:\n  mask_ratio: 0.5\n  lambda_freq: 0.2\n")
    cfg = load_pretrain_config(yml, {"batch_size": 4, "mim.mask_ratio": 0.4, "lr": None, "data": []})
    assert (cfg.batch_size, cfg.mim.mask_ratio, cfg.mim.lambda_freq, cfg.lr) == (4, 0.4, 0.2, PretrainConfig().lr)
    shipped = load_pretrain_config("configs/pretrain_tiny.yaml")
    assert shipped.model == "usfm_vit_tiny_patch16_224" and shipped.mim == MimConfig()
    args = _parser().parse_args(["--out", "x", "--data", "a", "--data", "b", "--mask-ratio", "0.3", "--compile"])
    over = {o.field: getattr(args, o.field.replace(".", "__")) for o in pretrain_options}
    cfg = load_pretrain_config(None, over)
    assert cfg.data == ["a", "b"] and cfg.mim.mask_ratio == 0.3 and cfg.compile is True
    assert {o.field.split(".")[-1] for o in pretrain_options} <= set(PretrainConfig.__dataclass_fields__) | set(
        MimConfig.__dataclass_fields__)
    assert isinstance(UsfmMim(create_model(PRESET, img_size=SIZE)).cfg, MimConfig)
