"""Training state: ``TrainState`` (the loop's counters), training-state checkpoints with RNG states, and what
pretraining, fine-tuning and distillation runs share around the loop (resume, stale temporaries, the step
schedule, DDP wrapping, the run's ``config.yaml``).

Training-state files (``checkpoint.pt``) are written with ``torch.save`` to a temp file then
``os.replace``, and read back only with ``torch.load(weights_only=True)``: every value in them is a
tensor, number, string, list or dict (RNG states included), so no pickle code ever runs on load.
"""

from __future__ import annotations

import glob
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from usfm_edge.core.errors import CheckpointError, ConfigError
from usfm_edge.train.dist import DistInfo
from usfm_edge.train.optim import budget_cosine_lr, scaled_lr

__all__ = ["TrainState", "rng_state", "set_rng_state", "save_training_state", "load_training_state", "resume_payload",
           "remove_stale_checkpoint_temps", "Schedule", "schedule", "TimeBudget", "restore_training_state",
           "distributed", "write_run_config", "ema_model", "restore_ema"]


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


class TimeBudget:
    """A run's ``--time-limit-min`` budget, spanning resumes (``train_seconds`` in the checkpoint's ``extra``).

    The cosine schedule follows the larger of the step fraction and the budget fraction (:meth:`lr_fn`), so a
    time-limited run ends at ``min_lr`` instead of being cut off at a high rate.
    """

    def __init__(self, time_limit_min: float | None, payload: dict | None):
        self.limit_min = time_limit_min
        self.seconds = 60.0 * time_limit_min if time_limit_min else None
        self.spent_before = float((payload or {}).get("extra", {}).get("train_seconds", 0.0))
        self.since = time.time()

    def spent(self) -> float:
        """Seconds of training so far, earlier runs of a resumed run included."""
        return self.spent_before + time.time() - self.since

    def check_not_spent(self, resume) -> None:
        """Raise when a resumed run has no budget left (``resume``: the checkpoint, named in the error)."""
        if self.seconds is not None and self.spent() >= self.seconds:
            raise ConfigError(f"--resume: the run already used its {self.limit_min} min budget", path=resume,
                              hint="raise --time-limit-min to train longer")

    def remaining_min(self) -> float | None:
        """Minutes left (the loop's time limit), or None without a budget."""
        return None if self.seconds is None else (self.seconds - self.spent()) / 60.0

    def lr_fn(self, sched: Schedule, min_lr: float):
        """``lr_at(step)``: the budget-following cosine of ``sched``."""
        def lr_at(step: int) -> float:
            frac = self.spent() / self.seconds if self.seconds else 0.0
            return budget_cosine_lr(step, sched.total_steps, sched.warmup_steps, sched.peak_lr, min_lr, frac)

        return lr_at


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


def ema_model(model: torch.nn.Module, decay: float):
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


def restore_ema(ema, payload: dict, resume) -> None:
    """Load the EMA weights a training checkpoint saved (``extra["ema"]``) into ``ema`` (nothing when ``ema`` is
    None); a checkpoint written without EMA is a ``ConfigError`` naming ``resume``."""
    if ema is None:
        return
    if "ema" not in payload["extra"]:
        raise ConfigError("--resume: the checkpoint has no EMA weights", path=resume, hint="pass --ema 0")
    ema.load_state_dict(payload["extra"]["ema"])
