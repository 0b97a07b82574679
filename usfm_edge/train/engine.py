"""The training loop: ``train_one_epoch`` with explicit arguments, the shared epoch loop ``run_epochs``, and
training-state checkpoints.

The engine knows nothing about the CLI or the task: the model returns ``(loss, pred, parts)`` and the loop
does lr schedule, autocast, gradient accumulation (DDP ``no_sync`` on all but the last micro-step),
clipping, the non-finite-loss stop, a tqdm bar, JSONL logging and periodic checkpoints (through a
callback, so the caller decides what a checkpoint holds).

Training-state files (``checkpoint.pt``) are written with ``torch.save`` to a temp file then
``os.replace``, and read back only with ``torch.load(weights_only=True)``: every value in them is a
tensor, number, string, list or dict (RNG states included), so no pickle code ever runs on load.
"""

from __future__ import annotations

import contextlib
import glob
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from usfm_edge.core.errors import CheckpointError, ConfigError, UsfmEdgeError
from usfm_edge.train.dist import DistInfo, all_reduce_mean
from usfm_edge.train.optim import scaled_lr, set_lr

__all__ = ["NonFiniteLossError", "TrainState", "JsonlLogger", "cpu_supports_bf16", "autocast_dtype",
           "train_one_epoch", "run_epochs", "rng_state", "set_rng_state", "save_training_state", "load_training_state",
           "resume_payload", "remove_stale_checkpoint_temps", "Schedule", "schedule", "restore_training_state", "distributed", "write_run_config"]


class NonFiniteLossError(UsfmEdgeError):
    """The loss became NaN or infinite; training stops instead of corrupting the weights."""


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint.

    Attributes:
        step: optimiser steps done in total.
        epoch: current epoch (0-based).
        position: micro-batches of ``epoch`` already consumed (mid-epoch resume point).
    """

    step: int = 0
    epoch: int = 0
    position: int = 0


class JsonlLogger:
    """Appends one JSON object per line to ``path`` (only where ``enabled``, i.e. on the main rank)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def log(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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


# -- training state ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy's global generator and Python's ``random``, as tensors/lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def save_training_state(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: TrainState, config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write model (encoder + decoder), optimiser, counters, RNG states and config atomically.

    Args:
        model: the unwrapped model (not DDP / compiled), so keys are ``encoder.*`` / ``decoder.*``.
        config: the resolved run config (plain dict).
        extra: more JSON-like values to keep (e.g. the data sources' organs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "usfm_edge.train_state/1",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": state.step, "epoch": state.epoch, "position": state.position,
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
    }
    from usfm_edge.core.io import atomic_write_with

    return atomic_write_with(path, lambda tmp: torch.save(payload, tmp))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Read a training-state file with ``torch.load(weights_only=True)`` (no pickled code runs)."""
    from usfm_edge.models.checkpoint import describe_load_error

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("training checkpoint not found", path=path,
                              hint="pass the run folder's checkpoint.pt, or drop --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg, unsafe = describe_load_error(exc)
        hint = ("this file contains code and was refused (no pickled code runs); it is not a checkpoint this "
                "tool wrote: use the run's own checkpoint.pt" if unsafe
                else "the file may be truncated; use an earlier checkpoint")
        raise CheckpointError(f"cannot read training checkpoint: {msg}", path=path, hint=hint) from exc
    if not isinstance(payload, dict) or payload.get("format") != "usfm_edge.train_state/1":
        raise CheckpointError("not a usfm-edge training checkpoint (no 'format' key)", path=path,
                              hint="--resume takes checkpoint.pt of a pretraining run; use --init for weights")
    return payload


# -- what pretraining and fine-tuning runs share around the loop ----------------------------------------------
def resume_payload(resume: str | Path | None, name: str = "checkpoint.pt") -> tuple[dict | None, Path | None]:
    """``(training state, its file)`` to resume from (a file, or a run folder holding ``name``), or ``(None, None)``."""
    if resume is None:
        return None, None
    path = Path(resume)
    path = path / name if path.is_dir() else path
    partial = sorted(path.parent.glob(f"{glob.escape(path.name)}.*.tmp")) if path.parent.is_dir() else []
    remove_stale_checkpoint_temps(path)
    if not path.is_file() and partial:
        raise CheckpointError(f"no complete {path.name} yet; the run died during its first save "
                              f"(left {partial[0].name})", path=path,
                              hint="start it again without --resume")
    return load_training_state(path), path


def remove_stale_checkpoint_temps(path: str | Path) -> list[Path]:
    """Remove the ``NAME.*.tmp`` files a killed save of ``path`` left (the complete ``path`` is kept until a new
    one has been written in full: ``save_training_state`` writes a temporary, then renames it). Run at the start
    of every run and resume; a save of this machine still in progress (its PID is alive) is left alone, and a
    temporary without a PID (older versions) once it is 10 minutes old."""
    from usfm_edge.core.io import remove_stale_temps

    return remove_stale_temps(path, max_age_s=600)


@dataclass(frozen=True)
class Schedule:
    """Optimiser steps and learning rate of a run (``schedule``)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    total_batch: int
    peak_lr: float


def schedule(cfg, samples_per_rank: int, world_size: int, hint: str = "lower --batch-size") -> Schedule:
    """Steps per epoch, total and warm-up steps, images per optimiser step and the peak lr (linear scaling rule:
    ``cfg.lr`` per 256 images) of a ``train.config.RunConfig``.

    Raises:
        ConfigError: an epoch of ``samples_per_rank`` is smaller than one optimiser step.
    """
    steps = samples_per_rank // cfg.batch_size // cfg.accum_steps
    if steps < 1:
        raise ConfigError(f"an epoch of {samples_per_rank} samples per process is smaller than one optimiser step "
                          f"({cfg.batch_size} x {cfg.accum_steps} accumulation)", hint=hint)
    total = cfg.epochs * steps
    batch = cfg.batch_size * cfg.accum_steps * world_size
    return Schedule(steps, total, min(int(round(cfg.warmup_epochs * steps)), total), batch, scaled_lr(cfg.lr, batch))


def restore_training_state(payload: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                           steps_in_epoch: int) -> TrainState:
    """Load model and optimiser from a training state, set the RNG states, and return where the loop goes on
    (the next epoch when the checkpoint was written at the very end of one)."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    state = TrainState(payload["step"], payload["epoch"], payload["position"])
    if state.position >= steps_in_epoch:
        state = TrainState(state.step, state.epoch + 1, 0)
    set_rng_state(payload["rng"])
    return state


def distributed(net: nn.Module, info: DistInfo) -> nn.Module:
    """``net`` in DDP under torchrun (on the rank's GPU when CUDA), else unchanged."""
    if not info.distributed:
        return net
    return nn.parallel.DistributedDataParallel(net, device_ids=[info.local_rank] if info.device.type == "cuda"
                                               else None)


def write_run_config(out: Path, config: dict[str, Any]) -> Path:
    """The resolved config as ``config.yaml`` in the run folder (key order kept)."""
    import yaml

    path = Path(out) / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
