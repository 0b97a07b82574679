"""Band-stop filtering of torch tensors: torch.fft (default), the MatMul form, or a fused Triton kernel.

All forms compute ``Re(IDFT2(M * DFT2(x)))`` for real ``x`` and a real mask in the unshifted layout.
For real ``x`` that equals ``IDFT2(sym(M) * DFT2(x))`` with ``sym(M)(k) = (M(k) + M(-k)) / 2`` (see
:func:`symmetrize`), so every form works on the point-symmetric mask and the ``fft`` form uses the
faster half spectrum (``rfft2``/``irfft2``, half the work of ``fft2``/``ifft2``) for ANY real mask.
Ring masks are symmetric already: pass ``symmetric=True`` to skip the (cheap, exact) symmetrisation.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from usfm_edge.core.errors import BackendUnavailableError, ConfigError, InputError

__all__ = ["band_stop_filter", "symmetrize", "prepare_mask", "IMPLS"]

IMPLS = ("auto", "fft", "matmul", "triton")


def symmetrize(mask: torch.Tensor) -> torch.Tensor:
    """``(M(k) + M(-k)) / 2`` over the last two dims of an unshifted mask (exact for symmetric masks)."""
    flipped = torch.roll(torch.flip(mask, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    return 0.5 * (mask + flipped)


def prepare_mask(mask, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Check ``mask`` against ``x`` and return it broadcastable to ``x`` on ``x.device`` in ``dtype``.

    Args:
        mask: ``(H, W)`` shared mask, or per-sample ``(B, H, W)`` / ``(B, 1, H, W)``; numpy or torch.
        x: images ``(B, C, H, W)`` or ``(B, H, W)``.
        dtype: compute dtype of the mask.

    Returns:
        ``(H, W)`` or ``(B, 1, H, W)`` (4-D ``x``) / ``(B, H, W)`` (3-D ``x``) real tensor.

    Raises:
        InputError: on a shape mismatch or a complex mask.
    """
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise InputError(f"mask must be a real numpy array or tensor, got {type(mask).__name__}")
    h, w = x.shape[-2:]
    if mask.shape[-2:] != (h, w):
        raise InputError(f"mask {tuple(mask.shape)} must end with the image size {(h, w)} of x {tuple(x.shape)}")
    mask = mask.to(device=x.device, dtype=dtype)
    if mask.ndim == 2:
        return mask
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise InputError(f"a 4-D mask must be (B, 1, H, W), got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.ndim != 3 or mask.shape[0] not in (1, x.shape[0]):
        raise InputError(f"per-sample mask {tuple(mask.shape)} does not match the batch of x {tuple(x.shape)}")
    return mask[:, None] if x.ndim == 4 else mask


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.is_complex() or not x.is_floating_point():
        raise InputError(f"band_stop_filter takes real floating images, got {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _triton_available(x: torch.Tensor) -> bool:
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Elements per chunk (8 frames of 224x224): one rfft2 over a large batch runs out of cache. With several
# intra-op threads and no autograd the chunks run concurrently (_USE_POOL), one chunk per thread and one torch
# thread per chunk (MKL's FFT parallelises a small batch poorly). benchmarks/bench_kernels.py times these
# paths side by side ("chunks, serial" and "one call" rows); in a one-off interleaved A/B run (session 3,
# benchmarks/RESULTS.md §6.2) 1, 2, 4 or 8 frames per pooled chunk gave 3.0x, 4.8x, 5.1x, 5.5x the numpy loop.
_CHUNK_ELEMENTS = 8 * 224 * 224
_USE_POOL = True
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _needs_grad(x: torch.Tensor, half: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or half.requires_grad)


def _inverse(spec: torch.Tensor, w: int, out: torch.Tensor | None = None) -> torch.Tensor:
    # complex IFFT over H, then the real inverse over W: measured ~2x faster than irfft2 on 224x224
    # (torch's irfft2 copies the spectrum before MKL's c2r); same result and normalisation 1/(H*W)
    return torch.fft.irfft(torch.fft.ifft(spec, dim=-2), n=w, dim=-1, out=out)


def _fft_chunk(x: torch.Tensor, half: torch.Tensor, h: int, w: int, out: torch.Tensor | None = None) -> torch.Tensor:
    spec = torch.fft.rfft2(x)
    if _needs_grad(x, half):
        return _inverse(spec * half, w)
    spec.mul_(half)  # complex *= real in place: 4x faster than multiplying the float-pair view by a broadcast
    return _inverse(spec, w, out)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != workers:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="usfm-band-stop")
        return _POOL


def _chunks(x: torch.Tensor, half: torch.Tensor):
    """``[(batch slice, its half mask)]`` covering ``x`` in chunks of about ``_CHUNK_ELEMENTS`` elements."""
    per_frame = x[0].numel() if x.ndim == 4 else x.shape[-2] * x.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // per_frame)
    shared = half.ndim == 2
    return [(slice(i, i + step), half if shared else half[i:i + step]) for i in range(0, x.shape[0], step)]


def _fft(x: torch.Tensor, mask: torch.Tensor, symmetric: bool) -> torch.Tensor:
    h, w = x.shape[-2:]
    if not symmetric:
        mask = symmetrize(mask)
    half = mask[..., : w // 2 + 1]
    chunks = [] if x.is_cuda else _chunks(x, half)
    if len(chunks) <= 1:
        return _fft_chunk(x, half, h, w)
    if _needs_grad(x, half):
        return torch.cat([_fft_chunk(x[sl], hf, h, w) for sl, hf in chunks])
    out = torch.empty_like(x)
    threads = torch.get_num_threads()
    if _USE_POOL and 1 < threads <= len(chunks):
        # threads x one-thread chunks. torch's thread count is process-wide: other Python threads running
        # torch ops meanwhile run single-threaded until it is restored below.
        torch.set_num_threads(1)
        try:
            jobs = [_pool(threads).submit(_fft_chunk, x[sl], hf, h, w, out[sl]) for sl, hf in chunks]
            for job in jobs:
                job.result()
        finally:
            torch.set_num_threads(threads)
        return out
    for sl, hf in chunks:
        _fft_chunk(x[sl], hf, h, w, out=out[sl])
    return out


def band_stop_filter(x: torch.Tensor, mask, impl: str = "auto", symmetric: bool = False) -> torch.Tensor:
    """Band-stop filter a batch of images (differentiable with respect to ``x`` and the mask).

    Args:
        x: real images ``(B, C, H, W)`` or ``(B, H, W)``; float32/64, or bf16/fp16 (computed in float32
            and cast back).
        mask: real mask in the unshifted layout: ``(H, W)`` shared, or per-sample ``(B, H, W)`` /
            ``(B, 1, H, W)``; a numpy array is accepted.
        impl: ``"fft"`` (torch.fft half spectrum), ``"matmul"`` (DFT as real MatMuls, the exportable
            math), ``"triton"`` (fused mask kernel, NVIDIA GPU), ``"auto"`` (triton on CUDA when
            triton is installed, else fft).
        symmetric: promise that ``M(k) == M(-k)`` (true for ring masks) to skip the symmetrisation.
            Giving False is always correct.

    Returns:
        ``Re(IDFT2(mask * DFT2(x)))`` with the shape and dtype of ``x``.

    Raises:
        ConfigError: unknown ``impl``, or ``triton`` where it cannot run.
        InputError: bad shapes or dtypes.
        BackendUnavailableError: ``triton`` requested but not installed.
    """
    if impl not in IMPLS:
        raise ConfigError(f"impl must be one of {IMPLS}, got {impl!r}")
    if x.ndim not in (3, 4):
        raise InputError(f"x must be (B, C, H, W) or (B, H, W), got {tuple(x.shape)}")
    dtype = _compute_dtype(x)
    m = prepare_mask(mask, x, dtype)
    xc = x if x.dtype == dtype else x.to(dtype)
    if impl == "auto":
        impl = "triton" if _triton_available(x) else "fft"
    if impl == "fft":
        y = _fft(xc, m, symmetric)
    elif impl == "matmul":
        from usfm_edge.kernels.dft_matmul import band_stop_filter_matmul

        y = band_stop_filter_matmul(xc, m, symmetric=symmetric)
    else:
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ConfigError("impl='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 for the interpreter)")
        try:
            from usfm_edge.kernels._triton import band_stop_filter_triton
        except ImportError as exc:  # pragma: no cover - the module itself has no hard import
            raise BackendUnavailableError(str(exc), hint="pip install triton (NVIDIA GPU build)") from exc
        y = band_stop_filter_triton(xc, m, symmetric=symmetric)
    return y if y.dtype == x.dtype else y.to(x.dtype)
