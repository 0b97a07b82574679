"""torch Dataset wrappers for pretraining: deterministic per-sample randomness and mid-epoch resume.

The sampler side is :class:`usfm_edge.data.sampler.OrganBalancedSampler` (organ shares, DDP shards, order
fixed by ``(seed, epoch)``). :class:`PositionedSampler` wraps it and yields ``(epoch, position, index)``
keys, where ``position`` is the draw's place in the epoch over all ranks, and can start mid-epoch.
:class:`MimPretrainDataset` seeds each sample's augmentation and masks from ``(seed, epoch, position)``:
the same draw gets the same crop and masks whatever the number of workers or ranks, and a resumed run
reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from usfm_edge.core.errors import ConfigError
from usfm_edge.data.readers import read_image
from usfm_edge.data.sampler import OrganBalancedSampler
from usfm_edge.train.masking import MimTransform

__all__ = ["PositionedSampler", "MimPretrainDataset", "build_pretrain_loader"]

_SALT = 0x55F4  # separates the augmentation stream from the sampler's default_rng([seed, epoch])


class PositionedSampler(Sampler[tuple[int, int, int]]):
    """Wrap a per-rank sampler: yield ``(epoch, global position, index)``, optionally skipping a prefix.

    Args:
        base: a sampler with ``set_epoch`` whose rank ``r`` of ``world_size`` yields the draws at global
            positions ``r, r + world_size, ...`` of the epoch (as ``OrganBalancedSampler`` does).
        rank, world_size: this process's place in the job.
    """

    def __init__(self, base: OrganBalancedSampler, rank: int = 0, world_size: int = 1):
        self.base, self.rank, self.world_size = base, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and skip its first ``start`` draws of this rank (mid-epoch resume)."""
        self.base.set_epoch(epoch)
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for pos, index in enumerate(self.base):
            if pos >= self.start:
                yield self.epoch, pos * self.world_size + self.rank, int(index)

    def __len__(self) -> int:
        return max(len(self.base) - self.start, 0)


class MimPretrainDataset(Dataset):
    """Images of ``records`` -> ``(image, spatial_mask, freq_mask)`` tensors for :class:`UsfmMim`.

    Args:
        records: items with an ``.image`` path (``usfm_edge.data.sources.Record``).
        transform: frame + rng -> :class:`usfm_edge.train.masking.MimSample`.
        seed: run seed; a key ``(epoch, position, index)`` draws from ``default_rng([seed, epoch, position])``.

    Indexing with a plain ``int`` uses epoch 0, position ``index`` (handy for figures and tests).
    """

    def __init__(self, records: Sequence, transform: MimTransform, seed: int = 0):
        if not records:
            raise ConfigError("no images to pretrain on", hint="check the --data sources")
        self.records, self.transform, self.seed = list(records), transform, int(seed)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, position, index = (0, int(key), int(key)) if isinstance(key, (int, np.integer)) else key
        rng = np.random.default_rng([self.seed, _SALT, epoch, position])
        sample = self.transform(read_image(self.records[index].image), rng)
        return (torch.from_numpy(sample.image), torch.from_numpy(sample.spatial_mask),
                torch.from_numpy(sample.freq_mask))


def build_pretrain_loader(dataset: MimPretrainDataset, organs: Sequence[str], *, batch_size: int, seed: int,
                          samples_per_epoch: int | None = None, organ_weights: dict[str, float] | None = None,
                          rank: int = 0, world_size: int = 1, workers: int = 0,
                          pin_memory: bool = False) -> tuple[DataLoader, PositionedSampler]:
    """Organ-balanced, DDP-sharded, resumable DataLoader (``drop_last``: every micro-batch is full).

    Returns:
        ``(loader, sampler)``; call ``sampler.set_epoch(epoch, start)`` before iterating an epoch.
    """
    base = OrganBalancedSampler(organs, num_samples=samples_per_epoch, weights=organ_weights, seed=seed,
                                rank=rank, world_size=world_size)
    sampler = PositionedSampler(base, rank, world_size)
    # the DataLoader draws a base seed for its workers from this generator at every iter(); giving it its own
    # keeps the global torch RNG (dropout, drop path) untouched, which exact resume relies on
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=pin_memory, generator=gen, persistent_workers=False)
    return loader, sampler
