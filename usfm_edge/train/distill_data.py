"""The data side of ``train.distill``: unlabelled frames with MIM block masks (feature mode) and patient-split seg
samples whose unlabelled share carries the target -1 (task mode), plus the student's validation.

``cfg`` is a ``train.distill.DistillConfig`` whose teacher-dependent fields (``img_size``, ``val_fraction``,
``split_seed``) are already resolved.
"""

from __future__ import annotations

import numpy as np
import torch

from usfm_edge.core.errors import ConfigError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.train.dist import DistInfo

__all__ = ["HideLabels", "distill_records", "feature_loader", "task_loader", "evaluate_student"]


class HideLabels(torch.utils.data.Dataset):
    """Seg samples whose record is outside the labelled subset get the target -1 (soft targets only)."""

    def __init__(self, base, labelled: list[bool]):
        self.base, self.labelled = base, labelled

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        x, y = self.base[key]
        index = key if isinstance(key, (int, np.integer)) else key[2]
        return (x, y) if self.labelled[index] else (x, torch.full_like(y, -1))


def distill_records(cfg) -> list:
    from usfm_edge.data.sources import load_records

    if not cfg.data:
        raise ConfigError("no data sources given", hint="add --data busbra:PATH, hc18:PATH or folder:PATH[@organ]")
    return [r for spec in cfg.data for r in load_records(spec)]


def feature_loader(cfg, records: list, patch_size: int, info: DistInfo):
    from usfm_edge.train.datasets import MimPretrainDataset, build_pretrain_loader
    from usfm_edge.train.masking import MimTransform

    # one data path: with mask_ratio 0 the workers still draw (unused) masks
    ratio = cfg.loss.mask_ratio or 0.5
    transform = MimTransform(PreprocessSpec(img_size=cfg.img_size), patch_size, cfg.loss.mask_patch_size, ratio,
                             freq_prob=0.0)
    loader, sampler = build_pretrain_loader(
        MimPretrainDataset(records, transform, cfg.seed), [r.organ for r in records], batch_size=cfg.batch_size,
        seed=cfg.seed, samples_per_epoch=cfg.samples_per_epoch, rank=info.rank, world_size=info.world_size,
        workers=cfg.workers, pin_memory=info.device.type == "cuda")
    return loader, sampler, len(sampler.base), {"images": len(records)}


def task_loader(cfg, records: list, spec: PreprocessSpec, info: DistInfo):
    from usfm_edge.data.sampler import OrganBalancedSampler
    from usfm_edge.data.splits import label_fraction, patient_split
    from usfm_edge.train.datasets import PositionedSampler
    from usfm_edge.train.task_data import TaskDataset

    train, val = patient_split(records, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    labelled = train if cfg.label_fraction >= 1 else label_fraction(train, cfg.label_fraction, seed=cfg.split_seed)
    keep = {r.image for r in labelled}
    dataset = HideLabels(TaskDataset(train, "seg", spec, train=True, seed=cfg.seed, augment=cfg.augment),
                          [r.image in keep for r in train])
    base = OrganBalancedSampler([r.organ for r in train], num_samples=len(train), seed=cfg.seed, rank=info.rank,
                                world_size=info.world_size)
    sampler = PositionedSampler(base, info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed))
    split = {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed, "train_images": len(train),
             "labelled_images": len(labelled), "val_images": len(val)}
    return loader, sampler, len(base), {"split": split, "val": val}


def evaluate_student(student, val: list, limit: int | None, device) -> dict:
    from usfm_edge.evaluation import TorchPredictor, evaluate_predictor

    if not val:
        return {}
    recs = val if not limit or len(val) <= limit else [val[i] for i in np.linspace(0, len(val) - 1, limit).astype(int)]
    was = student.training
    try:
        return evaluate_predictor(TorchPredictor(student, device=str(device)), recs, "seg")
    finally:
        student.train(was)
