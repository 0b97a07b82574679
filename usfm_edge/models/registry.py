"""Model registry: ``create_model`` / ``list_models`` over the presets of ``usfm_edge.models.vit``, the preset of a
foreign checkpoint (:func:`infer_preset`) and ``convert_weights`` (any checkpoint -> usfm-edge ``.safetensors``).

It builds on ``models.checkpoint`` (reading, filtering, strict loading), which never imports this module.
"""

from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path

from usfm_edge.core.errors import CheckpointError, ConfigError
from usfm_edge.models.checkpoint import LoadReport, load_into, read_checkpoint, save_checkpoint, unwrap_state_dict
from usfm_edge.models.vit import PRESETS, UsfmViT

__all__ = ["list_models", "sizes", "model_args", "create_model", "infer_preset", "convert_weights"]

#: embedding width -> the preset of that width (how foreign backbone checkpoints are recognised)
_BY_WIDTH = {768: "usfm_vit_base_patch16_224", 384: "usfm_vit_small_patch16_224", 192: "usfm_vit_tiny_patch16_224",
             64: "usfm_vit_test"}


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
        model.load_report = load_into(model, checkpoint)
    return model


def infer_preset(state_dict: dict) -> str | None:
    """The preset of a backbone state dict (official, SimMIM or usfm-edge layout) from its embedding width, or None."""
    w = unwrap_state_dict(state_dict)[0].get("patch_embed.proj.weight")
    return None if w is None else _BY_WIDTH.get(int(w.shape[0]))


def convert_weights(src: str | Path, dst: str | Path, model_name: str | None = None, half: bool = False) -> LoadReport:
    """Convert any supported checkpoint to a usfm-edge ``.safetensors`` file (verified by a strict load).

    The preset is inferred from the embedding width when ``model_name`` is not given.

    Raises:
        ConfigError: ``dst`` does not end in ``.safetensors``.
        CheckpointError: not a USFM/ViT checkpoint, or no preset of its width.
    """
    if Path(dst).suffix != ".safetensors":
        raise ConfigError(f"output must end in .safetensors, got '{Path(dst).name}'")
    raw, config = read_checkpoint(src)
    if config is not None and model_name is None:
        model_name = config.get("model")
    if model_name is None:
        w = unwrap_state_dict(raw)[0].get("patch_embed.proj.weight")
        if w is None:
            raise CheckpointError("no 'patch_embed.proj.weight' found: not a USFM/ViT checkpoint", path=src)
        model_name = infer_preset(raw)
        if model_name is None:
            raise CheckpointError(f"no preset has embedding width {w.shape[0]}", path=src, hint="pass --model")
    model = create_model(model_name)
    report = load_into(model, src)
    save_checkpoint(dst, model.state_dict(), {"model": model_name, "model_args": model_args(model_name),
                                              "task": "backbone", "source": Path(src).name}, half=half)
    return report
