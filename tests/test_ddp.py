"""Two-process DDP pretraining on CPU (Gloo), started like torchrun: RANK/WORLD_SIZE/MASTER_* in the env."""

from __future__ import annotations

import json
import os
import socket

import torch
import torch.multiprocessing as mp

from usfm_edge.data import sample_dir

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from usfm_edge.train.config import load_pretrain_config
    from usfm_edge.train.pretrain import fit_pretrain

    sample = sample_dir()
    cfg = load_pretrain_config({
        "data": [f"busbra:{sample / 'busbra'}", f"hc18:{sample / 'hc18'}"], "model": "usfm_vit_test",
        "img_size": 64, "batch_size": 2, "accum_steps": 2, "samples_per_epoch": 16, "epochs": 2, "lr": 0.05,
        "workers": 0, "device": "cpu", "amp": "off", "save_every": 2, "log_every": 1, "max_steps": STEPS,
        "mim": {"mask_patch_size": 16}})
    result = fit_pretrain(cfg, out, progress=False)
    torch.save(result.model.state_dict(), os.path.join(out, f"weights_rank{rank}.pt"))


def test_two_process_gloo_ddp(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks diverged at {k}"
    # one log (rank 0 only): one line per step, not one per rank
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert all(r["images_per_s"] > 0 for r in log)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pt", "config.yaml", "encoder.safetensors", "log.jsonl", "weights_rank0.pt",
                     "weights_rank1.pt"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == STEPS and state["extra"]["world_size"] == 2
    for k, v in state["model"].items():
        assert torch.equal(v, w0[k]), k
    torch.manual_seed(0)  # the run's initial weights (seed 0): training moved them
    from usfm_edge.models.mim import MimConfig, build_mim

    init = build_mim("usfm_vit_test", 64, MimConfig(mask_patch_size=16)).state_dict()
    assert not torch.equal(init["encoder.blocks.0.attn.qkv.weight"], w0["encoder.blocks.0.attn.qkv.weight"])
