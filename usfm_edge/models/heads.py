"""Task heads for the USFM backbone, in plain torch (no mmcv / mmseg), all exportable to ONNX.

=======================  =========  =========================================================================
head                     task       input -> output
=======================  =========  =========================================================================
``UperNetHead``          seg        4 block maps (stride 16) -> BEiT necks (strides 4/8/16/32) -> PPM + FPN
                                    -> logits at stride 4 (USFM's UperNet recipe, dossier §1.4 and §3.1)
``AuxFCNHead``           seg        the stride-16 level -> logits (training only, loss weight 0.4)
``ProgressiveUpsampleHead``  seg    last block map -> (conv3x3 + BN + GELU + 2x upsample) x n -> logits
                                    ("light": a few % of UperNet's FLOPs, for small devices)
``HiResFusionHead``      seg        4 block maps (stride 16) fused + a conv stem on the input (strides 2/4/8)
                                    -> U-Net decoder -> logits at stride 2 ("hires": boundary-precise)
``HybridUNetHead``       seg        a full conv U-Net on the input (strides 1-16) whose bottleneck adds the
                                    4 fused block maps -> logits at stride 1 ("hybrid")
``ClsHead``              cls        last block map -> mean of patch tokens -> ``fc_norm`` -> Linear
``EnhanceHead``          enhance    last block map (final norm) -> 1x1 conv + PixelShuffle, fused with the
                                    grey input by a light full-resolution conv -> residual -> [0, 1] image
=======================  =========  =========================================================================

Normalisation layers are ``BatchNorm2d``. For multi-GPU training wrap the model with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before DDP (USFM trains with SyncBN); the converted
module has the same state-dict keys, so checkpoints and export are unaffected. BatchNorm in training mode needs
more than one value per channel: the PPM's 1x1 branch therefore needs a batch of at least 2.

ONNX: ``nn.AdaptiveAvgPool2d`` only exports when the input size is divisible by the output size, which a
7x7 map (224 px / 32) pooled to 2, 3 or 6 is not. :class:`AreaPool` computes the same adaptive average
pooling as two MatMuls with pooling matrices built from the static feature size (bins
``[floor(i*H/s), ceil((i+1)*H/s))``, exactly torch's), which every backend (ONNX Runtime, OpenVINO,
TensorRT) runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AreaPool", "UperNetHead", "AuxFCNHead", "ProgressiveUpsampleHead", "HiResFusionHead", "HybridUNetHead", "ConvStem",
           "ClsHead", "EnhanceHead", "conv_bn_act", "adaptive_pool_matrix"]


def conv_bn_act(in_ch: int, out_ch: int, kernel_size: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Conv (no bias) + BatchNorm2d + activation, the mmseg ``ConvModule`` default."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_ch), act())


@lru_cache(maxsize=64)
def _pool_weights(in_size: int, out_size: int) -> tuple[tuple[float, ...], ...]:
    # cached as plain floats, never as tensors: a tensor cached while torch.export traces would be fake
    rows = []
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        rows.append(tuple(1.0 / (end - start) if start <= j < end else 0.0 for j in range(in_size)))
    return tuple(rows)


def adaptive_pool_matrix(in_size: int, out_size: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """(out_size, in_size) averaging matrix with the bins of ``nn.AdaptiveAvgPool1d``."""
    return torch.tensor(_pool_weights(int(in_size), int(out_size)), dtype=dtype, device=device)


class AreaPool(nn.Module):
    """Adaptive average pooling to ``output_size`` x ``output_size`` as ``P_h @ x @ P_w^T`` (ONNX-exportable).

    The pooling matrices depend only on the feature size, which is static in an exported graph (the
    model input size is fixed), so they are folded in as constants. Numerically equal to
    ``nn.AdaptiveAvgPool2d(output_size)`` for every input size, including sizes smaller than the output.
    """

    def __init__(self, output_size: int):
        super().__init__()
        self.output_size = int(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # the sizes are meant to be static in a traced graph
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            h, w = int(x.shape[-2]), int(x.shape[-1])
            ph = adaptive_pool_matrix(h, self.output_size, x.dtype, x.device)
            pw = adaptive_pool_matrix(w, self.output_size, x.dtype, x.device)
        return torch.matmul(torch.matmul(ph, x), pw.t())  # (s, H) @ (B, C, H, W) @ (W, s) -> (B, C, s, s)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _init_classifier(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class UperNetHead(nn.Module):
    """UperNet on four ViT block maps, with BEiT's multi-scale necks (USFM's segmentation decoder).

    Args:
        embed_dim: channels of the backbone maps (D).
        num_classes: output channels (background included).
        channels: width of the PPM/FPN (USFM: 768; smaller for the edge presets).
        pool_scales: PPM output sizes.
        dropout: ``Dropout2d`` before the classifier (USFM: 0.1).

    Input: four (B, D, H/16, W/16) maps (blocks ``default_out_indices``, no final norm).
    Output: logits (B, K, H/4, W/4).
    """

    def __init__(self, embed_dim: int, num_classes: int, channels: int = 256,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        d = embed_dim
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(d, d, 2, stride=2), nn.BatchNorm2d(d), nn.GELU(),
                                  nn.ConvTranspose2d(d, d, 2, stride=2))  # stride 4
        self.fpn2 = nn.ConvTranspose2d(d, d, 2, stride=2)  # stride 8
        self.fpn3 = nn.Identity()  # stride 16
        self.fpn4 = nn.MaxPool2d(2)  # stride 32
        self.ppm = nn.ModuleList(nn.Sequential(AreaPool(s), conv_bn_act(d, channels, 1)) for s in pool_scales)
        self.ppm_bottleneck = conv_bn_act(d + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_act(d, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_bn_act(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_act(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls_seg = _init_classifier(nn.Conv2d(channels, num_classes, 1))

    def necks(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Four stride-16 maps -> maps at strides 4, 8, 16, 32."""
        if len(feats) != 4:
            raise ValueError(f"UperNetHead needs 4 block maps, got {len(feats)}")
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]

    def _ppm(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return self.ppm_bottleneck(torch.cat([x] + [_resize(branch(x), size) for branch in self.ppm], dim=1))

    def forward(self, feats: Sequence[torch.Tensor], pyramid: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits at stride 4. ``pyramid``: the output of :meth:`necks` if already computed."""
        levels = self.necks(feats) if pyramid is None else list(pyramid)
        lat = [conv(f) for conv, f in zip(self.lateral_convs, levels[:3])] + [self._ppm(levels[3])]
        for i in range(3, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(f) for conv, f in zip(self.fpn_convs, lat[:3])] + [lat[3]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))
        return self.cls_seg(self.dropout(fused))


class AuxFCNHead(nn.Module):
    """mmseg-style auxiliary FCN head (one conv3x3 + BN + ReLU, dropout, 1x1 classifier) for deep supervision.

    USFM applies it to the third pyramid level (stride 16) with 256 channels and loss weight 0.4.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_act(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls_seg = _init_classifier(nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.dropout(self.conv(x)))


class ProgressiveUpsampleHead(nn.Module):
    """Light segmentation head: last block map -> n x (conv3x3 + BN + GELU + 2x bilinear upsample) -> logits.

    Args:
        embed_dim: channels of the backbone map.
        num_classes: output channels (background included).
        channels: width of each stage; ``len(channels)`` stages take stride 16 to ``16 / 2**n``.
        dropout: ``Dropout2d`` before the classifier.
    """

    def __init__(self, embed_dim: int, num_classes: int, channels: Sequence[int] = (128, 64), dropout: float = 0.1):
        super().__init__()
        widths = [embed_dim, *channels]
        self.stages = nn.ModuleList(conv_bn_act(widths[i], widths[i + 1], 3, nn.GELU) for i in range(len(channels)))
        self.dropout = nn.Dropout2d(dropout)
        self.cls_seg = _init_classifier(nn.Conv2d(widths[-1], num_classes, 1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``feats``: a list whose last element is (B, D, H/16, W/16); returns logits (B, K, H/s, W/s)."""
        x = feats[-1]
        for stage in self.stages:
            x = stage(x)
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.cls_seg(self.dropout(x))


class ClsHead(nn.Module):
    """USFM's classification head: mean of the patch tokens (cls excluded) -> ``fc_norm`` -> Linear.

    As in the official config (``use_mean_pooling: true``) the tokens are taken *before* the backbone's final
    ``norm``; ``fc_norm`` (LayerNorm eps 1e-6) replaces it. The Linear layer starts small (trunc-normal std
    0.02 scaled by ``init_scale`` = 0.001, BEiT/USFM) so fine-tuning starts near uniform logits.
    """

    def __init__(self, embed_dim: int, num_classes: int, dropout: float = 0.0, init_scale: float = 0.001):
        super().__init__()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        with torch.no_grad():
            self.fc.weight.mul_(init_scale)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """``feats``: a list whose last element is the last block map (B, D, h, w); returns (B, K)."""
        pooled = feats[-1].flatten(2).mean(-1)
        return self.fc(self.dropout(self.fc_norm(pooled)))


class EnhanceHead(nn.Module):
    """Dense image-to-image head: restored grey image in [0, 1] from the last block map and the input.

    ``decoder``: SimMIM's decoder shape, a 1x1 conv to ``patch**2 * hidden`` channels + PixelShuffle(patch),
    gives ``hidden`` full-resolution feature planes. ``refine``: conv3x3 (hidden + 1 -> width) + GELU +
    conv3x3 (width -> 1) on those planes concatenated with the de-normalised grey input predicts a
    residual; the output is ``clamp(grey + residual, 0, 1)``. The last conv starts at zero, so an untrained
    head returns its input unchanged (PSNR of the identity baseline) and training only learns the correction.

    Args:
        embed_dim: channels of the backbone map.
        patch_size: the backbone's patch size (upsampling factor of the PixelShuffle).
        hidden: planes per pixel after the PixelShuffle.
        width: channels of the refinement conv.
        mean, std: the per-channel normalisation of the model input (to recover the grey image).
    """

    def __init__(self, embed_dim: int, patch_size: int = 16, hidden: int = 8, width: int = 16,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        super().__init__()
        self.decoder = nn.Sequential(nn.Conv2d(embed_dim, patch_size ** 2 * hidden, 1), nn.PixelShuffle(patch_size))
        self.refine = nn.Sequential(nn.Conv2d(hidden + 1, width, 3, padding=1), nn.GELU(),
                                    nn.Conv2d(width, 1, 3, padding=1))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def grey(self, x: torch.Tensor) -> torch.Tensor:
        """De-normalised grey image (B, 1, H, W): the mean over channels of ``x * std + mean``."""
        return (x * self.std.to(x.dtype) + self.mean.to(x.dtype)).mean(1, keepdim=True)

    def forward(self, feats: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``feats``: list ending with (B, D, H/p, W/p); ``x``: the normalised input (B, C, H, W)."""
        grey = self.grey(x)
        planes = self.decoder(feats[-1])
        residual = self.refine(torch.cat([planes, grey], dim=1))
        return torch.clamp(grey + residual, 0.0, 1.0)


class ConvStem(nn.Module):
    """Light convolutional branch on the input frame: feature maps at strides 2, 4 and 8.

    Each stage is a stride-2 conv3x3 + BN + ReLU followed by a conv3x3 + BN + ReLU. It sees the pixels the
    16-pixel patch embedding averages away (speckle edges, thin boundaries) and hands them to the decoder.
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (24, 48, 96)):
        super().__init__()
        stages, c = [], in_chans
        for w in widths:
            stages.append(nn.Sequential(
                nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                conv_bn_act(w, w, 3)))
            c = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs  # strides 2, 4, 8


class HiResFusionHead(nn.Module):
    """Segmentation head that resolves boundaries at stride 2: ViT block maps fused with a conv stem.

    The ViT maps (stride 16, from several depths) are each projected by a 1x1 conv and summed into one
    context map. A U-Net-style decoder then upsamples it 2x at a time and, at strides 8, 4 and 2, concatenates
    the :class:`ConvStem` features of the raw input before two conv3x3 + BN + ReLU. The classifier runs at
    stride 2 and the logits are upsampled bilinearly to the input size by the task model. The global context
    comes from the transformer, the edges from the convolutions (the idea of ViT-Adapter's spatial prior and
    SAMUS's CNN branch; written for this project).

    Args:
        embed_dim: channels of the backbone maps.
        num_classes: output channels (background included).
        num_taps: how many block maps are fused (the caller passes exactly these).
        stem: widths of the conv stem at strides 2, 4, 8.
        decoder: widths of the decoder stages at strides 8, 4, 2.
        context: channels of the fused stride-16 map.
        dropout: ``Dropout2d`` before the classifier.

    ``forward(feats, x)`` returns logits (B, K, H/2, W/2); ``forward(..., aux=True)`` also returns logits at
    stride 8 for deep supervision.
    """

    def __init__(self, embed_dim: int, num_classes: int, num_taps: int = 4, stem: Sequence[int] = (24, 48, 96),
                 decoder: Sequence[int] = (96, 64, 32), context: int = 128, dropout: float = 0.1,
                 in_chans: int = 3):
        super().__init__()
        if len(stem) != 3 or len(decoder) != 3:
            raise ValueError("stem and decoder need three widths each (strides 8, 4, 2 for the decoder)")
        self.stem = ConvStem(in_chans, stem)
        self.taps = nn.ModuleList(nn.Conv2d(embed_dim, context, 1) for _ in range(num_taps))
        self.context = nn.Sequential(nn.BatchNorm2d(context), nn.ReLU(inplace=True))
        skips = list(stem)[::-1]  # strides 8, 4, 2
        ins = [context, *decoder[:-1]]
        self.stages = nn.ModuleList(
            nn.Sequential(conv_bn_act(c_in + s, c_out, 3), conv_bn_act(c_out, c_out, 3))
            for c_in, s, c_out in zip(ins, skips, decoder))
        self.dropout = nn.Dropout2d(dropout)
        self.cls_seg = _init_classifier(nn.Conv2d(decoder[-1], num_classes, 1))
        self.cls_aux = _init_classifier(nn.Conv2d(decoder[0], num_classes, 1))

    def forward(self, feats: Sequence[torch.Tensor], x: torch.Tensor, aux: bool = False):
        if len(feats) != len(self.taps):
            raise ValueError(f"HiResFusionHead was built for {len(self.taps)} block maps, got {len(feats)}")
        y = self.context(sum(proj(f) for proj, f in zip(self.taps, feats)))
        skips = self.stem(x)[::-1]
        deep = None
        for i, (stage, skip) in enumerate(zip(self.stages, skips)):
            y = stage(torch.cat([_resize(y, skip.shape[-2:]), skip], dim=1))
            if i == 0:
                deep = y
        logits = self.cls_seg(self.dropout(y))
        return (logits, self.cls_aux(deep)) if aux else logits


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv_bn_act(c_in, c_out, 3), conv_bn_act(c_out, c_out, 3))


class HybridUNetHead(nn.Module):
    """A convolutional U-Net on the input frame whose stride-16 bottleneck receives the ViT's context.

    The conv encoder has ``len(widths)`` levels (two conv3x3 + BN + ReLU each; a 2x2 max-pool before every
    level but the first, so the levels sit at strides 1, 2, 4, 8, 16 for five widths). The ViT block maps
    (stride 16) are each projected by a 1x1 conv to the bottleneck width, summed, batch-normalised and
    **added** to the conv bottleneck; the BN's scale starts at zero, so training starts from a plain U-Net and
    the transformer's global context enters only as far as it helps (a pretrained USFM encoder then adds what
    the small labelled set cannot teach a CNN). The decoder mirrors the encoder with skip concatenation up to
    stride 1. ``aux=True`` also returns logits at stride 8 for deep supervision.

    ``stem_stride=2`` makes the first conv a stride-2 one: no level runs at the full input size and the logits
    come out at half of it (the task model upsamples them bilinearly, like the ``hires`` head's). Four widths
    then put the bottleneck at stride 16. It is the edge students' layout: on a 2-core CPU the full-size level
    of thin (8-channel) maps costs more per multiply-add than any other (memory-bound), for boundaries that the
    bilinear upsampling of the logits resolves almost as well.

    The bottleneck stride must equal the patch size (16) for the two maps to line up; other sizes are
    resampled bilinearly. Why this shape: with a ViT trained on ~1k frames a thin conv stem beside it (the
    ``hires`` head) learned far slower per step than a plain U-Net (benchmarks/RESULTS.md
    §1); here the convolutions carry the boundaries at every scale and the ViT adds context.
    """

    def __init__(self, embed_dim: int, num_classes: int, num_taps: int = 4,
                 widths: Sequence[int] = (16, 32, 64, 128, 256), dropout: float = 0.1, in_chans: int = 3,
                 stem_stride: int = 1):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError("the hybrid head needs at least two encoder widths")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.enc = nn.ModuleList(_double_conv(c_in, c_out) for c_in, c_out in zip((in_chans, *widths[:-1]), widths))
        if stem_stride == 2:  # the first level's first conv halves the frame: no full-resolution level at all
            self.enc[0][0][0].stride = (2, 2)
        self.taps = nn.ModuleList(nn.Conv2d(embed_dim, widths[-1], 1) for _ in range(num_taps))
        self.context_norm = nn.BatchNorm2d(widths[-1])
        nn.init.zeros_(self.context_norm.weight)
        self.fuse = conv_bn_act(widths[-1], widths[-1], 3)
        self.dec = nn.ModuleList(_double_conv(widths[i + 1] + widths[i], widths[i])
                                 for i in reversed(range(len(widths) - 1)))
        self.dropout = nn.Dropout2d(dropout)
        self.cls_seg = _init_classifier(nn.Conv2d(widths[0], num_classes, 1))
        aux_level = max(0, len(widths) - 2)  # the first decoder stage (stride 8 for five levels)
        self.cls_aux = _init_classifier(nn.Conv2d(widths[aux_level], num_classes, 1))

    def forward(self, feats: Sequence[torch.Tensor], x: torch.Tensor, aux: bool = False):
        if len(feats) != len(self.taps):
            raise ValueError(f"HybridUNetHead was built for {len(self.taps)} block maps, got {len(feats)}")
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        y = skips.pop()
        context = self.context_norm(sum(proj(f) for proj, f in zip(self.taps, feats)))
        if context.shape[-2:] != y.shape[-2:]:
            context = _resize(context, y.shape[-2:])
        y = self.fuse(y + context)
        deep = None
        for i, block in enumerate(self.dec):
            skip = skips.pop()
            y = block(torch.cat([_resize(y, skip.shape[-2:]), skip], dim=1))
            if i == 0:
                deep = y
        logits = self.cls_seg(self.dropout(y))
        return (logits, self.cls_aux(deep)) if aux else logits
