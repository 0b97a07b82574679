"""AdamW parameter groups (no decay on 1-D params and named tokens, optional layer-wise lr decay) and the
per-step warm-up + half-cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["scaled_lr", "param_groups", "build_optimizer", "cosine_lr", "budget_cosine_lr", "set_lr"]


def scaled_lr(base_lr: float, total_batch: int) -> float:
    """Linear scaling rule: ``base_lr * total_batch / 256`` (total = micro-batch x accumulation x ranks)."""
    return base_lr * total_batch / 256


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 lr: float | None = None) -> list[dict]:
    """Split trainable parameters into AdamW groups (pretraining, and fine-tuning with layer-wise lr decay).

    No weight decay for 1-D parameters (biases, norms, layer scale ``gamma_*``), ``.bias`` and the names in
    ``model.no_weight_decay()`` (cls/mask tokens, relative position table). Frozen parameters are left out.
    With ``layer_decay`` (fine-tuning, the BEiT / USFM recipe: 0.65; 1.0 keeps the groups but no decay), a
    parameter of layer id ``i`` (``model.group_matcher``: 0 = embeddings, 1..depth = blocks, depth + 1 = final
    norm and heads) gets ``lr_scale = layer_decay ** (depth + 1 - i)``; heads train at the full lr.

    Args:
        model: anything with ``named_parameters`` (and ``depth``, ``group_matcher``, ``no_weight_decay`` for
            layer decay: ``UsfmViT``, ``TaskModel``, the MIM wrapper).
        weight_decay: decay of the other parameters.
        layer_decay: per-layer lr factor, or None (one layer).
        lr: base lr; when given each group also gets ``lr = lr * lr_scale``.

    Returns:
        Groups with keys ``params``, ``names`` (for inspection), ``weight_decay``, ``lr_scale``, ``layer_id``
        (and ``lr``).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    num_layers = None
    if layer_decay is not None:
        if not hasattr(model, "group_matcher"):
            raise TypeError(f"{type(model).__name__} has no group_matcher(name); layer-wise lr decay needs one")
        depth = getattr(model, "depth", None) or model.encoder.depth
        num_layers = depth + 2
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip or name.endswith(".bias")
        layer = model.group_matcher(name) if num_layers else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers - 1 - layer) if num_layers else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale, "layer_id": layer}
            if lr is not None:
                groups[key]["lr"] = lr * scale
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (SimMIM: betas (0.9, 0.999), eps 1e-8)."""
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up from 0, then half-cosine to ``min_lr``.

    ``min_lr`` is capped at ``peak_lr``; steps past ``total_steps`` stay at ``min_lr``.
    """
    min_lr = min(min_lr, peak_lr)
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def budget_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float,
                     time_fraction: float = 0.0) -> float:
    """:func:`cosine_lr` whose progress is the larger of the step fraction and ``time_fraction``.

    With a wall-clock budget (``--time-limit-min``) ``time_fraction`` is the share of the budget spent, so the
    half-cosine reaches ``min_lr`` when the budget ends, however many steps that turns out to be, instead of
    being cut off high by the time limit. Warm-up stays in steps.
    """
    min_lr = min(min_lr, peak_lr)
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max((step - warmup_steps) / span, float(time_fraction), 0.0), 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group['lr_scale']`` (1 when absent)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
