"""The distillation teacher: read a checkpoint with the project's readers, decide the mode (a backbone ->
feature distillation, a fine-tuned seg model -> task distillation) and freeze it (``load_teacher``, re-exported
from ``train.distill``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from usfm_edge.core.errors import ConfigError

__all__ = ["load_teacher"]


def load_teacher(path: str | Path, mode: str = "auto") -> tuple[str, torch.nn.Module, dict]:
    """Read the teacher and decide the mode -> ``(mode, frozen teacher in eval mode, its checkpoint config)``.

    The teacher is a backbone (feature mode) or a ``TaskModel`` (task mode).

    Raises:
        CheckpointError: not a checkpoint, unreadable, unsafe, or an unknown architecture (names the file).
        ConfigError: the checkpoint does not fit the mode (a cls/enhance teacher, a backbone with mode task).
    """
    from usfm_edge.models.checkpoint import read_checkpoint
    from usfm_edge.models.tasks import load_task_model

    path = Path(path)
    sd, meta = read_checkpoint(path)
    task = meta.get("task") if isinstance(meta, dict) else None
    if task in (None, "backbone", "features"):
        if mode == "task":
            raise ConfigError("task distillation needs a fine-tuned seg teacher; this is a backbone checkpoint",
                              path=path, hint="drop --mode task (feature distillation) or pass a seg task "
                                              "checkpoint such as a finetune run's best.safetensors")
        teacher = load_task_model(path).backbone if task == "features" else _backbone(path, sd, meta)
        resolved = "features"
    elif task == "seg" and mode in ("auto", "task"):
        teacher, resolved = load_task_model(path), "task"
    elif mode == "features":
        teacher, resolved = load_task_model(path).backbone, "features"
    else:
        raise ConfigError(f"a {task!r} teacher cannot teach segmentation: task distillation takes seg teachers",
                          path=path, hint="pass --mode features to distil its backbone, or a seg task checkpoint")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return resolved, teacher, meta or {}


def _backbone(path: Path, sd: dict, meta: dict | None) -> torch.nn.Module:
    """A backbone teacher: its preset from the checkpoint config or the embedding width, loaded strictly."""
    from usfm_edge.core.errors import CheckpointError
    from usfm_edge.models.registry import create_model, infer_preset

    preset = meta.get("model") if isinstance(meta, dict) else None
    preset = preset or infer_preset(sd)
    if preset is None:
        raise CheckpointError("cannot tell the teacher's architecture (no usfm-edge config, no known width)",
                              path=path, hint="convert it first: usfm-edge convert-weights FILE -o teacher.safetensors "
                                              "--model PRESET")
    size = ((meta or {}).get("model_args") or {}).get("img_size")
    return create_model(preset, checkpoint=path, img_size=size)
