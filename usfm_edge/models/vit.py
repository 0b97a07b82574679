"""The USFM backbone: a BEiT-style ViT-B/16 with one shared relative position bias table.

USFM: J. Jiao et al., "USFM: A universal ultrasound foundation model generalized to tasks and organs towards
label efficient image analysis", Medical Image Analysis 96 (2024) 103202. Official code: openmedlab/USFM.

Module names follow the official checkpoint (``USFM_latest.pth``) so it loads strictly after
``usfm_edge.models.checkpoint.checkpoint_filter_fn``: ``cls_token``, ``mask_token``, ``patch_embed.proj``,
``rel_pos_bias.relative_position_bias_table`` (shared by all blocks), and per block ``norm1``,
``attn.{qkv (no bias), q_bias, v_bias, proj}``, ``gamma_1``, ``norm2``, ``mlp.{fc1, fc2}``, ``gamma_2``;
final ``norm``. LayerNorm eps 1e-6, exact GELU, no absolute position embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from usfm_edge.core.errors import ConfigError


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """(N+1, N+1) long index into a table of (2h-1)(2w-1)+3 rows; the last 3 rows are cls<->token."""
    h, w = grid
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 2
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    num_rel = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.zeros((h * w + 1, h * w + 1), dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_rel - 3  # cls -> token
    index[0:, 0] = num_rel - 2  # token -> cls
    index[0, 0] = num_rel - 1  # cls -> cls
    return index


def resize_rel_pos_table(table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a BEiT relative position bias table from one patch grid to another.

    The (2h-1) x (2w-1) offset plane of each head is resampled bicubically with aligned corners, so offset
    (0, 0) stays at the centre and vertical offsets stay vertical (the official USFM loader transposes the
    plane when it resizes; dossier §1.3 bug 2). The 3 cls rows are kept as they are.
    """
    if tuple(old_grid) == tuple(new_grid):
        return table
    oh, ow = 2 * old_grid[0] - 1, 2 * old_grid[1] - 1
    nh, nw = 2 * new_grid[0] - 1, 2 * new_grid[1] - 1
    num_heads = table.shape[1]
    if table.shape[0] != oh * ow + 3:
        raise ConfigError(f"relative position table has {table.shape[0]} rows; expected {oh * ow + 3} for grid {old_grid}")
    plane = table[:-3].T.reshape(1, num_heads, oh, ow).float()
    plane = F.interpolate(plane, size=(nh, nw), mode="bicubic", align_corners=True)
    plane = plane.reshape(num_heads, nh * nw).T.to(table.dtype)
    return torch.cat([plane, table[-3:]], dim=0)


def dense_taps(depth: int) -> tuple[int, ...]:
    """Blocks a dense head taps: [3, 5, 7, 11] of 12 (USFM's UperNet), the same fractions of other depths."""
    if depth == 12:
        return (3, 5, 7, 11)
    return tuple(sorted({max(0, round(depth * f) - 1) for f in (4 / 12, 6 / 12, 8 / 12, 1.0)}))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, C


class RelativePositionBias(nn.Module):
    """One relative position bias table shared by every block (USFM / SimMIM ``USE_SHARED_RPB``)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        self.grid = tuple(grid)
        num_rel = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.grid), persistent=False)

    def forward(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Bias of shape (1, heads, N+1, N+1) for the model's grid, or resized for another grid."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        if grid is not None and tuple(grid) != self.grid:
            table = resize_rel_pos_table(table, self.grid, grid)
            index = relative_position_index(tuple(grid)).to(table.device)
        n = index.shape[0]
        bias = table[index.reshape(-1)].reshape(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention with BEiT's q/v bias (k bias fixed at zero, never saved)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        else:
            self.q_bias = self.v_bias = self.k_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # B, h, N, d
        drop = self.attn_drop if self.training else 0.0
        # an explicit constant scale (= SDPA's default 1/sqrt(d), bit for bit): exported, the scale is a folded
        # constant instead of a Shape->Sqrt->Div chain per block, so ONNX Runtime folds it into FusedMatMul and
        # OpenVINO's CPU plugin fuses MatMul-Add(bias)-Softmax-MatMul into one MHA subgraph (bench.opcount)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=rel_pos_bias, dropout_p=drop, scale=self.scale)
        x = x.transpose(1, 2).contiguous().reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole residual branches per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (``gamma_1``, ``gamma_2``)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 init_values: float | None = 0.1, norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = drop_path
        if init_values is not None and init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.norm1(x), rel_pos_bias)
        if self.gamma_1 is None:
            x = x + drop_path(a, self.drop_path, self.training)
            return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        x = x + drop_path(self.gamma_1 * a, self.drop_path, self.training)
        return x + drop_path(self.gamma_2 * self.mlp(self.norm2(x)), self.drop_path, self.training)


class VitBackbone(nn.Module):
    """What both backbone families share (:class:`UsfmViT` here, ``mae_vit.MaeViT``): the input checks, patch +
    cls embedding with the SimMIM mask token, the block loop, NCHW intermediates, the pooled head, the generic
    weight init and the lr-decay groups (timm's method names). A family adds its position information through
    two hooks: :meth:`_add_position` (tokens with the cls token in front) and :meth:`_block_bias` (the bias
    every block's attention adds, or None).
    """

    #: parameter-name prefixes of lr-decay group 0 (the embeddings)
    embedding_params: tuple[str, ...] = ("cls_token", "mask_token", "patch_embed")

    def _init_embedding(self, img_size, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                        num_heads: int, global_pool: str) -> None:
        """Check the shape arguments, set the shape attributes and build patch embedding, cls and mask tokens."""
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ConfigError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim = self.num_features = embed_dim
        self.depth, self.num_heads = depth, num_heads
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def _init_norms_and_head(self, embed_dim: int, num_classes: int) -> None:
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm = norm(embed_dim)
        self.fc_norm = norm(embed_dim) if (self.global_pool == "avg" and num_classes > 0) else None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _init_linear_and_norm(self) -> None:
        """Truncated-normal Linear weights with zero bias, unit LayerNorms (after the family's own inits)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- timm-style contract -------------------------------------------------------------------------
    def group_matcher(self, name: str) -> int:
        """Layer id for layer-wise lr decay: 0 = embeddings, i+1 = block i, depth+1 = norm/head."""
        if name.startswith(self.embedding_params):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    @property
    def default_out_indices(self) -> tuple[int, ...]:
        """Blocks tapped by dense heads: [3, 5, 7, 11] of 12 (USFM's UperNet, TinyUSFM's seg backbone); scaled
        for other depths."""
        return dense_taps(self.depth)

    def _add_position(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return x

    def _block_bias(self, grid: tuple[int, int], dtype) -> torch.Tensor | None:
        return None

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ConfigError(f"input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        grid = (H // self.patch_size, W // self.patch_size)
        x = self.patch_embed(x)
        if mask is not None:  # SimMIM: masked patches become the learned mask token (mask: B, N; 1 = masked)
            w = mask.flatten(1).unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return self.pos_drop(self._add_position(x, grid)), grid

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D) tokens after the final norm. ``mask`` (B, N), 1 = masked patch."""
        x, grid = self._embed(x, mask)
        bias = self._block_bias(grid, x.dtype)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None,
                              norm: bool = False) -> list[torch.Tensor]:
        """Block outputs as NCHW maps (B, D, H/16, W/16), cls token removed, for dense heads.

        Args:
            indices: 0-based block indices (default ``default_out_indices``); negatives count from the end.
            norm: apply the final norm to each map (USFM's segmentation backbone does not).
        """
        indices = self.default_out_indices if indices is None else indices
        want = sorted({i % self.depth for i in indices})
        x, grid = self._embed(x, None)
        bias = self._block_bias(grid, x.dtype)
        out = {}
        for i, blk in enumerate(self.blocks[: want[-1] + 1]):
            x = blk(x, bias)
            if i in want:
                t = self.norm(x) if norm else x
                out[i] = t[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return [out[i % self.depth] for i in indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, 1:].mean(1)
            if self.fc_norm is not None:
                x = self.fc_norm(x)
        else:
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class UsfmViT(VitBackbone):
    """USFM vision transformer backbone (BEiT-style, shared relative position bias).

    Args:
        img_size: input side the relative position table is built for (other multiples of the patch size
            work; the table is resized on the fly).
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio: architecture.
        qkv_bias: BEiT q/v bias.
        init_values: layer-scale init (USFM: 0.1); None disables layer scale.
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (drop path grows linearly with depth).
        num_classes: size of a linear head on the pooled feature (0 = no head, features only).
        global_pool: ``token`` (cls token after ``norm``) or ``avg`` (mean of patch tokens, ``fc_norm``).
    """

    family = "beit"
    optional_keys: tuple[str, ...] = ()  # every model key must come from the checkpoint
    embedding_params = ("cls_token", "mask_token", "patch_embed", "rel_pos_bias")

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, init_values: float | None = 0.1, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, num_classes: int = 0,
                 global_pool: str = "token"):
        super().__init__()
        self._init_embedding(img_size, patch_size, in_chans, embed_dim, depth, num_heads, global_pool)
        self.pos_drop = nn.Dropout(drop_rate)
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], init_values)
            for i in range(depth)
        )
        self._init_norms_and_head(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.rel_pos_bias.relative_position_bias_table, std=0.02)
        self._init_linear_and_norm()
        for i, blk in enumerate(self.blocks):  # BEiT: rescale residual projections by depth
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table"}

    def _block_bias(self, grid, dtype):
        return self.rel_pos_bias(grid).to(dtype)


# -- presets: plain hyper-parameter dicts --------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # the official USFM architecture (86M parameters)
    "usfm_vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    # the same architecture at DeiT-S / DeiT-Ti widths, for devices and CPU training
    "usfm_vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "usfm_vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    # edge students for distillation (usfm-edge distill): a sixth of tiny's encoder cost and less
    "usfm_vit_micro_patch16_224": dict(embed_dim=128, depth=6, num_heads=2),
    "usfm_vit_nano_patch16_224": dict(embed_dim=96, depth=4, num_heads=2),
    # unit tests only: 4 blocks of width 64 at 64 px
    "usfm_vit_test": dict(embed_dim=64, depth=4, num_heads=2, img_size=64),
}
