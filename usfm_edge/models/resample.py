"""In-graph resampling of the raw-frame graphs (``models.raw_frame``): the frame to the model size and the model's
maps back to the frame, three ways, all the resampling of ``F.interpolate(mode, align_corners=False,
antialias=False)`` (bicubic a = -0.75 or bilinear, half-pixel centres, taps clamped to the border):

- ``MatMulResize``: a static frame size, two MatMuls by constant matrices (``core.preprocess.resize_matrix``).
- ``resize_taps``: any size, one axis at a time, a ``Gather`` of the source rows or columns times the tap weight,
  per tap, the taps built in the graph from the traced sizes (``axis_taps``).
- ``resize_dense``: the same taps as two dense MatMuls, the matrices built in the graph.

Which graph takes which is ``raw_frame.RawFrameModel``'s ``resample`` choice (benchmarks/RESULTS.md §4.5).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from usfm_edge.core.errors import ExportError

__all__ = ["MatMulResize", "axis_taps", "resize_taps", "resize_dense"]


class MatMulResize(nn.Module):
    """Resize the last two axes from a fixed ``(H, W)`` to ``out_hw`` with two MatMuls (traceable, static size).

    ``y = R_h @ x @ R_w^T`` with ``R = core.preprocess.resize_matrix`` (float32 buffers), computed as
    ``R_h @ x`` then ``(R_w @ y^T)^T`` so each constant is the first MatMul input, in the cheaper order.
    Exactly ``F.interpolate(mode, align_corners=False, antialias=False)`` up to float rounding.

    Args:
        in_hw: the input's ``(H, W)``.
        out_hw: the output's ``(H, W)``.
        mode: ``bicubic`` or ``bilinear``.
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], mode: str = "bicubic"):
        super().__init__()
        from usfm_edge.core.preprocess import resize_matrix

        (h, w), (oh, ow) = (int(v) for v in in_hw), (int(v) for v in out_hw)
        self.in_hw, self.out_hw = (h, w), (oh, ow)
        self.register_buffer("rh", torch.from_numpy(resize_matrix(h, oh, mode).astype(np.float32)))
        self.register_buffer("rw", torch.from_numpy(resize_matrix(w, ow, mode).astype(np.float32)))
        # rows first costs oh*h*w + oh*w*ow multiply-adds, columns first ow*w*h + oh*h*ow
        self.rows_first = oh * h * w + oh * w * ow <= ow * w * h + oh * h * ow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows_first:
            return torch.matmul(self.rw, torch.matmul(self.rh, x).transpose(-1, -2)).transpose(-1, -2)
        return torch.matmul(self.rh, torch.matmul(self.rw, x.transpose(-1, -2)).transpose(-1, -2))


_CUBIC_A = -0.75  # torch's bicubic (and core.preprocess.resize_matrix)


def axis_taps(n_in, n_out, mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Taps of the resampling along one axis, built in the graph from ``n_in`` and ``n_out`` (ints or traced sizes,
    so one exported graph serves every frame size): per tap a source index ``(n_out,)`` int64 and a weight
    ``(n_out,)`` float32.
    Half-pixel centres and taps clamped to the border, as ``F.interpolate(mode, align_corners=False)``.

    The source coordinate ``((2i + 1) n_in - n_out) / (2 n_out)`` is kept as an int64 numerator: tap indices are
    exact integers on every backend. (OpenVINO computes an INT8 bundle's float ops in bf16 on CPUs with
    AVX512-BF16, which cannot hold coordinates above 256.) Only the fractional part and the kernel weights are
    float.
    """
    n = torch.as_tensor(n_in).to(torch.int64)
    m = torch.as_tensor(n_out).to(torch.int64)
    den = 2 * m
    num = (2 * torch.arange(n_out).to(torch.int64) + 1) * n - m
    if mode == "bilinear":
        num = torch.clamp(num, min=0)  # torch clamps negative source coordinates for linear modes
    base = torch.div(num + 4 * den, den, rounding_mode="trunc") - 4  # floor (the shifted numerator is positive)
    t = (num - base * den).to(torch.float32) / den.to(torch.float32)
    if mode == "bicubic":
        a = _CUBIC_A
        near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731 - |x| <= 1
        far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731 - 1 < |x| < 2
        taps = zip((-1, 0, 1, 2), (far(1 + t), near(t), near(1 - t), far(2 - t)))
    elif mode == "bilinear":
        taps = zip((0, 1), (1 - t, t))
    else:
        raise ExportError(f"in-graph resize supports bicubic and bilinear, not {mode!r}")
    return [(torch.minimum(torch.clamp(base + k, min=0), n - 1), w) for k, w in taps]


def resize_taps(x: torch.Tensor, out_hw: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize the last two axes of ``x`` (any size) to ``out_hw``, one axis at a time, as a sum over the kernel's
    taps of ``Gather`` (the source rows or columns) times the tap weight: 2-4 multiply-adds per output value,
    where dense MatMuls of the same matrices spend ``n_in`` (a 540x800 frame to 224: ~0.7M against ~125M).
    The axis whose resampling leaves fewer values goes first (chosen from the traced example's sizes).
    A 540x800 frame to 224 in OpenVINO: 0.7 ms against 2.3-3.9 ms for the dense MatMuls (benchmarks/RESULTS.md
    §4.5)."""
    h, w = x.shape[-2], x.shape[-1]
    oh, ow = out_hw
    axes = (-2, -1) if int(oh) * int(w) <= int(h) * int(ow) else (-1, -2)
    for ax in axes:
        n_out = oh if ax == -2 else ow
        acc = None
        for idx, wt in axis_taps(x.shape[ax], n_out, mode):
            term = torch.index_select(x, ax, idx) * (wt[:, None] if ax == -2 else wt)
            acc = term if acc is None else acc + term
        x = acc
    return x


def resize_dense(x: torch.Tensor, out_hw: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """``resize_taps``' resampling as two dense MatMuls, ``R_h @ x @ R_w^T``, the matrices built in the graph from the
    traced sizes (one-hot comparisons of the same int64 tap indices). More arithmetic than the taps, but ONNX
    Runtime runs these MatMuls faster than its ``Gather``: what ONNX Runtime bundles export for any-size frames
    (a whole BUS-BRA student bundle 9.1 vs 9.5 ms; benchmarks/RESULTS.md §4.5)."""
    def dense(n_in, n_out):
        j = torch.arange(n_in).to(torch.int64)
        mat = None
        for idx, w in axis_taps(n_in, n_out, mode):
            term = (j[None, :] == idx[:, None]).to(torch.float32) * w[:, None]
            mat = term if mat is None else mat + term
        return mat

    return torch.matmul(torch.matmul(dense(x.shape[-2], out_hw[0]), x), dense(x.shape[-1], out_hw[1]).transpose(0, 1))
