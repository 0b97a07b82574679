"""Label-efficiency evidence: fine-tune from scratch vs from the pretrained encoder at several label fractions.

Every run uses the same patient-level split (``--split-seed``), the same budget (``--steps`` optimiser steps of
``--batch-size`` frames, whatever the label fraction), the same schedule and the same seed; only ``--init``
and ``--label-fraction`` change. Results go to ``OUT/results.jsonl`` (one line per run), and ``--report``
turns them into ``OUT/label_efficiency.md`` and ``.png``.

    python benchmarks/label_efficiency.py --init none --out runs/labeleff
    python benchmarks/label_efficiency.py --init runs/pretrain_tiny/encoder.safetensors --out runs/labeleff
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
    done = set()
    if (out / "results.jsonl").is_file():
        for line in (out / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            done.add((r["experiment"], r["init"], r["label_fraction"]))
    for exp in args.experiments.split(","):
        task, data, metric = EXPERIMENTS[exp]
        for frac in (float(f) for f in args.fractions.split(",")):
            if (exp, init_name, frac) in done:
                continue
            run_dir = out / f"{exp}-{init_name}-{int(frac * 100)}"
            # same optimiser-step budget for every run: epochs sized so that epochs * steps/epoch >= steps
            cfg = load_finetune_config(None, {
                "task": task, "data": [data], "init": args.init, "model": args.model, "img_size": args.img_size,
                "label_fraction": frac, "split_seed": 0, "seed": args.seed, "batch_size": args.batch_size,
                "epochs": 1000, "max_steps": args.steps, "warmup_epochs": 0.0, "eval_every": 1000,
                "eval_limit": args.eval_limit, "lr": args.lr, "workers": 0, "log_every": 10})
            t0 = time.time()
            res = fit_finetune(cfg, run_dir, progress=False)
            rec = {"experiment": exp, "task": task, "init": init_name, "init_path": args.init, "label_fraction": frac,
                   "steps": args.steps, "batch_size": args.batch_size, "img_size": args.img_size, "model": args.model,
                   "metric": metric, "value": res.metrics.get(metric), "metrics": res.metrics,
                   "minutes": round((time.time() - t0) / 60, 2)}
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps({k: rec[k] for k in ("experiment", "init", "label_fraction", "metric", "value", "minutes")}),
                  flush=True)


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    exps = [e for e in EXPERIMENTS if any(r["experiment"] == e for r in rows)]
    lines = ["| experiment | metric | label fraction | scratch | pretrained | difference |", "|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(exps), figsize=(4.2 * len(exps), 3.6), dpi=120, squeeze=False)
    for ax, exp in zip(axes[0], exps):
        metric = EXPERIMENTS[exp][2]
        for init, style in (("scratch", "o--"), ("pretrained", "s-")):
            pts = sorted((r["label_fraction"], r["value"]) for r in rows if r["experiment"] == exp and r["init"] == init)
            if pts:
                ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], style, label=init)
        fracs = sorted({r["label_fraction"] for r in rows if r["experiment"] == exp})
        for fr in fracs:
            vals = {r["init"]: r for r in rows if r["experiment"] == exp and r["label_fraction"] == fr}
            s, p = vals.get("scratch"), vals.get("pretrained")
            extra = ""
            if exp.startswith("hc18") and p and "hc_mae_mm" in p["metrics"] and s and "hc_mae_mm" in s["metrics"]:
                extra = f" (HC MAE {s['metrics']['hc_mae_mm']:.1f} vs {p['metrics']['hc_mae_mm']:.1f} mm)"
            diff = f"{p['value'] - s['value']:+.3f}" if s and p else "-"
            lines.append(f"| {exp} | {metric} | {int(fr * 100)}% | {s['value']:.3f} |" if s else f"| {exp} | {metric} | {int(fr * 100)}% | - |")
            lines[-1] += f" {p['value']:.3f} | {diff}{extra} |" if p else " - | - |"
        ax.set_xscale("log")
        ax.set_xticks([10, 25, 100])
        ax.set_xticklabels(["10%", "25%", "100%"])
        ax.set_xlabel("labelled training patients")
        ax.set_ylabel(metric)
        ax.set_title(exp, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "label_efficiency.png")
    r0 = rows[0]
    header = (f"Tiny preset ({r0['model']}) at {r0['img_size']} px, {r0['steps']} optimiser steps of {r0['batch_size']} "
              f"frames per run, same patient-level split (seed 0, 20% of patients held out) for every run.\n\n")
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
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true")
    args = p.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
