"""Patient-level splits and label-fraction subsets of dataset records.

A patient is identified by ``(organ, record.patient)``, so ids that repeat across datasets (BUS-BRA case "1",
HC18 subject "001") never merge. Every draw is seeded and independent of the order of the input records;
the records returned keep their input order.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np

from usfm_edge.core.errors import ConfigError, DataError


class _Patient(Protocol):
    """What a split needs of a record (``data.sources.Record`` has it): its organ, patient id and class label."""

    organ: str
    patient: str
    label: int | None


Record = TypeVar("Record", bound=_Patient)


def _patients(records: Sequence[Record]) -> dict[tuple[str, str], int | None]:
    """Patient key -> stratum label (the highest label among the patient's images, None when unlabelled)."""
    strata: dict[tuple[str, str], int | None] = {}
    for r in records:
        key = (r.organ, r.patient)
        old = strata.get(key)
        strata[key] = r.label if old is None else (old if r.label is None else max(old, r.label))
    return strata


def _ranked_patients(records: Sequence[Record], seed: int) -> dict[int | None, list[tuple[str, str]]]:
    """Patients grouped by stratum, each group in a seeded random order (prefixes give nested subsets)."""
    groups: dict[int | None, list[tuple[str, str]]] = defaultdict(list)
    for key, label in sorted(_patients(records).items()):
        groups[label].append(key)
    rng = np.random.default_rng(seed)
    ranked = {}
    for label in sorted(groups, key=lambda x: (x is None, x if x is not None else 0)):
        keys = groups[label]
        ranked[label] = [keys[i] for i in rng.permutation(len(keys))]
    return ranked


def _take(records: Sequence[Record], chosen: set[tuple[str, str]], inside: bool) -> list[Record]:
    return [r for r in records if ((r.organ, r.patient) in chosen) == inside]


def patient_split(
    records: Sequence[Record], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Split records into train and validation by patient, stratified by label when labels exist.

    Args:
        records: dataset records (at least two patients).
        val_fraction: share of patients (per label stratum, rounded) put in validation; 0 < f < 1.
        seed: random seed; the same seed and records give the same split.

    Returns:
        (train, val) record lists; no patient appears in both and both are non-empty.

    Raises:
        ConfigError: val_fraction outside (0, 1).
        DataError: fewer than two patients.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    ranked = _ranked_patients(records, seed)
    n_total = sum(len(v) for v in ranked.values())
    if n_total < 2:
        raise DataError(f"{n_total} patient(s): a train/validation split needs at least two")
    val: set[tuple[str, str]] = set()
    for keys in ranked.values():
        val.update(keys[: int(round(val_fraction * len(keys)))])
    if not val:  # tiny sets: still one validation patient
        val.add(next(iter(ranked.values()))[0])
    if len(val) == n_total:
        val.discard(sorted(val)[0])
    return _take(records, val, inside=False), _take(records, val, inside=True)


def label_fraction(records: Sequence[Record], fraction: float, seed: int = 0) -> list[Record]:
    """Keep the images of a seeded random fraction of the PATIENTS (for label-efficiency experiments).

    Sampling is stratified by label when labels exist: each label keeps round(fraction * its patients) and
    at least one patient, so both classes survive small fractions. Subsets drawn with the same seed are
    nested: the 10% subset is inside the 50% subset.

    Args:
        records: dataset records.
        fraction: share of patients to keep, 0 < fraction <= 1.
        seed: random seed.

    Returns:
        The kept records, in input order (all of them when fraction == 1).

    Raises:
        ConfigError: fraction outside (0, 1].
        DataError: no records.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if not records:
        raise DataError("no records to sample from")
    if fraction == 1.0:
        return list(records)
    keep: set[tuple[str, str]] = set()
    for keys in _ranked_patients(records, seed).values():
        keep.update(keys[: max(1, int(round(fraction * len(keys))))])
    return _take(records, keep, inside=True)
