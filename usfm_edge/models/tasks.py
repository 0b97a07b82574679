"""Task models: one backbone (family ``beit``/USFM or ``mae``) + one task head as a single exportable ``nn.Module``.

``build_task_model("seg", "usfm_vit_tiny_patch16_224", num_classes=2)`` returns a :class:`TaskModel` whose
``forward`` takes the *normalised* model input (B, 3, S, S) and returns one tensor:

========  ==================================  ==========================================================
task      head names (``auto`` first)         output
========  ==================================  ==========================================================
seg       upernet / light / hires / hybrid    logits (B, K, S, S) at the input size (K includes background)
cls       linear                              logits (B, K)
enhance   pixelshuffle                        restored grey image (B, 1, S, S) in [0, 1] (not normalised)
features  cls_token                           embedding (B, D): the cls token after the final norm
========  ==================================  ==========================================================

``head="auto"`` for seg is ``upernet`` (USFM's recipe) for the base and small presets and ``light``
(:class:`ProgressiveUpsampleHead`) for the tiny and test presets, which target small devices. UperNet's width
defaults to 768 for base (the official value; at 224 px the head then costs ~4x the backbone's FLOPs, pass
``head_args={"channels": 256}`` to cut it ~9x), 256 for small, 128 for tiny and 32 for the test preset.

Parameters the task never uses get ``requires_grad=False`` (``mask_token`` always; the final ``norm`` for
seg and cls, whose heads read the blocks before it as USFM does), so DDP needs no ``find_unused_parameters``.

Checkpoints (``save_task_checkpoint``) are usfm-edge ``.safetensors`` files with keys ``backbone.*``,
``head.*`` (and ``aux_head.*``) and the JSON config of :meth:`TaskModel.config` plus ``preprocess`` and
``extra`` in the metadata; :func:`load_task_model` rebuilds and loads them strictly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from usfm_edge.core.errors import CheckpointError, ConfigError, UsfmEdgeError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.models.heads import (
    AuxFCNHead,
    ClsHead,
    EnhanceHead,
    HiResFusionHead,
    HybridUNetHead,
    ProgressiveUpsampleHead,
    UperNetHead,
)
from usfm_edge.models.registry import build_backbone, model_args

__all__ = ["TASKS", "HEADS", "TaskModel", "build_task_model", "save_task_checkpoint", "load_task_model",
           "default_head"]

log = logging.getLogger(__name__)

HEADS: dict[str, tuple[str, ...]] = {"seg": ("upernet", "light", "hires", "hybrid"), "cls": ("linear",), "enhance": ("pixelshuffle",),
                                     "features": ("cls_token",)}
TASKS = tuple(HEADS)
_UPERNET_CHANNELS = {768: 768, 384: 256, 192: 128}  # by embed_dim; anything else: 32


def default_head(task: str, embed_dim: int) -> str:
    """The head ``auto`` resolves to: UperNet for seg on base/small (D >= 384), the light head below."""
    if task == "seg":
        return "upernet" if embed_dim >= 384 else "light"
    return HEADS[task][0]


def _head_defaults(head: str, embed_dim: int) -> dict:
    if head == "upernet":
        ch = _UPERNET_CHANNELS.get(embed_dim, 32)
        return {"channels": ch, "pool_scales": [1, 2, 3, 6], "dropout": 0.1, "aux_channels": min(256, ch),
                "aux_weight": 0.4}
    if head == "light":
        return {"channels": [128, 64] if embed_dim >= 128 else [32, 16], "dropout": 0.1}
    if head == "hires":
        small = embed_dim < 128
        return {"stem": [8, 16, 32] if small else [24, 48, 96], "decoder": [32, 16, 8] if small else [96, 64, 32],
                "context": 32 if small else 128, "dropout": 0.1, "aux_weight": 0.4}
    if head == "hybrid":
        return {"widths": [8, 16, 32, 64, 128] if embed_dim < 128 else [16, 32, 64, 128, 256], "dropout": 0.1,
                "aux_weight": 0.4, "stem_stride": 1}
    if head == "linear":
        return {"dropout": 0.0, "init_scale": 0.001}
    if head == "pixelshuffle":
        return {"hidden": 8, "width": 16}
    return {}


class TaskModel(nn.Module):
    """A backbone (either family) and a task head.

    Args:
        backbone: a backbone of either family (:class:`UsfmViT`, :class:`MaeViT`).
        task: ``features``, ``seg``, ``cls`` or ``enhance``.
        labels: class names (seg: background first; cls: one per class; others: empty).
        head: a head name from ``HEADS[task]`` (already resolved, not ``auto``).
        head_args: head hyper-parameters (defaults filled in for missing keys).
        preset: the backbone preset name (recorded in the config).
        model_args: the backbone constructor arguments (recorded so the config rebuilds it exactly).
        preprocess: the input contract (its mean/std de-normalise the input of the enhance head).

    Attributes:
        task, labels, backbone, preset, img_size, head_name, head_args, num_classes, preprocess, out_indices,
        aux_weight (seg/UperNet: weight of the auxiliary loss), load_report (set by ``build_task_model``).
    """

    def __init__(self, backbone: nn.Module, task: str, labels: list[str], head: str, head_args: dict | None = None,
                 preset: str = "custom", model_args: dict | None = None, preprocess: PreprocessSpec | None = None):
        super().__init__()
        if task not in HEADS:
            raise ConfigError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
        if head not in HEADS[task]:
            raise ConfigError(f"head {head!r} does not fit task {task!r}: choose from auto, {', '.join(HEADS[task])}")
        self.task, self.labels, self.head_name, self.preset = task, list(labels), head, preset
        self.backbone = backbone
        self.img_size = int(backbone.img_size[0])
        self.model_args = dict(model_args or {})
        self.preprocess = preprocess or PreprocessSpec(img_size=self.img_size)
        self.num_classes = len(self.labels) if task in ("seg", "cls") else 0
        self.head_args = {**_head_defaults(head, backbone.embed_dim), **(head_args or {})}
        self.load_report = None
        d, k, a = backbone.embed_dim, self.num_classes, self.head_args
        self.aux_weight = 0.0
        self.aux_head = None
        if head == "upernet":
            self.out_indices = tuple(backbone.default_out_indices)
            if len(self.out_indices) != 4:
                raise ConfigError(f"UperNet needs 4 taps; backbone depth {backbone.depth} gives {self.out_indices}")
            self.head = UperNetHead(d, k, a["channels"], tuple(a["pool_scales"]), a["dropout"])
            self.aux_head = AuxFCNHead(d, k, a["aux_channels"], a["dropout"])
            self.aux_weight = float(a["aux_weight"])
        elif head == "hires":
            self.out_indices = tuple(backbone.default_out_indices)
            self.head = HiResFusionHead(d, k, len(self.out_indices), tuple(a["stem"]), tuple(a["decoder"]),
                                        a["context"], a["dropout"], in_chans=backbone.in_chans)
            self.aux_weight = float(a["aux_weight"])
        elif head == "hybrid":
            self.out_indices = tuple(backbone.default_out_indices)
            self.head = HybridUNetHead(d, k, len(self.out_indices), tuple(a["widths"]), a["dropout"],
                                       in_chans=backbone.in_chans, stem_stride=int(a["stem_stride"]))
            self.aux_weight = float(a["aux_weight"])
        elif head == "light":
            self.out_indices = (backbone.depth - 1,)
            self.head = ProgressiveUpsampleHead(d, k, tuple(a["channels"]), a["dropout"])
        elif head == "linear":
            self.out_indices = (backbone.depth - 1,)
            self.head = ClsHead(d, k, a["dropout"], a["init_scale"])
        elif head == "pixelshuffle":
            self.out_indices = (backbone.depth - 1,)
            self.head = EnhanceHead(d, backbone.patch_size, a["hidden"], a["width"], self.preprocess.mean,
                                    self.preprocess.std)
        else:  # features
            self.out_indices = ()
            self.head = nn.Identity()
        unused = ["mask_token"] + (["norm.weight", "norm.bias"] if task in ("seg", "cls") else [])
        for name, p in backbone.named_parameters():
            if name in unused:
                p.requires_grad_(False)

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (B, C, S, S) -> the task output (see the module docstring)."""
        return self.forward_train(x, aux=False)["out"]

    def forward_train(self, x: torch.Tensor, aux: bool = True) -> dict[str, torch.Tensor]:
        """Like ``forward`` but returns ``{"out": ...}`` plus ``"aux"`` (deep supervision: UperNet's auxiliary
        head, or the hires head's stride-8 logits, at the input size) when ``aux`` is true and the head has one."""
        if self.task == "features":
            return {"out": self.backbone.forward_features(x)[:, 0]}
        norm = self.task == "enhance"
        feats = self.backbone.forward_intermediates(x, indices=self.out_indices, norm=norm)
        if self.task == "cls":
            return {"out": self.head(feats)}
        if self.task == "enhance":
            return {"out": self.head(feats, x)}
        size = x.shape[-2:]
        if self.head_name == "upernet":
            pyramid = self.head.necks(feats)
            result = {"out": _upsample(self.head(feats, pyramid), size)}
            if aux:
                result["aux"] = _upsample(self.aux_head(pyramid[2]), size)
            return result
        if self.head_name in ("hires", "hybrid"):
            if not aux:
                return {"out": _upsample(self.head(feats, x), size)}
            out, deep = self.head(feats, x, aux=True)
            return {"out": _upsample(out, size), "aux": _upsample(deep, size)}
        return {"out": _upsample(self.head(feats), size)}

    # -- timm-style contract (lets usfm_edge.train.optim.param_groups work on a TaskModel) --------------
    @property
    def depth(self) -> int:
        return self.backbone.depth

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def group_matcher(self, name: str) -> int:
        """Layer id for layer-wise lr decay: backbone ids from ``UsfmViT.group_matcher``; heads ``depth + 1``."""
        if name.startswith("backbone."):
            return self.backbone.group_matcher(name[len("backbone."):])
        return self.backbone.depth + 1

    # -- config ------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-serialisable description that :meth:`from_config` rebuilds the model from."""
        return {"model": self.preset, "model_args": _jsonable(self.model_args), "task": self.task,
                "labels": list(self.labels), "head": self.head_name, "head_args": _jsonable(self.head_args),
                "img_size": self.img_size, "num_classes": self.num_classes, "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_config(cls, cfg: dict) -> TaskModel:
        """Rebuild a (randomly initialised) task model from :meth:`config` output."""
        for key in ("model", "task", "head"):
            if key not in cfg:
                raise ConfigError(f"task model config lacks '{key}'")
        args = dict(cfg.get("model_args") or model_args(cfg["model"], img_size=cfg.get("img_size")))
        if cfg.get("img_size"):
            args["img_size"] = int(cfg["img_size"])
        backbone = build_backbone(cfg["model"], args)
        pre = cfg.get("preprocess")
        pre = PreprocessSpec.from_dict(pre) if isinstance(pre, dict) else None
        return cls(backbone, cfg["task"], list(cfg.get("labels") or []), cfg["head"], cfg.get("head_args"),
                   preset=cfg["model"], model_args=args, preprocess=pre)


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _resolve_labels(task: str, num_classes: int | None, labels) -> list[str]:
    if task in ("features", "enhance"):
        if labels or num_classes:
            raise ConfigError(f"task {task!r} takes no labels or num_classes")
        return []
    if labels is not None:
        labels = [str(v) for v in labels]
        if num_classes is not None and num_classes != len(labels):
            raise ConfigError(f"num_classes={num_classes} but {len(labels)} labels given: {labels}")
        if len(labels) < 2:
            raise ConfigError(f"{task} needs at least 2 labels (seg: background included), got {labels}")
        return labels
    if num_classes is None:
        if task == "cls":
            raise ConfigError("cls needs num_classes or labels", hint="e.g. labels=['benign', 'malignant']")
        num_classes = 2
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2 (seg counts the background), got {num_classes}")
    if task == "seg":
        return ["background"] + (["foreground"] if num_classes == 2 else [f"class_{i}" for i in range(1, num_classes)])
    return [f"class_{i}" for i in range(num_classes)]


def build_task_model(task: str, backbone: str = "usfm_vit_tiny_patch16_224", num_classes: int | None = None,
                     labels: list[str] | None = None, head: str = "auto", img_size: int = 224,
                     checkpoint: str | Path | None = None, *, head_args: dict | None = None,
                     preprocess: PreprocessSpec | None = None, **backbone_kw) -> TaskModel:
    """Build a task model, optionally initialised from a checkpoint.

    Args:
        task: ``features``, ``seg``, ``cls`` or ``enhance``.
        backbone: a preset of ``usfm_edge.models.list_models()``.
        num_classes, labels: classes (seg: background included; default ``["background", "foreground"]``).
        head: ``auto`` or a name from ``HEADS[task]``.
        img_size: input side (multiple of 16).
        checkpoint: a backbone checkpoint (official ``USFM_latest.pth``, SimMIM/pretraining file, usfm-edge
            ``task: backbone`` file) -> backbone loaded, heads fresh; or a task checkpoint -> its backbone, plus
            its heads when task, head, number of classes and head arguments (defaults filled in) all match
            (else heads fresh, and ``load_report.heads_fresh`` says what differs).
        head_args: head hyper-parameters overriding the per-preset defaults.
        preprocess: the input contract (default: ``PreprocessSpec(img_size=img_size)``).
        **backbone_kw: backbone constructor overrides (``drop_path_rate=0.1`` for fine-tuning, ...).

    Returns:
        The model. ``model.load_report`` (a ``LoadReport`` or None) lists in ``missing`` the keys left at
        their initialisation (the fresh heads).
    """
    if task not in HEADS:
        raise ConfigError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    args = model_args(backbone, img_size=img_size, **backbone_kw)
    net = build_backbone(backbone, args)
    resolved = default_head(task, net.embed_dim) if head == "auto" else head
    model = TaskModel(net, task, _resolve_labels(task, num_classes, labels), resolved, head_args, preset=backbone,
                      model_args=args, preprocess=preprocess or PreprocessSpec(img_size=img_size))
    if checkpoint is not None:
        model.load_report = _init_from_checkpoint(model, checkpoint)
        log.info("initialised %s from %s: %s", task, checkpoint, model.load_report.summary())
    return model


def _init_from_checkpoint(model: TaskModel, path: str | Path):
    from usfm_edge.models.checkpoint import load_into, read_checkpoint

    sd, cfg = read_checkpoint(path)
    is_task = isinstance(cfg, dict) and cfg.get("task") in HEADS
    if not is_task:
        report = load_into(model.backbone, path)
    else:
        bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        try:
            report = load_into(model.backbone, bb)
        except CheckpointError as exc:
            theirs = cfg.get("model")
            hint = (f"the checkpoint's backbone is {theirs}, this model's {model.preset}: build it with that preset "
                    f"(finetune --model {theirs})" if theirs and theirs != model.preset else exc.hint)
            raise CheckpointError(exc.message, path=path, hint=hint) from exc
        report.source_format = f"usfm_edge task '{cfg['task']}'"
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    differ = _head_mismatch(model, cfg) if is_task else ["not a task checkpoint"]
    if not differ:
        head_sd = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
        _load_strict(model, head_sd, path, prefix_ok=tuple(heads))
    else:
        report.missing = sorted(set(report.missing) | set(heads))
        report.heads_fresh = "; ".join(differ)
    return report


def _head_mismatch(model: TaskModel, cfg: dict) -> list[str]:
    """Why a task checkpoint's heads cannot initialise ``model``'s (empty: they can). Head arguments are
    compared with the head's defaults filled in on both sides, so a checkpoint written before a new head
    argument existed (stored without it, meaning its default) still matches."""
    mine = model.config()
    out = [f"{k} {cfg.get(k)!r} != {mine[k]!r}" for k in ("task", "head") if cfg.get(k) != mine[k]]
    theirs_k, ours_k = len(cfg.get("labels") or []), len(mine["labels"])
    if theirs_k != ours_k:  # the class names may differ: a 2-class head is a good start for any 2-class task
        out.append(f"{theirs_k} classes != {ours_k}")
    if cfg.get("head") == mine["head"]:
        theirs = _jsonable({**_head_defaults(mine["head"], model.backbone.embed_dim), **(cfg.get("head_args") or {})})
        ours = mine["head_args"]
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        out += [f"head_args.{k} {theirs.get(k)!r} != {ours.get(k)!r}" for k in keys]
    return out


def _load_strict(model: nn.Module, sd: dict, path, prefix_ok: tuple[str, ...] | None = None) -> None:
    own = model.state_dict()
    wanted = set(own) if prefix_ok is None else set(prefix_ok)
    missing, unexpected = sorted(wanted - set(sd)), sorted(set(sd) - wanted)
    if missing or unexpected:
        raise CheckpointError(f"task checkpoint does not match the model: missing {missing[:8]}, unexpected "
                              f"{unexpected[:8]}", path=path, hint="was it written by another usfm-edge version?")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"shape mismatch for '{k}': {tuple(v.shape)} vs {tuple(own[k].shape)}", path=path)
    model.load_state_dict(sd, strict=prefix_ok is None)


def save_task_checkpoint(model: TaskModel, path: str | Path, extra: dict | None = None, half: bool = False) -> Path:
    """Write ``model`` as a ``.safetensors`` task checkpoint.

    Args:
        extra: JSON-serialisable data stored under ``"extra"`` (metrics, training config, dataset...).
        half: store floating tensors as fp16 (loaded back into fp32 parameters).

    Returns:
        The written path. Its metadata config is ``model.config()`` + ``"extra"`` + ``"format"``.
    """
    from usfm_edge.models.checkpoint import save_checkpoint

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"task checkpoints are .safetensors files, got {path.name}")
    cfg = {**model.config(), "extra": _jsonable(dict(extra or {})), "format": "usfm_edge.task/1"}
    return save_checkpoint(path, model.state_dict(), cfg, half=half)


def load_task_model(path: str | Path, map_location: str | torch.device = "cpu") -> TaskModel:
    """Rebuild the task model stored by :func:`save_task_checkpoint` and load it strictly (in eval mode).

    Raises:
        CheckpointError: not a task checkpoint (e.g. a backbone file), or keys/shapes do not match.
    """
    from usfm_edge.models.checkpoint import read_checkpoint

    sd, cfg = read_checkpoint(path)
    if not isinstance(cfg, dict) or cfg.get("task") not in HEADS:
        task = cfg.get("task") if isinstance(cfg, dict) else None
        raise CheckpointError(f"not a usfm-edge task checkpoint (task: {task!r})", path=path,
                              hint="initialise a task model from a backbone with build_task_model(task, "
                                   "checkpoint=PATH)")
    try:
        model = TaskModel.from_config(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # an edited or foreign config; ConfigError too
        why = exc.message if isinstance(exc, UsfmEdgeError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"the model config stored in the checkpoint cannot build a model ({why})", path=path,
                              hint="the checkpoint's metadata was edited or written by another tool: "
                                   "fine-tune or export it again") from exc
    _load_strict(model, sd, path)
    model.checkpoint_config = cfg
    return model.to(map_location).eval()
