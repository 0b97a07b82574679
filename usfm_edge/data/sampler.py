"""Organ-balanced sampling for multi-organ pretraining and calibration sets.

A pool that holds 1000 breast frames and 50 thyroid frames would otherwise teach (or calibrate) mostly breast.
:class:`OrganBalancedSampler` gives each organ an equal share of every epoch (or a chosen weight), cycling
through the images of small organs (each image is drawn once before any is drawn twice) and subsampling large
ones. This module imports torch; ``usfm_edge.data`` exposes the class lazily so the readers stay torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed
import torch.utils.data

from usfm_edge.core.errors import ConfigError


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """Split ``total`` into integer counts proportional to ``shares`` (summing exactly to total)."""
    exact = total * shares / shares.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


class OrganBalancedSampler(torch.utils.data.Sampler[int]):
    """Dataset indices drawn so that every organ gets its share of each epoch, whatever its size.

    Args:
        organs: organ of each dataset item (``organs[i]`` for index i), e.g. ``[r.organ for r in records]``.
        num_samples: draws per epoch over all ranks; default ``len(organs)``.
        weights: optional share per organ (normalised); organs left out get weight 0 and are never drawn.
            Default: equal shares.
        seed: base seed; the order depends only on (seed, epoch).
        rank: this process's rank under DDP; default: from the initialised process group, else 0.
        world_size: number of DDP processes; default: from the process group, else 1. Each rank yields a
            disjoint shard (every world_size-th draw of the shared epoch order) of ``num_samples // world_size``
            indices.

    Raises:
        ConfigError: empty organ list, bad weights, rank outside the world, or fewer draws than ranks.
    """

    def __init__(
        self,
        organs: Sequence[str],
        num_samples: int | None = None,
        weights: dict[str, float] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        if world_size is None or rank is None:  # like DistributedSampler: ask the process group, if any
            ready = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if ready else 1)
            rank = rank if rank is not None else (torch.distributed.get_rank() if ready else 0)
        if len(organs) == 0:
            raise ConfigError("OrganBalancedSampler needs at least one item")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside a world of size {world_size}")
        self.names = sorted(set(organs))
        lookup = {n: i for i, n in enumerate(self.names)}
        codes = np.array([lookup[o] for o in organs])
        self.pools = [np.flatnonzero(codes == i) for i in range(len(self.names))]
        if weights is None:
            shares = np.ones(len(self.names))
        else:
            unknown = sorted(set(weights) - set(self.names))
            if unknown:
                raise ConfigError(f"weights name organs not in the data: {unknown}", hint=f"organs: {self.names}")
            shares = np.array([float(weights.get(n, 0.0)) for n in self.names])
            if np.any(shares < 0) or shares.sum() <= 0:
                raise ConfigError(f"organ weights must be >= 0 with a positive sum, got {weights}")
        self.shares = shares / shares.sum()
        self.num_samples = len(organs) if num_samples is None else int(num_samples)
        if self.num_samples < world_size:
            raise ConfigError(f"num_samples={self.num_samples} is smaller than world_size={world_size}")
        self.seed, self.rank, self.world_size, self.epoch = int(seed), int(rank), int(world_size), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (call it before each epoch, as with DDP)."""
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """All ``num_samples`` draws of the current epoch, before sharding (the same on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        counts = _largest_remainder(self.num_samples, self.shares)
        draws = []
        for pool, count in zip(self.pools, counts):
            if count == 0:
                continue
            rounds = -(-int(count) // len(pool))  # whole shuffled passes over the pool, then cut
            passes = [pool[rng.permutation(len(pool))] for _ in range(rounds)]
            draws.append(np.concatenate(passes)[:count])
        out = np.concatenate(draws)
        return out[rng.permutation(len(out))]

    def __iter__(self) -> Iterator[int]:
        per_rank = len(self)
        shard = self.epoch_indices()[self.rank : per_rank * self.world_size : self.world_size]
        return iter(shard.tolist())

    def __len__(self) -> int:
        return self.num_samples // self.world_size
