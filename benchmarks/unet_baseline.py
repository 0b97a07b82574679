"""The baseline a reader would train instead: a plain convolutional U-Net, same data, split, recipe and CPU budget.

The U-Net (Ronneberger et al., 2015, with BatchNorm and bilinear upsampling; no pretrained weights) goes through
the very fine-tuning loop of the USFM path (``usfm_edge.train.finetune.fit_finetune``): the same patient split,
ultrasound augmentation, Dice + cross-entropy loss, EMA weights, wall-clock-following cosine schedule and the
same held-out evaluation through the raw-frame graph. Only the network differs, so the comparison in
``benchmarks/RESULTS.md`` isolates the architecture (and the ViT's pretraining, when used).

Usage (one core, the same budget as the USFM model it is compared with)::

    OMP_NUM_THREADS=1 python benchmarks/unet_baseline.py --out runs/busbra_unet --data busbra:../shared/data/busbra \\
        --img-size 256 --time-limit-min 80
    usfm-edge evaluate is not used: the script evaluates the last (EMA) weights itself and writes eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from usfm_edge.core.preprocess import PreprocessSpec


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Encoder of ``len(widths)`` levels (max-pool between them), mirrored decoder with skip concatenation."""

    def __init__(self, in_chans: int = 1, num_classes: int = 2, widths: Sequence[int] = (32, 64, 128, 256, 512)):
        super().__init__()
        self.down = nn.ModuleList()
        c = in_chans
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1)))
        self.cls = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return self.cls(x)


class UNetTaskModel(nn.Module):
    """The U-Net behind the task-model interface the fine-tuning loop and the raw-frame graph use.

    Input: the normalised 3-channel frame (B, 3, S, S) (grey replicated); the U-Net reads its first channel.
    """

    task = "seg"
    aux_weight = 0.0
    depth = 1  # one "layer" for layer-wise lr decay (the recipe runs it at 1.0: no decay)

    def __init__(self, labels: list[str], img_size: int, widths: Sequence[int] = (32, 64, 128, 256, 512)):
        super().__init__()
        self.labels, self.img_size, self.widths = list(labels), int(img_size), list(widths)
        self.num_classes = len(self.labels)
        self.preprocess = PreprocessSpec(img_size=self.img_size)
        self.net = UNet(1, self.num_classes, widths)
        self.load_report = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :1])

    def forward_train(self, x: torch.Tensor, aux: bool = False) -> dict[str, torch.Tensor]:
        return {"out": self.forward(x)}

    def no_weight_decay(self) -> set[str]:
        return set()

    def group_matcher(self, name: str) -> int:
        return 1

    def config(self) -> dict:
        return {"model": "unet_baseline", "task": "seg", "labels": self.labels, "head": "unet",
                "head_args": {"widths": self.widths}, "img_size": self.img_size, "num_classes": self.num_classes,
                "preprocess": self.preprocess.to_dict()}


def main(argv: list[str] | None = None) -> int:
    from usfm_edge.train.finetune import fit_finetune, load_finetune_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--widths", default="32,64,128,256,512")
    p.add_argument("--time-limit-min", type=float, default=80.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.016, help="per 256 images (0.016 at batch 8 = 5e-4)")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    widths = [int(v) for v in args.widths.split(",")]
    cfg = load_finetune_config(None, {
        "task": "seg", "data": args.data, "init": "none", "img_size": args.img_size, "batch_size": args.batch_size,
        "lr": args.lr, "layer_decay": 1.0, "warmup_epochs": 1.0, "epochs": args.epochs, "eval_every": args.eval_every,
        "save_every": 100, "log_every": 20, "time_limit_min": args.time_limit_min, "augment": "ultrasound",
        "ema": 0.999, "seed": args.seed, "head": "unet-baseline", "model": "unet_baseline"})
    res = fit_finetune(cfg, args.out, resume=args.out if args.resume else None,
                       build_model=lambda labels: UNetTaskModel(labels, args.img_size, widths))
    (Path(args.out) / "eval.json").write_text(json.dumps(res.metrics, indent=2))
    print(json.dumps(res.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
