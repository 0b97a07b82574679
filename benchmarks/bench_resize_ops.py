"""The any-size in-graph pre- and post-processing of a seg bundle, each several ways.

Preprocessing: a uint8 frame (B, H, W) of any size to the bicubic resize at 224x224, float32
(``F.interpolate(align_corners=False)``), three ways: ``models.resample.resize_taps`` (a Gather of the source rows
or columns times the weight, per tap, per axis; what any-size OpenVINO bundles export), the same resampling as two
dense MatMuls whose matrices the graph builds from the traced size (``resize_dense``; what any-size ONNX Runtime
bundles export), and the runtimes' dynamic-shape ``Resize`` / ``Interpolate`` op.

Post-processing: two 224x224 logit maps resized bilinearly to the frame's size, softmax over the classes and
argmax: ONNX ``Softmax`` on axis 1; ``models.raw_frame.channel_softmax`` (written out; what seg bundles of more
than two classes export); and ``models.raw_frame.binary_seg_post`` on the resized logit difference (sigmoid and
compare; what two-class seg bundles export), resized by the ``Resize`` op (ONNX Runtime bundles) or by
``resize_taps`` (OpenVINO bundles).

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

from usfm_edge.models.raw_frame import binary_seg_post, channel_softmax  # what the bundles export
from usfm_edge.models.resample import resize_dense, resize_taps

S = 224


class MatMulAny(torch.nn.Module):
    def forward(self, f):
        return resize_dense(f.to(torch.float32).unsqueeze(1), (S, S), "bicubic")


class TapsAny(torch.nn.Module):
    def forward(self, f):
        return resize_taps(f.to(torch.float32).unsqueeze(1), (S, S), "bicubic")


class ResizeOp(torch.nn.Module):
    def forward(self, f):
        return F.interpolate(f.to(torch.float32).unsqueeze(1), size=(S, S), mode="bicubic", align_corners=False)


class Post(torch.nn.Module):
    """Seg post-processing one way: ``softmax`` (ONNX ``Softmax``), ``written`` (``channel_softmax``), ``binary``
    (``binary_seg_post``, resized by ``Resize``) or ``binary-taps`` (resized by ``resize_taps``)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, logits, f):
        hw = (f.shape[-2], f.shape[-1])
        if self.mode.startswith("binary"):
            d = logits[:, 1:2] - logits[:, 0:1]
            d = resize_taps(d, hw, "bilinear") if self.mode == "binary-taps" else \
                F.interpolate(d, size=hw, mode="bilinear", align_corners=False)
            return binary_seg_post(d)
        y = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
        probs = channel_softmax(y) if self.mode == "written" else torch.softmax(y, 1)
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


def _export(net, example: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> Path:
    torch.onnx.export(net, example, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    return path


def _time_graph(path: Path, inputs: tuple, threads: int, batch_one: bool) -> tuple[float, float, np.ndarray]:
    """(ONNX Runtime ms, OpenVINO f32 ms, ONNX Runtime's first output) of one graph on ``inputs``;
    ``batch_one``: OpenVINO compiles the graph with its batch fixed at 1, as the runtime does for single frames."""
    import onnxruntime as ort
    import openvino as ov

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: v for i, v in zip(sess.get_inputs(), inputs)}
    core = ov.Core()
    model = core.read_model(str(path))
    if batch_one:  # as the runtime compiles single frames: every input's batch fixed at 1
        model.reshape({i: ov.PartialShape([1, *[-1] * (len(v.shape) - 1)]) for i, v in enumerate(inputs)})
    req = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                            "INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    t_ort = _median_ms(lambda: sess.run(None, feeds))
    t_ov = _median_ms(lambda: req.infer(list(inputs)))
    return t_ort, t_ov, sess.run(None, feeds)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="where the ONNX graphs go (default: a temp folder)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="usfm_resize_"))
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 81, 97, dtype=torch.uint8)
    frame_axes = {"frame": {0: "b", 1: "h", 2: "w"}}
    pre = {name: _export(net, (example,), out / f"{stem}.onnx", ["frame"], ["y"], frame_axes)
           for name, stem, net in (("dense MatMuls, matrices built in the graph (resize_dense)", "matmul", MatMulAny()),
                                   ("taps: Gather x weight per tap (resize_taps)", "taps", TapsAny()),
                                   ("Resize / Interpolate op", "resize", ResizeOp()))}
    print(f"bicubic resize of one uint8 frame to {S}x{S}, {args.threads} threads, median of 50 calls\n")
    print("| frame | graph | ONNX Runtime ms | OpenVINO ms (f32) | max abs diff vs torch (grey levels) |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for hw in ((352, 276), (540, 800)):
        f = rng.integers(0, 256, (1, *hw), dtype=np.uint8)
        ref = F.interpolate(torch.from_numpy(f).float().unsqueeze(1), size=(S, S), mode="bicubic",
                            align_corners=False).numpy()
        for name, p in pre.items():
            t_ort, t_ov, y = _time_graph(p, (f,), args.threads, batch_one=True)
            print(f"| {hw[0]}x{hw[1]} | {name} | {t_ort:.2f} | {t_ov:.2f} | {float(np.abs(y - ref).max()):.1e} |")

    print(f"\nseg post-processing: 2 logit maps {S}x{S} -> bilinear to the frame, softmax, argmax (OpenVINO: the "
          "batch fixed at 1); "
          f"{args.threads} threads, median of 50 calls\n")
    print("| frame | post-processing | ONNX Runtime ms | OpenVINO ms (f32) | max abs diff of the probabilities vs torch |")
    print("|---|---|---|---|---|")
    post = {name: _export(Post(mode), (torch.zeros(1, 2, S, S), example), out / f"post_{mode}.onnx",
                          ["logits", "frame"], ["probs", "mask"], {"logits": {0: "b"}, **frame_axes})
            for name, mode in (("ONNX Softmax, axis 1", "softmax"),
                               ("written out (channel_softmax)", "written"),
                               ("2 classes: logit difference, sigmoid (binary_seg_post)", "binary"),
                               ("2 classes, resized by resize_taps", "binary-taps"))}
    for hw in ((352, 276), (540, 800)):
        f = rng.integers(0, 256, (1, *hw), dtype=np.uint8)
        logits = (rng.standard_normal((1, 2, S, S)) * 4).astype(np.float32)
        ref = torch.softmax(F.interpolate(torch.from_numpy(logits), size=hw, mode="bilinear", align_corners=False),
                            1).numpy()
        for name, p in post.items():
            t_ort, t_ov, probs = _time_graph(p, (logits, f), args.threads, batch_one=True)
            print(f"| {hw[0]}x{hw[1]} | {name} | {t_ort:.2f} | {t_ov:.2f} | {float(np.abs(probs - ref).max()):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
