"""Checkpoint loading: the official USFM key layout, SimMIM files, our safetensors, and every refusal."""

from __future__ import annotations

import pickle

import pytest
import torch

import usfm_edge
from usfm_edge.core.errors import CheckpointError
from usfm_edge.models.checkpoint import checkpoint_filter_fn, load_into, save_checkpoint
from usfm_edge.models.registry import convert_weights


def official_usfm_state_dict(dim=768, depth=12, heads=12, grid=14, seed=0) -> dict[str, torch.Tensor]:
    """A synthetic checkpoint with exactly the key names and shapes of USFM_latest.pth (dossier §1.2)."""
    g = torch.Generator().manual_seed(seed)
    n_tok = grid * grid + 1

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {
        "cls_token": r(1, 1, dim),
        "mask_token": r(1, 1, dim),
        "patch_embed.proj.weight": r(dim, 3, 16, 16),
        "patch_embed.proj.bias": r(dim),
        "rel_pos_bias.relative_position_bias_table": r((2 * grid - 1) ** 2 + 3, heads),
        "rel_pos_bias.relative_position_index": torch.zeros(n_tok, n_tok, dtype=torch.long),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim),
            p + "attn.q_bias": r(dim), p + "attn.v_bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim),
            p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
            p + "gamma_1": 0.1 + r(dim),
            p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
            p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
            p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim),
            p + "gamma_2": 0.1 + r(dim),
        })
    sd["norm.weight"] = 1 + r(dim)
    sd["norm.bias"] = r(dim)
    return sd


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
    sd = official_usfm_state_dict()
    assert len(sd) == 188
    path = tmp_path_factory.mktemp("ckpt") / "USFM_latest.pth"
    torch.save(sd, path)
    return path, sd


def test_official_layout_loads_strictly_every_key_used(official_pth):
    path, sd = official_pth
    model = usfm_edge.create_model("usfm_vit_base_patch16_224", checkpoint=path)
    rep = model.load_report
    assert rep.source_format == "usfm_official"
    assert len(rep.mapped) == 187 and rep.missing == []
    assert set(rep.dropped) == {"rel_pos_bias.relative_position_index"}
    own = model.state_dict()
    for k in rep.mapped:  # every tensor really arrived, q/v bias and layer scale included
        torch.testing.assert_close(own[k], sd[k])


def test_official_layout_resized_to_512(official_pth):
    path, sd = official_pth
    model = usfm_edge.create_model("usfm_vit_base_patch16_224", checkpoint=path, img_size=512)
    assert model.rel_pos_bias.relative_position_bias_table.shape == (63 * 63 + 3, 12)
    assert "rel_pos_bias.relative_position_bias_table" in model.load_report.resized
    torch.testing.assert_close(model.rel_pos_bias.relative_position_bias_table[-3:],
                               sd["rel_pos_bias.relative_position_bias_table"][-3:])


def test_simmim_nested_encoder_prefix_and_decoder_dropped():
    ref = usfm_edge.create_model("usfm_vit_test")
    nested = {"model": {**{"encoder." + k: v for k, v in ref.state_dict().items()},
                        "decoder.0.weight": torch.zeros(768, 64, 1, 1)}, "epoch": 3}
    m = usfm_edge.create_model("usfm_vit_test")
    rep = load_into(m, nested)
    assert rep.source_format == "simmim" and "decoder.0.weight" in rep.dropped
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v)


def test_identical_per_block_tables_collapse():
    ref = usfm_edge.create_model("usfm_vit_test")
    sd = dict(ref.state_dict())
    table = sd.pop("rel_pos_bias.relative_position_bias_table")
    for i in range(4):
        sd[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    out = checkpoint_filter_fn(sd, ref)
    assert torch.equal(out["rel_pos_bias.relative_position_bias_table"], table)
    sd["blocks.1.attn.relative_position_bias_table"] = table + 1
    with pytest.raises(CheckpointError, match="per-block"):
        checkpoint_filter_fn(sd, ref)


def test_safetensors_roundtrip_and_fp16(tmp_path):
    ref = usfm_edge.create_model("usfm_vit_test")
    p = save_checkpoint(tmp_path / "w.safetensors", ref.state_dict(), {"model": "usfm_vit_test"}, half=True)
    m = usfm_edge.create_model("usfm_vit_test", checkpoint=p)
    assert m.load_report.source_format == "usfm_edge"
    torch.testing.assert_close(m.cls_token, ref.cls_token, atol=1e-3, rtol=1e-3)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_other_architecture_is_refused(official_pth):
    path, _ = official_pth
    with pytest.raises(CheckpointError, match="shape mismatch|does not match") as exc:
        usfm_edge.create_model("usfm_vit_small_patch16_224", checkpoint=path)
    assert "USFM_latest.pth" in str(exc.value)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = dict(usfm_edge.create_model("usfm_vit_test").state_dict())
    del sd["blocks.0.attn.q_bias"]
    sd["blocks.0.attn.qkv.bias"] = torch.zeros(192)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): blocks.0.attn.qkv.bias.*missing key\(s\): blocks.0.attn.q_bias"):
        usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "bad.pth")


def test_truncated_and_empty_files(tmp_path, official_pth):
    path, _ = official_pth
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cut.pth"):
        usfm_edge.create_model("usfm_vit_base_patch16_224", checkpoint=tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "empty.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "nope.pth")


def test_wrong_files_get_a_message_that_says_what_they_are(tmp_path):
    """A text file, random bytes and a run's training state (checkpoint.pt) each say what to pass instead."""
    from click.testing import CliRunner

    from usfm_edge.cli import main
    from usfm_edge.train.engine import TrainState, save_training_state

    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(CheckpointError, match="not a checkpoint: this is a text file") as err:
        usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "notes.txt")
    assert "best.safetensors" in str(err.value) and "pop from" not in str(err.value)
    (tmp_path / "notes-utf8.txt").write_text("a" + "é" * 2048)  # the 4096 bytes read end inside a character
    with pytest.raises(CheckpointError, match="text file"):
        usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "notes-utf8.txt")
    save_checkpoint(tmp_path / "w.safetensors", usfm_edge.create_model("usfm_vit_test").state_dict(), {})
    (tmp_path / "w.safetensors").rename(tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="safetensors file without the .safetensors suffix"):
        usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "w.pth")
    (tmp_path / "noise.pth").write_bytes(bytes(range(7, 200)))
    with pytest.raises(CheckpointError, match="binary file of another kind"):
        usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "noise.pth")
    run = tmp_path / "run"
    model = usfm_edge.create_model("usfm_vit_test")
    save_training_state(run / "checkpoint.pt", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        state=TrainState(), config={"task": "seg"})
    (run / "best.safetensors").write_bytes(b"x")  # only its name matters to the hint
    res = CliRunner().invoke(main, ["export", str(run / "checkpoint.pt"), "--target", "onnx", "-o", str(tmp_path / "b")])
    assert res.exit_code == 1, res.output
    assert "training-state file" in res.output and str(run / "best.safetensors") in res.output, res.output
    assert "convert-weights" not in res.output


class _Evil:
    def __reduce__(self):
        return (exec, ("open('/tmp/usfm_edge_pwned', 'w').write('x')",))


def test_code_running_pickle_is_refused(tmp_path):
    import os

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": _Evil()}, f)
    torch.save({"x": _Evil()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="evil") as err:
            usfm_edge.create_model("usfm_vit_test", checkpoint=p)
        text = str(err.value)  # one complete message: no escape codes, no sentence cut short
        assert "\x1b" not in text and "refused: the pickle" in text and "contains code and was refused" in text, text
        assert "truncated" not in text and len(text) < 600, text
    assert "references builtins.exec" in str(err.value)  # torch.save's pickle names the refused global
    assert not os.path.exists("/tmp/usfm_edge_pwned")


def test_convert_weights(tmp_path):
    sd = official_usfm_state_dict(dim=64, depth=4, heads=2, grid=4)
    torch.save(sd, tmp_path / "tiny_official.pth")
    rep = convert_weights(tmp_path / "tiny_official.pth", tmp_path / "out.safetensors")
    assert len(rep.mapped) == len(sd) - 1
    m = usfm_edge.create_model("usfm_vit_test", checkpoint=tmp_path / "out.safetensors")
    torch.testing.assert_close(m.blocks[3].gamma_2, sd["blocks.3.gamma_2"])


def test_convert_weights_keeps_a_usfm_edge_encoders_input_size(tmp_path):
    # a 96-px pretraining encoder (not the preset's default size) converts to fp16 without a lossy table resize
    enc = usfm_edge.create_model("usfm_vit_test", img_size=96)
    cfg = {"model": "usfm_vit_test", "model_args": {"img_size": 96}, "task": "backbone", "pretrain": {"step": 7}}
    save_checkpoint(tmp_path / "encoder.safetensors", enc.state_dict(), cfg)
    rep = convert_weights(tmp_path / "encoder.safetensors", tmp_path / "fp16.safetensors", half=True)
    assert not rep.resized
    from usfm_edge.models.checkpoint import load_checkpoint
    sd, meta = load_checkpoint(tmp_path / "fp16.safetensors")
    assert meta["model_args"]["img_size"] == 96 and meta["pretrain"] == {"step": 7}
    table = "rel_pos_bias.relative_position_bias_table"
    torch.testing.assert_close(sd[table].float(), enc.state_dict()[table].half().float())
