"""The ``mae`` backbone family (TinyUSFM / UltraFedFM layout): published checkpoint layouts load strictly and
compute what an independent plain-torch MAE-ViT forward computes from the same state dict; family detection;
refusals; and the whole product path (fine-tune a hybrid seg head, ONNX / OpenVINO bundles, INT8, runtime).

Checkpoints are synthetic (random tensors of the published key names and shapes, at the ``mae_vit_test`` size);
images are real frames of the bundled sample.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import usfm_edge
from usfm_edge.core.errors import CheckpointError
from usfm_edge.core.preprocess import PreprocessSpec, preprocess
from usfm_edge.data.readers import read_image
from usfm_edge.models.checkpoint import detect_family, state_dict_keys
from usfm_edge.models.registry import convert_weights, infer_preset

torch.set_num_threads(1)
DIM, DEPTH, HEADS, GRID = 64, 4, 4, 4  # mae_vit_test: 64 px, 16 px patches


# -- synthetic checkpoints in the published layouts -----------------------------------------------------
def mae_encoder_state_dict(dim=DIM, depth=DEPTH, grid=GRID, seed=0) -> dict[str, torch.Tensor]:
    """Encoder keys of an MAE / timm ViT (``models_mae.MaskedAutoencoderViT`` minus its decoder)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd = {"cls_token": r(1, 1, dim, s=0.5), "pos_embed": r(1, 1 + grid * grid, dim, s=0.5),
          "patch_embed.proj.weight": r(dim, 3, 16, 16, s=0.02), "patch_embed.proj.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
                   p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
                   p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                   p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    sd["norm.weight"], sd["norm.bias"] = 1 + r(dim), r(dim)
    return sd


def mae_decoder_state_dict(dec=32, grid=GRID) -> dict[str, torch.Tensor]:
    """MAE pretraining decoder keys (decoder width != encoder width, as in MAE)."""
    sd = {"mask_token": torch.randn(1, 1, dec), "decoder_pos_embed": torch.randn(1, 1 + grid * grid, dec),
          "decoder_embed.weight": torch.randn(dec, DIM), "decoder_embed.bias": torch.randn(dec),
          "decoder_norm.weight": torch.ones(dec), "decoder_norm.bias": torch.zeros(dec),
          "decoder_pred.weight": torch.randn(16 * 16 * 3, dec), "decoder_pred.bias": torch.zeros(16 * 16 * 3)}
    for name, shape in [("norm1.weight", (dec,)), ("attn.qkv.weight", (3 * dec, dec)), ("attn.qkv.bias", (3 * dec,)),
                        ("mlp.fc1.weight", (4 * dec, dec))]:
        sd[f"decoder_blocks.0.{name}"] = torch.randn(*shape)
    return sd


def layouts(enc: dict) -> dict[str, dict]:
    """The published layouts of one encoder: name -> the object ``torch.save`` writes."""
    head = {"head.weight": torch.randn(5, DIM), "head.bias": torch.randn(5)}
    gp = {k: v for k, v in enc.items() if not k.startswith("norm.")}
    gp.update({"fc_norm.weight": enc["norm.weight"], "fc_norm.bias": enc["norm.bias"], **head})
    return {
        # UltraFedFM / facebookresearch-mae pretraining: {"model": encoder + decoder, "optimizer", "epoch", "args"}
        "mae_pretrain": {"model": {**enc, **mae_decoder_state_dict()}, "optimizer": {"state": {}, "param_groups": []},
                         "epoch": 399, "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)},
        # timm / MAE fine-tune with a classifier (token pooling: norm kept)
        "timm_finetune": {"model": {**enc, **head}},
        # MAE global-pool fine-tune: no norm, fc_norm + head
        "globalpool_finetune": {"model": gp},
        # TinyUSFM's distilled file: the student under "model." (flat)
        "tinyusfm_distilled": {f"model.{k}": v for k, v in enc.items()},
        # distillation with both networks, DDP-wrapped
        "student_teacher": {**{f"module.student.{k}": v for k, v in enc.items()},
                            "module.teacher.blocks.0.attn.qkv.bias": torch.zeros(3)},
    }


@pytest.fixture(scope="module")
def enc():
    return mae_encoder_state_dict()


@pytest.fixture(scope="module")
def files(enc, tmp_path_factory):
    d = tmp_path_factory.mktemp("mae_ckpt")
    out = {}
    for name, obj in layouts(enc).items():
        torch.save(obj, d / f"{name}.pth")
        out[name] = d / f"{name}.pth"
    return out


@pytest.fixture(scope="module")
def frame(sample_dir):
    return read_image(sample_dir / "busbra" / "Images" / "bus_0090-l.png")


def model_input(frame, size: int) -> torch.Tensor:
    return torch.from_numpy(preprocess(frame, PreprocessSpec(img_size=size)))[None]


# -- the independent reference: a minimal MAE-ViT forward in plain torch ops --------------------------------
def ref_resize(pos: torch.Tensor, old: int, new: tuple[int, int]) -> torch.Tensor:
    """cls slot kept; the patch slots as a (D, old, old) map, bicubic (align_corners=False) to ``new``."""
    d = pos.shape[-1]
    plane = pos[0, 1:].T.reshape(1, d, old, old)
    plane = F.interpolate(plane, size=new, mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], plane.reshape(1, d, -1).transpose(1, 2)], dim=1)


def ref_forward(sd: dict, x: torch.Tensor, heads: int = HEADS):
    """-> (tokens after the final norm (B, 1+N, D), {block: (B, D, h, w) map before the final norm})."""
    w = sd["patch_embed.proj.weight"]
    D, p = w.shape[0], w.shape[-1]
    t = F.conv2d(x, w, sd["patch_embed.proj.bias"], stride=p)
    B, _, h, wd = t.shape
    t = torch.cat([sd["cls_token"].expand(B, 1, D), t.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["pos_embed"]
    old = math.isqrt(pos.shape[1] - 1)
    t = t + (pos if (old, old) == (h, wd) else ref_resize(pos, old, (h, wd)))
    N, hd = t.shape[1], D // heads
    maps = {}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = {n[len(f"blocks.{i}."):]: v for n, v in sd.items() if n.startswith(f"blocks.{i}.")}.__getitem__
        y = F.layer_norm(t, (D,), b("norm1.weight"), b("norm1.bias"), 1e-6)
        qkv = (y @ b("attn.qkv.weight").T + b("attn.qkv.bias")).reshape(B, N, 3, heads, hd)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, N, D)
        t = t + y @ b("attn.proj.weight").T + b("attn.proj.bias")
        y = F.layer_norm(t, (D,), b("norm2.weight"), b("norm2.bias"), 1e-6)
        y = F.gelu(y @ b("mlp.fc1.weight").T + b("mlp.fc1.bias"))
        t = t + y @ b("mlp.fc2.weight").T + b("mlp.fc2.bias")
        maps[i] = t[:, 1:].transpose(1, 2).reshape(B, D, h, wd)
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6), maps


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


# -- published layouts: strict load, exact outputs ----------------------------------------------------------
@pytest.mark.parametrize("layout", ["mae_pretrain", "timm_finetune", "globalpool_finetune", "tinyusfm_distilled",
                                    "student_teacher"])
def test_published_layout_loads_strictly_and_matches_reference(layout, files, enc, frame):
    model = usfm_edge.create_model("mae_vit_test", checkpoint=files[layout]).eval()
    rep = model.load_report
    assert rep.family == "mae" and rep.missing == ["mask_token"]  # ours only: published files never hold it
    want = {"mae_pretrain": {k for k in layouts(enc)["mae_pretrain"]["model"] if k.startswith("decoder_")}
                            | {"mask_token"},
            "timm_finetune": {"head.weight", "head.bias"}, "globalpool_finetune": {"head.weight", "head.bias"},
            "tinyusfm_distilled": set(), "student_teacher": {"teacher.blocks.0.attn.qkv.bias"}}[layout]
    assert set(rep.dropped) == want, rep.dropped
    assert len(rep.mapped) == len(enc) and not rep.resized
    if layout == "globalpool_finetune":
        assert rep.renamed == {"fc_norm.weight": "norm.weight", "fc_norm.bias": "norm.bias"}
    for k, v in model.state_dict().items():
        if k != "mask_token":
            assert torch.equal(v, enc[k]), k
    x = model_input(frame, 64)
    with torch.no_grad():
        ref, maps = ref_forward(enc, x)
        assert _max_diff(model.forward_features(x), ref) <= 1e-5
        got = model.forward_intermediates(x)
    assert model.default_out_indices == (0, 1, 2, 3)
    for i, m in zip(model.default_out_indices, got):
        assert _max_diff(m, maps[i]) <= 1e-5


def test_pretrain_report_names_the_decoder(files):
    model = usfm_edge.create_model("mae_vit_test", checkpoint=files["mae_pretrain"])
    text = model.load_report.summary()
    assert model.load_report.source_format.startswith("mae_pretrain")
    assert "decoder_blocks.0.* (4)" in text and "mask_token" in text
    assert "pretraining decoder" in model.load_report.dropped["decoder_embed.weight"]


@pytest.mark.parametrize("size", [96, 48])
def test_pos_embed_resized_at_load_and_on_the_fly(size, files, enc, frame):
    built = usfm_edge.create_model("mae_vit_test", checkpoint=files["mae_pretrain"], img_size=size).eval()
    g = size // 16
    assert built.pos_embed.shape == (1, 1 + g * g, DIM)
    assert built.load_report.resized["pos_embed"] == ((1, 17, DIM), (1, 1 + g * g, DIM))
    assert torch.equal(built.pos_embed[:, 0], enc["pos_embed"][:, 0])  # the cls slot is kept
    native = usfm_edge.create_model("mae_vit_test", checkpoint=files["mae_pretrain"]).eval()
    x = model_input(frame, size)
    with torch.no_grad():
        ref, _ = ref_forward(enc, x)
        assert _max_diff(built.forward_features(x), ref) <= 1e-5  # resized when loading
        assert _max_diff(native.forward_features(x), ref) <= 1e-5  # resized on the fly


def test_resize_keeps_a_linear_ramp():
    """An embedding that grows with the row index still does so, unchanged in its range, after resizing."""
    from usfm_edge.models.mae_vit import resize_pos_embed

    ramp = torch.arange(4.0)[:, None].expand(4, 4).reshape(1, 16, 1).expand(1, 16, 3)
    pos = torch.cat([torch.full((1, 1, 3), 7.0), ramp], dim=1)
    out = resize_pos_embed(pos, (4, 4), (8, 6))
    plane = out[0, 1:, 0].reshape(8, 6)
    assert out[0, 0].tolist() == [7.0, 7.0, 7.0]
    assert torch.allclose(plane, plane[:, :1].expand_as(plane), atol=1e-5)  # constant along x
    assert (plane[1:, 0] >= plane[:-1, 0] - 1e-5).all() and plane[-1, 0] > plane[0, 0] + 2


# -- family detection, preset inference, conversion ------------------------------------------------------
def test_family_detection_is_a_function_of_the_keys(enc):
    usfm = usfm_edge.create_model("usfm_vit_test").state_dict()
    assert detect_family(usfm) == "beit"  # the official USFM names (shared table, q/v bias)
    per_block = [k.replace("rel_pos_bias.", "blocks.0.attn.") for k in usfm]
    assert detect_family(per_block) == "beit" and detect_family([f"encoder.{k}" for k in usfm]) == "beit"
    for name, obj in layouts(enc).items():
        assert detect_family(state_dict_keys(obj)) == "mae", name
    assert detect_family(list(mae_decoder_state_dict())) is None  # decoder_blocks / decoder_pos_embed only
    assert detect_family(["conv1.weight", "fc.bias"]) is None
    assert infer_preset(layouts(enc)["mae_pretrain"]) == "mae_vit_test"
    assert infer_preset(layouts(enc)["student_teacher"]) == "mae_vit_test"
    assert infer_preset(usfm) == "usfm_vit_test"
    tiny = {"pos_embed": torch.zeros(1, 197, 192), "patch_embed.proj.weight": torch.zeros(192, 3, 16, 16),
            "blocks.0.attn.qkv.bias": torch.zeros(576)}
    assert infer_preset({f"model.{k}": v for k, v in tiny.items()}) == "mae_vit_tiny_patch16_224"  # TinyUSFM
    assert infer_preset({**tiny, "patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}) == "mae_vit_base_patch16_224"
    with torch.device("meta"):
        assert usfm_edge.create_model("mae_vit_tiny_patch16_224").blocks[0].attn.head_dim == 16  # 12 heads of 16


def test_checkpoint_of_the_other_family_is_refused(files, tmp_path):
    path = tmp_path / "USFM_like.pth"
    torch.save(usfm_edge.create_model("usfm_vit_test").state_dict(), path)
    with pytest.raises(CheckpointError, match="'beit' checkpoint .* 'mae' family") as err:
        usfm_edge.create_model("mae_vit_test", checkpoint=path)
    assert "USFM_like.pth" in str(err.value) and "choose a beit preset" in str(err.value)
    with pytest.raises(CheckpointError, match="'mae' checkpoint .* 'beit' family") as err:
        usfm_edge.create_model("usfm_vit_test", checkpoint=files["timm_finetune"])
    assert "timm_finetune.pth" in str(err.value)


@pytest.mark.parametrize("bad,match", [("wrong_width", r"shape mismatch for 'cls_token'"),
                                       ("missing", r"missing key\(s\): blocks.1.mlp.fc2.bias"),
                                       ("extra", r"unexpected key\(s\): blocks.0.attn.rope_freqs")])
def test_bad_checkpoints_raise_naming_the_file(bad, match, enc, tmp_path):
    sd = mae_encoder_state_dict(dim=96) if bad == "wrong_width" else dict(enc)
    if bad == "missing":
        del sd["blocks.1.mlp.fc2.bias"]
    if bad == "extra":
        sd["blocks.0.attn.rope_freqs"] = torch.zeros(8)
    path = tmp_path / f"{bad}.pth"
    torch.save({"model": sd, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=match) as err:
        usfm_edge.create_model("mae_vit_test", checkpoint=path)
    assert f"{bad}.pth" in str(err.value)
    if bad == "wrong_width":
        with pytest.raises(CheckpointError, match="no mae preset has embedding width 96") as err:
            convert_weights(path, tmp_path / "out.safetensors")
        assert "wrong_width.pth" in str(err.value)


def test_convert_weights_cli_prints_family_and_preset(files, enc, frame, tmp_path):
    from click.testing import CliRunner

    from usfm_edge.cli import main

    out = tmp_path / "mae.safetensors"
    r = CliRunner().invoke(main, ["convert-weights", str(files["mae_pretrain"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "detected family 'mae', preset 'mae_vit_test'" in r.output and "decoder_blocks.0.*" in r.output
    r = CliRunner().invoke(main, ["convert-weights", str(files["globalpool_finetune"]), "-o", str(tmp_path / "g.safetensors")])
    assert r.exit_code == 0 and "renamed: fc_norm.bias -> norm.bias, fc_norm.weight -> norm.weight" in r.output, r.output
    rep = convert_weights(files["tinyusfm_distilled"], tmp_path / "tiny.safetensors")
    assert (rep.family, rep.preset) == ("mae", "mae_vit_test")
    m = usfm_edge.create_model("mae_vit_test", checkpoint=out).eval()
    assert m.load_report.source_format == "usfm_edge" and m.load_report.missing == []
    with torch.no_grad():
        x = model_input(frame, 64)
        assert _max_diff(m.forward_features(x), ref_forward(enc, x)[0]) <= 1e-5


# -- the product path: pretrain, fine-tune (hybrid seg head), bundles, INT8, runtime --------------------------
def test_mim_pretraining_continues_from_an_mae_file(files, tmp_path, sample_dir):
    from usfm_edge.train.config import load_pretrain_config
    from usfm_edge.train.pretrain import fit_pretrain

    cfg = load_pretrain_config(dict(data=[f"busbra:{sample_dir / 'busbra'}"], model="mae_vit_test", img_size=64,
                                    epochs=1, samples_per_epoch=8, batch_size=2, accum_steps=1, lr=0.05,
                                    warmup_epochs=0.0, workers=0, amp="off", save_every=0, log_every=1, max_steps=2,
                                    init=str(files["mae_pretrain"]), mim=dict(mask_patch_size=16)))
    result = fit_pretrain(cfg, tmp_path / "pre", progress=False)
    assert result.steps == 2
    enc = usfm_edge.create_model("mae_vit_test", checkpoint=result.encoder)
    assert enc.load_report.missing == []  # our encoder file holds the mask token the MIM objective trained
    for k, v in result.model.encoder.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k
    start = usfm_edge.create_model("mae_vit_test", checkpoint=files["mae_pretrain"]).state_dict()
    assert not torch.equal(enc.state_dict()["mask_token"], start["mask_token"])  # trained


def test_finetune_hybrid_seg_export_bundles_int8_and_runtime(files, tmp_path, sample_dir, frame, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from usfm_edge.calibration import make_quantizer
    from usfm_edge.export import export
    from usfm_edge.export.parity import default_frames
    from usfm_edge.models.tasks import load_task_model
    from usfm_edge.runtime import Engine
    from usfm_edge.train.finetune import fit_finetune, load_finetune_config

    convert_weights(files["mae_pretrain"], tmp_path / "enc.safetensors")
    data = f"busbra:{sample_dir / 'busbra'}"
    cfg = load_finetune_config(None, {"task": "seg", "data": [data], "model": "mae_vit_test", "img_size": 64,
                                      "head": "hybrid", "init": str(tmp_path / "enc.safetensors"), "epochs": 1,
                                      "batch_size": 4, "max_steps": 2, "eval_every": 1, "val_fraction": 0.3,
                                      "warmup_epochs": 0.0, "log_every": 1, "ema": 0.0})
    res = fit_finetune(cfg, tmp_path / "run", progress=False)
    seg = load_task_model(res.last)
    assert seg.backbone.family == "mae" and seg.head_name == "hybrid" and seg.config()["model"] == "mae_vit_test"
    init = usfm_edge.create_model("mae_vit_test", checkpoint=tmp_path / "enc.safetensors").state_dict()
    moved = seg.backbone.state_dict()["blocks.0.attn.qkv.weight"] - init["blocks.0.attn.qkv.weight"]
    assert 0 < moved.abs().max() < 1.0  # started from the converted MAE weights and trained

    frames = default_frames(2)
    bundles = {t: export(res.last, t, out=tmp_path / f"seg-{t}", verify_frames=frames) for t in ("onnx", "openvino")}
    masks = {}
    for target, path in bundles.items():
        meta = json.loads((path / "usfm.json").read_text())
        assert meta["parity"]["passed"] and meta["parity"]["frames"] == 2 and meta["model"]["head"] == "hybrid"
        with Engine.open(path) as engine:
            r = engine.predict(frame)
        assert r.mask.shape == frame.shape and np.allclose(r.probs.sum(0), 1.0, atol=1e-4)
        masks[target] = r.mask
    assert np.mean(masks["onnx"] == masks["openvino"]) > 0.99

    monkeypatch.setenv("USFM_EDGE_MIN_CALIB_FRAMES", "8")
    specs = [f"busbra:{sample_dir / 'busbra'}", f"hc18:{sample_dir / 'hc18'}"]
    # two training steps: the INT8 masks of a barely trained model are not the point (force keeps the bundle)
    int8 = export(res.last, "onnx", "int8", out=tmp_path / "seg-int8", quantizer=make_quantizer(specs, force=True),
                  force=True)
    meta = json.loads((int8 / "usfm.json").read_text())
    assert meta["precision"] == "int8" and meta["calibration"]["report"]["gate"]["metric"] == "dice"
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8 / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with Engine.open(int8) as engine:
        r = engine.predict(frame)
    assert r.mask.shape == frame.shape and np.isfinite(r.probs).all()


def test_raw_published_file_exports_as_a_features_bundle(files, enc, frame, tmp_path):
    """A TinyUSFM-layout .pth goes straight to a bundle (preset inferred); its runtime output is the reference's
    cls token of the same frame (the graph does the resize and normalisation itself)."""
    pytest.importorskip("onnxruntime")
    from usfm_edge.export import export
    from usfm_edge.runtime import Engine

    path = export(files["tinyusfm_distilled"], "onnx", out=tmp_path / "feat")
    meta = json.loads((path / "usfm.json").read_text())
    assert meta["task"] == "features" and meta["parity"]["passed"]
    with Engine.open(path) as engine:
        got = engine.predict(frame).features
    with torch.no_grad():
        want = ref_forward(enc, model_input(frame, 64))[0][0, 0].numpy()
    assert got.shape == (DIM,) and np.abs(got - want).max() < 1e-3


def test_info_lists_weight_families_and_licences():
    from click.testing import CliRunner

    from usfm_edge.cli import main

    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    text = r.output[r.output.index("weight families"):]
    for name, family, preset, licence in [("USFM", "beit", "usfm_vit_base_patch16_224", "CC-BY-NC 4.0"),
                                          ("TinyUSFM", "mae", "mae_vit_tiny_patch16_224", "Apache-2.0"),
                                          ("UltraFedFM", "mae", "mae_vit_base_patch16_224", "unconfirmed")]:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name + " "))
        assert f"family {family}" in line and preset in line, line
        assert licence in text.split(line, 1)[1].splitlines()[1]
    weights = json.loads(CliRunner().invoke(main, ["info", "--json"]).output)["weights"]
    assert [w["name"] for w in weights] == ["USFM", "TinyUSFM", "UltraFedFM"]
    assert all(w["preset"] in usfm_edge.list_models() for w in weights)
