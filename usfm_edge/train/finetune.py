"""Label-efficient fine-tuning: segmentation, classification and enhancement heads on a USFM backbone.

Shares the pretraining engine (``train.engine``: progress bar, JSONL log, atomic checkpoints, exact
``--resume``, torchrun DDP). What is specific to fine-tuning:

* data: records of the ``--data`` sources, split by **patient** into train / validation (``val_fraction``,
  ``split_seed``); ``label_fraction`` then keeps a seeded fraction of the *training patients* (nested:
  the 10% set lies inside the 25% set), so label-efficiency runs differ only in how many labels they see;
* model: ``models.tasks.build_task_model`` from ``--init`` (USFM_latest.pth, a pretraining encoder, a
  task checkpoint) or ``none`` (from scratch); layer-wise lr decay (USFM: 0.65) through
  ``train.optim.param_groups``;
* losses (``train.losses``): seg = cross-entropy + soft Dice (+ 0.4 x the same on UperNet's auxiliary head);
  cls = cross-entropy with label smoothing (USFM: 0.1); enhance = L1 to the clean frame;
* model selection: the held-out patients are evaluated every ``eval_every`` epochs through the export graph
  (``evaluation.TorchPredictor``: frames at their own size, exactly what a bundle computes); the best
  checkpoint by Dice / AUC / PSNR is kept as ``best.safetensors``, the last as ``last.safetensors``. Each
  stores task, labels, preprocessing, data split and metrics, so ``export`` needs no extra flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from usfm_edge.core.config import to_dict
from usfm_edge.core.errors import ConfigError, UsfmEdgeError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.data.sources import label_names, load_records
from usfm_edge.data.splits import label_fraction, patient_split
from usfm_edge.models.tasks import build_task_model, save_task_checkpoint
from usfm_edge.train.config import RunConfig, load_config
from usfm_edge.train.dist import cleanup, init_distributed
from usfm_edge.train.engine import (
    JsonlLogger,
    TimeBudget,
    TrainState,
    autocast_dtype,
    distributed,
    ema_model,
    remove_stale_checkpoint_temps,
    restore_ema,
    restore_training_state,
    resume_payload,
    run_epochs,
    save_training_state,
    schedule,
    write_run_config,
)
from usfm_edge.train.losses import TaskLoss, soft_dice_loss  # noqa: F401 - soft_dice_loss: re-exported
from usfm_edge.train.optim import param_groups
from usfm_edge.train.options import add_argparse_options, finetune_options, overrides_from

CHECKPOINT, BEST, LAST = "checkpoint.pt", "best.safetensors", "last.safetensors"
PRIMARY = {"seg": "dice", "cls": "auc", "enhance": "psnr"}


@dataclass
class FinetuneConfig(RunConfig):
    """A fine-tuning run: the :class:`~usfm_edge.train.config.RunConfig` fields (with fine-tuning's schedule
    defaults) plus the ones below; every field is a CLI flag (``train.options.finetune_options``).

    Attributes:
        task: ``seg``, ``cls`` or ``enhance``.
        init: starting weights (``USFM_latest.pth``, a pretraining ``encoder.safetensors``, a task checkpoint)
            or ``none`` for random initialisation.
        model: backbone preset (ignored when ``init`` is a task checkpoint of another preset: error).
        head: ``auto`` or a head name (seg: ``upernet`` / ``light``).
        label_fraction: fraction of the training patients whose labels are used (1.0 = all).
        val_fraction, split_seed: the patient-level held-out split (keep them fixed across runs).
        label_seed: seed of the labelled subset (default ``split_seed``); vary it to measure how much the
            choice of labelled patients matters.
        layer_decay: layer-wise lr decay (USFM: 0.65; with lr decay, wd 0.05, clip 5, drop path 0.1).
        label_smoothing: classification only (USFM: 0.1).
        dice_weight: weight of the soft Dice term of the seg loss.
        augment: training augmentation: ``ultrasound`` (scanner/operator effects, ``data.augment``),
            ``light``, ``basic`` (crop, flip, gain/gamma) or ``none``.
        ema: decay of the exponential moving average of the weights (0 = off). With EMA the validation,
            ``best`` and ``last`` checkpoints use the averaged weights.
        aux_weight: weight of the deep-supervision loss of heads that have one (UperNet's auxiliary head, the
            hires head's stride-8 logits); None keeps the head's default (0.4), 0 turns it off.
        eval_every: epochs between validations (the last epoch is always validated); eval_limit caps the
            number of validation frames (None = all).
    """

    model: str = "usfm_vit_tiny_patch16_224"
    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    warmup_epochs: float = 2.0
    workers: int = 0
    save_every: int = 0
    task: str = "seg"
    init: str = "none"
    head: str = "auto"
    label_fraction: float = 1.0
    val_fraction: float = 0.2
    split_seed: int = 0
    label_seed: int | None = None
    layer_decay: float = 0.65
    label_smoothing: float = 0.1
    dice_weight: float = 1.0
    augment: str = "ultrasound"
    ema: float = 0.999
    aux_weight: float | None = None
    eval_every: int = 5
    eval_limit: int | None = None

    def __post_init__(self):
        if self.task not in PRIMARY:
            raise ConfigError(f"task must be seg, cls or enhance, got {self.task!r}")
        super().__post_init__()
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def load_finetune_config(config=None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Defaults < YAML (path or dict) < flag overrides (None / empty lists ignored): ``train.config.load_config``."""
    return load_config(FinetuneConfig, config, overrides)


@dataclass
class FinetuneResult:
    best: Path
    last: Path
    metrics: dict
    history: list


def _splits(cfg: FinetuneConfig):
    records = [r for spec in cfg.data for r in load_records(spec)]
    if not records:
        raise ConfigError("no data: pass --data SOURCE")
    train, val = patient_split(records, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if cfg.label_fraction < 1.0:
        train = label_fraction(train, cfg.label_fraction,
                               seed=cfg.split_seed if cfg.label_seed is None else cfg.label_seed)
    return records, train, val


def _labels(cfg: FinetuneConfig, records) -> list[str] | None:
    if cfg.task == "cls":
        return label_names(records)
    if cfg.task == "seg":
        return ["background", records[0].organ if records[0].fill_outline else "lesion"]
    return None


def _evaluate(model, val, task: str, limit: int | None, device) -> dict:
    from usfm_edge.evaluation import TorchPredictor, evaluate_predictor

    recs = val if not limit or len(val) <= limit else [val[i] for i in np.linspace(0, len(val) - 1, limit).astype(int)]
    was = model.training
    try:
        return evaluate_predictor(TorchPredictor(model, device=str(device)), recs, task)
    finally:
        model.train(was)


class _Validations:
    """What a fine-tuning run keeps between epochs: validation history, best score, last metrics and training time
    (earlier runs included); validates the scored (EMA) model, saves ``best``/``last`` and the training state."""

    def __init__(self, cfg: FinetuneConfig, out: Path, model: nn.Module, ema, optimizer, val: list, info,
                 logger, config: dict, extra_meta: dict, payload: dict | None):
        self.cfg, self.out, self.model, self.ema, self.optimizer = cfg, out, model, ema, optimizer
        self.val, self.info, self.logger, self.config, self.extra_meta = val, info, logger, config, extra_meta
        self.scored = model if ema is None else ema.module  # what is validated and saved
        extra = payload["extra"] if payload is not None else {}
        self.history: list = json.loads(extra.get("history", "[]"))
        self.best_score = float(extra.get("best_score", -float("inf")))
        self.budget = TimeBudget(cfg.time_limit_min, payload)
        self.metrics: dict = {}

    def checkpoint(self, st: TrainState) -> None:
        if self.info.is_main:
            extra = {"history": json.dumps(self.history), "best_score": self.best_score, "train_seconds": self.budget.spent()}
            if self.ema is not None:
                extra["ema"] = self.ema.state_dict()
            save_training_state(self.out / CHECKPOINT, model=self.model, optimizer=self.optimizer, state=st,
                                config=self.config, extra=extra)

    def end_of_epoch(self, st: TrainState, done: bool, bar) -> None:
        cfg = self.cfg
        if not self.info.is_main or not (done or (st.epoch + 1) % cfg.eval_every == 0):
            return
        self.metrics = _evaluate(self.scored, self.val, cfg.task, cfg.eval_limit, self.info.device)
        self.history.append({"epoch": st.epoch, "step": st.step, **self.metrics})
        self.logger.log(event="eval", epoch=st.epoch, step=st.step, **self.metrics)
        score = self.metrics[PRIMARY[cfg.task]]
        if score > self.best_score:
            self.best_score = score
            save_task_checkpoint(self.scored, self.out / BEST, extra={**self.extra_meta, "metrics": self.metrics,
                                                                      "epoch": st.epoch, "step": st.step})
        if bar is not None:
            bar.write(f"[finetune] epoch {st.epoch}: " + ", ".join(
                f"{k}={v:.4f}" for k, v in self.metrics.items() if isinstance(v, float)))

    def finish(self, state: TrainState) -> None:
        if self.info.is_main:
            self.checkpoint(state)
            save_task_checkpoint(self.scored, self.out / LAST, extra={**self.extra_meta, "metrics": self.metrics,
                                                                      "step": state.step})
            (self.out / "metrics.json").write_text(json.dumps(
                {"last": self.metrics, "best_score": self.best_score, "primary": PRIMARY[self.cfg.task],
                 "history": self.history}, indent=2))


def _model(cfg: FinetuneConfig, labels, payload, info, build_model) -> nn.Module:
    """The task model (seeded; from ``cfg.init`` unless resuming), or ``build_model(labels)``."""
    torch.manual_seed(cfg.seed)
    if build_model is not None:
        return build_model(labels).to(info.device)
    init = None if (payload is not None or cfg.init in ("", "none", None)) else cfg.init
    head, head_args = _init_head(cfg)  # on --resume too: the same head as the run's start
    if cfg.aux_weight is not None:
        head_args = {**(head_args or {}), "aux_weight": cfg.aux_weight}
    return build_task_model(cfg.task, backbone=cfg.model, labels=labels, head=head, img_size=cfg.img_size,
                            checkpoint=init, drop_path_rate=cfg.drop_path, head_args=head_args).to(info.device)


def _init_head(cfg: FinetuneConfig) -> tuple[str, dict | None]:
    """The head to build: a task checkpoint given as ``--init`` for the same task lends its head and head
    arguments when ``--head`` is ``auto`` or names the same head (fine-tuning a shipped model or a student
    continues from its whole network, widths included); otherwise ``cfg.head`` with its defaults."""
    if not cfg.init or not Path(cfg.init).is_file():  # none, or a file the model build reports as missing
        return cfg.head, None
    from usfm_edge.models.checkpoint import read_checkpoint_config

    ck = read_checkpoint_config(cfg.init) or {}  # other formats: None
    if ck.get("task") == cfg.task and cfg.head in ("auto", ck.get("head")) and ck.get("head"):
        return ck["head"], dict(ck.get("head_args") or {})
    return cfg.head, None


def _loader(cfg: FinetuneConfig, train: list, spec: PreprocessSpec, info, groups: list[str] | None = None,
            weights: dict[str, float] | None = None):
    """``(loader, resumable sampler, per-rank sample count)`` of the labelled training records, organ-balanced
    (or balanced over ``groups``, one key per record, with optional ``weights`` per key)."""
    from usfm_edge.data.sampler import OrganBalancedSampler
    from usfm_edge.train.datasets import PositionedSampler
    from usfm_edge.train.task_data import TaskDataset

    dataset = TaskDataset(train, cfg.task, spec, train=True, seed=cfg.seed, augment=cfg.augment)
    base = OrganBalancedSampler(groups or [r.organ for r in train], num_samples=len(train), weights=weights,
                                seed=cfg.seed, rank=info.rank, world_size=info.world_size)
    sampler = PositionedSampler(base, info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler, len(base)


def _split_record(cfg: FinetuneConfig, train: list, val: list) -> dict:
    return {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "label_seed": cfg.label_seed,
            "train_images": len(train), "val_images": len(val),
            "train_patients": len({(r.organ, r.patient) for r in train})}


def fit_finetune(cfg: FinetuneConfig, out_dir: str | Path, resume: str | Path | None = None,
                 progress: bool = True, build_model=None) -> FinetuneResult:
    """Fine-tune and validate; returns the best/last checkpoint paths and the last validation metrics.

    ``build_model(labels) -> nn.Module`` replaces the USFM task model (baselines such as
    ``benchmarks/unet_baseline.py``); it must offer the task-model interface (``task``, ``labels``,
    ``img_size``, ``preprocess``, ``forward``, ``forward_train``, ``aux_weight``, ``depth``,
    ``group_matcher``, ``no_weight_decay``, ``config``) and then ``cfg.model``, ``cfg.head`` and ``cfg.init``
    are only recorded.
    """
    info = init_distributed(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        payload, resume = resume_payload(resume, CHECKPOINT)
        remove_stale_checkpoint_temps(out / CHECKPOINT)
        if payload is not None:
            diff = cfg.resume_diff(payload["config"], sorted(
                k for k in payload["config"] if k not in ("epochs", "max_steps", "time_limit_min")))
            if diff:
                raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}", path=resume)
        records, train, val = _splits(cfg)
        model = _model(cfg, _labels(cfg, records), payload, info, build_model)
        spec = PreprocessSpec(img_size=cfg.img_size)
        loader, sampler, samples = _loader(cfg, train, spec, info)
        ema = ema_model(model, cfg.ema)
        sched = schedule(cfg, samples, info.world_size)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=sched.peak_lr,
                                      betas=(0.9, 0.999))
        state = TrainState()
        if payload is not None:
            state = restore_training_state(payload, model, optimizer, sched.steps_per_epoch * cfg.accum_steps)
            restore_ema(ema, payload, resume)
        else:
            torch.manual_seed(cfg.seed + info.rank)
        net = distributed(TaskLoss(model, cfg.task, cfg.label_smoothing, cfg.dice_weight), info)
        amp = autocast_dtype(cfg.amp, info.device)
        config_dict = to_dict(cfg)
        extra_meta = {"preprocess": spec.to_dict(), "finetune": config_dict, "split": _split_record(cfg, train, val)}
        logger = JsonlLogger(out / "log.jsonl", enabled=info.is_main)
        runs = _Validations(cfg, out, model, ema, optimizer, val, info, logger, config_dict, extra_meta, payload)
        if info.is_main:
            write_run_config(out, config_dict)
            print(f"[finetune] {cfg.task}: {len(train)} training images ({extra_meta['split']['train_patients']} "
                  f"patients, label fraction {cfg.label_fraction}), {len(val)} held out; init={cfg.init}; "
                  f"{sched.steps_per_epoch} steps/epoch x {cfg.epochs}, batch {sched.total_batch}, peak lr "
                  f"{sched.peak_lr:.3g}, amp={amp or 'fp32'}" + (f"; resuming at step {state.step}" if payload else ""),
                  file=sys.stderr)
            if model.load_report is not None:
                print(f"[finetune] init: {model.load_report.summary()}", file=sys.stderr)
        runs.budget.check_not_spent(resume)
        run_epochs(net, loader, optimizer, sampler, state=state, epochs=cfg.epochs, batch_size=cfg.batch_size,
                   last_step=min(sched.total_steps, cfg.max_steps or sched.total_steps),
                   time_limit_min=runs.budget.remaining_min(),
                   progress=progress and info.is_main, on_epoch_end=runs.end_of_epoch, device=info.device,
                   lr_at=runs.budget.lr_fn(sched, cfg.min_lr), after_step=(lambda st: ema.update_parameters(model)) if ema is not None else None,
                   steps_in_epoch=sched.steps_per_epoch, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
                   amp_dtype=amp, dist_info=info, images_per_step=sched.total_batch, log_every=cfg.log_every,
                   logger=logger, save_every=cfg.save_every, checkpoint_fn=runs.checkpoint)
        runs.finish(state)
        if info.distributed:
            torch.distributed.barrier()
        return FinetuneResult(out / BEST, out / LAST, runs.metrics, runs.history)
    finally:
        cleanup()


def main(argv: list[str] | None = None) -> int:
    """argparse entry point (``python -m usfm_edge.train.finetune``; torchrun-friendly)."""
    p = argparse.ArgumentParser(prog="python -m usfm_edge.train.finetune", description=__doc__.splitlines()[0])
    args = add_argparse_options(p, finetune_options).parse_args(argv)
    try:
        cfg = load_finetune_config(args.config, overrides_from(args, finetune_options))
        resume = (args.out if args.resume == "auto" else args.resume) if args.resume else None
        res = fit_finetune(cfg, args.out, resume)
    except UsfmEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(res.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
