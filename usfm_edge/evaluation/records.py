"""Which real frames are scored, and how they are read: data sources -> records -> uint8 frames and references.

The one place the scoring paths (``evaluate``, the INT8 calibration and gate, ``bench``) get their records and
frames from: ``select_records`` gives the held-out patient split that fine-tuning used, ``read_frame`` the
uint8 grey frame exactly as a bundle is fed, ``read_mask`` the reference mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import ConfigError, DataError
from usfm_edge.data import sample_dir
from usfm_edge.data.readers import read_image
from usfm_edge.data.sources import Record, load_records, read_record_mask
from usfm_edge.data.splits import patient_split

__all__ = ["select_records", "describe_selection", "evenly_spaced", "split_records", "read_frame", "read_mask", "default_frames", "Record"]


def evenly_spaced(records: list, limit: int | None) -> list:
    """At most ``limit`` records, evenly spaced (deterministic)."""
    if limit is None or len(records) <= limit:
        return records
    return [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]


def select_records(data: str | Sequence[str], split: str = "val", val_fraction: float = 0.2, seed: int = 0,
                   limit: int | None = None) -> list[Record]:
    """Records of one or more sources, restricted to the held-out patient split used by fine-tuning.

    Args:
        split: ``val`` (held-out patients, the default: same split as ``finetune``), ``train`` or ``all``.
        val_fraction, seed: the patient-level split (must match the one used for training).
        limit: keep at most this many records (evenly spaced, deterministic).
    """
    specs = [data] if isinstance(data, str) else list(data)
    return evenly_spaced(split_records([r for s in specs for r in load_records(s)], split, val_fraction, seed), limit)


def split_records(records: Sequence[Record], split: str = "val", val_fraction: float = 0.2,
                  seed: int = 0) -> list[Record]:
    """The ``val`` (held-out) or ``train`` patients of ``records`` (``data.splits.patient_split``), or ``all``.

    Raises:
        ConfigError: unknown split.
        DataError: fewer than two patients to split.
    """
    if split == "all":
        return list(records)
    if split not in ("train", "val"):
        raise ConfigError(f"split must be train, val or all, got {split!r}")
    train, val = patient_split(records, val_fraction=val_fraction, seed=seed)
    return val if split == "val" else train


def describe_selection(records: Sequence[Record], split: str, val_fraction: float = 0.2, seed: int = 0,
                       of: int | None = None) -> dict:
    """What was scored, for people: frames, patients and the split, e.g. ``scored 300 frames of 137 patients:
    split 'val' (20% of patients held out, seed 0)``.

    Args:
        records: the scored records.
        split, val_fraction, seed: how they were selected (``select_records``).
        of: number of records before ``limit`` thinned them (None: not thinned).
    """
    n, patients = len(records), len({(r.organ, r.patient) for r in records})
    thinned = of is not None and of > n
    if split == "all":
        what = f"{n} of the source's {of} frames (evenly spaced: limit)" if thinned else "every frame of the source"
        text = f"scored {what}: {n} frames of {patients} patients (split 'all')"
    else:
        pct = f"{100 * val_fraction:.0f}%"
        which = f"{pct} of patients held out" if split == "val" else f"the patients left after holding out {pct}"
        text = f"scored {n} frames of {patients} patients: split '{split}' ({which}, seed {seed})"
        if thinned:
            text += f"; {n} of the split's {of} frames, evenly spaced (limit)"
    return {"split": split, "frames": n, "patients": patients, "frames_in_split": of if thinned else n,
            "val_fraction": None if split == "all" else val_fraction, "seed": None if split == "all" else seed,
            "text": text}


def read_frame(item: Record | str | Path) -> np.ndarray:
    """The uint8 grey ``(H, W)`` frame of a record or an image file (``data.readers.read_image``).

    Raises:
        DataError: the file cannot be read (the message names it).
    """
    return read_image(item.image if isinstance(item, Record) else item)


def read_mask(record: Record, size: tuple[int, int] | None = None) -> np.ndarray:
    """The reference class mask of a record (at the image's size, or ``size``)."""
    return read_record_mask(record, size)


def default_frames(n: int = 4) -> list[np.ndarray]:
    """Real frames from the bundled sample: alternately BUS-BRA breast and HC18 fetal-head images (the default
    frames of the export parity gate)."""
    root = sample_dir()
    bus = sorted((root / "busbra" / "Images").glob("*.png"))
    hc = sorted(p for p in (root / "hc18" / "training_set").glob("*.png") if "Annotation" not in p.name)
    paths = [p for pair in zip(bus, hc) for p in pair][:n]
    if not paths:
        raise DataError("the bundled sample frames are missing", path=root,
                        hint="pass verify_frames=[...] (real ultrasound frames) to export()")
    return [read_image(p) for p in paths]
