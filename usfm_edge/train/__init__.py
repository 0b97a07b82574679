"""Training: typed configs, DDP via torchrun, optimiser and schedule, one engine, pretraining (dual MIM),
distillation into edge students.

Public entry points are imported lazily, so ``import usfm_edge.train`` stays cheap and ``train.options`` (the
command-line flags) can be read without torch.
"""

from __future__ import annotations

_LAZY = {
    "PretrainConfig": "usfm_edge.train.config",
    "pretrain_options": "usfm_edge.train.config",
    "load_pretrain_config": "usfm_edge.train.config",
    "run_pretrain": "usfm_edge.train.pretrain",
    "DistillConfig": "usfm_edge.train.distill",
    "fit_distill": "usfm_edge.train.distill",
    "run_distill": "usfm_edge.train.distill",
    "train_one_epoch": "usfm_edge.train.engine",
    "run_epochs": "usfm_edge.train.engine",
    "init_distributed": "usfm_edge.train.dist",
    "DistInfo": "usfm_edge.train.dist",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'usfm_edge.train' has no attribute {name!r}")
