"""Typed pretraining config: the one source of truth for the CLI, the Python API and checkpoints.

Layers, later wins: dataclass defaults < YAML file (``--config``) < command-line flags. Unknown keys
raise :class:`ConfigError` with a suggestion. ``pretrain_options`` lists the flags as plain tuples so the
argparse entry point of :mod:`usfm_edge.train.pretrain` and the click CLI build the same options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from usfm_edge.core.config import from_dict, load_yaml, to_dict
from usfm_edge.core.errors import ConfigError
from usfm_edge.models.mim import MimConfig

__all__ = ["PretrainConfig", "MimConfig", "Option", "pretrain_options", "load_pretrain_config"]

AMP_CHOICES = ("auto", "bf16", "off")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass
class PretrainConfig:
    """Dual masked image modelling pretraining run.

    Attributes:
        data: source specs read by ``usfm_edge.data.sources.load_records`` (``folder:PATH[@organ]``,
            ``busbra:PATH``, ``hc18:PATH``); images of all sources are pooled.
        model: backbone preset (``usfm_vit_base_patch16_224`` is the official USFM architecture).
        img_size: training resolution (multiple of ``mim.mask_patch_size``).
        drop_path: stochastic depth of the encoder (SimMIM ViT-B: 0.1).
        epochs: passes over ``samples_per_epoch`` samples; the lr schedule spans all of them.
        samples_per_epoch: samples drawn per epoch by the organ-balanced sampler (default: all records).
        batch_size: images per micro-batch per process.
        accum_steps: micro-batches per optimiser step (gradient accumulation).
        lr: base learning rate **per 256 images**; the peak lr is
            ``lr * batch_size * accum_steps * world_size / 256`` (the linear scaling rule of MAE/SimMIM;
            SimMIM writes it per 512). 1.5e-4 is MAE's base; SimMIM ViT-B's 1e-4/512 equals 5e-5 per 256,
            tuned for 800 epochs at batch 2048, too slow for short runs from scratch.
        min_lr: floor of the cosine schedule (absolute, not scaled).
        warmup_epochs: linear warm-up length (fractional epochs allowed).
        weight_decay: AdamW decay (SimMIM: 0.05); never applied to 1-D params, tokens or the rel-pos table.
        clip_grad: max global grad norm (SimMIM: 5.0); 0 disables clipping.
        seed: seeds model init, data order, augmentation and masks.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda`` (under torchrun: ``cuda:LOCAL_RANK``).
        workers: DataLoader worker processes per rank (0 = load in the main process).
        amp: ``auto`` (bf16 autocast where the hardware runs bf16 natively), ``bf16`` (force) or ``off``.
        compile: wrap the model in ``torch.compile``.
        save_every: optimiser steps between checkpoints (0: only at the end).
        log_every: optimiser steps between JSONL log lines.
        init: checkpoint the encoder starts from (``USFM_latest.pth``, SimMIM or usfm-edge), for
            continued pretraining; the decoder starts fresh.
        organ_weights: relative sampling weight per organ (default: every organ equally likely).
        max_steps: stop after this many optimiser steps in total (time-boxed runs, tests); the schedule
            still spans ``epochs``.
        time_limit_min: stop cleanly (with a checkpoint) after this many minutes of training.
        mim: masking and loss settings (:class:`usfm_edge.models.mim.MimConfig`).
    """

    data: list[str] = field(default_factory=list)
    model: str = "usfm_vit_base_patch16_224"
    img_size: int = 224
    drop_path: float = 0.1
    epochs: int = 100
    samples_per_epoch: int | None = None
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
    compile: bool = False
    save_every: int = 500
    log_every: int = 10
    init: str | None = None
    organ_weights: dict[str, float] | None = None
    max_steps: int | None = None
    time_limit_min: float | None = None
    mim: MimConfig = field(default_factory=MimConfig)

    def __post_init__(self):
        if isinstance(self.mim, dict):
            self.mim = from_dict(MimConfig, self.mim)
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
        if self.img_size % self.mim.mask_patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of mim.mask_patch_size "
                              f"{self.mim.mask_patch_size}", hint="use e.g. --mask-patch-size 16 or 32")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        return from_dict(cls, data)


class Option(NamedTuple):
    """One command-line option.

    Attributes:
        flag: the option name (``--batch-size``).
        field: the config field; dotted for nested fields (``mim.mask_ratio``).
        type: ``str``, ``int``, ``float``, ``bool`` (an on/off switch: ``--compile/--no-compile``) or ``list``
            (a repeatable string option).
        help: one line of help.
    """

    flag: str
    field: str
    type: type
    help: str


pretrain_options: list[Option] = [
    Option("--data", "data", list, "image source: folder:PATH[@organ], busbra:PATH or hc18:PATH (repeatable)"),
    Option("--model", "model", str, "backbone preset (usfm_vit_{base,small,tiny}_patch16_224)"),
    Option("--img-size", "img_size", int, "training resolution in pixels"),
    Option("--epochs", "epochs", int, "epochs (the lr schedule spans all of them)"),
    Option("--samples-per-epoch", "samples_per_epoch", int, "samples per epoch (default: number of images)"),
    Option("--batch-size", "batch_size", int, "images per micro-batch per process"),
    Option("--accum-steps", "accum_steps", int, "micro-batches per optimiser step"),
    Option("--lr", "lr", float, "base learning rate per 256 images (scaled by the total batch / 256)"),
    Option("--min-lr", "min_lr", float, "final learning rate of the cosine schedule"),
    Option("--warmup-epochs", "warmup_epochs", float, "linear warm-up in epochs"),
    Option("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    Option("--clip-grad", "clip_grad", float, "max gradient norm (0 = off)"),
    Option("--drop-path", "drop_path", float, "stochastic depth rate of the encoder"),
    Option("--seed", "seed", int, "random seed"),
    Option("--device", "device", str, "auto, cpu or cuda"),
    Option("--workers", "workers", int, "DataLoader workers per process"),
    Option("--amp", "amp", str, "auto, bf16 or off"),
    Option("--compile", "compile", bool, "torch.compile the model"),
    Option("--save-every", "save_every", int, "optimiser steps between checkpoints (0 = end only)"),
    Option("--log-every", "log_every", int, "optimiser steps between log lines"),
    Option("--init", "init", str, "start the encoder from this checkpoint (e.g. USFM_latest.pth)"),
    Option("--max-steps", "max_steps", int, "stop after this many optimiser steps"),
    Option("--time-limit-min", "time_limit_min", float, "stop cleanly after this many minutes"),
    Option("--mask-ratio", "mim.mask_ratio", float, "fraction of spatial blocks masked"),
    Option("--mask-patch-size", "mim.mask_patch_size", int, "spatial mask block size in pixels"),
    Option("--freq-prob", "mim.freq_prob", float, "probability of frequency masking per sample"),
    Option("--drop-ratio", "mim.drop_ratio", float, "fraction of frequency rings removed"),
    Option("--lambda-freq", "mim.lambda_freq", float, "weight of the Fourier loss"),
    Option("--freq-loss", "mim.freq_loss", str, "Fourier loss: complex or log_amplitude"),
    Option("--norm-target", "mim.norm_target", bool,
           "reconstruct per-patch normalised pixels (MAE; default), --no-norm-target: raw pixels (SimMIM)"),
]


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


def load_pretrain_config(config: str | Path | dict | None = None, overrides: dict[str, Any] | None = None
                         ) -> PretrainConfig:
    """Build a :class:`PretrainConfig` from an optional YAML file (or dict) and flag overrides.

    Args:
        config: YAML path or mapping (keys as in the dataclass; ``mim`` nested).
        overrides: field -> value, dotted keys for nested fields; ``None`` values and empty lists are
            ignored so unset flags do not override the YAML.
    """
    base = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    flat = {k: v for k, v in (overrides or {}).items() if not (v is None or (isinstance(v, (list, tuple)) and not v))}
    return from_dict(PretrainConfig, _deep_merge(base, _nest(flat)))
