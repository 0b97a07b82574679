"""Continue training the shipped HC18 model, with or without HC-size-balanced sampling (RESULTS.md section 1.1).

The question it answers: is the > 250 mm bin's HC error a matter of more training, or of the few large heads in
the training set (51 of 619 frames)? Two runs side by side, one core each, the same budget: ``plain`` continues
with the fine-tuning loop as it is; ``balance`` draws each size bin (< 150, 150-250, > 250 mm) in proportion to
the square root of its frame count (the > 250 mm frames about 2.2x as often, the middle bin 0.8x).
Everything else is ``usfm-edge finetune``'s recipe: patient split (seed 0), ultrasound augmentation, Dice + CE,
EMA, cosine schedule over the time budget; the start is the shipped model, backbone and head.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/hc18_continue.py --out runs/hc18_cont_plain &
    OMP_NUM_THREADS=1 python benchmarks/hc18_continue.py --out runs/hc18_cont_bal --balance &
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import usfm_edge.train.finetune as F
from usfm_edge.core.geometry import size_bin

SHIPPED = Path(__file__).resolve().parents[1] / "usfm_edge" / "assets" / "checkpoints" / "hc18_seg_tiny.safetensors"


def balanced_loader(cfg, train, spec, info, plain=F._loader):
    """``finetune._loader`` with size bins in place of organs, weighted by the square root of their counts."""
    keys = [size_bin(r.hc_mm) for r in train]
    counts = {k: keys.count(k) for k in sorted(set(keys))}
    print(f"[hc18_continue] training frames per bin {counts}", file=sys.stderr)
    return plain(cfg, train, spec, info, groups=keys, weights={k: float(np.sqrt(c)) for k, c in counts.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data", default="hc18:../shared/data/hc18")
    p.add_argument("--init", default=str(SHIPPED))
    p.add_argument("--balance", action="store_true", help="size-balanced sampling (square root of bin counts)")
    p.add_argument("--time-limit-min", type=float, default=40.0)
    p.add_argument("--lr", type=float, default=0.004, help="per 256 images (the shipped run's peak: 0.016)")
    args = p.parse_args(argv)
    cfg = F.load_finetune_config(None, dict(
        task="seg", model="usfm_vit_tiny_patch16_224", head="hybrid", init=args.init, data=[args.data], img_size=320,
        batch_size=8, lr=args.lr, layer_decay=1.0, warmup_epochs=0.2, epochs=200, eval_every=2, save_every=100,
        time_limit_min=args.time_limit_min, augment="ultrasound", ema=0.995))
    plain = F._loader
    F._loader = balanced_loader if args.balance else plain
    try:
        res = F.fit_finetune(cfg, args.out)
    finally:
        F._loader = plain
    print(json.dumps(res.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
