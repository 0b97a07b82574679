"""Model registry over the backbone families: ``create_model`` / ``list_models`` / ``model_args`` for the presets of
``usfm_edge.models.vit`` (family ``beit``, USFM) and ``usfm_edge.models.mae_vit`` (family ``mae``, TinyUSFM /
UltraFedFM), the family and preset of a foreign checkpoint (:func:`infer_preset`, from its keys and embedding
width) and ``convert_weights`` (any checkpoint -> usfm-edge ``.safetensors``).

It builds on ``models.checkpoint`` (reading, filtering, strict loading), which never imports this module.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from usfm_edge.core.errors import CheckpointError, ConfigError
from usfm_edge.models import mae_vit, vit
from usfm_edge.models.checkpoint import (
    LoadReport,
    detect_family,
    load_into,
    read_checkpoint,
    save_checkpoint,
    state_dict_keys,
)

__all__ = ["FAMILIES", "WEIGHTS", "list_models", "sizes", "family_of", "model_args", "build_backbone",
           "create_model", "detect_family", "infer_preset", "convert_weights"]


@dataclass(frozen=True)
class Family:
    """One backbone family: its model class, presets and the constructor defaults every preset starts from."""

    name: str
    cls: type[nn.Module]
    presets: dict[str, dict]
    defaults: dict


_COMMON = dict(img_size=224, patch_size=16, in_chans=3, mlp_ratio=4.0, qkv_bias=True)
FAMILIES: dict[str, Family] = {
    "beit": Family("beit", vit.UsfmViT, vit.PRESETS, {**_COMMON, "init_values": 0.1}),
    "mae": Family("mae", mae_vit.MaeViT, mae_vit.PRESETS, dict(_COMMON)),
}

#: published weights each family loads, with their licences (``usfm-edge info`` prints this table)
WEIGHTS: tuple[dict, ...] = (
    dict(name="USFM", family="beit", preset="usfm_vit_base_patch16_224", file="USFM_latest.pth",
         licence="CC-BY-NC 4.0 (non-commercial use only)", source="github.com/openmedlab/USFM"),
    dict(name="TinyUSFM", family="mae", preset="mae_vit_tiny_patch16_224", file="TinyUSFM checkpoint (.pth)",
         licence="Apache-2.0, stated in the repo's readme.md (no LICENSE file found in the repo)",
         source="github.com/MacDunno/TinyUSFM"),
    dict(name="UltraFedFM", family="mae", preset="mae_vit_base_patch16_224", file="UltraFedFM checkpoint (.pth)",
         licence="unconfirmed: Apache-2.0 per issue 21, but no licence file or statement found in the repo, and "
                 "its MAE-derived files carry Meta's header (upstream MAE is CC-BY-NC 4.0)",
         source="github.com/yuncheng97/UltraFedFM"),
)


def _all_presets() -> dict[str, str]:
    return {name: fam.name for fam in FAMILIES.values() for name in fam.presets}


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Names of the registered presets matching a shell-style pattern (of one family, if given)."""
    return sorted(n for n, f in _all_presets().items() if fnmatch.fnmatch(n, pattern) and family in (None, f))


def sizes() -> dict[str, str]:
    """The USFM ViT-B/16-family presets by size: ``{"nano": ..., "micro": ..., "tiny": "usfm_vit_tiny_patch16_224", "small": ..., "base": ...}``."""
    names = list_models("usfm_vit_*_patch16_224")
    order = {"nano": -2, "micro": -1, "tiny": 0, "small": 1, "base": 2}
    return {n.split("_")[2]: n for n in sorted(names, key=lambda n: order.get(n.split("_")[2], 9))}


def family_of(name: str) -> Family:
    """The family a preset belongs to; an unknown name raises ``ConfigError`` with the closest preset."""
    presets = _all_presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(list_models())}"
        raise ConfigError(f"unknown model '{name}': {hint}")
    return FAMILIES[presets[name]]


def model_args(name: str, **overrides) -> dict:
    """The full constructor arguments of a preset, with overrides applied (``None`` values ignored)."""
    fam = family_of(name)
    args = {**fam.defaults, **fam.presets[name]}
    args.update({k: v for k, v in overrides.items() if v is not None})
    return args


def build_backbone(name: str, args: dict | None = None) -> nn.Module:
    """A randomly initialised backbone of preset ``name``'s family from full constructor ``args`` (default: the
    preset's); ``model.preset`` is set. Task models and configs rebuild their backbone through this."""
    model = family_of(name).cls(**(model_args(name) if args is None else args))
    model.preset = name
    return model


def create_model(name: str, checkpoint: str | Path | None = None, img_size: int | None = None, **kwargs) -> nn.Module:
    """Build a backbone preset of either family, optionally loading weights strictly.

    Args:
        name: a preset from ``list_models()`` (``usfm_vit_base_patch16_224``, ``mae_vit_tiny_patch16_224``...).
        checkpoint: a file of the preset's family: official ``USFM_latest.pth`` or a SimMIM-style file (beit),
            an MAE pretraining / timm fine-tune / distilled file (mae), or a usfm-edge ``.safetensors``; loaded
            through the family's filter function then strictly.
        img_size: input side (multiple of 16); the position table (relative or absolute) is resized to match.
        **kwargs: other constructor overrides (``drop_path_rate``, ``num_classes``, ``global_pool``...).

    Returns:
        The model; the load report (if any) is attached as ``model.load_report``.
    """
    model = build_backbone(name, model_args(name, img_size=img_size, **kwargs))
    model.load_report = None
    if checkpoint is not None:
        model.load_report = load_into(model, checkpoint)
        model.load_report.preset = name
    return model


def _patch_width(state_dict: dict) -> int | None:
    inner = next((state_dict[k] for k in ("model", "state_dict", "module", "student")
                  if isinstance(state_dict.get(k), dict)), state_dict)
    w = next((v for k, v in inner.items() if isinstance(v, torch.Tensor) and k.endswith("patch_embed.proj.weight")
              and not k.startswith("teacher.")), None)
    return None if w is None else int(w.shape[0])


def infer_preset(state_dict: dict) -> str | None:
    """The preset of a backbone state dict of either family: the family from its keys (:func:`detect_family`),
    the preset of that family from its embedding width; None if either is unknown."""
    family, width = detect_family(state_dict_keys(state_dict)), _patch_width(state_dict)
    if family is None or width is None:
        return None
    return {p["embed_dim"]: name for name, p in FAMILIES[family].presets.items()}.get(width)


def convert_weights(src: str | Path, dst: str | Path, model_name: str | None = None, half: bool = False) -> LoadReport:
    """Convert any supported checkpoint to a usfm-edge ``.safetensors`` file (verified by a strict load).

    The family is detected from the keys and the preset from the embedding width when ``model_name`` is not
    given; the returned report names both (``report.family``, ``report.preset``). A usfm-edge file of the same
    preset keeps its input size (and its pretraining record), so nothing is resized.

    Raises:
        ConfigError: ``dst`` does not end in ``.safetensors``.
        CheckpointError: not a ViT checkpoint of a known family, no preset of its width, or a strict-load failure.
    """
    if Path(dst).suffix != ".safetensors":
        raise ConfigError(f"output must end in .safetensors, got '{Path(dst).name}'")
    raw, config = read_checkpoint(src)
    if config is not None and model_name is None:
        model_name = config.get("model")
    if model_name is None:
        keys = state_dict_keys(raw)
        if _patch_width(raw) is None:
            raise CheckpointError("no 'patch_embed.proj.weight' found: not a USFM/ViT checkpoint", path=src)
        family = detect_family(keys)
        if family is None:
            raise CheckpointError("cannot tell the backbone family: neither a relative position bias (USFM) nor an "
                                  "absolute pos_embed with qkv bias (MAE/timm ViT)", path=src,
                                  hint=f"pass --model (one of {', '.join(list_models())})")
        model_name = infer_preset(raw)
        if model_name is None:
            raise CheckpointError(f"no {family} preset has embedding width {_patch_width(raw)}", path=src,
                                  hint="pass --model")
    # a usfm-edge file keeps the input size it was trained at (a 256-px encoder stays 256 px: no lossy resize)
    img_size = ((config or {}).get("model_args") or {}).get("img_size") if config and config.get("model") == model_name else None
    model = create_model(model_name, img_size=img_size)
    report = load_into(model, src)
    report.preset = model_name
    meta = {"model": model_name, "model_args": model_args(model_name, img_size=img_size), "family": report.family,
            "task": "backbone", "source": Path(src).name}
    if config and "pretrain" in config:
        meta["pretrain"] = config["pretrain"]  # what the encoder learned from travels with it
    save_checkpoint(dst, model.state_dict(), meta, half=half)
    return report
