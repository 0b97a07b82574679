"""USFM backbone: shapes, reference attention, relative position bias geometry, gradients."""

from __future__ import annotations

import pytest
import torch

import usfm_edge
from usfm_edge.core.errors import ConfigError
from usfm_edge.models.vit import relative_position_index, resize_rel_pos_table


def test_list_models_has_presets():
    names = usfm_edge.list_models()
    for n in ("usfm_vit_base_patch16_224", "usfm_vit_small_patch16_224", "usfm_vit_tiny_patch16_224", "usfm_vit_test"):
        assert n in names
    assert usfm_edge.list_models("*tiny*") == ["mae_vit_tiny_patch16_224", "usfm_vit_tiny_patch16_224"]
    from usfm_edge.models.registry import list_models

    assert list_models("*tiny*", family="beit") == ["usfm_vit_tiny_patch16_224"]
    from usfm_edge.models.registry import sizes

    assert sizes() == {s: f"usfm_vit_{s}_patch16_224" for s in ("nano", "micro", "tiny", "small", "base")}
    assert list(sizes()) == ["nano", "micro", "tiny", "small", "base"]  # smallest first


def test_unknown_model_suggests():
    with pytest.raises(ConfigError, match="did you mean 'usfm_vit_tiny_patch16_224'"):
        usfm_edge.create_model("usfm_vit_tiny_patch16_22")


@pytest.mark.parametrize("name,params_m", [("usfm_vit_base_patch16_224", 85.67), ("usfm_vit_small_patch16_224", 21.5),
                                           ("usfm_vit_tiny_patch16_224", 5.4), ("mae_vit_tiny_patch16_224", 5.52),
                                           ("mae_vit_base_patch16_224", 85.8)])
def test_preset_sizes(name, params_m):
    with torch.device("meta"):
        m = usfm_edge.create_model(name)
    n = sum(p.numel() for p in m.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.03


@pytest.mark.parametrize("preset", ["usfm_vit_test", "mae_vit_test"])
def test_forward_shapes_and_intermediates(preset):
    m = usfm_edge.create_model(preset).eval()
    x = torch.randn(2, 3, 64, 64)
    assert m.forward_features(x).shape == (2, 1 + 16, 64)
    maps = m.forward_intermediates(x)
    assert [t.shape for t in maps] == [(2, 64, 4, 4)] * 4
    maps = m.forward_intermediates(torch.randn(1, 3, 96, 64), indices=[-1, 1])
    assert [t.shape for t in maps] == [(1, 64, 6, 4)] * 2
    assert torch.isfinite(m(x)).all()
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        m.forward_features(torch.randn(1, 3, 70, 64))


def test_base_default_taps_are_usfm_upernet():
    with torch.device("meta"):
        m = usfm_edge.create_model("usfm_vit_base_patch16_224")
    assert m.default_out_indices == (3, 5, 7, 11)


def _manual_index(h, w):
    """Straightforward loop version of BEiT's relative position index (for checking the vectorised one)."""
    n = h * w
    num_rel = (2 * h - 1) * (2 * w - 1) + 3
    idx = torch.zeros(n + 1, n + 1, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dy = i // w - j // w + h - 1
            dx = i % w - j % w + w - 1
            idx[i + 1, j + 1] = dy * (2 * w - 1) + dx
    idx[0, :] = num_rel - 3
    idx[:, 0] = num_rel - 2
    idx[0, 0] = num_rel - 1
    return idx


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (14, 14)])
def test_relative_position_index_matches_definition(grid):
    assert torch.equal(relative_position_index(grid), _manual_index(*grid))


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    m = usfm_edge.create_model("usfm_vit_test").eval()
    with torch.no_grad():
        m.rel_pos_bias.relative_position_bias_table.normal_()
        for blk in m.blocks:
            blk.attn.q_bias.normal_()
            blk.attn.v_bias.normal_()
    x = torch.randn(2, 17, 64)
    blk = m.blocks[0]
    bias = m.rel_pos_bias()
    a = blk.attn
    qkv = x @ a.qkv.weight.T + torch.cat([a.q_bias, torch.zeros_like(a.q_bias), a.v_bias])
    q, k, v = qkv.reshape(2, 17, 3, 2, 32).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * 32 ** -0.5 + bias
    ref = (attn.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, 64) @ a.proj.weight.T + a.proj.bias
    torch.testing.assert_close(a(x, bias), ref, atol=1e-5, rtol=1e-5)
    assert not hasattr(a, "k_bias") or "k_bias" not in dict(m.named_parameters())


def test_resized_table_keeps_axes():
    # a table that varies only with the vertical offset must still vary only vertically after resizing
    heads, old, new = 2, (14, 14), (32, 20)
    oh, ow = 2 * old[0] - 1, 2 * old[1] - 1
    dy = torch.arange(oh, dtype=torch.float32)[:, None].expand(oh, ow)
    table = torch.cat([dy.reshape(-1, 1).repeat(1, heads), torch.zeros(3, heads)])
    out = resize_rel_pos_table(table, old, new)
    nh, nw = 2 * new[0] - 1, 2 * new[1] - 1
    plane = out[:-3, 0].reshape(nh, nw)
    assert torch.allclose(plane, plane[:, :1].expand_as(plane), atol=1e-4)  # constant along x
    assert plane[-1, 0] > plane[0, 0] + 20  # increasing along y
    assert plane[nh // 2, 0].item() == pytest.approx(dy[oh // 2, 0].item(), abs=1e-4)  # centre stays the centre


def test_other_input_size_equals_model_built_for_it():
    torch.manual_seed(0)
    small = usfm_edge.create_model("usfm_vit_test").eval()
    big = usfm_edge.create_model("usfm_vit_test", img_size=96).eval()
    sd = small.state_dict()
    sd["rel_pos_bias.relative_position_bias_table"] = resize_rel_pos_table(
        sd["rel_pos_bias.relative_position_bias_table"], (4, 4), (6, 6))
    big.load_state_dict(sd)
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(small.forward_features(x), big.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["usfm_vit_test", "mae_vit_test"])
def test_every_parameter_gets_a_gradient(preset):
    m = usfm_edge.create_model(preset, num_classes=3, global_pool="avg")
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16)
    mask[:, :5] = 1
    feats = m.forward_features(x, mask=mask)
    loss = m.forward_head(feats).sum() + feats[:, 0].sum()
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize("preset", ["usfm_vit_test", "mae_vit_test"])
def test_mask_token_replaces_masked_patches(preset):
    m = usfm_edge.create_model(preset).eval()
    x = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 16)
    mask[0, 3] = 1
    with torch.no_grad():
        a = m.forward_features(x, mask=mask)
        x2 = x.clone()
        x2[..., :16, 48:64] = 123.0  # patch 3 changed: masked, so the output must not change
        b = m.forward_features(x2, mask=mask)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("preset", ["usfm_vit_test", "mae_vit_test"])
def test_no_weight_decay_names_exist(preset):
    m = usfm_edge.create_model(preset)
    names = dict(m.named_parameters())
    assert m.no_weight_decay() <= set(names)
    assert m.group_matcher("blocks.2.attn.qkv.weight") == 3
    assert m.group_matcher("patch_embed.proj.weight") == 0
