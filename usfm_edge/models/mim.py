"""USFM pretraining model: spatial-frequency dual masked image modelling on a SimMIM skeleton.

``UsfmMim`` = the USFM ViT encoder (with its ``mask_token``) + SimMIM's light decoder (a 1x1 convolution to
``patch**2 * C`` channels and a PixelShuffle). The model owns its loss; the masks come from the data
pipeline (:mod:`usfm_edge.train.masking`).

Input corruption, in this order (``UsfmMim.corrupt``):

1. **Frequency**: each sample whose band-stop mask is not all ones is filtered as a whole image,
   ``Re(IDFT2(M * DFT2(x)))`` (:func:`usfm_edge.kernels.torch_fft.band_stop_filter`), with its own random
   subset of rings. It comes first so the mean fill of step 2 stays a flat block instead of being
   smeared into ringing by the filter, and so spatial and frequency corruption compose as in the
   paper's figure (both feed one masked input). The filter is linear and the protected centre keeps DC,
   so filtering the normalised image equals normalising the filtered image.
2. **Spatial**: the masked blocks are filled with the (filtered) image's per-channel mean (the figure's
   "mean-padded spatial mask") **and** their patch tokens are replaced by the learnable ``mask_token``
   (the official checkpoint has one, as SimMIM does). The dossier leaves open which of the two USFM used;
   we do both. Note that with a non-overlapping patch embedding, a token replaced by ``mask_token``
   no longer depends on its pixels, so with both on the mean fill only changes the corrupted image that
   :meth:`UsfmMim.corrupt` returns (for figures); ``mask_token=False`` gives pure mean padding, in which the
   encoder sees the embedding of a flat, mean-valued patch.

Loss (computed in fp32): ``L = L_spa + lambda_freq * L_freq`` with

* ``L_spa``: SimMIM's L1 on the masked pixels, normalised by the masked pixel count and the channels;
* ``L_freq``: L1 between ``DFT2(pred)`` and ``DFT2(target)`` (orthonormal DFT) over the **whole** image,
  ``mean |F(pred) - F(target)|``. Whole image, because on a frequency-masked sample the visible pixels
  are corrupted too, and this term is what asks the model to restore the removed bands there. Complex
  difference rather than log-amplitude, because it keeps phase (where structure lives), its gradient is
  bounded like any L1 and, through Parseval, a noise-like (texture) error has the same scale per bin as per
  pixel whatever the image size (a pure brightness offset counts less: it lives in one bin).
  ``freq_loss="log_amplitude"`` is available as an ablation.

Defaults (:class:`MimConfig`; the paper gives no values, so each is a choice):

==================  =======  ==================================================================================
field               default  why
==================  =======  ==================================================================================
mask_ratio          0.6      SimMIM's ViT-B value; the USFM remnants (``MaskGenerator``) default to it too.
mask_patch_size     32       SimMIM's value at 224 px: 2x2 patches per block, so a masked region cannot be
                             filled in from the same patch's neighbours alone.
freq_prob           0.5      half the samples are pure SimMIM (clean visible pixels, close to fine-tuning
                             inputs), half also lose frequency bands; neither objective starves the other.
drop_ratio          0.3      3 of the 10 rings at 224 px (kernels' default): moderate, since it is stacked on a
                             60 % spatial mask.
base_width, growth, 2, 1.5,  the kernels' ring geometry (``usfm_edge.kernels.rings``): 10 rings at 224 px,
max_width,          16, 4    fine below 45 bins where ultrasound energy sits, 16-bin bands above; DC and radii
center_protect                < 4 bins are never dropped.
lambda_freq         1.0      measured on real BUS-BRA/HC18 frames, the complex Fourier L1 (orthonormal DFT) is
                             0.3-0.65x the masked pixel L1, at init and after 100 steps; with weight 1 the
                             spatial term, the one SimMIM validated, still leads and the frequency term is
                             about a third of the loss. The orthonormal DFT keeps it near pixel scale.
freq_loss           complex  see above.
mean_pad, mask_token True    both corruptions of the figure/checkpoint (see above).
norm_target         True     MAE's per-patch normalised target (each 16x16 patch of the target, all channels,
                             to zero mean and unit variance) for BOTH loss terms. On by default since session 5:
                             on our data a raw-pixel target taught the encoder little beyond each patch's mean
                             grey (benchmarks/RESULTS.md §8.3), while the normalised target's 66-minute encoder
                             beat training from scratch on all three 10%-label tasks in 5 of 5 paired seeds
                             (§6e). SimMIM and, as far as the dossier tells, USFM reconstruct raw pixels:
                             ``norm_target=False`` (``--no-norm-target``) gives that objective. Predictions
                             are in normalised units: :meth:`UsfmMim.denormalize` maps them back for display.
==================  =======  ==================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from usfm_edge.core.errors import ConfigError
from usfm_edge.models.losses import FOURIER_LOSSES, fourier_loss, masked_l1
from usfm_edge.models.vit import UsfmViT

__all__ = ["MimConfig", "UsfmMim", "build_mim", "patch_normalize"]


@dataclass
class MimConfig:
    """Dual masked image modelling settings (defaults and reasons in the module docstring).

    Attributes:
        mask_ratio: fraction of ``mask_patch_size`` blocks masked per image.
        mask_patch_size: side of a spatial mask block in pixels (multiple of the patch size).
        freq_prob: probability that a sample also gets a band-stop frequency mask.
        drop_ratio: fraction of frequency rings removed by one band-stop mask.
        base_width: width of the innermost ring in frequency bins.
        growth: geometric growth of the ring widths.
        max_width: cap on a ring's width in bins.
        center_protect: radius in bins of the never-dropped centre (keeps DC).
        lambda_freq: weight of the Fourier loss (0 disables it).
        freq_loss: ``complex`` or ``log_amplitude``.
        mean_pad: fill masked blocks with the image mean.
        mask_token: replace masked patch tokens by the encoder's ``mask_token``.
        norm_target: reconstruct per-patch normalised pixels (MAE's ``norm_pix_loss``, the default) instead of
            raw pixels (SimMIM).
    """

    mask_ratio: float = 0.6
    mask_patch_size: int = 32
    freq_prob: float = 0.5
    drop_ratio: float = 0.3
    base_width: float = 2.0
    growth: float = 1.5
    max_width: float = 16.0
    center_protect: float = 4.0
    lambda_freq: float = 1.0
    freq_loss: str = "complex"
    mean_pad: bool = True
    mask_token: bool = True
    norm_target: bool = True

    def __post_init__(self):
        if self.freq_loss not in FOURIER_LOSSES:
            raise ConfigError(f"freq_loss must be one of {', '.join(FOURIER_LOSSES)}, got {self.freq_loss!r}")
        if self.lambda_freq < 0:
            raise ConfigError(f"lambda_freq must be >= 0, got {self.lambda_freq}")
        if not (self.mean_pad or self.mask_token):
            raise ConfigError("at least one of mean_pad and mask_token must be on, else nothing is masked")

    def ring_params(self) -> dict:
        """Keyword arguments for :class:`usfm_edge.kernels.rings.BandStopMaskGenerator`."""
        return dict(drop_ratio=self.drop_ratio, base_width=self.base_width, growth=self.growth,
                    max_width=self.max_width, center_protect=self.center_protect)


_NORM_EPS = 1e-6  # MAE's


def _patch_stats(x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` viewed as ``(B, C, H/p, p, W/p, p)`` patches, with each patch's mean and std over (C, p, p)."""
    B, C, H, W = x.shape
    t = x.reshape(B, C, H // p, p, W // p, p)
    mean = t.mean(dim=(1, 3, 5), keepdim=True)
    std = (t.var(dim=(1, 3, 5), keepdim=True, unbiased=False) + _NORM_EPS).sqrt()
    return t, mean, std


def patch_normalize(x: torch.Tensor, p: int) -> torch.Tensor:
    """Each ``p x p`` patch of ``(B, C, H, W)`` images to zero mean and unit variance over its channels and pixels
    (flat patches become 0)."""
    t, mean, std = _patch_stats(x, p)
    return ((t - mean) / std).reshape(x.shape)


def _band_stop(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from usfm_edge.kernels.torch_fft import band_stop_filter

    return band_stop_filter(x, mask, symmetric=True)  # ring masks are radial, hence point-symmetric


class UsfmMim(nn.Module):
    """Encoder + SimMIM decoder + dual MIM loss.

    Args:
        encoder: a :class:`UsfmViT` (its ``mask_token`` is used; heads are ignored).
        cfg: masking/loss settings.

    State dict: ``encoder.*`` (loads into ``create_model`` through the SimMIM branch of the checkpoint
    filter, which strips ``encoder.`` and drops ``decoder.*``) and ``decoder.0.{weight,bias}``.
    """

    def __init__(self, encoder: UsfmViT, cfg: MimConfig | None = None):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg or MimConfig()
        p, c = encoder.patch_size, encoder.in_chans
        self.patch_size = p
        self.decoder = nn.Sequential(nn.Conv2d(encoder.num_features, p * p * c, kernel_size=1), nn.PixelShuffle(p))

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{k}" for k in self.encoder.no_weight_decay()}

    def group_matcher(self, name: str) -> int:
        """Layer id for layer-wise lr decay (encoder ids; the decoder counts as the last layer)."""
        if name.startswith("encoder."):
            return self.encoder.group_matcher(name[len("encoder."):])
        return self.encoder.depth + 1

    def denormalize(self, pred: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """A prediction in the model's target units -> image units (identity unless ``norm_target``: then each
        patch takes the mean and spread of the clean image's patch, as MAE shows its reconstructions)."""
        if not self.cfg.norm_target:
            return pred
        _, mean, std = _patch_stats(img.float(), self.patch_size)
        B, C, H, W = pred.shape
        p = self.patch_size
        return (pred.float().reshape(B, C, H // p, p, W // p, p) * std + mean).reshape(B, C, H, W)

    def pixel_mask(self, spatial_mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Patch mask ``(B, N)`` or ``(B, h, w)`` -> pixel mask ``(B, 1, H, W)`` float (1 = masked)."""
        gh, gw = hw[0] // self.patch_size, hw[1] // self.patch_size
        m = spatial_mask.reshape(spatial_mask.shape[0], 1, gh, gw).float()
        return m.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)

    def corrupt(self, img: torch.Tensor, spatial_mask: torch.Tensor,
                freq_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the frequency then the spatial corruption (module docstring) -> (input, pixel mask)."""
        B, _, H, W = img.shape
        x = img.float()
        if freq_mask is not None and self.cfg.freq_prob > 0:
            # no data-dependent branch (torch.compile keeps one graph); samples whose mask is all ones keep x exactly
            fm = freq_mask.reshape(B, 1, H, W).float()
            apply = (fm < 1).flatten(1).any(1)
            x = torch.where(apply[:, None, None, None], _band_stop(x, fm), x)
        m_pix = self.pixel_mask(spatial_mask, (H, W))
        if self.cfg.mean_pad:
            x = x * (1 - m_pix) + x.mean(dim=(2, 3), keepdim=True) * m_pix
        return x, m_pix

    def forward(self, img: torch.Tensor, spatial_mask: torch.Tensor,
                freq_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One pretraining forward pass.

        Args:
            img: ``(B, C, H, W)`` normalised clean images (the target).
            spatial_mask: ``(B, N)`` patch mask, 1 = masked.
            freq_mask: ``(B, H, W)`` or ``(B, 1, H, W)`` band-stop masks (unshifted layout), or None.

        Returns:
            ``(loss, pred, parts)``: scalar loss, reconstruction ``(B, C, H, W)`` and the detached loss
            parts ``{"spatial", "freq"}``.
        """
        if spatial_mask is None:
            raise ConfigError("UsfmMim.forward needs a spatial mask (B, N); build it with MimTransform")
        B, _, H, W = img.shape
        x, m_pix = self.corrupt(img, spatial_mask, freq_mask)
        token_mask = spatial_mask.reshape(B, -1) if self.cfg.mask_token else None
        z = self.encoder.forward_features(x.to(img.dtype), mask=token_mask)[:, 1:]
        z = z.transpose(1, 2).reshape(B, -1, H // self.patch_size, W // self.patch_size)
        pred = self.decoder(z).float()
        target = patch_normalize(img.float(), self.patch_size) if self.cfg.norm_target else img.float()
        loss_spa = masked_l1(pred, target, m_pix)
        if self.cfg.lambda_freq > 0:
            loss_freq = fourier_loss(pred, target, self.cfg.freq_loss)
        else:
            loss_freq = torch.zeros((), device=img.device)
        loss = loss_spa + self.cfg.lambda_freq * loss_freq
        return loss, pred, {"spatial": loss_spa.detach(), "freq": loss_freq.detach()}


def build_mim(preset: str, img_size: int | None = None, cfg: MimConfig | None = None,
              drop_path_rate: float = 0.0, init: str | None = None) -> UsfmMim:
    """Create a USFM preset wrapped for pretraining.

    Args:
        preset: backbone preset name (``usfm_edge.models.list_models()``).
        img_size: input side (default: the preset's).
        cfg: masking/loss settings.
        drop_path_rate: stochastic depth of the encoder (SimMIM ViT-B: 0.1).
        init: optional checkpoint to start the encoder from (official ``USFM_latest.pth``, SimMIM-style,
            a usfm-edge ``.safetensors`` or one of our training checkpoints), loaded strictly.
    """
    from usfm_edge.models.registry import create_model

    encoder = create_model(preset, checkpoint=init, img_size=img_size, drop_path_rate=drop_path_rate)
    model = UsfmMim(encoder, cfg)
    model.preset = preset
    return model
