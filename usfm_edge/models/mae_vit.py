"""The ``mae`` backbone family: a plain ViT with an absolute position embedding (MAE / timm layout).

TinyUSFM (C. Ma et al., "TinyUSFM: Towards Compact and Efficient Ultrasound Foundation Models", arXiv 2510.19239;
code MacDunno/TinyUSFM) and UltraFedFM (Y. Jiang et al., "From pretraining to privacy: federated ultrasound
foundation model with self-supervised learning", npj Digital Medicine 8 (2025) 714; code yuncheng97/UltraFedFM)
publish ViTs of this layout: ``cls_token``, ``pos_embed`` (1, 1 + N, D) with a cls slot, ``patch_embed.proj``,
per block ``norm1``, ``attn.{qkv (with bias), proj}``, ``norm2``, ``mlp.{fc1, fc2}``; final ``norm``. LayerNorm
eps 1e-6, exact GELU, no layer scale, no relative position bias.

:class:`MaeViT` has the method names and return conventions of :class:`usfm_edge.models.vit.UsfmViT`, so every
task head, the MIM wrapper, layer-wise lr decay and export use it unchanged. Its ``mask_token`` (SimMIM-style
pretraining with usfm-edge) is not part of the published checkpoints: a load leaves it at its initialisation and
says so (``LoadReport.missing``). Published files pass :func:`checkpoint_filter_fn` (one pure function: layouts,
dropped decoder and heads, pos-embed resize), then load strictly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from usfm_edge.core.errors import CheckpointError, ConfigError
from usfm_edge.models.vit import Mlp, VitBackbone, drop_path


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resample an absolute position embedding (1, 1 + h*w, D) from one patch grid to another.

    The patch slots are a (D, h, w) map resampled bicubically (``align_corners=False``, no antialiasing: what
    the MAE fine-tuning code does); the cls slot is kept as it is.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    if pos_embed.shape[1] != 1 + old_grid[0] * old_grid[1]:
        raise ConfigError(f"pos_embed has {pos_embed.shape[1]} slots; expected {1 + old_grid[0] * old_grid[1]} "
                          f"for grid {old_grid}")
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    d = pos_embed.shape[-1]
    plane = patches.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2).float()
    plane = F.interpolate(plane, size=new_grid, mode="bicubic", align_corners=False)
    patches = plane.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table (1, 1 + h*w, D), cls slot zero: the initial value of the learned embedding."""
    if dim % 4:
        raise ConfigError(f"embed_dim {dim} is not a multiple of 4 (2-D sin-cos position embedding)")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid[0], dtype=np.float64), np.arange(grid[1], dtype=np.float64), indexing="ij")

    def embed(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([embed(xs), embed(ys)], axis=1)  # (h*w, D): first half x, second half y (as MAE)
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (with bias)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    """Pre-norm transformer block (no layer scale)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), attn_bias), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class MaeViT(VitBackbone):
    """Plain ViT backbone with a learned absolute position embedding (MAE / timm key layout).

    Args:
        img_size: input side the position embedding is built for; other multiples of the patch size work
            (the embedding is resampled on the fly, cls slot kept).
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: architecture.
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (drop path grows linearly with depth).
        num_classes: size of a linear head on the pooled feature (0 = no head, features only).
        global_pool: ``token`` (cls token after ``norm``) or ``avg`` (mean of patch tokens, ``fc_norm``).
    """

    family = "mae"
    #: model keys a published checkpoint never holds; a load leaves them at init and lists them as missing
    optional_keys = ("mask_token",)
    embedding_params = ("cls_token", "mask_token", "pos_embed", "patch_embed")

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, num_classes: int = 0, global_pool: str = "token"):
        super().__init__()
        self._init_embedding(img_size, patch_size, in_chans, embed_dim, depth, num_heads, global_pool)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i]) for i in range(depth)
        )
        self._init_norms_and_head(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self):
        if self.pos_embed.device.type != "meta":
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed(self.embed_dim, self.grid))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self._init_linear_and_norm()

    @staticmethod
    def filter_checkpoint(state_dict: dict, model: nn.Module, report=None) -> dict:
        """This family's pure checkpoint filter (:func:`checkpoint_filter_fn`), which ``load_into`` applies."""
        return checkpoint_filter_fn(state_dict, model, report)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token", "pos_embed"}

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The (1, 1 + h*w, D) position embedding for a patch grid (resampled when it is not the model's)."""
        return resize_pos_embed(self.pos_embed, self.grid, grid)

    def _add_position(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return x + self.position_embedding(grid).to(x.dtype)


# -- checkpoints -----------------------------------------------------------------------------------------
_WRAPPERS = ("model", "state_dict", "module", "student")  # {"model": {...}} and friends
_PREFIXES = ("module.", "student.", "model.", "encoder.", "backbone.")  # DDP, distillation, wrappers
_HEAD_KEYS = ("head.", "head_dist.", "fc_norm.", "dist_token")  # timm fine-tunes: classifier heads


def _unwrap(state_dict: dict) -> tuple[dict, list[str], dict[str, str]]:
    """Nesting and prefixes off: (flat tensors, what was stripped, {key: why dropped} for teacher keys)."""
    sd, how, dropped = state_dict, [], {}
    for key in _WRAPPERS:
        if isinstance(sd.get(key), dict):
            sd, how = sd[key], [f"{{'{key}': ...}}"]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if sd and (f"{p}patch_embed.proj.weight" in sd or all(k.startswith(p) for k in sd)):
                rest = {k: v for k, v in sd.items() if not k.startswith(p)}
                for k in [k for k in rest if k.startswith("teacher.")]:
                    dropped[k] = "distillation teacher (not the student backbone)"
                    del rest[k]
                sd = {**{k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, **rest}
                how.append(f"prefix '{p}'")
                changed = True
    return sd, how, dropped


def checkpoint_filter_fn(state_dict: dict, model: nn.Module, report=None) -> dict:
    """Map a published MAE-layout state dict onto ``model``'s keys (pure: does not modify its inputs).

    Handles: MAE pretraining files ``{"model": {encoder keys, decoder_*, mask_token, decoder_pos_embed}}`` (the
    decoder and its mask token dropped); timm / MAE fine-tunes with ``head.*`` / ``fc_norm.*`` (dropped unless
    the model has them; a global-pool fine-tune, which has no ``norm``, gives its ``fc_norm`` as ``norm``);
    ``module.`` / ``student.`` / ``model.`` / ``encoder.`` / ``backbone.`` prefixes (TinyUSFM's distilled file
    keeps the student under ``model.``; ``teacher.*`` is dropped); ``pos_embed`` resized to the model's grid.
    Every drop, rename and resize is written to ``report`` (a ``LoadReport``).
    """
    from usfm_edge.models.checkpoint import LoadReport

    report = report if report is not None else LoadReport("unknown")
    sd, how, dropped = _unwrap(state_dict)
    own = set(model.state_dict())
    mae_decoder = any(k.startswith("decoder_") for k in sd)
    fmt = "mae_pretrain" if mae_decoder else ("timm_finetune" if any(k.startswith(_HEAD_KEYS) for k in sd) else "mae")
    if report.source_format == "unknown":
        report.source_format = fmt + (f" ({', '.join(how)})" if how else "")
    report.dropped.update(dropped)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(("decoder_", "decoder.")):
            report.dropped[k] = "pretraining decoder (not part of the backbone)"
        elif k == "mask_token" and mae_decoder:
            report.dropped[k] = "MAE decoder mask token (decoder width; the backbone's mask token starts fresh)"
        elif k.startswith(_HEAD_KEYS) and k not in own:
            report.dropped[k] = "classification head of a fine-tuned model (usfm-edge builds its own task heads)"
        else:
            out[k] = v
    if "norm.weight" not in out and "fc_norm.weight" in sd and "fc_norm.weight" not in own:
        for part in ("weight", "bias"):  # MAE global_pool fine-tunes delete `norm`; fc_norm is the last norm left
            out[f"norm.{part}"] = sd[f"fc_norm.{part}"]
            report.dropped.pop(f"fc_norm.{part}", None)
            report.renamed[f"fc_norm.{part}"] = f"norm.{part}"
    pos = out.get("pos_embed")
    if pos is not None and hasattr(model, "grid") and pos.ndim == 3:
        n = pos.shape[1] - 1
        target = tuple(model.grid)
        if n != target[0] * target[1]:
            side = int(round(n ** 0.5))
            if side * side != n:
                raise CheckpointError(f"pos_embed has {n} patch slots, not a square grid and not the model's "
                                      f"{target[0]}x{target[1]}", hint="build the model at the checkpoint's size")
            out["pos_embed"] = resize_pos_embed(pos, (side, side), target)
            report.resized["pos_embed"] = (tuple(pos.shape), tuple(out["pos_embed"].shape))
    return out


# -- presets: plain hyper-parameter dicts --------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # UltraFedFM's encoder (MAE ViT-B/16, 86M parameters)
    "mae_vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    # TinyUSFM's student (5.5M parameters): 12 heads of width 16 (the usfm tiny preset has 3 of width 64)
    "mae_vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=12),
    # unit tests only: 4 blocks of width 64 at 64 px, heads of width 16
    "mae_vit_test": dict(embed_dim=64, depth=4, num_heads=4, img_size=64),
}
