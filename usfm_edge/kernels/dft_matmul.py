"""The band-stop filter as plain MatMuls: exportable to ONNX and correct in every runtime.

Math (``x`` real ``(H, W)``, mask ``M`` real, unshifted layout). Write the DFT of a real signal in a
*real* basis: per axis an ``n x n`` analysis matrix ``A`` whose rows are ``cos(2 pi k i / n)`` for
``k = 0..n//2`` followed by ``sin(2 pi k i / n)`` for the interior ``k = 1..(n-1)//2`` (``n`` rows in
all; sin rows of ``k = 0`` and Nyquist are identically zero and omitted), and its exact inverse
``S = A^T diag(w) / n`` with ``w = 1`` for ``k = 0`` and Nyquist, else 2. With ``P = A_h x A_w^T`` (the
four real quadrant spectra CC, CS, SC, SS side by side) the filter is::

    y = Re(IDFT2(M * DFT2(x))) = S_h (E * P + D * (A'_h x A'_w^T)) S_w^T

where ``E`` is the part of ``M`` even in both axes (``M(+-k, +-l)`` averaged) read in quadrant
layout, ``D`` the odd-odd part with signs, and ``A'`` swaps the cos and sin rows of each interior
frequency. A radially symmetric mask (every ring mask) has ``D == 0``: the whole filter is **4
MatMuls and 1 Mul** (90 MFLOP at 224x224, vs 136 MFLOP and 12 MatMuls for the complex half-spectrum
form of perf-baseline.md §6). Any other real mask is exact too, with 2 more MatMuls.

``BandStopMatMul`` also prunes, at build time, rows and columns of the quadrant spectrum where the
mask term is zero, and uses ``y = x - S((1 - M) * P)S^T`` when the complement has the smaller
support (exactly the same result; fewer FLOPs when few rings are dropped or only low rings are).

Export: ``torch.onnx.export(..., dynamo=False)`` (TorchScript exporter, opset 17) gives the cleanest
graph: constant initializers, ``MatMul``/``Mul``/``Sub``/``Add`` only. The dynamo exporter gives the same
ops at opset 18; both are tested by ``export_band_stop_onnx(dynamo=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from usfm_edge.core.errors import ExportError, InputError

__all__ = ["RealDFT", "dft_matrices", "quadrant_masks", "band_stop_filter_matmul", "BandStopMatMul",
           "export_band_stop_onnx"]


@lru_cache(maxsize=32)
def _real_dft_np(n: int) -> tuple[np.ndarray, ...]:
    """float64 (analysis, synthesis, swapped, freq, sign) for length ``n``; see the module docstring."""
    if n < 1:
        raise InputError(f"DFT length must be >= 1, got {n}")
    cos_k = np.arange(n // 2 + 1)
    sin_k = np.arange(1, (n - 1) // 2 + 1)
    freq = np.concatenate([cos_k, sin_k])
    sign = np.concatenate([np.ones(cos_k.size), -np.ones(sin_k.size)])
    i = np.arange(n)
    angle = 2.0 * np.pi * ((freq[:, None] * i[None, :]) % n) / n  # exact integer phase, then scale
    analysis = np.where(sign[:, None] > 0, np.cos(angle), np.sin(angle))
    weight = np.where((freq == 0) | (2 * freq == n), 1.0, 2.0)
    synthesis = analysis.T * weight[None, :] / n
    swapped = np.zeros_like(analysis)
    n_sin = sin_k.size
    swapped[1 : 1 + n_sin] = analysis[cos_k.size :]  # cos row k <- sin row k (interior k)
    swapped[cos_k.size :] = analysis[1 : 1 + n_sin]  # sin row k <- cos row k
    return analysis, synthesis, swapped, freq, sign


@dataclass(frozen=True)
class RealDFT:
    """Real DFT matrices of one axis of length ``n`` (see the module docstring).

    Attributes:
        analysis: ``(n, n)``; rows cos_k (k = 0..n//2) then sin_k (k = 1..(n-1)//2).
        synthesis: ``(n, n)``; exact inverse, ``synthesis @ analysis == I``.
        swapped: ``(n, n)``; analysis with cos/sin rows of each interior frequency exchanged (rows of
            k = 0 and Nyquist zero), used for masks that are not even in each axis.
        freq: ``(n,)`` int64 frequency index of each row.
        sign: ``(n,)`` +1 for cos rows, -1 for sin rows.
    """

    analysis: torch.Tensor
    synthesis: torch.Tensor
    swapped: torch.Tensor
    freq: torch.Tensor
    sign: torch.Tensor


def dft_matrices(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> RealDFT:
    """Real cos/sin DFT matrices of length ``n`` (computed in float64, then cast; cached, do not modify).

    Args:
        n: signal length.
        dtype: floating dtype of the matrices.
        device: device of the tensors.

    Returns:
        the :class:`RealDFT` of length ``n``.
    """
    return _dft_matrices(int(n), dtype, str(torch.device(device or "cpu")))


@lru_cache(maxsize=16)
def _dft_matrices(n: int, dtype: torch.dtype, device: str) -> RealDFT:
    analysis, synthesis, swapped, freq, sign = _real_dft_np(n)
    mats = (torch.as_tensor(m, dtype=dtype, device=device) for m in (analysis, synthesis, swapped, sign))
    a, s, sw, sg = mats
    return RealDFT(a, s, sw, torch.as_tensor(freq, device=device), sg)


def quadrant_masks(
    mask: torch.Tensor, mh: RealDFT, mw: RealDFT, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Even-even part ``E`` and signed odd-odd part ``D`` of ``mask`` in quadrant layout.

    Args:
        mask: real ``(..., H, W)`` mask, unshifted layout.
        mh: matrices of the H axis.
        mw: matrices of the W axis.
        symmetric: promise ``M(k) == M(-k)`` (2 gathers instead of 4).

    Returns:
        ``(E, D)``, both ``(..., H, W)``; ``D`` is zero for radially (or axis-) symmetric masks.
    """
    h, w = mask.shape[-2:]
    kh, kw = mh.freq, mw.freq
    nh, nw = (-kh) % h, (-kw) % w
    pos, neg = mask.index_select(-2, kh), mask.index_select(-2, nh)  # index_select: fast contiguous gathers
    a, b = pos.index_select(-1, kw), neg.index_select(-1, kw)
    if symmetric:  # M(-k, -l) == M(k, l) and M(k, -l) == M(-k, l)
        even, odd = 0.5 * (a + b), 0.5 * (a - b)
    else:
        c, d = pos.index_select(-1, nw), neg.index_select(-1, nw)
        even, odd = 0.25 * (a + b + c + d), 0.25 * (a - b - c + d)
    return even, odd * -(mh.sign[:, None] * mw.sign[None, :]).to(mask.dtype)


def band_stop_filter_matmul(
    x: torch.Tensor, mask: torch.Tensor, mats: tuple[RealDFT, RealDFT] | None = None, symmetric: bool = False
) -> torch.Tensor:
    """Band-stop filter ``(..., H, W)`` images with MatMuls only (differentiable, any device).

    Args:
        x: real images ``(..., H, W)``.
        mask: real mask broadcastable to ``x`` (e.g. ``(H, W)`` or per-sample ``(B, 1, H, W)``).
        mats: ``(matrices of H, matrices of W)`` in ``x``'s dtype/device; built (cached in numpy) if None.
        symmetric: promise ``M(k) == M(-k)`` (ring masks); False is always correct.

    Returns:
        ``Re(IDFT2(mask * DFT2(x)))``, same shape and dtype as ``x``.
    """
    h, w = x.shape[-2:]
    if mats is None:
        mats = (dft_matrices(h, x.dtype, x.device), dft_matrices(w, x.dtype, x.device))
    mh, mw = mats
    even, odd = quadrant_masks(mask.to(device=x.device, dtype=x.dtype), mh, mw, symmetric)
    q = (mh.analysis @ (x @ mw.analysis.T)) * even
    if bool(torch.any(odd != 0)):
        q = q + (mh.swapped @ (x @ mw.swapped.T)) * odd
    return mh.synthesis @ (q @ mw.synthesis.T)


def _plan(even: np.ndarray, odd: np.ndarray, h: int, w: int) -> tuple[bool, np.ndarray, np.ndarray]:
    """Pick direct or complement form and the active quadrant rows/cols that minimise MatMul FLOPs."""
    best = None
    for complement in (False, True):
        e = 1.0 - even if complement else even
        active = (e != 0) | (odd != 0)
        rows, cols = np.flatnonzero(active.any(1)), np.flatnonzero(active.any(0))
        rh, cw = max(rows.size, 1), max(cols.size, 1)
        n_an = 2 if np.any(odd != 0) else 1
        cost = n_an * (h * w * cw + rh * h * cw) + rh * cw * w + h * rh * w
        if best is None or cost < best[0]:
            best = (cost, complement, rows, cols)
    return best[1], best[2], best[3]


class BandStopMatMul(nn.Module):
    """Band-stop filter with a FIXED mask as MatMul/Mul/Add/Sub only (ONNX-exportable, no DFT op).

    Args:
        mask: real ``(H, W)`` mask in the unshifted layout (numpy or torch).
        dtype: dtype of the stored matrices (float32 for export).
        prune: drop quadrant rows/cols where the mask term is zero and use the complement form when
            cheaper (exact either way).

    Shape:
        input ``(..., H, W)`` real, output the same.
    """

    def __init__(self, mask, dtype: torch.dtype = torch.float32, prune: bool = True):
        super().__init__()
        m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64)
        if m.ndim != 2 or np.iscomplexobj(m) or not np.all(np.isfinite(m)):
            raise InputError(f"BandStopMatMul needs a finite real (H, W) mask, got shape {m.shape}")
        h, w = m.shape
        mh64 = RealDFT(*(torch.from_numpy(v) for v in _real_dft_np(h)))
        mw64 = RealDFT(*(torch.from_numpy(v) for v in _real_dft_np(w)))
        even, odd = (t.numpy() for t in quadrant_masks(torch.from_numpy(m), mh64, mw64))
        odd = np.where(np.abs(odd) < 1e-12, 0.0, odd)
        self.image_size = (h, w)
        self.complement, rows, cols = _plan(even, odd, h, w) if prune else (False, np.arange(h), np.arange(w))
        if self.complement:
            even, odd = 1.0 - even, -odd
        self.has_odd = bool(np.any(odd != 0))
        ah, sh, ahs = (v.numpy() for v in (mh64.analysis, mh64.synthesis, mh64.swapped))
        aw, sw, aws = (v.numpy() for v in (mw64.analysis, mw64.synthesis, mw64.swapped))
        self.active = (int(rows.size), int(cols.size))

        def buf(name: str, value: np.ndarray) -> None:
            self.register_buffer(name, torch.as_tensor(np.ascontiguousarray(value), dtype=dtype))

        buf("ah", ah[rows])  # (rh, H)
        buf("awt", aw[cols].T)  # (W, cw)
        buf("sh", sh[:, rows])  # (H, rh)
        buf("swt", sw[:, cols].T)  # (cw, W)
        buf("even", even[np.ix_(rows, cols)])
        if self.has_odd:
            buf("ahs", ahs[rows])
            buf("awts", aws[cols].T)
            buf("odd", odd[np.ix_(rows, cols)])

    @property
    def flops(self) -> int:
        """Multiply-add FLOPs per image (2 x MACs) of the MatMuls."""
        (h, w), (rh, cw) = self.image_size, self.active
        n_an = 2 if self.has_odd else 1
        return 2 * (n_an * (h * w * cw + rh * h * cw) + rh * cw * w + h * rh * w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == self.ah.dtype else x.to(self.ah.dtype)  # no Cast node in the usual fp32 export
        q = (self.ah @ (xf @ self.awt)) * self.even
        if self.has_odd:
            q = q + (self.ahs @ (xf @ self.awts)) * self.odd
        y = self.sh @ (q @ self.swt)
        if self.complement:
            y = xf - y
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, active={self.active}, complement={self.complement}, odd={self.has_odd}"


def export_band_stop_onnx(
    mask,
    path: str | Path,
    batch_dynamic: bool = True,
    channels: int = 1,
    opset: int = 17,
    dynamo: bool = False,
    prune: bool = True,
) -> Path:
    """Export :class:`BandStopMatMul` for ``mask`` to ONNX (input ``x`` ``(N, C, H, W)`` float32, output ``y``).

    Args:
        mask: real ``(H, W)`` mask, unshifted layout.
        path: the ``.onnx`` file to write (parent folders are created).
        batch_dynamic: make the batch axis ``N`` dynamic.
        channels: the fixed channel count ``C``.
        opset: ONNX opset (17 by default; the dynamo exporter uses >= 18).
        dynamo: use the dynamo exporter instead of the TorchScript one.
        prune: see :class:`BandStopMatMul`.

    Returns:
        the written path.

    Raises:
        ExportError: if the exporter fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = BandStopMatMul(mask, prune=prune).eval()
    h, w = module.image_size
    dummy = torch.zeros(2 if batch_dynamic else 1, channels, h, w)
    kwargs: dict = {"input_names": ["x"], "output_names": ["y"], "opset_version": opset, "dynamo": dynamo}
    if dynamo:
        kwargs["opset_version"] = max(opset, 18)
        kwargs["external_data"] = False
        if batch_dynamic:
            kwargs["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch")}}
    elif batch_dynamic:
        kwargs["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
    try:
        with torch.no_grad():
            torch.onnx.export(module, (dummy,), str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is reported as ExportError
        raise ExportError(f"ONNX export of BandStopMatMul failed: {exc}", path=path) from exc
    return path
