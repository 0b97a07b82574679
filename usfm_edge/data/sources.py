r"""Data sources named on the command line, and the records they yield.

A source spec is ``KIND:PATH`` with an optional ``@organ`` tag:

===========================  =================================================================================
``busbra:PATH``              BUS-BRA: ``bus_data.csv``, ``Images/bus_NNNN-x.png``, ``Masks/mask_NNNN-x.png``
``hc18:PATH``                HC18: ``training_set/NNN_HC.png`` + ``NNN_HC_Annotation.png`` (ellipse outline)
                             and ``training_set_pixel_size_and_HC.csv`` (in PATH or in the image folder)
``folder:PATH[@organ]``      every image below PATH; organ from the tag, the first sub-folder, or PATH's name;
                             an optional ``PATH/manifest.csv`` (path, organ[, label, patient]) lists the images
``pairs:IMAGES,MASKS``       image/mask pairs matched by file stem (``mask_`` prefix or ``_mask``/
                             ``_Annotation`` suffix on masks allowed)
``csv:FILE.csv``             columns path, label[, patient, organ]; paths relative to the csv's folder
===========================  =================================================================================

A bare existing path is read as ``folder:PATH``. Every adapter returns :class:`Record` objects; the tag, when
given, overrides the organ of any source.

Patients. Splits are always by patient (``data.splits``), so every record needs the id of the patient it comes
from. BUS-BRA, HC18 and tables with a ``patient`` column carry it; for ``folder:`` and ``pairs:`` give it after a
``?`` at the end of the spec (quote the spec in a shell):

``?patient=REGEX``           the patient id is the first group of REGEX searched in the image's file name
                             (``'pairs:img,masks?patient=^(\d+)_'`` makes ``0042_left.png`` patient ``0042``)
``?patients=FILE.csv``       a table with columns ``file`` (image file name, or path relative to the image
                             folder) and ``patient``

Without either, such a source warns once that it splits per image: two views of one patient could then land
on both sides of a train/validation split.
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import ConfigError, DataError
from usfm_edge.core.geometry import fill_outline_mask
from usfm_edge.data.readers import IMAGE_SUFFIXES, read_mask

KINDS = ("busbra", "hc18", "folder", "pairs", "csv")
BUSBRA_LABELS = ("benign", "malignant")
_MASK_STEM = re.compile(r"^(?:mask_)?(?P<key>.+?)(?:_mask|_annotation|_seg|_label)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    """One image of a dataset and what is known about it.

    Attributes:
        image: path of the image file.
        mask: path of the segmentation mask (or outline annotation), or None.
        label: class index, or None.
        label_name: class name, or None.
        patient: patient (or subject) id used for patient-level splits.
        organ: organ / application tag (``breast``, ``fetal_head``, ...).
        device: scanner model, or None.
        pixel_size_mm: pixel size in mm, or None.
        hc_mm: reference head circumference in mm (HC18), or None.
        fill_outline: the mask file is an outline that must be filled (HC18).
    """

    image: Path
    mask: Path | None = None
    label: int | None = None
    label_name: str | None = None
    patient: str = ""
    organ: str = "unknown"
    device: str | None = None
    pixel_size_mm: float | None = None
    hc_mm: float | None = None
    fill_outline: bool = False


@dataclass(frozen=True)
class DataSource:
    """A parsed source spec.

    Attributes:
        kind: one of ``busbra``, ``hc18``, ``folder``, ``pairs``, ``csv``.
        path: the dataset folder or file (the image folder for ``pairs``).
        organ: organ tag from ``@organ``, or None.
        masks: the mask folder of a ``pairs`` source, else None.
        patient_regex: ``?patient=REGEX``: patient id = first group (or the match) in the image's file name.
        patient_table: ``?patients=FILE.csv``: columns ``file``, ``patient``.
    """

    kind: str
    path: Path
    organ: str | None = None
    masks: Path | None = None
    patient_regex: str | None = None
    patient_table: Path | None = None

    def __str__(self) -> str:
        text = f"{self.kind}:{self.path}" + (f",{self.masks}" if self.masks else "")
        text += f"@{self.organ}" if self.organ else ""
        if self.patient_regex is not None:
            text += f"?patient={self.patient_regex}"
        elif self.patient_table is not None:
            text += f"?patients={self.patient_table}"
        return text


def parse_source(spec: str | DataSource) -> DataSource:
    """Parse ``KIND:PATH[@organ]`` (``pairs:IMAGES,MASKS[@organ]``) into a DataSource.

    Args:
        spec: the spec string, or a DataSource (returned unchanged).

    Returns:
        The DataSource (the paths are not checked here; :func:`load_records` does that).

    Raises:
        ConfigError: unknown kind or malformed spec.
    """
    if isinstance(spec, DataSource):
        return spec
    spec, _, query = str(spec).partition("?")
    key = _patient_key(query, spec) if query else {}
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS:
        if Path(spec).exists():
            return DataSource("folder", Path(spec))
        raise ConfigError(
            f"unknown data source {spec!r}",
            hint="use busbra:PATH, hc18:PATH, folder:PATH[@organ], pairs:IMAGES,MASKS or csv:FILE",
        )
    organ = None
    head, at, tag = rest.rpartition("@")
    if at and tag and re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        rest, organ = head, tag
    if not rest:
        raise ConfigError(f"data source {spec!r} has no path")
    if kind == "pairs":
        images, comma, masks = rest.partition(",")
        if not comma or not images or not masks:
            raise ConfigError(f"pairs source {spec!r} needs two folders", hint="pairs:IMAGES_DIR,MASKS_DIR")
        return DataSource(kind, Path(images), organ, Path(masks), **key)
    return DataSource(kind, Path(rest), organ, **key)


def _patient_key(query: str, spec: str) -> dict:
    name, eq, value = query.partition("=")
    if not eq or not value or name not in ("patient", "patients"):
        raise ConfigError(f"data source {spec!r}: unknown option {query!r}",
                          hint="use ?patient=REGEX (over the image file name) or ?patients=FILE.csv (file,patient)")
    if name == "patients":
        return {"patient_table": Path(value)}
    try:
        re.compile(value)
    except re.error as exc:
        raise ConfigError(f"data source {spec!r}: bad patient regex {value!r} ({exc})") from None
    return {"patient_regex": value}


def _need(path: Path, what: str, hint: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found", path=path, hint=hint)
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]


def _busbra(src: DataSource) -> list[Record]:
    root = src.path
    table = _need(
        root / "bus_data.csv", "BUS-BRA table bus_data.csv", "busbra:PATH must hold bus_data.csv, Images/, Masks/"
    )
    records = []
    for row in _read_csv(table):  # Width/Height columns are not used: four rows are wrong
        image = root / "Images" / f"{row['ID']}.png"
        if not image.is_file():
            continue  # the shared copy holds only some folds
        mask = root / "Masks" / f"mask_{row['ID'].removeprefix('bus_')}.png"
        pathology = row.get("Pathology", "").lower()
        label = BUSBRA_LABELS.index(pathology) if pathology in BUSBRA_LABELS else None
        records.append(
            Record(
                image=image,
                mask=mask if mask.is_file() else None,
                label=label,
                label_name=pathology if label is not None else None,
                patient=row["Case"],
                organ="breast",
                device=row.get("Device") or None,
            )
        )
    if not records:
        raise DataError("no image of bus_data.csv was found under Images/", path=root, hint="check the BUS-BRA folder")
    return records


def _hc18(src: DataSource) -> list[Record]:
    root = _need(src.path, "HC18 folder", "hc18:PATH must hold training_set/ and its csv")
    images = root / "training_set" if (root / "training_set").is_dir() else root
    tables = sorted(images.glob("*pixel_size*.csv")) + sorted(root.glob("*pixel_size*.csv"))
    if not tables and images == root:
        tables = sorted(root.parent.glob("*pixel_size*.csv"))
    if tables:
        rows = _read_csv(tables[0])
    else:  # no table: the images alone, without pixel size
        rows = [{"filename": p.name} for p in sorted(images.glob("*HC.png"))]
    records = []
    for row in rows:
        image = images / row["filename"]
        if not image.is_file():
            continue
        annotation = image.with_name(image.stem + "_Annotation.png")
        size, hc = row.get("pixel size(mm)"), row.get("head circumference (mm)")
        records.append(
            Record(
                image=image,
                mask=annotation if annotation.is_file() else None,
                patient=image.stem.split("_")[0],
                organ="fetal_head",
                pixel_size_mm=float(size) if size else None,
                hc_mm=float(hc) if hc else None,
                fill_outline=True,
            )
        )
    if not records:
        raise DataError("no HC18 image found", path=images, hint="expected NNN_HC.png files and their csv")
    return records


def _is_annotation(path: Path) -> bool:
    stem = path.stem.lower()
    return stem.startswith("mask_") or stem.endswith(("_mask", "_annotation"))


def _labels_from_column(values: list[str]) -> tuple[list[int | None], list[str | None]]:
    """Integer labels stay integers; names are numbered in sorted order; empty cells are None."""
    present = sorted({v for v in values if v})
    if all(re.fullmatch(r"-?\d+", v) for v in present):
        return [int(v) if v else None for v in values], [v or None for v in values]
    index = {name: i for i, name in enumerate(present)}
    return [index[v] if v else None for v in values], [v or None for v in values]


def _table_records(table: Path, base: Path, default_organ: str) -> list[Record]:
    rows = _read_csv(table)
    if not rows or "path" not in rows[0]:
        raise DataError("the table needs a 'path' column", path=table, hint="columns: path, organ, label, patient")
    labels, names = _labels_from_column([r.get("label", "") for r in rows])
    records = []
    for row, label, name in zip(rows, labels, names):
        image = _need(base / row["path"], "image listed in the table", f"fix the row in {table.name}")
        organ = row.get("organ") or default_organ
        records.append(
            Record(image=image, label=label, label_name=name, patient=row.get("patient") or image.stem, organ=organ)
        )
    return records


def _folder(src: DataSource) -> list[Record]:
    root = _need(src.path, "image folder", "give an existing folder: folder:PATH[@organ]")
    if (root / "manifest.csv").is_file():
        records = _table_records(root / "manifest.csv", root, root.name)
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        records = []
        for p in files:
            if _is_annotation(p):
                continue
            parts = p.relative_to(root).parts
            records.append(Record(image=p, patient=p.stem, organ=parts[0] if len(parts) > 1 else root.name))
    if not records:
        raise DataError("no image found", path=root, hint="supported: " + ", ".join(IMAGE_SUFFIXES))
    return records


def _pairs(src: DataSource) -> list[Record]:
    images = _need(src.path, "image folder", "pairs:IMAGES_DIR,MASKS_DIR")
    masks = _need(src.masks, "mask folder", "pairs:IMAGES_DIR,MASKS_DIR")
    by_key: dict[str, Path] = {}
    for m in sorted(masks.iterdir()):
        if m.suffix.lower() in IMAGE_SUFFIXES:
            key = _MASK_STEM.match(m.stem).group("key")
            if key not in by_key or (_is_annotation(m) and not _is_annotation(by_key[key])):
                by_key[key] = m  # a file named like a mask wins (images and masks may share a folder)
    records = []
    for p in sorted(images.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or _is_annotation(p):
            continue
        mask = by_key.get(p.stem) or by_key.get(p.stem.partition("_")[2])  # bus_0001 <-> mask_0001
        if mask is not None:
            records.append(Record(image=p, mask=mask, patient=p.stem, organ=images.name))
    if not records:
        raise DataError("no image has a mask with a matching name", path=images, hint=f"masks looked up in {masks}")
    return records


def _csv(src: DataSource) -> list[Record]:
    table = _need(src.path, "csv table", "csv:FILE.csv with columns path,label[,patient,organ]")
    return _table_records(table, table.parent, table.parent.name)


_ADAPTERS = {"busbra": _busbra, "hc18": _hc18, "folder": _folder, "pairs": _pairs, "csv": _csv}


def load_records(spec: str | DataSource) -> list[Record]:
    """List the records of a data source.

    Args:
        spec: a source spec string (see the module doc) or a parsed DataSource.

    Returns:
        Records in a stable order; the ``@organ`` tag, when given, overrides every record's organ.

    Raises:
        ConfigError: malformed spec.
        DataError: missing dataset files, or a source with no usable image.
    """
    src = parse_source(spec)
    records = _ADAPTERS[src.kind](src)
    if src.patient_regex is not None or src.patient_table is not None:
        records = _with_patients(records, src)
    elif src.kind in ("folder", "pairs") and all(r.patient == r.image.stem for r in records) and len(records) > 1:
        warnings.warn(f"{src}: no patient key, so this source splits per image (each of its {len(records)} "
                      "images counts as its own patient; two views of one patient can land on both sides of a "
                      "split). Add ?patient=REGEX or ?patients=FILE.csv to the spec (usfm_edge.data.sources)",
                      UserWarning, stacklevel=2)
    if src.organ:
        records = [replace(r, organ=src.organ) for r in records]
    return records


def _with_patients(records: list[Record], src: DataSource) -> list[Record]:
    """Set each record's patient from the source's ``?patient=`` regex or ``?patients=`` table."""
    if src.patient_regex is not None:
        pattern = re.compile(src.patient_regex)
        out = []
        for r in records:
            m = pattern.search(r.image.name)
            if m is None:
                raise DataError(f"the patient regex {src.patient_regex!r} does not match this file name", path=r.image,
                                hint="the regex is searched in the file name; its first group is the patient id")
            out.append(replace(r, patient=(m.group(1) if m.groups() else m.group(0)) or r.image.stem))
        return out
    table = _need(src.patient_table, "patient table", "?patients=FILE.csv with columns file,patient")
    rows = _read_csv(table)
    if not rows or "file" not in rows[0] or "patient" not in rows[0]:
        raise DataError("the patient table needs the columns file and patient", path=table)
    by_file = {row["file"].replace("\\", "/"): row["patient"] for row in rows if row.get("patient")}
    out = []
    for r in records:
        rel = r.image.relative_to(src.path).as_posix() if r.image.is_relative_to(src.path) else r.image.name
        patient = by_file.get(rel) or by_file.get(r.image.name)
        if patient is None:
            raise DataError(f"{r.image.name} is not listed in the patient table", path=table,
                            hint="every image of the source needs a row: file,patient")
        out.append(replace(r, patient=patient))
    return out


def label_names(records: list[Record]) -> list[str]:
    """Class names indexed by label (``['benign', 'malignant']`` for BUS-BRA); empty when unlabelled.

    Args:
        records: records of one task.

    Returns:
        List whose item i is the name of label i (``str(i)`` where no name is known).
    """
    names: dict[int, str] = {r.label: r.label_name or str(r.label) for r in records if r.label is not None}
    return [names.get(i, str(i)) for i in range(max(names) + 1)] if names else []


def read_record_mask(record: Record, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a record's mask as uint8 0/1 (or labels), filling HC18-style outlines.

    Args:
        record: a record with a mask.
        size: optional (height, width) to resize to (nearest neighbour, after filling).

    Returns:
        uint8 (H, W) mask.

    Raises:
        DataError: the record has no mask, or the mask file is unreadable.
    """
    if record.mask is None:
        raise DataError("record has no mask", path=record.image, hint="use a source with masks (busbra, hc18, pairs)")
    mask = read_mask(record.mask)
    if record.fill_outline:
        mask = fill_outline_mask(mask)
    if size is not None and mask.shape != tuple(size):
        from PIL import Image

        mask = np.asarray(Image.fromarray(mask).resize((int(size[1]), int(size[0])), Image.NEAREST), dtype=np.uint8)
    return mask
