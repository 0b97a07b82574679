"""The Markdown report of ``benchmarks/bench_int8.py``: one table per preset (bundles, PyTorch and the by-hand peers,
batch-1 latency and frames/s at larger batches), OpenVINO's int8 per-op counters and the preprocessing share."""

from __future__ import annotations

from usfm_edge.bench.peer import peer_markdown
from usfm_edge.bench.sysinfo import load_note

__all__ = ["markdown"]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# INT8 benchmark (usfm-edge)", "", f"Command: `{result['command']}`", "",
             f"Machine: {m.get('cpu')} x{m['cpus']} vCPU; ISA: {', '.join(m.get('isa', []))}; class (detected): "
             f"{m.get('cpu_class', '?')}; "
             f"load average at start {m['load_avg_start']}, end {m.get('load_avg_end')} "
             f"({load_note([m['load_avg_start'], m.get('load_avg_end')], m['cpus'])}).",
             f"Versions: torch {m['torch']}, onnxruntime {m['onnxruntime']}, openvino {m['openvino']}, nncf "
             f"{m['nncf']}, onnx {m['onnx']}. Threads {result['threads']}, batch "
             f"{', '.join(str(b) for b in result.get('batches', [1]))}, {result['runs']} runs per variant ("
             + (f"in {result['rounds']} fresh processes of its own per variant, rotating order"
                if not result.get("one_process", True) else "all in one process, interleaved call by call")
             + f"). Calibration/held-out data: {result['data']}.", ""]
    big = [b for b in result.get("batches", [1]) if b > 1]
    fps_head = "".join(f"frames/s b{b} | " for b in big)
    for p in result["presets"]:
        lines += [f"## {p['model']} {p.get('task', 'seg')} (weights: {p['weights']}), frame {p['timing_frame_hw'][0]}x"
                  f"{p['timing_frame_hw'][1]}, fidelity on {p['eval_frames']} held-out real frames", "",
                  "| variant | median ms (b1) | p90 ms | speed-up vs PyTorch fp32 | " + fps_head
                  + "cos raw | cos centred mean / min | mask agreement | model MB | INT8 gate |",
                  "|---|---|---|---|" + "---|" * len(big) + "---|---|---|---|---|"]
        for r in p["rows"]:
            g = r.get("gate")
            gate = "" if not g else (f"{'pass' if g['passed'] else 'FAIL'}: {g['metric']} {g['fp32'].get(g['metric'])}"
                                     f" -> {g['int8'].get(g['metric'])}" if g.get("metric") else
                                     ("pass" if g["passed"] else "FAIL"))
            fps = "".join(f"{(r.get('fps') or {}).get(b, (r.get('fps') or {}).get(str(b), '-'))} | " for b in big)
            lines.append(f"| {r['variant']} | {r['median_ms']} | {r['p90_ms']} | {r['speedup_vs_torch']}x | {fps}"
                         f"{r['cos_raw']} | {r['cos_centred_mean']} / {r['cos_centred_min']} | "
                         f"{r['mask_pixel_agreement']} | {r['size_mb']} | {gate} |")
        if p["dice_vs_ground_truth"]:
            lines += ["", "Dice vs ground truth: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                               p["dice_vs_ground_truth"].items())]
        lines += ["", "OpenVINO int8 per-layer counters (PERF_COUNT, mean ms per inference, top op types):", "",
                  "| op | kernel | ms | share |", "|---|---|---|---|"]
        lines += [f"| {c['op']} | {c['kernel']} | {c['ms']} | {c['share']:.1%} |" for c in
                  p["openvino_int8_perf_counters"]]
        st = p.get("openvino_int8_stage_shares")
        if st:
            lines += ["", "Preprocessing share (same counters by stage: `/pre/*` in-graph resize + normalisation, "
                      "`/model/*`, post-processing): " + ", ".join(f"{k} {v['ms']} ms ({v['share']:.1%})"
                                                                     for k, v in st.items())]
        if p.get("fused_attention"):
            lines += ["", "Fused attention nodes (bench.opcount: OpenVINO CPU runtime graph / IR SDPA ops; ORT optimised "
                      "graph Attention ops): " + ", ".join(f"{k} {v['fused_attention']}" + (
                          f" (IR SDPA {v['ir_sdpa']})" if "ir_sdpa" in v else "") for k, v in p["fused_attention"].items())]
        lines += peer_markdown(p.get("peer_rows", []))
        lines.append("")
    lines += [f"Notes: OpenVINO fp16 = fp16-compressed weights, computed as this CPU allows ({m.get('cpu_class', '?')}). "
              "With random weights Dice is meaningless and centred cosine is harsh (perf-baseline.md §2); "
              "use `--checkpoint` for accuracy. Peer rows: cosine of the bare model's output (at model size) against "
              "PyTorch fp32 on the same preprocessed held-out frames.", ""]
    return "\n".join(lines)
