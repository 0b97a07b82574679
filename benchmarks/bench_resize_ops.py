"""The any-size in-graph resize, two ways: the runtimes' dynamic-shape ``Resize``/``Interpolate`` against two MatMuls
whose resampling matrices are built in the graph from the frame's traced size (a prototype for any-size bundles;
static-frame bundles already use constant matrices, ``models.raw_frame.MatMulResize``).

Each graph takes a uint8 frame (B, H, W) of any size and returns the bicubic resize to 224x224 as float32
(``F.interpolate(align_corners=False)``). Timed in ONNX Runtime and in OpenVINO (f32, batch 1), 2 threads, on
random uint8 frames of a BUS-BRA-like and an HC18-like size; also prints the largest difference from torch.

Usage::

    python benchmarks/bench_resize_ops.py [--threads 2] [--out DIR]

Not in the bundles yet: OpenVINO INT8 bundles compute float ops in bf16 on CPUs with AVX512-BF16, and index
arithmetic on frame coordinates above 256 is not exact in bf16 (an exported bundle's parity gate failed with mask
Dice 0.58); the indices have to be computed in int64 first.
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

A = -0.75
S = 224


def _axis(n_in, n_out: int) -> torch.Tensor:
    """(n_out, n_in) bicubic resampling matrix from a (traced) input size, taps clamped to the border."""
    n_in_f = torch.as_tensor(n_in).to(torch.float32)
    src = (torch.arange(n_out).to(torch.float32) + 0.5) * (n_in_f / n_out) - 0.5
    base = torch.floor(src)
    t = src - base
    j = torch.arange(n_in).to(torch.float32)

    def near(x):
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    mat = None
    for k, w in zip((-1.0, 0.0, 1.0, 2.0), (far(1 + t), near(t), near(1 - t), far(2 - t))):
        idx = torch.minimum(torch.clamp(base + k, min=0.0), n_in_f - 1.0)
        term = (j[None, :] == idx[:, None]).to(torch.float32) * w[:, None]
        mat = term if mat is None else mat + term
    return mat


class MatMulAny(torch.nn.Module):
    def forward(self, f):
        x = f.to(torch.float32).unsqueeze(1)
        return torch.matmul(torch.matmul(_axis(x.shape[-2], S), x), _axis(x.shape[-1], S).transpose(0, 1))


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
