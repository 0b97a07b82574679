"""The command-line flags of ``pretrain``, ``finetune`` and ``distill``, as plain rows (torch-free, so ``usfm-edge --help`` and
the click CLI read them without loading torch); the argparse entry points (``python -m usfm_edge.train.pretrain``,
``... .finetune``, torchrun-friendly) and the click commands build the same options from them.

Every row names a config field (``train.config.RunConfig`` and its subclasses); dotted fields are nested
(``mim.mask_ratio``). ``None`` (a flag not given) never overrides the YAML config.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

__all__ = ["Option", "RUN_OPTIONS", "pretrain_options", "finetune_options", "distill_options",
           "add_argparse_options", "overrides_from"]


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


#: the flags of ``train.config.RunConfig``: what every training run has
RUN_OPTIONS: list[Option] = [
    Option("--model", "model", str,
           "backbone preset (usfm_vit_{base,small,tiny}_patch16_224, mae_vit_{base,tiny}_patch16_224)"),
    Option("--img-size", "img_size", int, "model input side (training resolution) in pixels"),
    Option("--epochs", "epochs", int, "epochs (the lr schedule spans all of them)"),
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
    Option("--save-every", "save_every", int, "optimiser steps between training checkpoints (0 = end only)"),
    Option("--log-every", "log_every", int, "optimiser steps between log lines"),
    Option("--max-steps", "max_steps", int, "stop after this many optimiser steps"),
    Option("--time-limit-min", "time_limit_min", float, "stop cleanly after this many minutes"),
]

pretrain_options: list[Option] = [
    Option("--data", "data", list, "image source: folder:PATH[@organ], busbra:PATH or hc18:PATH (repeatable)"),
    *RUN_OPTIONS,
    Option("--samples-per-epoch", "samples_per_epoch", int, "samples per epoch (default: number of images)"),
    Option("--compile", "compile", bool, "torch.compile the model"),
    Option("--init", "init", str, "start the encoder from this checkpoint (e.g. USFM_latest.pth)"),
    Option("--mask-ratio", "mim.mask_ratio", float, "fraction of spatial blocks masked"),
    Option("--mask-patch-size", "mim.mask_patch_size", int, "spatial mask block size in pixels"),
    Option("--freq-prob", "mim.freq_prob", float, "probability of frequency masking per sample"),
    Option("--drop-ratio", "mim.drop_ratio", float, "fraction of frequency rings removed"),
    Option("--lambda-freq", "mim.lambda_freq", float, "weight of the Fourier loss"),
    Option("--freq-loss", "mim.freq_loss", str, "Fourier loss: complex or log_amplitude"),
    Option("--norm-target", "mim.norm_target", bool,
           "reconstruct per-patch normalised pixels (MAE; default), --no-norm-target: raw pixels (SimMIM)"),
]

finetune_options: list[Option] = [
    Option("--task", "task", str, "seg, cls or enhance"),
    Option("--data", "data", list, "labelled source: busbra:PATH, hc18:PATH, folder:PATH ... (repeatable)"),
    Option("--init", "init", str, "starting weights (USFM_latest.pth, encoder.safetensors, a task checkpoint "
           "such as a shipped model: backbone and head) or none"),
    Option("--head", "head", str, "auto, hybrid, upernet, light or hires (seg), linear (cls), pixelshuffle "
           "(enhance); auto with a task checkpoint as --init: its head and widths"),
    Option("--label-fraction", "label_fraction", float, "fraction of training patients with labels"),
    Option("--val-fraction", "val_fraction", float, "fraction of patients held out for validation"),
    Option("--split-seed", "split_seed", int, "seed of the patient split (and of the label subset by default)"),
    Option("--label-seed", "label_seed", int, "seed of the labelled subset of training patients (default: split seed)"),
    *RUN_OPTIONS,
    Option("--layer-decay", "layer_decay", float, "layer-wise lr decay (1 = off)"),
    Option("--label-smoothing", "label_smoothing", float, "classification label smoothing"),
    Option("--augment", "augment", str, "training augmentation: ultrasound, light, basic or none"),
    Option("--ema", "ema", float, "EMA decay of the weights (0 = off)"),
    Option("--aux-weight", "aux_weight", float, "deep-supervision loss weight (0 = off)"),
    Option("--eval-every", "eval_every", int, "epochs between validations"),
    Option("--eval-limit", "eval_limit", int, "at most this many validation frames"),
]

distill_options: list[Option] = [
    Option("--teacher", "teacher", str, "teacher checkpoint: a backbone (feature mode) or a seg task checkpoint"),
    Option("--student", "model", str, "student backbone preset (e.g. usfm_vit_tiny_patch16_224)"),
    Option("--data", "data", list, "frames: folder:PATH[@organ], busbra:PATH, hc18:PATH (task mode: with masks)"),
    Option("--mode", "mode", str, "auto (from the teacher's task), features or task"),
    Option("--student-init", "student_init", str, "start the student from these weights (backbone or task file)"),
    Option("--head", "head", str, "task mode: student head (auto = the teacher's: hybrid, light, upernet, ...)"),
    Option("--head-widths", "head_widths", str, "task mode: smaller head widths, comma-separated (hybrid: 8,16,32,64,128)"),
    Option("--head-stride", "head_stride", int, "task mode, hybrid head: 2 = no full-resolution level (4 widths)"),
    *[o for o in RUN_OPTIONS if o.flag != "--model"],
    Option("--samples-per-epoch", "samples_per_epoch", int, "feature mode: samples per epoch (default: all frames)"),
    Option("--label-fraction", "label_fraction", float, "task mode: fraction of training patients whose labels are used"),
    Option("--val-fraction", "val_fraction", float, "task mode: held-out patients (default: the teacher's split)"),
    Option("--split-seed", "split_seed", int, "task mode: seed of the patient split (default: the teacher's)"),
    Option("--augment", "augment", str, "task mode: ultrasound, light, basic or none"),
    Option("--eval-limit", "eval_limit", int, "task mode: at most this many validation frames"),
    Option("--ema", "ema", float, "EMA decay of the student's weights (0 = off)"),
    Option("--layers", "loss.layers", int, "evenly spaced blocks matched in each backbone"),
    Option("--feature-loss", "loss.feature_loss", str, "smooth_l1 or cosine on layer-normalised teacher tokens"),
    Option("--feature-weight", "loss.feature_weight", float, "weight of the feature term (task mode default 0)"),
    Option("--mask-ratio", "loss.mask_ratio", float, "feature mode: fraction of blocks masked in the student input"),
    Option("--mask-patch-size", "loss.mask_patch_size", int, "feature mode: mask block size in pixels"),
    Option("--alpha", "loss.alpha", float, "task mode: weight of the soft-target KL (1 - alpha: the label loss)"),
    Option("--temperature", "loss.temperature", float, "task mode: softmax temperature of the soft targets"),
]


def add_argparse_options(parser: argparse.ArgumentParser, options: list[Option]) -> argparse.ArgumentParser:
    """Add ``--config``, ``--out``, ``--resume`` and one argument per option (dest: the field, dots as ``__``)."""
    parser.add_argument("--config", help="YAML config file (flags override it)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--resume", nargs="?", const="auto", help="continue from checkpoint.pt (default: OUT's)")
    for opt in options:
        dest = opt.field.replace(".", "__")
        if opt.type is bool:
            parser.add_argument(opt.flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=opt.help)
        elif opt.type is list:
            parser.add_argument(opt.flag, dest=dest, action="append", help=opt.help)
        else:
            parser.add_argument(opt.flag, dest=dest, type=opt.type, help=opt.help)
    return parser


def overrides_from(values, options: list[Option]) -> dict:
    """``{config field: value}`` of parsed flags (an ``argparse.Namespace`` or a dict keyed by dest names);
    tuples become lists, flags not given are None."""
    get = values.get if isinstance(values, dict) else (lambda k: getattr(values, k, None))
    out = {}
    for opt in options:
        v = get(opt.field.replace(".", "__"))
        out[opt.field] = list(v) if isinstance(v, tuple) else v
    return out
