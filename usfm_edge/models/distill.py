"""Knowledge distillation into an edge student: the losses, the projections and the two trainable wrappers.

Two modes (``usfm_edge.train.distill`` picks one from the teacher checkpoint):

* **Feature distillation** (:class:`FeatureDistiller`, unlabelled frames): the student backbone matches the
  teacher's block maps at ``layers`` evenly spaced depths (``evenly_spaced_blocks``: blocks 2, 5, 8, 11 of a
  12-block ViT; 0-3 of a 4-block one). Each student map (B, d, h, w) passes a learned ``Linear(d -> D)``
  (:class:`FeatureProjector`; dropped after training, so the student keeps its own width); the target is the
  teacher map, layer-normalised over channels without affine weights (every block and every teacher then has
  unit scale, so no block dominates and ViT-B's large-norm late blocks need no weighting). A teacher map on
  another grid (other patch size or input size) is resized to the student's grid (:func:`resize_map`: area
  averaging when it shrinks, bilinear when it grows); the teacher sees the student's frame resized to its own
  input size. Loss per block:
  smooth-L1 (``feature_loss="smooth_l1"``, beta 1) or ``1 - cosine`` over channels (``"cosine"``), averaged
  over **all** tokens and the blocks.

  **Masked student input, in the spirit of TinyUSFM**: the teacher sees the clean frame; the student sees it
  with SimMIM blocks of ``mask_patch_size`` pixels (``mask_ratio`` of them, drawn by the data workers with
  ``train.masking.SpatialMaskGenerator``) filled with the frame's per-channel mean (MIM's ``mean_pad``).
  Since the loss covers every token, the student must both reproduce the teacher on visible patches and
  infer it under the masks, which regularises a small student on a small data set (and needs no mask token,
  so any backbone's ``forward_intermediates`` serves). ``mask_ratio=0`` gives plain feature matching.

* **Task distillation** (:class:`TaskDistiller`, seg teacher): the student task model (any preset and head)
  learns from ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T))`` per pixel (Hinton's soft targets, at the
  student's output size). The teacher sees the student's (augmented, unmasked) frame, resized bilinearly to its
  own input size when that differs, and its logits are resized back. Plus
  ``(1 - alpha) *`` the usual supervised seg loss (cross-entropy + soft Dice, and the head's deep-supervision
  term) on the samples that carry labels (target ``-1`` = unlabelled: soft targets only), plus optionally
  ``feature_weight *`` the feature term on the backbones (student input unmasked in this mode).

The teacher is frozen (``requires_grad=False``), always in eval mode (``train()`` never reaches it) and held
**outside the module tree**: it is not in ``state_dict`` (training checkpoints stay student-sized), not in the
optimiser, and not wrapped by DDP. Move it with :meth:`move_teacher`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from usfm_edge.core.errors import ConfigError

__all__ = ["DistillLossConfig", "FEATURE_LOSSES", "evenly_spaced_blocks", "mean_fill", "resize_map", "FeatureProjector",
           "FeatureDistiller", "TaskDistiller", "freeze_unused"]

FEATURE_LOSSES = ("smooth_l1", "cosine")


@dataclass
class DistillLossConfig:
    """What the student learns from (the objective; the reasons are in the module docstring).

    Attributes:
        layers: how many evenly spaced blocks of each backbone are matched (4).
        feature_loss: ``smooth_l1`` or ``cosine`` on layer-normalised teacher tokens.
        feature_weight: weight of the feature term; None = 1 in feature mode (the whole loss), 0 (off) in task
            mode.
        mask_ratio: fraction of ``mask_patch_size`` blocks mean-filled in the student's input (feature mode;
            0 = no masking). TinyUSFM-style masked consistency; 0.4 keeps most context for a small student.
        mask_patch_size: side of a masked block in pixels (a multiple of the student's patch size).
        alpha: task mode: weight of the soft-target term; ``1 - alpha`` weighs the supervised loss.
        temperature: task mode: softmax temperature of both logits (the KL is scaled by ``T^2``).
        dice_weight: task mode: weight of the soft Dice inside the supervised loss (as fine-tuning).
    """

    layers: int = 4
    feature_loss: str = "smooth_l1"
    feature_weight: float | None = None
    mask_ratio: float = 0.4
    mask_patch_size: int = 16
    alpha: float = 0.5
    temperature: float = 2.0
    dice_weight: float = 1.0

    def __post_init__(self):
        if self.feature_loss not in FEATURE_LOSSES:
            raise ConfigError(f"feature_loss must be one of {', '.join(FEATURE_LOSSES)}, got {self.feature_loss!r}")
        if self.layers < 1:
            raise ConfigError(f"layers must be >= 1, got {self.layers}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if (self.feature_weight or 0) < 0 or self.dice_weight < 0:
            raise ConfigError("feature_weight and dice_weight must be >= 0")


def evenly_spaced_blocks(depth: int, n: int) -> tuple[int, ...]:
    """``n`` block indices spread evenly over ``depth`` blocks, the last block included (12, 4 -> 2, 5, 8, 11)."""
    if n > depth:
        raise ConfigError(f"cannot match {n} blocks of a {depth}-block backbone", hint=f"use --layers {depth} or less")
    return tuple(round((i + 1) * depth / n) - 1 for i in range(n))


def mean_fill(x: torch.Tensor, patch_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Fill the masked patches of ``x`` (B, C, H, W) with each image's per-channel mean.

    ``patch_mask``: (B, N) or (B, h, w) on the ``patch_size`` grid, 1 = masked.
    """
    B, _, H, W = x.shape
    m = patch_mask.reshape(B, 1, H // patch_size, W // patch_size).to(x.dtype)
    m = m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    return x * (1 - m) + x.mean(dim=(2, 3), keepdim=True) * m


def resize_map(t: torch.Tensor, size) -> torch.Tensor:
    """A teacher map (B, D, h, w) on the student's grid: area averaging where it shrinks (each student token
    gets the mean of the teacher tokens it covers, no aliasing), bilinear where it grows."""
    size = tuple(int(v) for v in size)
    if tuple(t.shape[-2:]) == size:
        return t
    if t.shape[-2] >= size[0] and t.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(t, size)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)


class FeatureProjector(nn.Module):
    """One ``Linear(student_dim -> teacher_dim)`` per matched block, and the feature loss.

    ``forward(student_maps, teacher_maps)`` -> scalar: the mean over blocks of the per-token loss between the
    projected student map and the layer-normalised teacher map (resized to the student grid when needed).
    """

    def __init__(self, student_dim: int, teacher_dim: int, layers: int, loss: str = "smooth_l1"):
        super().__init__()
        if loss not in FEATURE_LOSSES:
            raise ConfigError(f"feature_loss must be one of {', '.join(FEATURE_LOSSES)}, got {loss!r}")
        self.proj = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in range(layers))
        self.loss, self.teacher_dim = loss, teacher_dim

    def forward(self, student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(student_maps) != len(self.proj) or len(teacher_maps) != len(self.proj):
            raise ValueError(f"expected {len(self.proj)} maps each, got {len(student_maps)} and {len(teacher_maps)}")
        total = 0.0
        for proj, s, t in zip(self.proj, student_maps, teacher_maps):
            t = t.detach().float()
            t = resize_map(t, s.shape[-2:])
            t = F.layer_norm(t.flatten(2).transpose(1, 2), (self.teacher_dim,))  # (B, N, D), unit scale
            p = proj(s.flatten(2).transpose(1, 2)).float()
            if self.loss == "cosine":
                total = total + (1 - F.cosine_similarity(p, t, dim=-1)).mean()
            else:
                total = total + F.smooth_l1_loss(p, t)
        return total / len(self.proj)


def freeze_unused(module: nn.Module, run) -> list[str]:
    """Freeze the parameters of ``module`` that ``run()`` (a forward returning a scalar) gives no gradient:
    DDP needs every trainable parameter to take part (e.g. the backbone's final norm and mask token, unused by
    ``forward_intermediates``). Works for any backbone family. Returns the frozen names."""
    loss = run()
    loss.backward()
    frozen = []
    for name, p in module.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            frozen.append(name)
        p.grad = None
    return frozen


class _Frozen:
    """The teacher, outside the student's module tree (see the module docstring)."""

    def __init__(self, teacher: nn.Module):
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.module = teacher


class _Distiller(nn.Module):
    def __init__(self, teacher: nn.Module):
        super().__init__()
        self._frozen = _Frozen(teacher)

    @property
    def teacher(self) -> nn.Module:
        return self._frozen.module

    def move_teacher(self, device) -> None:
        self._frozen.module.to(device)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # never leaves eval mode: no dropout, BatchNorm statistics untouched
        return self

    def _teacher_input(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False).to(x.dtype)


def _side(module: nn.Module) -> int:
    size = module.img_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class FeatureDistiller(_Distiller):
    """Student backbone + projections, trained to match a frozen teacher backbone (feature mode).

    ``forward(img, patch_mask, freq_mask=None) -> (loss, last student map, {"feat": loss})``, the engine's
    contract; ``img`` is the clean normalised frame, ``patch_mask`` (B, N) the student's masked patches
    (``freq_mask``, produced by the shared MIM data pipeline, is ignored). State dict: ``student.*`` (loads
    into ``create_model(preset)`` once the prefix is stripped) and ``projector.*``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillLossConfig | None = None):
        super().__init__(teacher)
        self.cfg = cfg or DistillLossConfig()
        self.student = student
        self.student_blocks = evenly_spaced_blocks(student.depth, self.cfg.layers)
        self.teacher_blocks = evenly_spaced_blocks(teacher.depth, self.cfg.layers)
        self.projector = FeatureProjector(student.embed_dim, teacher.embed_dim, self.cfg.layers, self.cfg.feature_loss)
        self.patch_size = int(student.patch_size)

    def freeze_unused(self) -> list[str]:
        side = _side(self.student)
        x = torch.zeros(1, self.student.in_chans, side, side)
        maps = self.student.forward_intermediates(x, indices=self.student_blocks)
        return freeze_unused(self.student, lambda: sum(m.sum() for m in maps))

    def forward(self, img: torch.Tensor, patch_mask: torch.Tensor | None = None, freq_mask=None):
        x = img if patch_mask is None or self.cfg.mask_ratio == 0 else mean_fill(img, patch_mask, self.patch_size)
        s_maps = self.student.forward_intermediates(x, indices=self.student_blocks)
        with torch.no_grad():
            t_maps = self.teacher.forward_intermediates(self._teacher_input(img, _side(self.teacher)),
                                                        indices=self.teacher_blocks)
        weight = 1.0 if self.cfg.feature_weight is None else self.cfg.feature_weight
        loss = weight * self.projector(s_maps, t_maps)
        return loss, s_maps[-1], {"feat": loss.detach()}

    def no_weight_decay(self) -> set[str]:
        return {f"student.{n}" for n in self.student.no_weight_decay()}


def _seg_supervised(logits: torch.Tensor, y: torch.Tensor, dice_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy + soft Dice (foreground classes) over the labelled pixels (``y >= 0``); 0 when none are,
    with the graph kept (DDP needs every parameter in every step)."""
    logits = logits.float()
    valid = (y >= 0)
    n = valid.sum().clamp_min(1)
    ce = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
    ce = (ce * valid).sum() / n
    probs = logits.softmax(1) * valid[:, None]
    onehot = F.one_hot(y.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid[:, None]
    inter, denom = (probs * onehot).sum((0, 2, 3)), probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = 1 - ((2 * inter + 1.0) / (denom + 1.0))[1:].mean()
    dice = dice * (valid.any().to(dice.dtype))
    return ce + dice_weight * dice, ce, dice


class TaskDistiller(_Distiller):
    """Student task model (+ projections when ``feature_weight > 0``) trained on a frozen seg teacher.

    ``forward(x, y) -> (loss, student logits, parts)``: ``x`` normalised frames at the student's size, ``y``
    (B, S, S) class maps with ``-1`` where a sample has no label. Parts: ``kd``, ``sup`` (ce + dice), ``ce``,
    ``dice``, ``aux`` (deep supervision, when the head has it) and ``feat``. State dict: ``student.*`` (a
    ``TaskModel``) and ``projector.*``.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillLossConfig | None = None):
        super().__init__(teacher)
        self.cfg = cfg or DistillLossConfig()
        if student.task != "seg" or teacher.task != "seg":
            raise ConfigError(f"task distillation needs seg models, got student {student.task!r}, teacher "
                              f"{teacher.task!r}")
        if student.num_classes != teacher.num_classes:
            raise ConfigError(f"the student has {student.num_classes} classes, the teacher {teacher.num_classes}")
        self.student = student
        self.projector = None
        self.feature_weight = self.cfg.feature_weight or 0.0
        if self.feature_weight > 0:
            self.student_blocks = evenly_spaced_blocks(student.backbone.depth, self.cfg.layers)
            self.teacher_blocks = evenly_spaced_blocks(teacher.backbone.depth, self.cfg.layers)
            self.projector = FeatureProjector(student.backbone.embed_dim, teacher.backbone.embed_dim,
                                              self.cfg.layers, self.cfg.feature_loss)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        cfg, student = self.cfg, self.student
        outs = student.forward_train(x, aux=student.aux_weight > 0)
        logits = outs["out"]
        with torch.no_grad():
            xt = self._teacher_input(x, self.teacher.img_size)
            t_logits = self.teacher(xt).float()
            if t_logits.shape[-2:] != logits.shape[-2:]:
                t_logits = F.interpolate(t_logits, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        T = cfg.temperature
        log_p = F.log_softmax(logits.float() / T, dim=1)
        q = F.softmax(t_logits / T, dim=1)
        kd = (q * (torch.log(q.clamp_min(1e-8)) - log_p)).sum(1).mean() * T * T
        sup, ce, dice = _seg_supervised(logits, y, cfg.dice_weight)
        parts = {"kd": kd.detach(), "sup": sup.detach(), "ce": ce.detach(), "dice": dice.detach()}
        if "aux" in outs:
            aux, _, _ = _seg_supervised(outs["aux"], y, cfg.dice_weight)
            sup = sup + student.aux_weight * aux
            parts["aux"] = aux.detach()
        loss = cfg.alpha * kd + (1 - cfg.alpha) * sup
        if self.projector is not None:
            s_maps = student.backbone.forward_intermediates(x, indices=self.student_blocks)
            with torch.no_grad():
                t_maps = self.teacher.backbone.forward_intermediates(xt, indices=self.teacher_blocks)
            feat = self.projector(s_maps, t_maps)
            loss = loss + self.feature_weight * feat
            parts["feat"] = feat.detach()
        return loss, logits, parts

    def no_weight_decay(self) -> set[str]:
        return {f"student.{n}" for n in self.student.no_weight_decay()}
