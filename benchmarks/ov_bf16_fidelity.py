"""OpenVINO INT8 features bundle: its float ops in bf16 (the CPU plugin's default on AVX512-BF16 CPUs) against
``INFERENCE_PRECISION_HINT=f32``, in fidelity and in time.

For the random-weight features model of ``bench_int8.py`` (same preset, seed and 16 held-out real frames):

- centred cosine vs PyTorch fp32 per frame, bundle compiled with the default precision and with the f32 hint;
- the same with frames resized to the model size beforehand (bicubic, rounded to uint8), so the graph's own
  resize does nothing: whether a drop comes from the in-graph preprocessing or from the model body;
- batch-1 latency of both compiles, alternating, ``--rounds`` x 30 calls each, 2 threads.

Usage::

    python benchmarks/ov_bf16_fidelity.py --preset tiny --bundle /tmp/usfm_bench_int8_feat/tiny/openvino-int8.usfm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_int8 as B  # noqa: E402

HINTS = {"default (bf16)": {}, "f32 hint": {"INFERENCE_PRECISION_HINT": "f32"}}


def _model_size(frames: list[np.ndarray], s: int) -> list[np.ndarray]:
    out = []
    for f in frames:
        y = F.interpolate(torch.from_numpy(f).float()[None, None], size=(s, s), mode="bicubic", align_corners=False)
        out.append(np.clip(np.round(y[0, 0].numpy()), 0, 255).astype(np.uint8))
    return out


def main(argv: list[str] | None = None) -> int:
    import openvino as ov

    from usfm_edge.data.readers import read_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(B.PRESETS))
    ap.add_argument("--bundle", type=Path, required=True, help="the OpenVINO INT8 features bundle of that preset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    specs, _ = B.data_specs()
    model = B.build_model(args.preset, None, "features")
    s = int(model.img_size)
    frames = [read_image(r.image) for r in B.held_out(specs, 16)]
    torch_fn, _ = B.run_variant_fn("PyTorch eager fp32", None, model, args.threads)
    core = ov.Core()
    print(f"{args.bundle} ({args.preset}), 16 held-out frames, centred cosine vs PyTorch fp32\n")
    print("| input | compile | mean | min | per frame |")
    print("|---|---|---|---|---|")
    for label, fs in (("raw frames", frames), (f"frames resized to {s}x{s} first", _model_size(frames, s))):
        ref = [torch_fn(f[None])["features"][0] for f in fs]
        for name, hint in HINTS.items():
            c = core.compile_model(str(args.bundle / "model.xml"), "CPU", hint)
            _, cc = B.centred(ref, [c([f[None]])[0][0] for f in fs], s)
            print(f"| {label} | {name} | {np.mean(cc):.4f} | {np.min(cc):.4f} | {' '.join(f'{x:.3f}' for x in cc)} |")
    times: dict[str, list[float]] = {name: [] for name in HINTS}
    for _ in range(args.rounds):
        for name, hint in HINTS.items():
            m = core.read_model(str(args.bundle / "model.xml"))
            m.reshape({0: ov.PartialShape([1, -1, -1])})
            req = core.compile_model(m, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": args.threads,
                                                **hint}).create_infer_request()
            x = frames[0][None]
            for _ in range(5):
                req.infer([x])
            ts = []
            for _ in range(30):
                t0 = time.perf_counter()
                req.infer([x])
                ts.append(time.perf_counter() - t0)
            times[name].append(float(np.median(ts)) * 1e3)
    print(f"\nbatch 1, {args.threads} threads, median of 30 calls per round, {args.rounds} alternating rounds\n")
    print("| compile | ms per round |")
    print("|---|---|")
    for name, v in times.items():
        print(f"| {name} | {' / '.join(f'{t:.2f}' for t in v)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
