"""Label-efficiency evidence: fine-tune from scratch vs from the pretrained encoder at several label fractions.

Every run uses the same patient-level held-out split (split seed 0), the same budget (``--steps`` optimiser steps
of ``--batch-size`` frames, whatever the label fraction) and the same recipe; only ``--init``, the label fraction
and the seed change. A seed ``s`` (``--seeds``) sets both the model seed and the labelled subset of training
patients (``label_seed``), and scratch and pretrained runs with the same seed see the same labelled patients, so
their difference is paired. Results go to ``OUT/results.jsonl`` (one line per run; finished runs are skipped when
the command is run again), and ``--report`` turns them into ``OUT/label_efficiency.md`` and ``.png``:
mean +- standard deviation over seeds, and the paired difference.

    python benchmarks/label_efficiency.py --init none --out runs/labeleff --seeds 0,1,2
    python benchmarks/label_efficiency.py --init runs/pretrain_tiny/encoder.safetensors --out runs/labeleff --seeds 0,1,2
    python benchmarks/label_efficiency.py --report --out runs/labeleff
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EXPERIMENTS = {
    "busbra-seg": ("seg", f"busbra:{SHARED / 'busbra'}", "dice"),
    "busbra-cls": ("cls", f"busbra:{SHARED / 'busbra'}", "auc"),
    "hc18-seg": ("seg", f"hc18:{SHARED / 'hc18'}", "dice"),
}


def run(args) -> None:
    from usfm_edge.train.finetune import fit_finetune, load_finetune_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_name = "scratch" if args.init == "none" else "pretrained"
    done = {_key(r) for r in _rows(out)}
    for seed in (int(x) for x in args.seeds.split(",")):
        for exp in args.experiments.split(","):
            task, data, metric = EXPERIMENTS[exp]
            for frac in (float(f) for f in args.fractions.split(",")):
                if (exp, init_name, frac, seed) in done:
                    continue
                run_dir = out / f"{exp}-{init_name}-{int(frac * 100)}-s{seed}"
                # same optimiser-step budget for every run: epochs sized so that epochs * steps/epoch >= steps
                cfg = load_finetune_config(None, {
                    "task": task, "data": [data], "init": args.init, "model": args.model, "img_size": args.img_size,
                    "label_fraction": frac, "split_seed": 0, "label_seed": seed, "seed": seed,
                    "batch_size": args.batch_size, "epochs": 1000, "max_steps": args.steps,
                    "warmup_epochs": args.warmup_epochs, "eval_every": 1000, "eval_limit": args.eval_limit,
                    "lr": args.lr, "layer_decay": args.layer_decay, "workers": 0, "log_every": 10})
                t0 = time.time()
                res = fit_finetune(cfg, run_dir, progress=False)
                rec = {"experiment": exp, "task": task, "init": init_name, "init_path": args.init,
                       "label_fraction": frac, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
                       "img_size": args.img_size, "model": args.model, "lr": args.lr, "layer_decay": args.layer_decay,
                       "metric": metric, "value": res.metrics.get(metric), "metrics": res.metrics,
                       "minutes": round((time.time() - t0) / 60, 2)}
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps({k: rec[k] for k in ("experiment", "init", "label_fraction", "seed", "metric", "value",
                                                      "minutes")}), flush=True)


def _rows(out: Path) -> list[dict]:
    f = out / "results.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def _key(r: dict) -> tuple:
    return r["experiment"], r["init"], r["label_fraction"], r.get("seed", 0)


def _mean_sd(values: list[float]) -> str:
    import numpy as np

    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} +- {np.std(values, ddof=1):.3f}"


def report(args) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    rows = _rows(out)
    if not rows:
        raise SystemExit(f"no results in {out / 'results.jsonl'}")
    exps = [e for e in EXPERIMENTS if any(r["experiment"] == e for r in rows)]
    lines = ["| experiment | metric | labels | seeds | scratch | pretrained | paired difference | pretrained better |",
             "|---|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(exps), figsize=(4.2 * len(exps), 3.6), dpi=120, squeeze=False)
    for ax, exp in zip(axes[0], exps):
        metric = EXPERIMENTS[exp][2]
        sel = [r for r in rows if r["experiment"] == exp]
        fracs = sorted({r["label_fraction"] for r in sel})
        for k, (init, style) in enumerate((("scratch", "o--"), ("pretrained", "s-"))):
            xs, ms, sds = [], [], []
            for fr in fracs:
                v = [r["value"] for r in sel if r["init"] == init and r["label_fraction"] == fr]
                if v:
                    xs.append(100 * fr * (0.97 if k == 0 else 1.03))
                    ms.append(float(np.mean(v)))
                    sds.append(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ms, yerr=sds, fmt=style, capsize=3, label=init)
        for fr in fracs:
            by = {(r["init"], r.get("seed", 0)): r for r in sel if r["label_fraction"] == fr}
            seeds = sorted({s for _, s in by})
            s_vals = [by[("scratch", s)]["value"] for s in seeds if ("scratch", s) in by]
            p_vals = [by[("pretrained", s)]["value"] for s in seeds if ("pretrained", s) in by]
            pairs = [(by[("scratch", s)], by[("pretrained", s)]) for s in seeds
                     if ("scratch", s) in by and ("pretrained", s) in by]
            diffs = [p["value"] - s["value"] for s, p in pairs]
            hc = ""
            if exp.startswith("hc18"):
                hs = [by[("scratch", s)]["metrics"].get("hc_mae_mm") for s in seeds if ("scratch", s) in by]
                hp = [by[("pretrained", s)]["metrics"].get("hc_mae_mm") for s in seeds if ("pretrained", s) in by]
                if all(x is not None for x in hs + hp) and hs and hp:
                    hc = f" (HC MAE {np.mean(hs):.1f} vs {np.mean(hp):.1f} mm)"
            better = f"{sum(d > 0 for d in diffs)} of {len(diffs)}" if diffs else "-"
            diff = _mean_sd(diffs) if diffs else "-"
            if diffs and not diff.startswith("-"):
                diff = "+" + diff
            lines.append(f"| {exp} | {metric} | {int(fr * 100)}% | {len(seeds)} | {_mean_sd(s_vals)} | "
                         f"{_mean_sd(p_vals)} | {diff}{hc} | {better} |")
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in fracs])
        ax.set_xticklabels([f"{100 * f:g}%" for f in fracs])
        ax.minorticks_off()
        if len(fracs) == 1:
            ax.set_xlim(100 * fracs[0] * 0.9, 100 * fracs[0] * 1.1)
        ax.set_xlabel("labelled training patients")
        ax.set_ylabel(metric + " (mean +- sd over seeds)")
        ax.set_title(exp, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "label_efficiency.png")
    r0 = rows[-1]
    from usfm_edge.bench.sysinfo import machine_line

    header = (f"Machine: {machine_line()}.\n\nTiny preset ({r0['model']}) at {r0['img_size']} px, {r0['steps']} optimiser steps of {r0['batch_size']} "
              f"frames per run (lr {r0.get('lr', '?')} per 256, layer decay {r0.get('layer_decay', 0.65)}), the same "
              "patient-level split (seed 0, 20% of patients held out) for every run; a seed sets the model seed and "
              "the labelled patients, shared by the scratch and pretrained runs of that seed.\n\n")
    (out / "label_efficiency.md").write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", default="none")
    p.add_argument("--out", default="runs/labeleff")
    p.add_argument("--experiments", default="busbra-seg,busbra-cls,hc18-seg")
    p.add_argument("--fractions", default="0.1,0.25,1.0")
    p.add_argument("--model", default="usfm_vit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="base lr per 256 images")
    p.add_argument("--layer-decay", type=float, default=0.65)
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (model seed and labelled-subset seed)")
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
