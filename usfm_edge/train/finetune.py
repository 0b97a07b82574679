"""Label-efficient fine-tuning: segmentation, classification and enhancement heads on a USFM backbone.

Shares the pretraining engine (``train.engine``: progress bar, JSONL log, atomic checkpoints, exact
``--resume``, torchrun DDP). What is specific to fine-tuning:

* data: records of the ``--data`` sources, split by **patient** into train / validation (``val_fraction``,
  ``split_seed``); ``label_fraction`` then keeps a seeded fraction of the *training patients* (nested:
  the 10% set lies inside the 25% set), so label-efficiency runs differ only in how many labels they see;
* model: ``models.tasks.build_task_model`` from ``--init`` (USFM_latest.pth, a pretraining encoder, a
  task checkpoint) or ``none`` (from scratch); layer-wise lr decay (USFM: 0.65) through
  ``train.optim.param_groups``;
* losses: seg = cross-entropy + soft Dice (+ 0.4 x the same on UperNet's auxiliary head); cls =
  cross-entropy with label smoothing (USFM: 0.1); enhance = L1 to the clean frame;
* model selection: the held-out patients are evaluated every ``eval_every`` epochs through the export graph
  (``evaluation.TorchPredictor``: frames at their own size, exactly what a bundle computes); the best
  checkpoint by Dice / AUC / PSNR is kept as ``best.safetensors``, the last as ``last.safetensors``. Each
  stores task, labels, preprocessing, data split and metrics, so ``export`` needs no extra flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from usfm_edge.core.config import to_dict
from usfm_edge.core.errors import ConfigError, UsfmEdgeError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.data.sources import label_names, load_records
from usfm_edge.data.splits import label_fraction, patient_split
from usfm_edge.train.config import RunConfig, load_config
from usfm_edge.train.dist import cleanup, init_distributed
from usfm_edge.train.engine import (
    JsonlLogger,
    TrainState,
    autocast_dtype,
    load_training_state,
    run_epochs,
    save_training_state,
    set_rng_state,
)
from usfm_edge.train.optim import budget_cosine_lr, param_groups, scaled_lr
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
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1) (0 = off), got {self.ema}")


def load_finetune_config(config=None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Defaults < YAML (path or dict) < flag overrides (None / empty lists ignored): ``train.config.load_config``."""
    return load_config(FinetuneConfig, config, overrides)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (background excluded), computed over the batch."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + eps) / (denom + eps))[1:].mean()


class TaskLoss(nn.Module):
    """Wraps a TaskModel so that ``forward(x, y) -> (loss, output, parts)`` (the engine's contract)."""

    def __init__(self, model: nn.Module, task: str, label_smoothing: float = 0.1, dice_weight: float = 1.0):
        super().__init__()
        self.model, self.task = model, task
        self.label_smoothing, self.dice_weight = label_smoothing, dice_weight

    def _seg(self, logits, y):
        ce = F.cross_entropy(logits.float(), y)
        dice = soft_dice_loss(logits, y)
        return ce + self.dice_weight * dice, ce, dice

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        if self.task == "seg":
            outs = self.model.forward_train(x, aux=self.model.aux_weight > 0)
            loss, ce, dice = self._seg(outs["out"], y)
            parts = {"ce": ce.detach(), "dice": dice.detach()}
            if "aux" in outs:
                aux, _, _ = self._seg(outs["aux"], y)
                loss = loss + self.model.aux_weight * aux
                parts["aux"] = aux.detach()
            return loss, outs["out"], parts
        out = self.model(x)
        if self.task == "cls":
            loss = F.cross_entropy(out.float(), y, label_smoothing=self.label_smoothing)
            return loss, out, {"ce": loss.detach()}
        loss = F.l1_loss(out.float(), y)
        return loss, out, {"l1": loss.detach()}


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


def _ema_model(model: nn.Module, decay: float):
    """An ``AveragedModel`` keeping an EMA of the weights and BatchNorm statistics (None when ``decay`` is 0).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early, poor weights fade
    quickly.
    """
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel

    def avg(avg_p: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return avg_p * d + p * (1.0 - d)

    ema = AveragedModel(model, avg_fn=avg, use_buffers=True)
    ema.module.eval()
    return ema


def fit_finetune(cfg: FinetuneConfig, out_dir: str | Path, resume: str | Path | None = None,
                 progress: bool = True, build_model=None) -> FinetuneResult:
    """Fine-tune and validate; returns the best/last checkpoint paths and the last validation metrics.

    ``build_model(labels) -> nn.Module`` replaces the USFM task model (baselines such as
    ``benchmarks/unet_baseline.py``); it must offer the task-model interface (``task``, ``labels``,
    ``img_size``, ``preprocess``, ``forward``, ``forward_train``, ``aux_weight``, ``depth``,
    ``group_matcher``, ``no_weight_decay``, ``config``) and then ``cfg.model``, ``cfg.head`` and ``cfg.init``
    are only recorded.
    """
    from usfm_edge.data.sampler import OrganBalancedSampler
    from usfm_edge.models.tasks import build_task_model, save_task_checkpoint
    from usfm_edge.train.datasets import PositionedSampler
    from usfm_edge.train.task_data import TaskDataset

    info = init_distributed(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        payload = None
        if resume is not None:
            resume = Path(resume)
            resume = resume / CHECKPOINT if resume.is_dir() else resume
            payload = load_training_state(resume)
            saved = payload["config"]
            diff = cfg.resume_diff(saved, sorted(k for k in saved if k not in ("epochs", "max_steps", "time_limit_min")))
            if diff:
                raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}", path=resume)
        records, train, val = _splits(cfg)
        labels = _labels(cfg, records)
        torch.manual_seed(cfg.seed)
        init = None if (payload is not None or cfg.init in ("", "none", None)) else cfg.init
        head_args = {"aux_weight": cfg.aux_weight} if cfg.aux_weight is not None else None
        if build_model is not None:
            model = build_model(labels).to(info.device)
        else:
            model = build_task_model(cfg.task, backbone=cfg.model, labels=labels, head=cfg.head,
                                     img_size=cfg.img_size, checkpoint=init, drop_path_rate=cfg.drop_path,
                                     head_args=head_args).to(info.device)
        spec = PreprocessSpec(img_size=cfg.img_size)
        dataset = TaskDataset(train, cfg.task, spec, train=True, seed=cfg.seed, augment=cfg.augment)
        ema = _ema_model(model, cfg.ema)
        base = OrganBalancedSampler([r.organ for r in train], num_samples=len(train), seed=cfg.seed,
                                    rank=info.rank, world_size=info.world_size)
        sampler = PositionedSampler(base, info.rank, info.world_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                             num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed))
        steps_per_epoch = len(base) // cfg.batch_size // cfg.accum_steps
        if steps_per_epoch < 1:
            raise ConfigError(f"{len(train)} training images per process are fewer than one optimiser step "
                              f"({cfg.batch_size} x {cfg.accum_steps})", hint="lower --batch-size")
        total_steps = cfg.epochs * steps_per_epoch
        warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total_steps)
        total_batch = cfg.batch_size * cfg.accum_steps * info.world_size
        peak_lr = scaled_lr(cfg.lr, total_batch)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.layer_decay), lr=peak_lr,
                                      betas=(0.9, 0.999))
        state, history, best_score = TrainState(), [], -float("inf")
        clock = {"spent": 0.0, "since": time.time()}  # training seconds of earlier runs, start of this one
        if payload is not None:
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            if ema is not None:
                if "ema" not in payload["extra"]:
                    raise ConfigError("--resume: the checkpoint has no EMA weights", path=resume, hint="pass --ema 0")
                ema.load_state_dict(payload["extra"]["ema"])
            clock["spent"] = float(payload["extra"].get("train_seconds", 0.0))
            state = TrainState(payload["step"], payload["epoch"], payload["position"])
            if state.position >= steps_per_epoch * cfg.accum_steps:
                state = TrainState(state.step, state.epoch + 1, 0)
            history = json.loads(payload["extra"].get("history", "[]"))
            best_score = float(payload["extra"].get("best_score", -float("inf")))
            set_rng_state(payload["rng"])
        else:
            torch.manual_seed(cfg.seed + info.rank)
        net: nn.Module = TaskLoss(model, cfg.task, cfg.label_smoothing, cfg.dice_weight)
        if info.distributed:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[info.local_rank] if info.device.type == "cuda"
                                                      else None)
        amp = autocast_dtype(cfg.amp, info.device)
        config_dict = to_dict(cfg)
        extra_meta = {"preprocess": spec.to_dict(), "finetune": config_dict,
                      "split": {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed,
                                "label_seed": cfg.label_seed,
                                "train_images": len(train), "val_images": len(val),
                                "train_patients": len({(r.organ, r.patient) for r in train})}}
        logger = JsonlLogger(out / "log.jsonl", enabled=info.is_main)
        if info.is_main:
            import yaml

            (out / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
            print(f"[finetune] {cfg.task}: {len(train)} training images ({extra_meta['split']['train_patients']} "
                  f"patients, label fraction {cfg.label_fraction}), {len(val)} held out; init={cfg.init}; "
                  f"{steps_per_epoch} steps/epoch x {cfg.epochs}, batch {total_batch}, peak lr {peak_lr:.3g}, "
                  f"amp={amp or 'fp32'}" + (f"; resuming at step {state.step}" if payload else ""), file=sys.stderr)
            if model.load_report is not None:
                print(f"[finetune] init: {model.load_report.summary()}", file=sys.stderr)

        def spent() -> float:
            return clock["spent"] + time.time() - clock["since"]

        def checkpoint(st: TrainState) -> None:
            if info.is_main:
                extra = {"history": json.dumps(history), "best_score": best_score, "train_seconds": spent()}
                if ema is not None:
                    extra["ema"] = ema.state_dict()
                save_training_state(out / CHECKPOINT, model=model, optimizer=optimizer, state=st, config=config_dict,
                                    extra=extra)

        scored = model if ema is None else ema.module  # what is validated and saved

        metrics: dict = {}

        def end_of_epoch(st, done: bool, bar) -> None:
            nonlocal metrics, best_score
            if not info.is_main or not (done or (st.epoch + 1) % cfg.eval_every == 0):
                return
            metrics = _evaluate(scored, val, cfg.task, cfg.eval_limit, info.device)
            history.append({"epoch": st.epoch, "step": st.step, **metrics})
            logger.log(event="eval", epoch=st.epoch, step=st.step, **metrics)
            score = metrics[PRIMARY[cfg.task]]
            if score > best_score:
                best_score = score
                save_task_checkpoint(scored, out / BEST, extra={**extra_meta, "metrics": metrics,
                                                                "epoch": st.epoch, "step": st.step})
            if bar is not None:
                bar.write(f"[finetune] epoch {st.epoch}: " + ", ".join(
                    f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

        budget_s = 60.0 * cfg.time_limit_min if cfg.time_limit_min else None
        if budget_s is not None and spent() >= budget_s:
            raise ConfigError(f"--resume: the run already used its {cfg.time_limit_min} min budget",
                              path=resume, hint="raise --time-limit-min to train longer")

        def lr_at(step: int) -> float:
            frac = spent() / budget_s if budget_s else 0.0
            return budget_cosine_lr(step, total_steps, warmup, peak_lr, cfg.min_lr, frac)

        def after_step(st: TrainState) -> None:
            if ema is not None:
                ema.update_parameters(model)

        remaining = None if budget_s is None else (budget_s - spent()) / 60.0
        run_epochs(net, loader, optimizer, sampler, state=state, epochs=cfg.epochs, batch_size=cfg.batch_size,
                   last_step=min(total_steps, cfg.max_steps or total_steps), time_limit_min=remaining,
                   progress=progress and info.is_main, on_epoch_end=end_of_epoch, device=info.device,
                   lr_at=lr_at, after_step=after_step,
                   steps_in_epoch=steps_per_epoch, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
                   amp_dtype=amp, dist_info=info, images_per_step=total_batch, log_every=cfg.log_every,
                   logger=logger, save_every=cfg.save_every, checkpoint_fn=checkpoint)
        if info.is_main:
            checkpoint(state)
            save_task_checkpoint(scored, out / LAST, extra={**extra_meta, "metrics": metrics, "step": state.step})
            (out / "metrics.json").write_text(json.dumps({"last": metrics, "best_score": best_score,
                                                          "primary": PRIMARY[cfg.task], "history": history}, indent=2))
        if info.distributed:
            torch.distributed.barrier()
        return FinetuneResult(out / BEST, out / LAST, metrics, history)
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
