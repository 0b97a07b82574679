"""Dual masked image modelling pretraining: data + model + optimiser + engine, resumable, DDP-ready.

Single process::

    python -m usfm_edge.train.pretrain --data busbra:/data/busbra --data hc18:/data/hc18 \\
        --model usfm_vit_tiny_patch16_224 --out runs/pre --epochs 10

Several processes (one per GPU, or Gloo on CPU)::

    torchrun --nproc_per_node 2 -m usfm_edge.train.pretrain --data ... --out runs/pre

A run folder holds ``config.yaml`` (resolved config), ``log.jsonl`` (one line per ``log_every`` steps),
``checkpoint.pt`` (full training state, for ``--resume``) and ``encoder.safetensors`` (the backbone, which
``create_model(preset, checkpoint=...)`` loads strictly).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usfm_edge.core.config import to_dict
from usfm_edge.core.errors import ConfigError, UsfmEdgeError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.models.checkpoint import save_checkpoint
from usfm_edge.models.mim import UsfmMim, build_mim
from usfm_edge.models.registry import model_args
from usfm_edge.train.config import PretrainConfig, load_pretrain_config
from usfm_edge.train.dist import DistInfo, cleanup, init_distributed
from usfm_edge.train.engine import (
    JsonlLogger,
    TimeBudget,
    TrainState,
    autocast_dtype,
    distributed,
    remove_stale_checkpoint_temps,
    restore_training_state,
    resume_payload,
    run_epochs,
    save_training_state,
    schedule,
    write_run_config,
)
from usfm_edge.train.optim import build_optimizer
from usfm_edge.train.options import add_argparse_options, overrides_from, pretrain_options

__all__ = ["PretrainResult", "fit_pretrain", "run_pretrain", "export_encoder", "main"]

CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.safetensors"
# fields that must match for --resume to continue the same run (others, e.g. max_steps, may change)
_RESUME_FIXED = ("data", "model", "img_size", "batch_size", "accum_steps", "seed", "samples_per_epoch", "mim")


@dataclass
class PretrainResult:
    """What a run produced: the training checkpoint, the encoder file, steps done and the trained model."""

    checkpoint: Path
    encoder: Path
    steps: int
    model: UsfmMim


def _load_records(cfg: PretrainConfig) -> list:
    from usfm_edge.data.sources import load_records

    if not cfg.data:
        raise ConfigError("no data sources given", hint="add --data busbra:PATH, hc18:PATH or folder:PATH[@organ]")
    records = []
    for spec in cfg.data:
        records.extend(load_records(spec))
    return records


def export_encoder(model: UsfmMim, cfg: PretrainConfig, path: str | Path, state: TrainState) -> Path:
    """Save the encoder as a usfm-edge ``.safetensors`` backbone (config records the pretraining)."""
    config = {
        "model": cfg.model,
        "model_args": model_args(cfg.model, img_size=cfg.img_size),
        "task": "backbone",
        "preprocess": PreprocessSpec(img_size=cfg.img_size).to_dict(),
        "pretrain": {"objective": "usfm_dual_mim", "step": state.step, "epoch": state.epoch,
                     "config": to_dict(cfg)},
    }
    return save_checkpoint(path, model.encoder.state_dict(), config)


def _check_resume(saved: dict, cfg: PretrainConfig, path: Path) -> None:
    diff = cfg.resume_diff(saved, _RESUME_FIXED)  # names the nested field: mim.norm_target (True -> False)
    if diff:
        hint = "resume with the original settings (see the run's config.yaml)"
        if any(d.startswith("mim.norm_target") for d in diff):
            hint += "; runs started before the normalised target became the default need --no-norm-target"
        raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}", path=path,
                          hint=hint)


def fit_pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: str | Path | None = None,
                 progress: bool = True) -> PretrainResult:
    """Pretrain (or continue pretraining) a USFM encoder with dual masked image modelling.

    Args:
        cfg: the run config.
        out_dir: run folder (created); checkpoints and logs go there.
        resume: ``checkpoint.pt`` to continue exactly (model, optimiser, step, RNG, data position), or a run
            folder holding one.
        progress: show a tqdm bar on the main rank.

    Returns:
        A :class:`PretrainResult`. Under torchrun every rank returns its own (identical) model.
    """
    info = init_distributed(cfg.device)
    try:
        return _fit(cfg, Path(out_dir), resume, progress, info)
    finally:
        cleanup()


def _fit(cfg: PretrainConfig, out: Path, resume, progress: bool, info: DistInfo) -> PretrainResult:
    out.mkdir(parents=True, exist_ok=True)
    payload, resume = resume_payload(resume, CHECKPOINT)
    remove_stale_checkpoint_temps(out / CHECKPOINT)
    if payload is not None:
        _check_resume(payload["config"], cfg, resume)
        if payload["extra"].get("world_size", 1) != info.world_size:
            raise ConfigError(f"--resume: the checkpoint was written by {payload['extra'].get('world_size')} "
                              f"process(es), this run has {info.world_size}", path=resume,
                              hint="resume with the same number of processes so every rank continues its shard")
    if info.device.type == "cuda":  # TF32 matmuls on Ampere+: fp32 training at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    init = None if payload is not None else cfg.init  # a resumed run takes every weight from its checkpoint
    model = build_mim(cfg.model, cfg.img_size, cfg.mim, cfg.drop_path, init=init).to(info.device)
    if init and info.is_main:
        print(f"[pretrain] encoder from {cfg.init}: {model.encoder.load_report.summary()}", file=sys.stderr)
    records = _load_records(cfg)
    loader, sampler = _loader(cfg, records, model.patch_size, info)
    sched = schedule(cfg, len(sampler.base), info.world_size,
                     hint="lower --batch-size/--accum-steps or raise --samples-per-epoch")
    optimizer = build_optimizer(model, sched.peak_lr, cfg.weight_decay)
    state = TrainState()
    if payload is not None:
        state = restore_training_state(payload, model, optimizer, sched.steps_per_epoch * cfg.accum_steps)
    else:
        torch.manual_seed(cfg.seed + info.rank)  # drop path differs per rank, as data does
        np.random.seed(cfg.seed + info.rank)

    net = distributed(torch.compile(model) if cfg.compile else model, info)
    amp = autocast_dtype(cfg.amp, info.device)
    config_dict = to_dict(cfg)
    logger = JsonlLogger(out / "log.jsonl", enabled=info.is_main)
    if payload is not None:
        logger.truncate_after(state.step)
    if info.is_main:
        write_run_config(out, config_dict)
        _announce(cfg, records, sampler, info, amp, sched, state if payload else None)
    saved_at = [-1]
    budget = TimeBudget(cfg.time_limit_min, payload)  # spans resumes, like fine-tuning's
    budget.check_not_spent(resume)

    def checkpoint(st: TrainState) -> None:
        if info.is_main and saved_at[0] != st.step:
            saved_at[0] = st.step
            save_training_state(out / CHECKPOINT, model=model, optimizer=optimizer, state=st, config=config_dict,
                                extra={"organs": sampler.base.names, "world_size": info.world_size,
                                       "train_seconds": budget.spent()})
            export_encoder(model, cfg, out / ENCODER, st)

    run_epochs(net, loader, optimizer, sampler, state=state, epochs=cfg.epochs, batch_size=cfg.batch_size,
               last_step=min(sched.total_steps, cfg.max_steps or sched.total_steps),
               time_limit_min=budget.remaining_min(),
               progress=progress and info.is_main, device=info.device,
               lr_at=budget.lr_fn(sched, cfg.min_lr),
               steps_in_epoch=sched.steps_per_epoch, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
               amp_dtype=amp, dist_info=info, images_per_step=sched.total_batch, log_every=cfg.log_every,
               logger=logger, save_every=cfg.save_every, checkpoint_fn=checkpoint)
    checkpoint(state)
    if info.distributed:
        torch.distributed.barrier()
    return PretrainResult(out / CHECKPOINT, out / ENCODER, state.step, model)


def _loader(cfg: PretrainConfig, records: list, patch_size: int, info: DistInfo):
    """The organ-balanced, resumable loader of MIM samples (masks made by the data workers)."""
    from usfm_edge.train.datasets import MimPretrainDataset, build_pretrain_loader
    from usfm_edge.train.masking import MimTransform

    transform = MimTransform(PreprocessSpec(img_size=cfg.img_size), patch_size, cfg.mim.mask_patch_size,
                             cfg.mim.mask_ratio, cfg.mim.freq_prob, cfg.mim.ring_params())
    return build_pretrain_loader(
        MimPretrainDataset(records, transform, cfg.seed), [r.organ for r in records], batch_size=cfg.batch_size,
        seed=cfg.seed, samples_per_epoch=cfg.samples_per_epoch, organ_weights=cfg.organ_weights, rank=info.rank,
        world_size=info.world_size, workers=cfg.workers, pin_memory=info.device.type == "cuda")


def _announce(cfg: PretrainConfig, records: list, sampler, info: DistInfo, amp, sched, resumed: TrainState | None):
    print(f"[pretrain] {len(records)} images ({', '.join(sampler.base.names)}), {info.world_size} process(es) "
          f"on {info.device}, amp={amp or 'fp32'}; {sched.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, "
          f"batch {sched.total_batch}, peak lr {sched.peak_lr:.3g}, warm-up {sched.warmup_steps} steps"
          + (f"; resuming at step {resumed.step}" if resumed else ""), file=sys.stderr)
    if info.device.type == "cpu":
        from usfm_edge.kernels.mkl_dispatch import ENV_VAR, shim_applicable, shim_loaded

        applicable, reason = shim_applicable()
        if applicable and not shim_loaded():
            print(f"[pretrain] note: {ENV_VAR}=1 lets torch's MKL use AVX2 FFT kernels on this "
                  f"{reason.split(' CPU')[0]} CPU (README, 'AMD CPUs')", file=sys.stderr)


def run_pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: str | Path | None = None) -> Path:
    """Run pretraining and return the path of the final training checkpoint (``out_dir/checkpoint.pt``).

    The encoder alone is written next to it as ``encoder.safetensors``.
    """
    return fit_pretrain(cfg, out_dir, resume).checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m usfm_edge.train.pretrain", description=__doc__.splitlines()[0])
    return add_argparse_options(p, pretrain_options)


def main(argv: list[str] | None = None) -> int:
    """argparse entry point (``python -m usfm_edge.train.pretrain``); the click CLI wraps ``run_pretrain``."""
    args = _parser().parse_args(argv)
    overrides = overrides_from(args, pretrain_options)
    try:
        cfg = load_pretrain_config(args.config, overrides)
        resume = Path(args.out) / CHECKPOINT if args.resume == "auto" else args.resume
        result = fit_pretrain(cfg, args.out, resume)
    except UsfmEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[pretrain] done: {result.steps} steps; {result.checkpoint}, {result.encoder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
