"""Typed checks of ``usfm.json`` values (stdlib only): each failure is a ``BundleError`` naming the field and
showing the value as it is spelled in the JSON. ``core.bundle_schema`` validates every ``BundleMeta`` field with
them.
"""

from __future__ import annotations

import json
from typing import Any

from usfm_edge.core.errors import BundleError

__all__ = ["MAX_SIDE_LIMIT", "MAX_DIM", "show_value", "invalid_value", "check_int", "check_str", "check_type",
           "check_number", "check_str_list", "check_preprocessing"]

#: largest frame side, image size or tensor dimension a bundle may declare (also the runtime's hard ceiling)
MAX_SIDE_LIMIT = 65536
MAX_DIM = 2**31 - 1


def show_value(value: Any) -> str:
    """A value as it is spelled in ``usfm.json`` (``"4096"``, ``null``, ``Infinity``), shortened."""
    try:
        text = json.dumps(value, allow_nan=True, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def invalid_value(where: str, expected: str, value: Any) -> BundleError:
    """The BundleError of a value that is not what ``where`` must be."""
    return BundleError(f"{where} must be {expected}, got {show_value(value)}")


def check_int(value: Any, where: str, lo: int, hi: int) -> int:
    """``value`` if it is an integer (not a bool) in ``[lo, hi]``, else BundleError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise invalid_value(where, f"an integer in [{lo}, {hi}]", value)
    return value


def check_str(value: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
    """``value`` if it is a non-empty string (one of ``choices`` when given), else BundleError naming ``where``."""
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            raise invalid_value(where, "one of " + ", ".join(choices), value)
    elif not isinstance(value, str) or not value:
        raise invalid_value(where, "a non-empty string", value)
    return value


def check_type(value: Any, where: str, kind: type | tuple[type, ...], expected: str, optional: bool = False):
    """``value`` if it is a ``kind`` (bools only where ``kind`` is bool; None when ``optional``), else BundleError."""
    if (value is None and optional) or (isinstance(value, kind) and not isinstance(value, bool)) or \
            (kind is bool and isinstance(value, bool)):
        return value
    raise invalid_value(where, expected + (" or null" if optional else ""), value)


def check_number(value: Any, where: str, positive: bool = False) -> float:
    """``value`` as a float if it is a finite number (> 0 when ``positive``), else BundleError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
            value in (float("inf"), float("-inf")) or (positive and value <= 0):
        raise invalid_value(where, "a positive finite number" if positive else "a finite number", value)
    return float(value)


def check_str_list(value: Any, where: str, unique: bool = False) -> list[str]:
    """``value`` as a list if it is a list of non-empty strings (no repeats when ``unique``), else BundleError."""
    check_type(value, where, (list, tuple), "a list of strings")
    for i, item in enumerate(value):
        check_str(item, f"{where}[{i}]")
    if unique and len(set(value)) != len(value):
        dup = next(x for i, x in enumerate(value) if x in value[:i])
        raise BundleError(f"{where} must not repeat a name, {show_value(dup)} appears twice")
    return list(value)


def check_preprocessing(pre: Any) -> None:
    """The ``PreprocessSpec`` fields of ``usfm.json`` (the runtime builds the spec from them with ``from_dict``)."""
    where = "preprocessing"
    check_type(pre, where, dict, "a PreprocessSpec object")
    if "img_size" not in pre:
        raise BundleError(f"{where}.img_size is missing (preprocessing must be a PreprocessSpec object)")
    known = ("img_size", "interpolation", "antialias", "mean", "std", "in_chans", "max_side", "extra")
    unknown = sorted(set(pre) - set(known))
    if unknown:
        raise BundleError(f"{where} has unknown keys {unknown} (known: {', '.join(known)})")
    check_int(pre["img_size"], f"{where}.img_size", 1, MAX_SIDE_LIMIT)
    if "interpolation" in pre:
        check_str(pre["interpolation"], f"{where}.interpolation", ("bicubic", "bilinear"))
    if "antialias" in pre:
        check_type(pre["antialias"], f"{where}.antialias", bool, "true or false")
    chans = check_int(pre.get("in_chans", 3), f"{where}.in_chans", 1, 4)
    for key in ("mean", "std"):
        if key not in pre:
            if chans != 3:
                raise BundleError(f"{where}.{key} is missing (the default has 3 values, in_chans is {chans})")
            continue
        values = check_type(pre[key], f"{where}.{key}", (list, tuple), f"a list of {chans} numbers")
        if len(values) != chans:
            raise invalid_value(f"{where}.{key}", f"a list of {chans} numbers (one per input channel)", values)
        for i, v in enumerate(values):
            check_number(v, f"{where}.{key}[{i}]", positive=key == "std")
    if "max_side" in pre:
        check_int(pre["max_side"], f"{where}.max_side", 8, MAX_SIDE_LIMIT)
    if "extra" in pre:
        check_type(pre["extra"], f"{where}.extra", dict, "an object")
