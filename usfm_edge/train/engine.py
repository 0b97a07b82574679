"""The training loop: ``train_one_epoch`` with explicit arguments and the shared epoch loop ``run_epochs``.

The engine knows nothing about the CLI or the task: the model returns ``(loss, pred, parts)`` and the loop
does lr schedule, autocast, gradient accumulation (DDP ``no_sync`` on all but the last micro-step),
clipping, the non-finite-loss stop, a tqdm bar, JSONL logging and periodic checkpoints (through a
callback, so the caller decides what a checkpoint holds).

``TrainState``, the training-state checkpoints and the helpers that pretraining, fine-tuning and distillation share
around the loop live in ``train.state`` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from usfm_edge.core.errors import ConfigError, UsfmEdgeError
from usfm_edge.train.dist import DistInfo, all_reduce_mean
from usfm_edge.train.optim import set_lr
from usfm_edge.train.state import (
    Schedule,
    TimeBudget,
    TrainState,
    distributed,
    ema_model,
    load_training_state,
    remove_stale_checkpoint_temps,
    restore_ema,
    restore_training_state,
    resume_payload,
    rng_state,
    save_training_state,
    schedule,
    set_rng_state,
    write_run_config,
)

__all__ = ["NonFiniteLossError", "TrainState", "JsonlLogger", "cpu_supports_bf16", "autocast_dtype",
           "train_one_epoch", "run_epochs", "rng_state", "set_rng_state", "save_training_state", "load_training_state",
           "resume_payload", "remove_stale_checkpoint_temps", "Schedule", "schedule", "restore_training_state", "distributed", "write_run_config", "TimeBudget",
           "ema_model", "restore_ema"]


class NonFiniteLossError(UsfmEdgeError):
    """The loss became NaN or infinite; training stops instead of corrupting the weights."""


class JsonlLogger:
    """Appends one JSON object per line to ``path`` (only where ``enabled``, i.e. on the main rank)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def log(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the lines logged after ``step`` (a resumed run logs those steps again)."""
        if self.enabled and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and _step_of(ln) <= step]
            self.path.write_text("".join(ln + "\n" for ln in kept))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512_BF16 or AMX), so bf16 autocast is faster, not emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    return torch.backends.cpu.get_cpu_capability() == "AVX512_BF16" or "AMX" in torch.backends.cpu.get_cpu_capability()


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Resolve ``amp`` (``auto``/``bf16``/``off``) to the autocast dtype (None = fp32)."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp != "auto":
        raise ConfigError(f"amp must be auto, bf16 or off, got {amp!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    state: TrainState,
    device: torch.device,
    lr_at: Callable[[int], float],
    steps_in_epoch: int,
    accum_steps: int = 1,
    clip_grad: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    dist_info: DistInfo | None = None,
    images_per_step: int = 0,
    max_steps: int | None = None,
    deadline: float | None = None,
    log_every: int = 10,
    logger: JsonlLogger | None = None,
    save_every: int = 0,
    checkpoint_fn: Callable[[TrainState], None] | None = None,
    progress=None,
    start_time: float | None = None,
    after_step: Callable[[TrainState], None] | None = None,
) -> bool:
    """Train until the epoch ends, ``max_steps`` is reached or ``deadline`` passes.

    Args:
        model: returns ``(loss, pred, parts)`` from ``model(*batch)``; possibly DDP-wrapped.
        loader: yields tuples of tensors (moved to ``device`` here); must start at ``state.position``.
        optimizer: its groups get ``lr_at(step) * lr_scale`` before every optimiser step.
        state: updated in place (step, position; epoch is advanced by the caller).
        steps_in_epoch: optimiser steps in a full epoch; the loop stops after them even if the loader has more.
        accum_steps: micro-batches per optimiser step.
        clip_grad: max global gradient norm (0 = no clipping).
        amp_dtype: autocast dtype, or None for fp32.
        images_per_step: images per optimiser step over all ranks (for images/s).
        max_steps: stop once ``state.step`` reaches it.
        deadline: ``time.time()`` after which to stop (checked after each optimiser step, agreed across ranks).
        log_every, logger: JSONL log cadence and sink.
        save_every, checkpoint_fn: call ``checkpoint_fn(state)`` every ``save_every`` optimiser steps.
        after_step: called with ``state`` after every optimiser step (e.g. to update an EMA of the weights).
        progress: a tqdm bar counting optimiser steps (main rank), or None.
        start_time: ``time.time()`` of the run start, for ``elapsed`` in the log.

    Returns:
        True if training should stop (max_steps or deadline), False at the natural end of the epoch.

    Raises:
        NonFiniteLossError: the loss is NaN/inf (names the step and the hint to lower the lr or disable amp).
    """
    info = dist_info or DistInfo(device=device)
    model.train()
    start_time = start_time or time.time()
    window_loss, window_parts, window_n = 0.0, {}, 0
    t_window, steps_window = time.perf_counter(), 0
    micro_end = steps_in_epoch * accum_steps
    micro, accum_i = state.position, 0
    if micro >= micro_end:
        return False
    for batch in loader:
        batch = [b.to(device, non_blocking=True) for b in batch]
        if accum_i == 0:
            set_lr(optimizer, lr_at(state.step))
        last = accum_i + 1 == accum_steps
        sync = contextlib.nullcontext() if (last or not info.distributed) else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, _, parts = model(*batch)
            loss_value = float(loss.detach())  # one sync per micro-step; cheap next to a ViT forward
            if not np.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"loss is {loss_value} at step {state.step} (epoch {state.epoch}, micro-batch {micro}, "
                    f"parts {({k: float(v) for k, v in parts.items()})})",
                    hint="lower --lr, raise --warmup-epochs, use --amp off, or resume from the last checkpoint")
            (loss / accum_steps).backward()
        window_loss += loss_value
        for k, v in parts.items():
            window_parts[k] = window_parts.get(k, 0.0) + float(v)
        window_n += 1
        micro, accum_i = micro + 1, accum_i + 1
        if not last:
            continue
        accum_i = 0
        grad_norm = None
        if clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step, state.position = state.step + 1, micro
        if after_step is not None:
            after_step(state)
        steps_window += 1
        stop = (max_steps is not None and state.step >= max_steps) or _past(deadline, info)
        end_of_epoch = micro >= micro_end
        if state.step % log_every == 0 or stop or end_of_epoch:
            dt = time.perf_counter() - t_window
            stats = torch.tensor([window_loss, *window_parts.values()], dtype=torch.float64, device=info.device)
            stats = all_reduce_mean(stats / max(window_n, 1), info).tolist()
            ips = images_per_step * steps_window / max(dt, 1e-9)
            record = {"step": state.step, "epoch": state.epoch, "loss": stats[0],
                      **{f"loss_{k}": v for k, v in zip(window_parts, stats[1:])},
                      "lr": lr_at(state.step - 1), "images_per_s": ips, "elapsed_s": time.time() - start_time}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if logger is not None:
                logger.log(**record)
            if progress is not None:
                progress.set_postfix(loss=f"{stats[0]:.4f}", img_s=f"{ips:.1f}", refresh=False)
            window_loss, window_parts, window_n = 0.0, {}, 0
            t_window, steps_window = time.perf_counter(), 0
        if progress is not None:
            progress.update(1)
        if checkpoint_fn is not None and save_every and state.step % save_every == 0 and not stop:
            checkpoint_fn(state)
        if stop:
            return True
        if end_of_epoch:
            break
    return False


def run_epochs(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    sampler,
    *,
    state: TrainState,
    epochs: int,
    batch_size: int,
    last_step: int,
    time_limit_min: float | None = None,
    progress: bool = False,
    on_epoch_end: Callable[[TrainState, bool, Any], None] | None = None,
    **epoch_kwargs,
) -> None:
    """The epoch loop shared by pretraining and fine-tuning, resumable at any step.

    Runs :func:`train_one_epoch` from ``state`` (epoch, position) until ``epochs`` are done, ``last_step`` is
    reached or ``time_limit_min`` passes; ``sampler.set_epoch(epoch, start_sample)`` positions the data.

    Args:
        model, loader, optimizer: as for :func:`train_one_epoch` (``epoch_kwargs`` are passed on to it).
        sampler: has ``set_epoch(epoch, skip)``.
        progress: show a tqdm bar (main process only: the caller decides).
        on_epoch_end: ``fn(state, done, bar)`` after each epoch (or the stop inside one), before the epoch
            counter advances; ``done`` says the loop ends after it (used for validation and best checkpoints).
    """
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=last_step, initial=min(state.step, last_step), unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    start = time.time()
    deadline = start + 60.0 * time_limit_min if time_limit_min else None
    try:
        while state.epoch < epochs and state.step < last_step:
            sampler.set_epoch(state.epoch, state.position * batch_size)
            stop = train_one_epoch(model, loader, optimizer, state=state, max_steps=last_step, deadline=deadline,
                                   progress=bar, start_time=start, **epoch_kwargs)
            if on_epoch_end is not None:
                on_epoch_end(state, stop or state.epoch + 1 >= epochs or state.step >= last_step, bar)
            if stop:
                break
            state.epoch, state.position = state.epoch + 1, 0
    finally:
        if bar is not None:
            bar.close()


def _past(deadline: float | None, info: DistInfo) -> bool:
    """Has the deadline passed? All ranks agree (rank 0's clock decides), so no rank stops alone."""
    if deadline is None:
        return False
    flag = torch.tensor([1.0 if time.time() >= deadline else 0.0], device=info.device)
    if info.distributed:
        dist.broadcast(flag, src=0)
    return bool(flag.item())
