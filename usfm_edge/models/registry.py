"""Model registry: ``create_model`` / ``list_models`` over the presets of ``usfm_edge.models.vit``."""

from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path

from usfm_edge.core.errors import ConfigError
from usfm_edge.models.vit import PRESETS, UsfmViT


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered presets matching a shell-style pattern."""
    return sorted(n for n in PRESETS if fnmatch.fnmatch(n, pattern))


def sizes() -> dict[str, str]:
    """The ViT-B/16-family presets by size: ``{"tiny": "usfm_vit_tiny_patch16_224", "small": ..., "base": ...}``."""
    names = list_models("usfm_vit_*_patch16_224")
    order = {"tiny": 0, "small": 1, "base": 2}
    return {n.split("_")[2]: n for n in sorted(names, key=lambda n: order.get(n.split("_")[2], 9))}


def model_args(name: str, **overrides) -> dict:
    """The full constructor arguments of a preset, with overrides applied."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(list_models())}"
        raise ConfigError(f"unknown model '{name}': {hint}")
    args = dict(img_size=224, patch_size=16, in_chans=3, mlp_ratio=4.0, qkv_bias=True, init_values=0.1)
    args.update(PRESETS[name])
    args.update({k: v for k, v in overrides.items() if v is not None})
    return args


def create_model(name: str, checkpoint: str | Path | None = None, img_size: int | None = None, **kwargs) -> UsfmViT:
    """Build a USFM backbone preset, optionally loading weights strictly.

    Args:
        name: a preset from ``list_models()`` (e.g. ``usfm_vit_base_patch16_224``).
        checkpoint: official ``USFM_latest.pth``, a SimMIM-style ``{"model": {"encoder.*"}}`` file, or a
            usfm-edge ``.safetensors``; loaded through ``checkpoint_filter_fn`` then strictly.
        img_size: input side (multiple of 16); the relative position table is resized to match.
        **kwargs: other constructor overrides (``drop_path_rate``, ``num_classes``, ``global_pool``...).

    Returns:
        The model; the load report (if any) is attached as ``model.load_report``.
    """
    model = UsfmViT(**model_args(name, img_size=img_size, **kwargs))
    model.preset = name
    model.load_report = None
    if checkpoint is not None:
        from usfm_edge.models.checkpoint import load_into

        model.load_report = load_into(model, checkpoint)
    return model
