"""Checkpoint loading: official USFM ``.pth``, SimMIM-style files, MAE-layout files and usfm-edge ``.safetensors``.

Every foreign format passes through one pure function of the model's family (``checkpoint_filter_fn`` here for
``beit``/USFM, ``mae_vit.checkpoint_filter_fn`` for ``mae``; :func:`detect_family` tells the families apart by
their keys) that detects the source by its keys, renames and drops what it must (reporting each key), and
resizes the position table (relative or absolute) to the target grid. The result is then loaded strictly: a key
left missing or unexpected, or a shape that does not match, raises ``CheckpointError`` naming the file and the
keys; a checkpoint of the other family is refused before that, saying which family it is. Pickles are only ever read with
``torch.load(weights_only=True)``, which refuses objects that would run code.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from usfm_edge.core.errors import CheckpointError

META_KEY = "usfm_edge"  # safetensors metadata key holding our JSON config

_FAMILY_NAMES = {"beit": "USFM layout: relative position bias", "mae": "MAE/timm layout: absolute pos_embed"}

# keys recomputed at construction; present in USFM_latest.pth but never loaded
_RECOMPUTED = ("relative_position_index", "attn.k_bias")


@dataclass
class LoadReport:
    """What happened to each checkpoint key."""

    source_format: str
    mapped: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> reason
    renamed: dict[str, str] = field(default_factory=dict)  # old -> new
    resized: dict[str, tuple] = field(default_factory=dict)  # key -> (old shape, new shape)
    missing: list[str] = field(default_factory=list)  # model keys initialised fresh (allowed only)
    family: str | None = None  # backbone family of the model loaded into ("beit" / "mae")
    preset: str | None = None  # preset name, where the caller knows it (convert_weights)
    heads_fresh: str | None = None  # task checkpoint whose heads were not loaded: why (what differs)

    def summary(self, limit: int = 6) -> str:
        """One line; key lists longer than ``limit`` are grouped by module (``head.dec``: 24 tensors)."""
        why = f"; heads start fresh: {self.heads_fresh}" if self.heads_fresh else ""
        return (f"{self.source_format}: {len(self.mapped)} tensors loaded, {len(self.dropped)} dropped"
                f" ({_names(sorted(self.dropped), limit)}), {len(self.resized)} resized,"
                f" {len(self.missing)} left at init ({_names(list(self.missing), limit)}){why}")


def _names(keys: list[str], limit: int) -> str:
    if not keys:
        return "none"
    if len(keys) <= limit:
        return ", ".join(keys)
    groups: dict[str, int] = {}
    for k in keys:
        prefix = ".".join(k.split(".")[:2])
        groups[prefix] = groups.get(prefix, 0) + 1
    return ", ".join(f"{g}.* ({n})" for g, n in groups.items())


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_REFUSED_OPCODE = re.compile(r"Unsupported operand (\d+)")


def describe_load_error(exc: BaseException) -> tuple[str, bool]:
    """``(one complete sentence, is_unsafe)`` for an error of ``torch.load(weights_only=True)``.

    torch's message for a refused pickle is a page with ANSI escape codes; this keeps what matters: the
    global the pickle references (``exec`` becomes ``builtins.exec``) or the refused pickle instruction.
    Other errors keep their first line, without escape codes.
    """
    text = _ANSI.sub("", str(exc))
    found = _REFUSED_GLOBAL.search(text)
    if found:
        name = found[1] if "." in found[1] else f"builtins.{found[1]}"
        return f"refused: the pickle references {name}, which could run code", True
    found = _REFUSED_OPCODE.search(text)
    if found:
        return f"refused: the pickle uses an instruction (opcode {found[1]}) that safe loading does not allow", True
    if "weights_only" in text:
        return "refused: the pickle holds objects that safe loading (weights_only=True) does not allow", True
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return first, False


def read_checkpoint_config(path: str | Path) -> dict | None:
    """The usfm-edge JSON config of a ``.safetensors`` checkpoint, read from its header alone (no tensors);
    None for other files or a file without one.

    Raises:
        CheckpointError: the file is missing, empty or unreadable, or its config is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint file not found", path=path)
    if path.stat().st_size == 0:
        raise CheckpointError("checkpoint file is empty", path=path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read safetensors file ({exc})", path=path,
                              hint="the file may be truncated; re-download or re-export it") from exc
    try:
        config = json.loads(meta[META_KEY]) if META_KEY in meta else None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"the '{META_KEY}' config in the safetensors metadata is not valid JSON ({exc})",
                              path=path, hint="re-export the checkpoint with usfm-edge") from None
    if config is not None and not isinstance(config, dict):
        raise CheckpointError(f"the '{META_KEY}' config in the safetensors metadata is a "
                              f"{type(config).__name__}, not a JSON object", path=path)
    return config


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a checkpoint file -> (flat-or-nested state dict, our JSON config or None).

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    config = read_checkpoint_config(path)  # the file checks, and the header's config
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read safetensors file ({exc})", path=path,
                                  hint="the file may be truncated; re-download or re-export it") from exc
        return sd, config
    _sniff(path)
    try:
        # MAE-style training files (UltraFedFM's, facebookresearch/mae's) store their argparse.Namespace under
        # "args": a plain attribute bag, allowed; anything that could run code is still refused
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        msg, unsafe = describe_load_error(exc)
        hint = ("this pickle contains code and was refused (weights_only=True); re-save it as a plain state dict "
                "where you trust its source" if unsafe else "the file may be truncated or not a checkpoint")
        raise CheckpointError(f"cannot load checkpoint: {msg}", path=path, hint=hint) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict", path=path)
    return obj, None


def _sniff(path: Path) -> None:
    """Refuse a file that is neither a torch zip archive nor a pickle, saying what it looks like instead."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive / a raw pickle
        return
    if head[8:9] == b"{" and b'"dtype"' in head:  # safetensors: u64 header length, then the JSON header
        kind = "a safetensors file without the .safetensors suffix"
        hint = "rename it to *.safetensors"
    else:
        try:  # incremental: a multi-byte character cut at the end of the read is not an error
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            kind = "a text file"
        except UnicodeDecodeError:
            kind = "a binary file of another kind"
        hint = ("pass a model file: a fine-tuning run's best.safetensors / last.safetensors, a pretraining run's "
                "encoder.safetensors, or the official USFM_latest.pth")
    raise CheckpointError(f"not a checkpoint: this is {kind} (it starts with {head[:16]!r})", path=path, hint=hint)


def unwrap_state_dict(sd: dict) -> tuple[dict, str]:
    """Strip ``{"model": ...}`` / ``{"state_dict": ...}`` nesting and ``module.`` / ``encoder.`` prefixes."""
    fmt = "usfm_official"
    for key in ("model", "state_dict", "module"):
        if key in sd and isinstance(sd[key], dict):
            sd, fmt = sd[key], "simmim"
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "encoder.", "backbone."):
        if tensors and any(k.startswith(prefix) for k in tensors):
            if prefix == "encoder.":
                fmt = "simmim"
            tensors = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in tensors.items()}
    return tensors, fmt


def detect_family(keys) -> str | None:
    """The backbone family of a state dict, from its key names alone (prefixes such as ``module.`` allowed).

    ``beit`` (USFM): a relative position bias table or BEiT's separate ``q_bias``; ``mae`` (TinyUSFM, UltraFedFM,
    timm ViTs): an absolute ``pos_embed`` and a fused ``qkv`` bias in the encoder blocks; None: neither.
    """
    keys = [k for k in keys if isinstance(k, str)]

    def has(name: str) -> bool:
        return any(k == name or k.endswith("." + name) for k in keys)

    if any(k.endswith("relative_position_bias_table") for k in keys) or has("blocks.0.attn.q_bias"):
        return "beit"
    if has("pos_embed") and has("blocks.0.attn.qkv.bias"):
        return "mae"
    return None


def state_dict_keys(obj: dict) -> list[str]:
    """The tensor names of a checkpoint object, looking inside ``{"model" | "state_dict" | "module": {...}}``."""
    for key in ("model", "state_dict", "module", "student"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return [k for k, v in obj.items() if isinstance(v, torch.Tensor)]


def filter_state_dict(state_dict: dict, model: torch.nn.Module, report: LoadReport | None = None) -> dict:
    """The filter of ``model``'s family applied to ``state_dict``: the model's ``filter_checkpoint`` where its
    family file defines one (``mae``), else :func:`checkpoint_filter_fn` (``beit``, USFM)."""
    own = getattr(model, "filter_checkpoint", None)
    return (own or checkpoint_filter_fn)(state_dict, model, report)


def checkpoint_filter_fn(state_dict: dict, model: torch.nn.Module, report: LoadReport | None = None) -> dict:
    """Map a foreign state dict onto ``model``'s keys (pure: does not modify its inputs).

    Handles: flat official USFM dicts; SimMIM ``{"model": {"encoder.*", "decoder.*"}}``; ``module.``
    prefixes; per-block relative position tables identical across blocks (collapsed into the shared one);
    recomputed buffers (dropped); the SimMIM decoder (dropped); the relative position table resized
    to the model's grid without swapping axes.
    """
    report = report if report is not None else LoadReport("unknown")
    sd, fmt = unwrap_state_dict(state_dict)
    report.source_format = report.source_format if report.source_format != "unknown" else fmt
    out: dict[str, torch.Tensor] = {}
    per_block_tables = {}
    for k, v in sd.items():
        if k.endswith(_RECOMPUTED):
            report.dropped[k] = "recomputed at construction"
        elif k.startswith("decoder."):
            report.dropped[k] = "SimMIM pretraining decoder (not part of the backbone)"
        elif k.startswith("blocks.") and k.endswith("attn.relative_position_bias_table"):
            per_block_tables[k] = v
        else:
            out[k] = v
    if per_block_tables:
        tables = list(per_block_tables.values())
        if all(torch.equal(tables[0], t) for t in tables[1:]) and "rel_pos_bias.relative_position_bias_table" not in out:
            out["rel_pos_bias.relative_position_bias_table"] = tables[0]
            for k in per_block_tables:
                report.renamed[k] = "rel_pos_bias.relative_position_bias_table"
        else:
            raise CheckpointError(
                "checkpoint has per-block relative position tables that differ between blocks; usfm-edge models"
                " share one table (the USFM pretraining layout)",
                hint="fine-tuned per-block checkpoints of the official repo are not supported")
    key = "rel_pos_bias.relative_position_bias_table"
    if key in out and hasattr(model, "rel_pos_bias"):
        table = out[key]
        target_grid = model.rel_pos_bias.grid
        num_rel = table.shape[0] - 3
        side = int(round(math.sqrt(num_rel)))
        if side * side == num_rel and side % 2 == 1:
            old_grid = ((side + 1) // 2, (side + 1) // 2)
            if old_grid != tuple(target_grid):
                from usfm_edge.models.vit import resize_rel_pos_table

                out[key] = resize_rel_pos_table(table, old_grid, target_grid)
                report.resized[key] = (tuple(table.shape), tuple(out[key].shape))
    return out


def load_into(model: torch.nn.Module, checkpoint: str | Path | dict, allow_missing: tuple[str, ...] = ()) -> LoadReport:
    """Load a checkpoint file (or state dict) into ``model`` strictly; return the LoadReport.

    Args:
        allow_missing: model key prefixes that may stay at their initialisation (e.g. a new task head); the
            model's ``optional_keys`` (``mae``: its ``mask_token``, which published files do not hold) are added.

    Raises:
        CheckpointError: a checkpoint of the other family, or keys/shapes that do not match after filtering.
    """
    path = None
    if isinstance(checkpoint, dict):
        raw, config = checkpoint, None
    else:
        path = Path(checkpoint)
        raw, config = read_checkpoint(path)
    family = getattr(model, "family", "beit")
    found = detect_family(state_dict_keys(raw))
    if found is not None and found != family:
        raise CheckpointError(f"this is a '{found}' checkpoint ({_FAMILY_NAMES[found]}) but the model is of the "
                              f"'{family}' family", path=path,
                              hint=f"choose a {found} preset (usfm-edge convert-weights detects it for you)")
    allow_missing = tuple(allow_missing) + tuple(getattr(model, "optional_keys", ()))
    report = LoadReport("usfm_edge" if config is not None else "unknown", family=family)
    sd = filter_state_dict(raw, model, report)
    if config is not None and "backbone." in "".join(list(sd)[:5]) and not any(k.startswith("backbone.") for k in model.state_dict()):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_missing = [k for k in missing if not k.startswith(allow_missing)]
    if unexpected or bad_missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}")
        if bad_missing:
            parts.append(f"{len(bad_missing)} missing key(s): {', '.join(bad_missing[:8])}")
        raise CheckpointError("checkpoint does not match the model architecture: " + "; ".join(parts), path=path,
                              hint="check the model preset (base/small/tiny) matches the checkpoint")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"shape mismatch for '{k}': checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}",
                                  path=path, hint="check the model preset matches the checkpoint")
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys  # checked above
    report.mapped = sorted(sd)
    report.missing = sorted(missing)
    return report


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict, half: bool = False) -> Path:
    """Write a usfm-edge ``.safetensors`` checkpoint atomically (temp file + rename).

    Args:
        config: JSON-serialisable description (model preset and args, task, labels, preprocessing...).
        half: store floating tensors as fp16 (demo checkpoints).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        tensors[k] = v.contiguous()
    from usfm_edge.core.io import atomic_write_with

    return atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(config, sort_keys=True)}))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Public alias of ``read_checkpoint``: (state dict, usfm-edge config or None)."""
    return read_checkpoint(path)
