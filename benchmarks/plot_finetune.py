"""Training curves of fine-tuning runs: loss and learning rate per step, held-out metric per validation.

    python benchmarks/plot_finetune.py runs/busbra_hires runs/busbra_unet --labels "USFM hires" "U-Net" \\
        --title "BUS-BRA lesion" --out docs/figures/seg_training_busbra.png

Reads each run's ``log.jsonl`` (written by ``usfm-edge finetune`` and ``benchmarks/unet_baseline.py``). The x axis
is training time in minutes (``elapsed_s``, carried across ``--resume``), so runs with the same CPU budget line
up even when their steps differ in cost. Panels: training loss (smoothed), learning rate, held-out Dice and, when
the runs report it, the HC18 head-circumference error in mm.
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


def read_log(run: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of a run, with ``minutes`` of training time on each (resumes stitched)."""
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    train, evals, offset, last = [], [], 0.0, 0.0
    for r in rows:
        if "elapsed_s" in r:
            if r["elapsed_s"] + offset < last - 1.0:  # a resumed process restarts its clock
                offset = last
            last = r["elapsed_s"] + offset
            train.append({**r, "minutes": last / 60.0})
        elif r.get("event") == "eval":
            evals.append({**r, "minutes": last / 60.0})
    return train, evals


def _smooth(y: np.ndarray, k: int = 9) -> np.ndarray:
    if len(y) < k:
        return y
    pad = np.pad(y, (k // 2, k // 2), mode="edge")
    return np.convolve(pad, np.ones(k) / k, mode="valid")


def plot(runs: list[Path], labels: list[str], out: Path, title: str = "") -> Path:
    logs = [read_log(r) for r in runs]
    has_hc = any(any("hc_mae_mm" in e for e in ev) for _, ev in logs)
    fig, axes = plt.subplots(1, 4 if has_hc else 3, figsize=(16 if has_hc else 12, 3.6))
    for (train, evals), label in zip(logs, labels):
        t = np.array([r["minutes"] for r in train])
        axes[0].plot(t, _smooth(np.array([r["loss"] for r in train])), label=label)
        axes[1].plot(t, [r["lr"] for r in train], label=label)
        if evals:
            te = [e["minutes"] for e in evals]
            axes[2].plot(te, [e["dice"] for e in evals], "o-", label=label)
            if has_hc and "hc_mae_mm" in evals[0]:
                axes[3].plot(te, [e["hc_mae_mm"] for e in evals], "o-", label=label)
    axes[0].set(title="training loss (CE + Dice + aux)", xlabel="training minutes", yscale="log")
    axes[1].set(title="learning rate", xlabel="training minutes")
    axes[2].set(title="held-out Dice (EMA weights)", xlabel="training minutes")
    if has_hc:
        axes[3].set(title="held-out HC error (mm, mean abs)", xlabel="training minutes", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--labels", nargs="*")
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error("give one label per run")
    print(plot(args.runs, labels, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
