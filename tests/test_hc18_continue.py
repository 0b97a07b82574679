"""benchmarks/hc18_continue.py: the size-balanced sampler draws each HC bin in proportion to the square root of
its frame count, over the fine-tuning loop's own dataset."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import load_benchmark

torch = pytest.importorskip("torch")


def test_balanced_loader_draws_bins_by_square_root_of_counts(sample_dir):
    from usfm_edge.core.geometry import size_bin
    from usfm_edge.core.preprocess import PreprocessSpec
    from usfm_edge.data import load_records
    from usfm_edge.train.finetune import load_finetune_config

    mod = load_benchmark("hc18_continue")
    train = load_records(f"hc18:{sample_dir / 'hc18'}")
    keys = [size_bin(r.hc_mm) for r in train]
    counts = {k: keys.count(k) for k in set(keys)}
    assert len(counts) >= 2 and min(counts.values()) < max(counts.values())
    cfg = load_finetune_config(None, {"task": "seg", "data": [f"hc18:{sample_dir / 'hc18'}"], "img_size": 64,
                                      "batch_size": 4})
    loader, sampler, n = mod.balanced_loader(cfg, train, PreprocessSpec(img_size=64),
                                             SimpleNamespace(rank=0, world_size=1))
    assert n == len(train)
    sampler.set_epoch(0, 0)
    drawn = [keys[i] for _, _, i in sampler]
    share = np.array([np.sqrt(counts[k]) for k in sorted(counts)])
    expect = n * share / share.sum()
    got = np.array([drawn.count(k) for k in sorted(counts)])
    assert np.all(np.abs(got - expect) <= 1)  # largest-remainder rounding
    x, y = next(iter(loader))
    assert x.shape[0] == 4 and x.shape[-1] == 64
