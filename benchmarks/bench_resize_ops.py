"""The any-size in-graph pre- and post-processing of a seg bundle, each two ways.

Preprocessing: the runtimes' dynamic-shape ``Resize``/``Interpolate`` op against ``models.raw_frame.resize_any``,
two MatMuls whose resampling matrices are built in the graph from the frame's traced size (int64 tap indices;
what any-size bundles export). Each graph takes a uint8 frame (B, H, W) of any size and returns the bicubic
resize to 224x224 as float32 (``F.interpolate(align_corners=False)``).

Post-processing: two 224x224 logit maps resized bilinearly to the frame's size, softmax over the classes and
argmax, with ONNX ``Softmax`` on axis 1 against ``models.raw_frame.channel_softmax`` (written out; what seg
bundles export).

Timed in ONNX Runtime and in OpenVINO (f32, batch 1), 2 threads, on random uint8 frames of a BUS-BRA-like and an
HC18-like size; also prints the largest difference from torch.

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

from usfm_edge.models.raw_frame import channel_softmax, resize_any  # what the bundles export

S = 224


class MatMulAny(torch.nn.Module):
    def forward(self, f):
        return resize_any(f.to(torch.float32).unsqueeze(1), (S, S), "bicubic")


class ResizeOp(torch.nn.Module):
    def forward(self, f):
        return F.interpolate(f.to(torch.float32).unsqueeze(1), size=(S, S), mode="bicubic", align_corners=False)


class Post(torch.nn.Module):
    def __init__(self, written_out: bool):
        super().__init__()
        self.written_out = written_out

    def forward(self, logits, f):
        y = F.interpolate(logits, size=(f.shape[-2], f.shape[-1]), mode="bilinear", align_corners=False)
        probs = channel_softmax(y) if self.written_out else torch.softmax(y, 1)
        return probs, torch.argmax(y, 1).to(torch.uint8)


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

    print(f"\nseg post-processing: 2 logit maps {S}x{S} -> bilinear to the frame, softmax, argmax; "
          f"{args.threads} threads, median of 50 calls\n")
    print("| frame | softmax | ONNX Runtime ms | OpenVINO ms (f32) | max abs diff of the probabilities vs torch |")
    print("|---|---|---|---|---|")
    posts = {}
    for name, written in (("ONNX Softmax, axis 1", False), ("written out (channel_softmax)", True)):
        p = out / f"post_{'written' if written else 'softmax'}.onnx"
        torch.onnx.export(Post(written), (torch.zeros(1, 2, S, S), example), str(p), input_names=["logits", "frame"],
                          output_names=["probs", "mask"],
                          dynamic_axes={"logits": {0: "b"}, "frame": {0: "b", 1: "h", 2: "w"}},
                          opset_version=17, dynamo=False)
        posts[name] = p
    for hw in ((352, 276), (540, 800)):
        f = rng.integers(0, 256, (1, *hw), dtype=np.uint8)
        logits = (rng.standard_normal((1, 2, S, S)) * 4).astype(np.float32)
        ref = torch.softmax(F.interpolate(torch.from_numpy(logits), size=hw, mode="bilinear", align_corners=False),
                            1).numpy()
        for name, p in posts.items():
            sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
            feeds = {i.name: v for i, v in zip(sess.get_inputs(), (logits, f))}
            req = core.compile_model(str(p), "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                     "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
            t_ort = _median_ms(lambda s=sess, x=feeds: s.run(None, x))
            t_ov = _median_ms(lambda r=req, a=logits, b=f: r.infer([a, b]))
            err = float(np.abs(sess.run(None, feeds)[0] - ref).max())
            print(f"| {hw[0]}x{hw[1]} | {name} | {t_ort:.2f} | {t_ov:.2f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
