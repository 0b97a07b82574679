"""Distil a teacher (a USFM backbone or a fine-tuned seg model) into a small edge student, on the shared engine.

The teacher checkpoint decides the mode (``mode="auto"``; losses, masks and projections are described in
:mod:`usfm_edge.models.distill`):

* a **backbone** (``USFM_latest.pth``, a converted ``.safetensors``, a pretraining ``encoder.safetensors``, or
  ``--mode features`` with a task checkpoint, whose backbone part is used): **feature distillation** on
  unlabelled frames. The data are the pretraining pipeline's (organ-balanced sampler, random resized crop,
  flip; the SimMIM block masks drawn by the data workers), the student sees masked frames, the teacher clean
  ones. Output: ``student.safetensors``, a ``task: backbone`` file that ``create_model(preset, checkpoint=...)``
  loads strictly and ``finetune --init`` starts from (the projections are dropped).
* a **seg task checkpoint** (e.g. ``assets/checkpoints/busbra_seg_tiny.safetensors``): **task distillation**
  into ``--student PRESET`` + ``--head`` (default: the teacher's head; ``--head-widths`` makes it thinner), with
  the fine-tuning data pipeline: the held-out patients are the teacher's (its recorded split) unless
  ``--val-fraction``/``--split-seed`` say otherwise, ``--label-fraction`` keeps the labels of that share of the
  training patients and the other frames learn from the soft targets alone. Output: ``student.safetensors``, a
  normal task checkpoint (``export``, ``quantize``, ``evaluate`` take it), with the validation metrics.

A cls/enhance teacher, a backbone with ``--mode task`` or a file that is not a checkpoint raise a typed error
naming the file. The teacher is read with the project's checkpoint readers only (safetensors or
``torch.load(weights_only=True)``), frozen and kept in eval mode. A run folder holds ``config.yaml``,
``log.jsonl``, ``checkpoint.pt`` (student + projections + optimiser, for ``--resume``; never the teacher) and
``student.safetensors`` (+ ``metrics.json`` in task mode). Single process or ``torchrun``, like ``pretrain``::

    usfm-edge distill --teacher USFM_latest.pth --student usfm_vit_tiny_patch16_224 --data busbra:PATH --out DIR
    torchrun --nproc_per_node 2 -m usfm_edge.train.distill --teacher ... --student ... --data ... --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from usfm_edge.core.config import to_dict
from usfm_edge.core.errors import ConfigError, UsfmEdgeError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.models.distill import DistillLossConfig, FeatureDistiller, TaskDistiller
from usfm_edge.train.config import RunConfig, load_config
from usfm_edge.train.dist import DistInfo, cleanup, init_distributed
from usfm_edge.train.distill_data import distill_records, evaluate_student, feature_loader, task_loader
from usfm_edge.train.distill_teacher import load_teacher
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
from usfm_edge.train.optim import build_optimizer
from usfm_edge.train.options import add_argparse_options, distill_options, overrides_from

__all__ = ["DistillConfig", "DistillResult", "load_distill_config", "load_teacher", "fit_distill", "run_distill",
           "main"]

CHECKPOINT, STUDENT = "checkpoint.pt", "student.safetensors"
MODES = ("auto", "features", "task")
# may change on --resume (the rest of the config must match the checkpoint's)
_RESUME_FREE = ("epochs", "max_steps", "time_limit_min", "save_every", "log_every", "workers", "device", "eval_limit")


@dataclass
class DistillConfig(RunConfig):
    """A distillation run: the :class:`~usfm_edge.train.config.RunConfig` fields plus the ones below; every field
    is a flag (``train.options.distill_options``).

    Attributes:
        teacher: the teacher checkpoint (backbone or seg task checkpoint).
        model: the student backbone preset (flag ``--student``).
        img_size: the student's input side; None = the teacher's (task mode) or the preset's (feature mode).
        mode: ``auto`` (task distillation for a seg teacher, feature distillation for a backbone), ``features``
            or ``task``.
        student_init: weights the student starts from (a backbone or task checkpoint), or None (random).
        head, head_widths: task mode: the student's head (``auto`` = the teacher's) and optional widths
            (hybrid: its U-Net widths; light: its stage widths; upernet: its channels).
        head_stride: task mode, hybrid head: 2 starts its conv encoder with a stride-2 conv, so no level runs
            at the full input size and the logits come out at half of it (upsampled bilinearly); give one
            width fewer (4 widths put the bottleneck at the patch size, 16). 1 = the teacher's layout.
        samples_per_epoch: feature mode: frames drawn per epoch (default: all).
        label_fraction: task mode: share of the training patients whose labels enter the supervised term.
        val_fraction, split_seed: task mode: patient split; None = the teacher's recorded split (else 0.2, 0).
        augment: task mode: training augmentation (as ``finetune``).
        eval_limit: task mode: at most this many validation frames.
        ema: decay of the exponential moving average of the student's weights (0 = off; as ``finetune``). With
            EMA the evaluated and saved student is the averaged one; the training checkpoint keeps both.
        loss: the objective (:class:`usfm_edge.models.distill.DistillLossConfig`).

    Schedule defaults are fine-tuning's (lr 2e-3 per 256 images, 30 epochs, 2 warm-up epochs): the student
    usually starts from scratch or a small encoder, and matching a fixed teacher is a well-conditioned target.
    """

    teacher: str = ""
    model: str = "usfm_vit_tiny_patch16_224"
    img_size: int | None = None
    mode: str = "auto"
    student_init: str | None = None
    head: str = "auto"
    head_widths: list[int] | str | None = None
    head_stride: int = 1
    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    warmup_epochs: float = 2.0
    samples_per_epoch: int | None = None
    label_fraction: float = 1.0
    val_fraction: float | None = None
    split_seed: int | None = None
    augment: str = "ultrasound"
    eval_limit: int | None = None
    ema: float = 0.999
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = DistillLossConfig(**self.loss)
        if isinstance(self.head_widths, str):
            try:
                self.head_widths = [int(v) for v in self.head_widths.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"head_widths must be comma-separated integers, got {self.head_widths!r}") from None
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.head_stride not in (1, 2):
            raise ConfigError(f"head_stride must be 1 or 2, got {self.head_stride!r}")
        if not self.teacher:
            raise ConfigError("no teacher given", hint="pass --teacher CHECKPOINT (a backbone or a seg task checkpoint)")


def load_distill_config(config=None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Defaults < YAML (path or dict) < flag overrides (None / empty lists ignored)."""
    return load_config(DistillConfig, config, overrides)


@dataclass
class DistillResult:
    """What a run produced: the student file, the training checkpoint, the mode, steps and (task mode) metrics."""

    student: Path
    checkpoint: Path
    mode: str
    steps: int
    metrics: dict
    model: torch.nn.Module


# -- the teacher (loaded by train.distill_teacher) ---------------------------------------------------------
def _resolve(cfg: DistillConfig, mode: str, teacher, meta: dict) -> DistillConfig:
    """Fill the fields left to the teacher (img_size, split); refuse task-mode fields in feature mode."""
    if mode == "features":
        if cfg.head != "auto" or cfg.head_widths or cfg.head_stride != 1:
            raise ConfigError("--head/--head-widths/--head-stride are for task distillation; this run distils backbone features",
                              path=cfg.teacher, hint="drop them (the feature-mode student is a backbone), or pass a "
                                                     "seg task checkpoint as the teacher")
        if cfg.img_size is None:
            from usfm_edge.models.registry import model_args

            return replace(cfg, img_size=int(model_args(cfg.model)["img_size"]))
        return cfg
    split = ((meta.get("extra") or {}).get("split") or {})
    return replace(cfg, img_size=cfg.img_size or teacher.img_size,
                   val_fraction=cfg.val_fraction if cfg.val_fraction is not None else split.get("val_fraction", 0.2),
                   split_seed=cfg.split_seed if cfg.split_seed is not None else split.get("split_seed", 0))


# -- the student ----------------------------------------------------------------------------------------------
_WIDTH_ARG = {"hybrid": "widths", "light": "channels", "upernet": "channels"}


def _task_student(cfg: DistillConfig, teacher, spec: PreprocessSpec):
    from usfm_edge.models.tasks import build_task_model

    head = teacher.head_name if cfg.head == "auto" else cfg.head
    head_args = None
    if cfg.head_widths:
        if head not in _WIDTH_ARG:
            raise ConfigError(f"--head-widths is not supported for the {head!r} head",
                              hint=f"use it with {', '.join(_WIDTH_ARG)}")
        widths = list(cfg.head_widths)
        head_args = {_WIDTH_ARG[head]: widths[0] if head == "upernet" else widths}
    if cfg.head_stride != 1:
        if head != "hybrid":
            raise ConfigError(f"--head-stride is for the hybrid head, not {head!r}", hint="drop it or pass --head hybrid")
        head_args = {**(head_args or {}), "stem_stride": cfg.head_stride}
    return build_task_model("seg", backbone=cfg.model, labels=teacher.labels, head=head, img_size=cfg.img_size,
                            checkpoint=cfg.student_init, head_args=head_args, preprocess=spec,
                            drop_path_rate=cfg.drop_path)


def _model(cfg: DistillConfig, mode: str, teacher, resumed: bool):
    """The distiller (student + projections; the teacher held outside), seeded, student from ``student_init``."""
    torch.manual_seed(cfg.seed)
    init = None if resumed else cfg.student_init
    if mode == "features":
        from usfm_edge.models.registry import create_model

        student = create_model(cfg.model, checkpoint=init, img_size=cfg.img_size, drop_path_rate=cfg.drop_path)
        net = FeatureDistiller(student, teacher, cfg.loss)
        net.freeze_unused()  # e.g. the final norm and mask token, unused by forward_intermediates (DDP needs this)
        return net, None
    spec = PreprocessSpec.from_dict({**teacher.preprocess.to_dict(), "img_size": cfg.img_size})
    student = _task_student(replace(cfg, student_init=init), teacher, spec)
    return TaskDistiller(student, teacher, cfg.loss), spec


def save_student(student: torch.nn.Module, mode: str, cfg: DistillConfig, path: Path, state: TrainState,
                 extra: dict) -> Path:
    """Write the student alone (the EMA copy when the run keeps one): a ``task: backbone`` file (feature mode) or
    a task checkpoint (task mode)."""
    record = {"teacher": Path(cfg.teacher).name, "mode": mode, "step": state.step, "epoch": state.epoch,
              "config": to_dict(cfg)}
    if mode == "task":
        from usfm_edge.models.tasks import save_task_checkpoint

        return save_task_checkpoint(student, path, extra={"preprocess": student.preprocess.to_dict(),
                                                              "distill": record, **extra})
    from usfm_edge.models.checkpoint import save_checkpoint
    from usfm_edge.models.registry import model_args

    config = {"model": cfg.model, "model_args": model_args(cfg.model, img_size=cfg.img_size), "task": "backbone",
              "preprocess": PreprocessSpec(img_size=cfg.img_size).to_dict(), "distill": record}
    return save_checkpoint(path, student.state_dict(), config)


# -- the run --------------------------------------------------------------------------------------------------
def fit_distill(cfg: DistillConfig, out_dir: str | Path, resume: str | Path | None = None,
                progress: bool = True) -> DistillResult:
    """Distil ``cfg.teacher`` into the student (or continue a run from ``resume``: a ``checkpoint.pt`` or a run
    folder holding one). Under torchrun every rank returns its own (identical) student."""
    info = init_distributed(cfg.device)
    try:
        return _fit(cfg, Path(out_dir), resume, progress, info)
    finally:
        cleanup()


def _fit(cfg: DistillConfig, out: Path, resume, progress: bool, info: DistInfo) -> DistillResult:
    mode, teacher, meta = load_teacher(cfg.teacher, cfg.mode)
    cfg = _resolve(cfg, mode, teacher, meta)
    out.mkdir(parents=True, exist_ok=True)
    payload, resume = resume_payload(resume, CHECKPOINT)
    remove_stale_checkpoint_temps(out / CHECKPOINT)
    if payload is not None:
        diff = cfg.resume_diff(payload["config"], sorted(k for k in payload["config"] if k not in _RESUME_FREE))
        if diff:
            raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}", path=resume,
                              hint="resume with the original settings (see the run's config.yaml)")
        if payload["extra"].get("world_size", 1) != info.world_size:
            raise ConfigError(f"--resume: the checkpoint was written by {payload['extra'].get('world_size')} "
                              f"process(es), this run has {info.world_size}", path=resume,
                              hint="resume with the same number of processes")
    net, spec = _model(cfg, mode, teacher, payload is not None)
    net.to(info.device)
    net.move_teacher(info.device)
    records = distill_records(cfg)
    if mode == "features":
        loader, sampler, samples, data = feature_loader(cfg, records, net.patch_size, info)
    else:
        loader, sampler, samples, data = task_loader(cfg, records, spec, info)
    sched = schedule(cfg, samples, info.world_size, hint="lower --batch-size/--accum-steps")
    optimizer = build_optimizer(net, sched.peak_lr, cfg.weight_decay)
    state = TrainState()
    ema = ema_model(net.student, cfg.ema)
    if payload is not None:
        state = restore_training_state(payload, net, optimizer, sched.steps_per_epoch * cfg.accum_steps)
        restore_ema(ema, payload, resume)
    else:
        torch.manual_seed(cfg.seed + info.rank)
        np.random.seed(cfg.seed + info.rank)
    wrapped = distributed(net, info)
    amp = autocast_dtype(cfg.amp, info.device)
    config_dict = to_dict(cfg)
    logger = JsonlLogger(out / "log.jsonl", enabled=info.is_main)
    if payload is not None:
        logger.truncate_after(state.step)
    if info.is_main:
        write_run_config(out, config_dict)
        print(f"[distill] {mode} distillation: {Path(cfg.teacher).name} -> {cfg.model} at {cfg.img_size} px; "
              f"{samples} samples/epoch/process, {sched.steps_per_epoch} steps/epoch x {cfg.epochs}, batch "
              f"{sched.total_batch}, peak lr {sched.peak_lr:.3g}, {info.world_size} process(es) on {info.device}, "
              f"amp={amp or 'fp32'}" + (f"; resuming at step {state.step}" if payload else ""), file=sys.stderr)
    budget = TimeBudget(cfg.time_limit_min, payload)
    budget.check_not_spent(resume)
    metrics: dict = {}
    scored = net.student if ema is None else ema.module  # what is evaluated and saved
    saved_at = [-1]
    extra_meta = {"split": data["split"]} if mode == "task" else {}

    def checkpoint(st: TrainState) -> None:
        if info.is_main and saved_at[0] != st.step:
            saved_at[0] = st.step
            extra = {"world_size": info.world_size, "train_seconds": budget.spent(), "mode": mode}
            if ema is not None:
                extra["ema"] = ema.state_dict()
            save_training_state(out / CHECKPOINT, model=net, optimizer=optimizer, state=st, config=config_dict,
                                extra=extra)
            save_student(scored, mode, cfg, out / STUDENT, st, {**extra_meta, "metrics": metrics})

    def end_of_epoch(st: TrainState, done: bool, bar) -> None:
        if mode == "task" and done and info.is_main:
            metrics.update(evaluate_student(scored, data["val"], cfg.eval_limit, info.device))
            logger.log(event="eval", epoch=st.epoch, step=st.step, **metrics)

    run_epochs(wrapped, loader, optimizer, sampler, state=state, epochs=cfg.epochs, batch_size=cfg.batch_size,
               last_step=min(sched.total_steps, cfg.max_steps or sched.total_steps),
               time_limit_min=budget.remaining_min(), progress=progress and info.is_main,
               on_epoch_end=end_of_epoch, device=info.device, lr_at=budget.lr_fn(sched, cfg.min_lr),
               steps_in_epoch=sched.steps_per_epoch, accum_steps=cfg.accum_steps, clip_grad=cfg.clip_grad,
               amp_dtype=amp, dist_info=info, images_per_step=sched.total_batch, log_every=cfg.log_every,
               logger=logger, save_every=cfg.save_every, checkpoint_fn=checkpoint,
               after_step=(lambda st: ema.update_parameters(net.student)) if ema is not None else None)
    saved_at[0] = -1  # the last save also carries the final metrics
    checkpoint(state)
    if mode == "task" and info.is_main:
        (out / "metrics.json").write_text(json.dumps({"student": metrics, "teacher_recorded": (meta.get("extra") or {})
                                                      .get("metrics", {}), **extra_meta}, indent=2))
    if info.distributed:
        torch.distributed.barrier()
    return DistillResult(out / STUDENT, out / CHECKPOINT, mode, state.step, metrics, net)


def run_distill(teacher: str | Path, student: str, data: list[str] | str, out_dir: str | Path,
                resume: str | Path | None = None, **options) -> DistillResult:
    """Python API: ``run_distill("USFM_latest.pth", "usfm_vit_tiny_patch16_224", ["busbra:PATH"], "runs/kd",
    max_steps=1000)``; ``options`` are :class:`DistillConfig` fields (``loss`` as a dict)."""
    cfg = load_distill_config({**options, "teacher": str(teacher), "model": student,
                               "data": [data] if isinstance(data, str) else list(data)})
    return fit_distill(cfg, out_dir, resume, progress=False)


def main(argv: list[str] | None = None) -> int:
    """argparse entry point (``python -m usfm_edge.train.distill``; torchrun-friendly)."""
    p = argparse.ArgumentParser(prog="python -m usfm_edge.train.distill", description=__doc__.splitlines()[0])
    args = add_argparse_options(p, distill_options).parse_args(argv)
    try:
        cfg = load_distill_config(args.config, overrides_from(args, distill_options))
        resume = (args.out if args.resume == "auto" else args.resume) if args.resume else None
        res = fit_distill(cfg, args.out, resume)
    except UsfmEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if res.metrics:
        print(json.dumps(res.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
