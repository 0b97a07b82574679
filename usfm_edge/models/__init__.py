"""USFM models (torch): the backbone families and presets, checkpoint loading, task heads and the MIM wrapper."""

from usfm_edge.models.mae_vit import MaeViT
from usfm_edge.models.registry import create_model, list_models, model_args
from usfm_edge.models.vit import PRESETS, UsfmViT

__all__ = ["create_model", "list_models", "model_args", "UsfmViT", "MaeViT", "PRESETS"]
