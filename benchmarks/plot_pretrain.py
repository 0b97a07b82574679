"""Figures of a pretraining run: the loss curve (from ``log.jsonl``) and reconstructions (from ``checkpoint.pt``).

    python benchmarks/plot_pretrain.py --run runs/pretrain_tiny            # writes loss.png + recon.png there
    python benchmarks/plot_pretrain.py --run runs/pre --data hc18:/work/shared/data/hc18 --n 6 --out figs/

The reconstruction figure shows, for a few real frames: the original, the spatially masked input
(mean-padded blocks), the frequency-masked input (band-stop filtered), the combined model input, and the
model's reconstruction of it. Masks are drawn with a fixed seed, so figures of two checkpoints compare.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from usfm_edge.core.preprocess import PreprocessSpec  # noqa: E402
from usfm_edge.data import load_records, read_image, sample_dir  # noqa: E402
from usfm_edge.models.mim import build_mim  # noqa: E402
from usfm_edge.train.config import PretrainConfig  # noqa: E402
from usfm_edge.train.engine import load_training_state  # noqa: E402
from usfm_edge.train.masking import MimTransform  # noqa: E402


def plot_loss(log: Path, out: Path) -> Path:
    """Total, spatial and Fourier loss per logged step (log scale) with the learning rate on a second axis."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{log}: no log lines yet")
    step = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(step, [r["loss"] for r in rows], label="total", color="k")
    for key, colour in (("loss_spatial", "tab:blue"), ("loss_freq", "tab:orange")):
        if key in rows[0]:
            ax.plot(step, [r[key] for r in rows], label=key.removeprefix("loss_"), color=colour, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    lr_ax = ax.twinx()
    lr_ax.plot(step, [r["lr"] for r in rows], color="tab:green", ls="--", lw=1, label="lr")
    lr_ax.set_ylabel("learning rate", color="tab:green")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right")
    ips = np.median([r["images_per_s"] for r in rows])
    ax.set_title(f"{log.parent.name}: {step[-1]} steps, {rows[-1]['elapsed_s'] / 60:.1f} min, {ips:.1f} img/s")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _grey(x: torch.Tensor, spec: PreprocessSpec) -> np.ndarray:
    """Normalised (C, H, W) -> 0..1 grey image of channel 0."""
    return np.clip(x[0].float().numpy() * spec.std[0] + spec.mean[0], 0, 1)


@torch.no_grad()
def plot_reconstructions(checkpoint: Path, out: Path, data: list[str] | None = None, n: int = 4,
                         seed: int = 0) -> Path:
    """Original / spatial mask / frequency mask / model input / reconstruction for ``n`` real frames."""
    state = load_training_state(checkpoint)
    cfg = PretrainConfig.from_dict(state["config"])
    model = build_mim(cfg.model, cfg.img_size, cfg.mim)
    model.load_state_dict(state["model"])
    model.eval()
    spec = PreprocessSpec(img_size=cfg.img_size)
    transform = MimTransform(spec, model.patch_size, cfg.mim.mask_patch_size, cfg.mim.mask_ratio, 1.0,
                             cfg.mim.ring_params(), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    s = sample_dir()
    specs = data or [f"busbra:{s / 'busbra'}", f"hc18:{s / 'hc18'}"]
    per = -(-n // len(specs))
    records = [r for sp in specs for r in load_records(sp)[:per]][:n]
    rng = np.random.default_rng(seed)
    samples = [transform(read_image(r.image), rng) for r in records]
    img = torch.from_numpy(np.stack([a.image for a in samples]))
    sm = torch.from_numpy(np.stack([a.spatial_mask for a in samples]))
    fm = torch.from_numpy(np.stack([a.freq_mask for a in samples]))
    spatial_only, _ = model.corrupt(img, sm, None)
    freq_only, _ = model.corrupt(img, torch.zeros_like(sm), fm)
    both, _ = model.corrupt(img, sm, fm)
    loss, pred, parts = model(img, sm, fm)
    cols = [("original", img), ("spatial mask (mean-padded)", spatial_only), ("band-stop filtered", freq_only),
            ("model input", both),
            ("reconstruction" + ("\n(patch mean/std of the original)" if cfg.mim.norm_target else ""),
             model.denormalize(pred, img))]
    fig, axes = plt.subplots(len(records), len(cols), figsize=(2.4 * len(cols), 2.4 * len(records)), squeeze=False)
    for i, rec in enumerate(records):
        for j, (title, x) in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(_grey(x[i], spec), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{rec.organ}\n{Path(rec.image).stem}", fontsize=8)
    fig.suptitle(f"{cfg.model}, step {state['step']}: loss {float(loss):.3f} (spatial {float(parts['spatial']):.3f},"
                 f" Fourier {float(parts['freq']):.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="run folder (log.jsonl, checkpoint.pt)")
    ap.add_argument("--log", type=Path, help="log.jsonl (default: RUN/log.jsonl)")
    ap.add_argument("--checkpoint", type=Path, help="checkpoint.pt (default: RUN/checkpoint.pt)")
    ap.add_argument("--data", action="append", help="source spec for the frames (default: bundled sample)")
    ap.add_argument("--n", type=int, default=4, help="frames in the reconstruction figure")
    ap.add_argument("--out", type=Path, help="output folder (default: RUN)")
    args = ap.parse_args(argv)
    log = args.log or (args.run / "log.jsonl" if args.run else None)
    ckpt = args.checkpoint or (args.run / "checkpoint.pt" if args.run else None)
    out = args.out or args.run or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    if log is None and ckpt is None:
        ap.error("give --run, --log or --checkpoint")
    if log is not None and log.is_file():
        print(plot_loss(log, out / "loss.png"))
    if ckpt is not None and ckpt.is_file():
        print(plot_reconstructions(ckpt, out / "recon.png", args.data, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
