"""Typed training configs: the one source of truth for the CLI, the Python API and checkpoints.

``RunConfig`` holds what every training run has (data, model, schedule, optimiser, devices, logging, limits) and
its checks; ``PretrainConfig`` adds dual-MIM pretraining, ``train.finetune.FinetuneConfig`` fine-tuning. Layers,
later wins: dataclass defaults < YAML file (``--config``) < command-line flags (:func:`load_config`). Unknown
keys raise :class:`ConfigError` with a suggestion. The flags are rows of ``train.options`` (torch-free), from
which the argparse entry points and the click CLI build the same options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from usfm_edge.core.config import from_dict, load_yaml, to_dict
from usfm_edge.core.errors import ConfigError
from usfm_edge.models.mim import MimConfig
from usfm_edge.train.options import Option, pretrain_options

__all__ = ["RunConfig", "PretrainConfig", "MimConfig", "Option", "pretrain_options", "load_config",
           "load_pretrain_config"]

C = TypeVar("C", bound="RunConfig")

AMP_CHOICES = ("auto", "bf16", "off")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass
class RunConfig:
    """What every training run has (pretraining and fine-tuning); defaults are pretraining's, ``FinetuneConfig``
    sets its own schedule.

    Attributes:
        data: source specs read by ``usfm_edge.data.sources.load_records`` (``folder:PATH[@organ]``,
            ``busbra:PATH``, ``hc18:PATH``); records of all sources are pooled.
        model: backbone preset (``usfm_vit_base_patch16_224`` is the official USFM architecture).
        img_size: model input side (training resolution).
        drop_path: stochastic depth of the encoder (SimMIM ViT-B: 0.1).
        epochs: passes over the training data; the lr schedule spans all of them.
        batch_size: images per micro-batch per process.
        accum_steps: micro-batches per optimiser step (gradient accumulation).
        lr: base learning rate **per 256 images**; the peak lr is
            ``lr * batch_size * accum_steps * world_size / 256`` (the linear scaling rule of MAE/SimMIM).
        min_lr: floor of the cosine schedule (absolute, not scaled).
        warmup_epochs: linear warm-up length (fractional epochs allowed).
        weight_decay: AdamW decay (SimMIM: 0.05); never applied to 1-D params, tokens or the rel-pos table.
        clip_grad: max global grad norm (SimMIM: 5.0); 0 disables clipping.
        seed: seeds model init, data order, augmentation and masks.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda`` (under torchrun: ``cuda:LOCAL_RANK``).
        workers: DataLoader worker processes per rank (0 = load in the main process).
        amp: ``auto`` (bf16 autocast where the hardware runs bf16 natively), ``bf16`` (force) or ``off``.
        save_every: optimiser steps between checkpoints (0: only at the end).
        log_every: optimiser steps between JSONL log lines.
        max_steps: stop after this many optimiser steps in total (time-boxed runs, tests); the schedule
            still spans ``epochs``.
        time_limit_min: stop cleanly (with a checkpoint) after this many minutes of training.
    """

    data: list[str] = field(default_factory=list)
    model: str = "usfm_vit_base_patch16_224"
    img_size: int = 224
    drop_path: float = 0.1
    epochs: int = 100
    batch_size: int = 32
    accum_steps: int = 1
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    clip_grad: float = 5.0
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    amp: str = "auto"
    save_every: int = 500
    log_every: int = 10
    max_steps: int | None = None
    time_limit_min: float | None = None

    def __post_init__(self):
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.device not in DEVICE_CHOICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        for name in ("epochs", "batch_size", "accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "save_every", "warmup_epochs", "weight_decay", "clip_grad", "lr", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        # fields of the fine-tuning runs (finetune, distill); a run type without them skips the check
        if not 0 < getattr(self, "label_fraction", 1.0) <= 1:
            raise ConfigError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if not 0 <= getattr(self, "ema", 0.0) < 1:
            raise ConfigError(f"ema must be in [0, 1) (0 = off), got {self.ema}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        return from_dict(cls, data)

    def resume_diff(self, saved: dict[str, Any], fields) -> list[str]:
        """The ``fields`` whose value in a checkpoint's config (``saved``) differs from this config, as
        ``name (old in the checkpoint, new now)``; nested configs name the nested field (``mim.norm_target``)."""
        now, diff = self.to_dict(), []
        for k in fields:
            a, b = saved.get(k), now.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                diff += [f"{k}.{sub} ({a.get(sub)!r} in the checkpoint, {b.get(sub)!r} now)"
                         for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
            elif a != b:
                diff.append(f"{k} ({a!r} in the checkpoint, {b!r} now)")
        return diff


@dataclass
class PretrainConfig(RunConfig):
    """Dual masked image modelling pretraining run (the :class:`RunConfig` fields, plus the ones below).

    lr: 1.5e-4 per 256 images is MAE's base; SimMIM ViT-B's 1e-4/512 equals 5e-5 per 256, tuned for 800 epochs
    at batch 2048, too slow for short runs from scratch.

    Attributes:
        samples_per_epoch: samples drawn per epoch by the organ-balanced sampler (default: all records).
        compile: wrap the model in ``torch.compile``.
        init: checkpoint the encoder starts from (``USFM_latest.pth``, SimMIM or usfm-edge), for
            continued pretraining; the decoder starts fresh.
        organ_weights: relative sampling weight per organ (default: every organ equally likely).
        mim: masking and loss settings (:class:`usfm_edge.models.mim.MimConfig`).
    """

    samples_per_epoch: int | None = None
    compile: bool = False
    init: str | None = None
    organ_weights: dict[str, float] | None = None
    mim: MimConfig = field(default_factory=MimConfig)

    def __post_init__(self):
        if isinstance(self.mim, dict):
            self.mim = from_dict(MimConfig, self.mim)
        super().__post_init__()
        if self.img_size % self.mim.mask_patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of mim.mask_patch_size "
                              f"{self.mim.mask_patch_size}", hint="use e.g. --mask-patch-size 16 or 32")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"mim.mask_ratio": 0.5}`` -> ``{"mim": {"mask_ratio": 0.5}}``; None values are dropped."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[C], config: str | Path | dict | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build a config of class ``cls`` from an optional YAML file (or dict) and flag overrides.

    Args:
        config: YAML path or mapping (keys as in the dataclass; nested configs such as ``mim`` nested).
        overrides: field -> value, dotted keys for nested fields; ``None`` values and empty lists are
            ignored so unset flags do not override the YAML.
    """
    base = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    flat = {k: v for k, v in (overrides or {}).items() if not (v is None or (isinstance(v, (list, tuple)) and not v))}
    return from_dict(cls, _deep_merge(base, _nest(flat)))


def load_pretrain_config(config: str | Path | dict | None = None, overrides: dict[str, Any] | None = None
                         ) -> PretrainConfig:
    """:func:`load_config` of a :class:`PretrainConfig`."""
    return load_config(PretrainConfig, config, overrides)
