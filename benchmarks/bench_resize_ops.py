"""The any-size in-graph resize, two ways: the runtimes' dynamic-shape ``Resize``/``Interpolate`` op against
``models.raw_frame.resize_any``, two MatMuls whose resampling matrices
are built in the graph from the frame's traced size (int64 tap indices; what any-size bundles export).

Each graph takes a uint8 frame (B, H, W) of any size and returns the bicubic resize to 224x224 as float32
(``F.interpolate(align_corners=False)``). Timed in ONNX Runtime and in OpenVINO (f32, batch 1), 2 threads, on
random uint8 frames of a BUS-BRA-like and an HC18-like size; also prints the largest difference from torch.

Usage::

    python benchmarks/bench_resize_ops.py [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from usfm_edge.models.raw_frame import resize_any  # the bundles' own any-size resize

S = 224


class MatMulAny(torch.nn.Module):
    def forward(self, f):
        return resize_any(f.to(torch.float32).unsqueeze(1), (S, S), "bicubic")


class ResizeOp(torch.nn.Module):
    def forward(self, f):
        return F.interpolate(f.to(torch.float32).unsqueeze(1), size=(S, S), mode="bicubic", align_corners=False)


def _median_ms(fn, runs: int = 50) -> float:
    for _ in range(5):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="where the two ONNX graphs go (default: a temp folder)")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import openvino as ov

    out = args.out or Path(tempfile.mkdtemp(prefix="usfm_resize_"))
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 81, 97, dtype=torch.uint8)
    paths = {}
    for name, net in (("matmul, matrices built in the graph", MatMulAny()), ("Resize / Interpolate op", ResizeOp())):
        p = out / f"{'matmul' if name.startswith('matmul') else 'resize'}.onnx"
        torch.onnx.export(net, (example,), str(p), input_names=["frame"], output_names=["y"],
                          dynamic_axes={"frame": {0: "b", 1: "h", 2: "w"}}, opset_version=17, dynamo=False)
        paths[name] = p
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    core = ov.Core()
    print(f"bicubic resize of one uint8 frame to {S}x{S}, {args.threads} threads, median of 50 calls\n")
    print("| frame | graph | ONNX Runtime ms | OpenVINO ms (f32) | max abs diff vs torch (grey levels) |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for hw in ((352, 276), (540, 800)):
        f = rng.integers(0, 256, (1, *hw), dtype=np.uint8)
        ref = F.interpolate(torch.from_numpy(f).float().unsqueeze(1), size=(S, S), mode="bicubic",
                            align_corners=False).numpy()
        for name, p in paths.items():
            sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            model = core.read_model(str(p))
            model.reshape({0: ov.PartialShape([1, -1, -1])})
            req = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                    "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
            t_ort = _median_ms(lambda s=sess, x=f: s.run(None, {"frame": x}))
            t_ov = _median_ms(lambda r=req, x=f: r.infer({0: x}))
            err = float(np.abs(sess.run(None, {"frame": f})[0] - ref).max())
            print(f"| {hw[0]}x{hw[1]} | {name} | {t_ort:.2f} | {t_ov:.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
