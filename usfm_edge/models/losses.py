"""Loss functions (pure torch, no state).

Pretraining: :func:`masked_l1` (SimMIM's spatial reconstruction loss) and :func:`fourier_loss` (the
frequency-domain term of USFM's dual masked image modelling). Both return a scalar tensor.
"""

from __future__ import annotations

import torch

from usfm_edge.core.errors import ConfigError

__all__ = ["masked_l1", "fourier_loss", "FOURIER_LOSSES"]

FOURIER_LOSSES = ("complex", "log_amplitude")


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over masked pixels (SimMIM).

    Args:
        pred, target: ``(B, C, H, W)``.
        mask: pixel mask ``(B, 1, H, W)`` (1 = masked); broadcast over channels.

    Returns:
        ``sum(|pred - target| * mask) / (sum(mask) * C)``: the per-pixel, per-channel mean over the masked
        region of the whole batch.
    """
    err = (pred - target).abs() * mask
    return err.sum() / (mask.sum() * pred.shape[1] + 1e-5)


def fourier_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "complex", eps: float = 1e-8) -> torch.Tensor:
    """Distance between the 2-D DFTs of ``pred`` and ``target`` over the whole image (fp32 FFT).

    Both spectra use ``norm="ortho"``, so by Parseval the squared spectral distance equals the squared
    pixel distance and the term has the same scale as a pixel loss whatever the image size.

    Args:
        pred, target: ``(B, C, H, W)`` real images.
        kind: ``complex``: mean over bins of ``|F(pred) - F(target)|`` (an L1 on complex numbers: compares
            amplitude and phase); ``log_amplitude``: mean of ``|log(1 + |F(pred)|) - log(1 + |F(target)|)|``
            (texture statistics only, phase-blind).
        eps: keeps the gradient of ``|z|`` finite at ``z = 0``.

    Returns:
        Scalar loss.
    """
    if kind not in FOURIER_LOSSES:
        raise ConfigError(f"unknown Fourier loss {kind!r}; choose from {', '.join(FOURIER_LOSSES)}")
    fp = torch.fft.fft2(pred.float(), norm="ortho")
    ft = torch.fft.fft2(target.float(), norm="ortho")
    if kind == "complex":
        d = fp - ft
        return torch.sqrt(d.real.square() + d.imag.square() + eps).mean()
    amp_p = torch.sqrt(fp.real.square() + fp.imag.square() + eps)
    return (torch.log1p(amp_p) - torch.log1p(ft.abs())).abs().mean()
