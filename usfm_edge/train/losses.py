"""Fine-tuning losses: soft Dice, and ``TaskLoss``, which wraps a ``TaskModel`` into the engine's
``forward(x, y) -> (loss, output, parts)`` contract (seg: cross-entropy + soft Dice, plus the auxiliary head's;
cls: cross-entropy with label smoothing; enhance: L1 to the clean frame).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["soft_dice_loss", "TaskLoss"]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (background excluded), computed over the batch."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1 - ((2 * inter + eps) / (denom + eps))[1:].mean()


class TaskLoss(nn.Module):
    """Wraps a TaskModel so that ``forward(x, y) -> (loss, output, parts)`` (the engine's contract)."""

    def __init__(self, model: nn.Module, task: str, label_smoothing: float = 0.1, dice_weight: float = 1.0):
        super().__init__()
        self.model, self.task = model, task
        self.label_smoothing, self.dice_weight = label_smoothing, dice_weight

    def _seg(self, logits, y):
        ce = F.cross_entropy(logits.float(), y)
        dice = soft_dice_loss(logits, y)
        return ce + self.dice_weight * dice, ce, dice

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        if self.task == "seg":
            outs = self.model.forward_train(x, aux=self.model.aux_weight > 0)
            loss, ce, dice = self._seg(outs["out"], y)
            parts = {"ce": ce.detach(), "dice": dice.detach()}
            if "aux" in outs:
                aux, _, _ = self._seg(outs["aux"], y)
                loss = loss + self.model.aux_weight * aux
                parts["aux"] = aux.detach()
            return loss, outs["out"], parts
        out = self.model(x)
        if self.task == "cls":
            loss = F.cross_entropy(out.float(), y, label_smoothing=self.label_smoothing)
            return loss, out, {"ce": loss.detach()}
        loss = F.l1_loss(out.float(), y)
        return loss, out, {"l1": loss.detach()}
