"""Render benchmark results: a Markdown table, JSON, and a latency-vs-accuracy PNG."""

from __future__ import annotations

import json
from pathlib import Path

from usfm_edge.core.io import atomic_write_json, atomic_write_text


def markdown(result: dict, command: str | None = None) -> str:
    """The results as a Markdown table (one row per variant and batch) with the machine and settings."""
    m, s = result["machine"], result["settings"]
    lines = []
    if command:
        lines.append(f"Command: `{command}`\n")
    if s.get("isolate", False):
        how = (f"each variant in {s['rounds']} fresh process(es) of its own, variants in a rotating order, "
               f"{s['warmup']} warm-up calls per process")
    else:
        how = (f"all variants in one process, {s['warmup']} warm-up calls, then blocks of "
               f"{s.get('block') or 1} timed calls after an untimed one, round-robin")
    lines.append(f"Machine: {m['cpu']} ({m['cores']} cores, {', '.join(m['isa']) or 'no AVX'}), "
                 f"{', '.join(m['gpus']) or 'no GPU'}; threads {s['threads']}, {s['runs']} timed runs ({how}); "
                 f"device {s['device']}.\n")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + "\n")
    lines.append("| variant | backend | precision | batch | p50 ms | p90 ms | p99 ms | frames/s | speed-up vs PyTorch fp32 "
                 "| size MB | peak RSS MB | RSS added MB | task metric |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    unstable = [r for r in result["rows"] if r.get("unstable")]
    for r in result["rows"]:
        ratio = f"{r['ratio_vs_torch']:.2f}x" if r["ratio_vs_torch"] else "-"
        metric = f"{r['metric']} {r['metric_value']:.4f}" if r.get("metric_value") is not None else "-"
        size = f"{r['size_mb']:.1f}" if r["size_mb"] is not None else "-"
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
        name = f"{r['name']} (unstable)" if r.get("unstable") else r["name"]
        lines.append(f"| {name} | {r['backend']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.1f} | "
                     f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['fps']:.1f} | {ratio} | {size} | "
                     f"{peak} | {r['rss_mb']:.0f} | {metric} |")
    lines.append("\npeak RSS: the variant alone in a fresh process (interpreter and libraries included, after its "
                 "first batch size on a real frame); RSS added: growth of the benchmark's main process when the "
                 "variant was opened there for the task metric (a lower bound: memory freed by earlier variants "
                 "is reused).")
    if unstable:
        lines.append("\n**Unstable rows** (their latencies and speed-ups are not reliable; re-run on an idle machine):")
        for r in unstable:
            lines.append(f"- {r['name']}, batch {r['batch']}: {'; '.join(r['unstable'])}")
    if result.get("paced"):
        fps = result["paced"][0]["fps"]
        lines.append(f"\nAt {fps:g} frames/s (batch 1, one call per {1000 / fps:.1f} ms frame slot, the cores idle "
                     "between calls as behind a scanner):\n")
        lines.append("| variant | p50 ms | p90 ms | p99 ms | p50 vs back to back | calls over the frame period |")
        lines.append("|---|---|---|---|---|---|")
        for r in result["paced"]:
            vs = f"{r['p50_vs_back_to_back']:.2f}x" if r.get("p50_vs_back_to_back") else "-"
            lines.append(f"| {r['name']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {vs} | "
                         f"{r['over_budget']} of {r['runs']} |")
    peers = [r for r in result["rows"] if (r.get("extra") or {}).get("vs_bundle") is not None]
    if peers:
        lines.append("\nBy-hand peers (bare model on normalised input, no pre/post-processing) against our INT8 bundle "
                     "of the same backend (raw frame in): peer p50 / bundle p50 (> 1: our bundle is faster).\n")
        lines.append("| peer | batch | our bundle | peer time / bundle time | cos centred vs fp32 |")
        lines.append("|---|---|---|---|---|")
        for r in peers:
            e = r["extra"]
            lines.append(f"| {r['name']} | {r['batch']} | {e['bundle']} | {e['vs_bundle']:.2f} | "
                         f"{e.get('cos_centred_mean', float('nan')):.4f} |")
    for sk in result.get("skipped", []):
        lines.append(f"\nSkipped {sk['bundle']}: {sk['reason']}")
    return "\n".join(lines) + "\n"


_MIN_HALF_SPAN = {"dice": 0.025, "auc": 0.025, "accuracy": 0.025, "psnr": 1.0}


def metric_axis(values: list[float], metric: str) -> tuple[float, float]:
    """The plot's metric range: the values' spread widened 1.6x, and at least ``_MIN_HALF_SPAN`` each side."""
    mid, half = (max(values) + min(values)) / 2, (max(values) - min(values)) / 2
    half = max(half * 1.6, _MIN_HALF_SPAN.get(metric, 0.0), 1e-6)
    return mid - half, mid + half


def plot(result: dict, path: str | Path, title: str = "usfm-edge: latency vs accuracy") -> Path | None:
    """p50 latency (batch 1, p10-p90 error bars) against the task metric, one labelled point per variant.

    The metric axis spans at least +-2.5 points (Dice/AUC) or +-1 dB (PSNR) around the values, so a
    difference of a thousandth looks like one; each point is labelled with the bundle name, the runtime that ran
    it and the precision (a Jetson bundle timed in ONNX Runtime says so). Unstable rows are drawn hollow.
    Returns None when no row has a task metric.
    """
    batch = min(x["batch"] for x in result["rows"]) if result["rows"] else 1
    rows = [r for r in result["rows"] if r["batch"] == batch and r.get("metric_value") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["p50_ms"])
    metric = rows[0]["metric"]
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    markers = "osD^vP*Xh<>"
    for i, r in enumerate(rows):
        lo, hi = r.get("p10_ms") or r["p50_ms"], r["p90_ms"]
        color = f"C{i % 10}"
        label = f"{r['name']} | {r['backend']} {r['precision']} | {r['metric_value']:.4f}" + (
            " | unstable" if r.get("unstable") else "")
        ax.errorbar(r["p50_ms"], r["metric_value"], xerr=[[r["p50_ms"] - lo], [hi - r["p50_ms"]]],
                    fmt=markers[i % len(markers)], color=color, mfc="none" if r.get("unstable") else color,
                    capsize=3, ms=7, label=label)
    ax.set_ylim(*metric_axis([r["metric_value"] for r in rows], metric))
    ax.set_xlim(0, max(r["p90_ms"] for r in rows) * 1.08)
    # labels in a legend below the axes: points close together never hide each other's names
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7, frameon=False,
              title="bundle | runtime precision | " + metric + " (hollow: unstable timing)", title_fontsize=7)
    ax.set_xlabel(f"latency per call, ms (batch {batch}, raw frame in, result out): p50, bars p10-p90")
    ax.set_ylabel(f"{metric} on held-out frames")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_all(result: dict, json_path=None, md_path=None, png_path=None, command: str | None = None) -> list[Path]:
    out = []
    if json_path:
        out.append(atomic_write_json(json_path, {**result, "command": command}))
    if md_path:
        out.append(atomic_write_text(md_path, markdown(result, command)))
    if png_path:
        p = plot(result, png_path)
        if p:
            out.append(p)
    return out


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
