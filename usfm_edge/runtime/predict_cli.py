"""``usfm-edge predict``: run a bundle over PNG/JPEG/DICOM files, folders and cine loops; write overlays + tables.

    usfm-edge predict hc18-seg.usfm scans/ cine.dcm --out predictions --pixel-spacing 0.12

Writes into ``--out`` (each file atomically: temporary file + rename):

* ``overlays/<name>.png``: seg: each class's contour (and a light tint) in its colour with areas (and the head
  circumference) written on the frame; cls: the label and its probability; enhance: input and enhanced frames
  side by side. Frames of a cine loop get ``_fNNNN`` suffixes.
* ``results.json``: the bundle, backend, one record per frame and the files that could not be read.
* ``results.csv``: one row per frame: file, frame, per-class areas in px and mm², head circumference (HC18-style
  models), label/probability (cls), timing_ms.
* ``features.npy`` for ``features`` bundles (one row per frame, in the order of ``results.csv``).

Frames are numbered within their file everywhere (records, errors, messages). Input names can carry patient
data: ``--anonymize-names`` writes overlays as ``frame_0001.png``... and names the inputs ``file_0001``... in the
tables and messages; ``--name-map PATH`` (outside ``--out``) keeps the mapping back to the input paths.

Pixel spacing: a DICOM's own spacing wins, then a dataset table next to the image (HC18's
``*pixel_size*.csv`` with ``filename`` and ``pixel size(mm)`` columns, in the image's folder or the one above),
then ``--pixel-spacing`` for the remaining files; ``results.json`` records which source gave each frame's spacing. HC18-style models are
recognised by a label containing ``fetal_head`` or a note in ``usfm.json`` mentioning HC18 / head circumference;
the circumference (mm) is the ellipse fit of the head mask (``core.geometry``), drawn on the overlay.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import ConfigError, DataError, InputError
from usfm_edge.core.io import atomic_save_npy, atomic_write_bytes, atomic_write_json, atomic_write_text
from usfm_edge.data.readers import IMAGE_SUFFIXES

__all__ = ["run_predict", "expand_inputs", "hc_label_index"]



def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded recursively to image/DICOM files (DICOMs without a suffix too), sorted.

    Raises:
        DataError: a path does not exist, or a folder holds no readable file.
    """
    from usfm_edge.data.readers import is_dicom

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and (
                f.suffix.lower() in IMAGE_SUFFIXES or (f.suffix == "" and is_dicom(f))))
            if not found:
                raise DataError("folder holds no PNG/JPEG/BMP/TIFF/DICOM files", path=p)
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError("input not found", path=p)
    return out


def hc_label_index(meta) -> int | None:
    """Class index of the fetal head for HC18-style bundles (label or ``usfm.json`` notes), else None."""
    if meta.task != "seg":
        return None
    for i, name in enumerate(meta.labels):
        if "fetal_head" in name.lower().replace(" ", "_").replace("-", "_"):
            return i
    notes = " ".join(str(n) for n in meta.notes).lower()
    if any(key in notes for key in ("hc18", "head circumference", "fetal_head", "fetal head")):
        return 1 if len(meta.labels) > 1 else None
    return None


def _hc(mask: np.ndarray, k: int, spacing) -> tuple[float | None, str | None, list[float] | None]:
    """(HC in mm or None, why not, fitted ellipse ``[cx, cy, a, b, theta]`` in pixels or None)."""
    from usfm_edge.core.geometry import ellipse_perimeter, fit_ellipse

    head = mask == k
    if not head.any():
        return None, "no fetal head segmented", None
    e = fit_ellipse(head)
    ellipse = [round(float(v), 3) for v in e]
    if spacing is None:
        return None, "pixel spacing unknown: give --pixel-spacing or a DICOM with PixelSpacing", ellipse
    dy, dx = spacing
    if abs(dy - dx) > 0.01 * max(dy, dx):
        return None, f"anisotropic pixel spacing {dy}x{dx} mm: the ellipse fit needs square pixels", ellipse
    return round(ellipse_perimeter(e.a, e.b) * (dy + dx) / 2.0, 3), None, ellipse


class _Names:
    """Unique overlay file names: ``stem.png``, ``stem_f0003.png`` for cine frames, ``stem-2.png`` on clashes;
    with ``anonymous`` ``frame_0001.png``, ``frame_0002.png``... in the order of the records (no input name)."""

    def __init__(self, anonymous: bool = False):
        self.used: set[str] = set()
        self.anonymous = anonymous

    def __call__(self, path: Path, frame: int, n_frames: int) -> str:
        if self.anonymous:
            name = f"frame_{len(self.used) + 1:04d}.png"
            self.used.add(name)
            return name
        base = path.stem if n_frames == 1 else f"{path.stem}_f{frame:04d}"
        name, k = f"{base}.png", 2
        while name in self.used:
            name, k = f"{base}-{k}.png", k + 1
        self.used.add(name)
        return name


class DatasetSpacing:
    """Pixel sizes listed by dataset tables beside the images (HC18: ``training_set_pixel_size_and_HC.csv``)."""

    def __init__(self):
        self._tables: dict[Path, dict[str, float]] = {}

    def _table(self, folder: Path) -> dict[str, float]:
        if folder not in self._tables:
            sizes: dict[str, float] = {}
            for table in sorted(folder.glob("*pixel_size*.csv")):
                try:
                    with open(table, newline="", encoding="utf-8-sig") as fh:
                        for row in csv.DictReader(fh):
                            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                            name, size = row.get("filename"), row.get("pixel size(mm)")
                            if name and size:
                                try:
                                    value = float(size)
                                except ValueError:
                                    continue
                                if np.isfinite(value) and value > 0:
                                    sizes[name] = value
                except (OSError, UnicodeDecodeError, csv.Error):
                    continue  # an unreadable table gives no spacing; the frame is still predicted
            self._tables[folder] = sizes
        return self._tables[folder]

    def __call__(self, path: Path) -> float | None:
        for folder in (path.parent, path.parent.parent):
            value = self._table(folder).get(path.name)
            if value is not None:
                return value
        return None


def _frames_of(files: list[Path], spacing, pending: deque, read_errors: deque) -> Iterator:
    """Runs in the stream's loader thread: every frame of every file, as ``(frame, spacing)``; notes each in ``pending``."""
    from usfm_edge.data.readers import is_dicom, iter_frames, read_dicom

    tables = DatasetSpacing()
    for f in files:
        try:
            if is_dicom(f):
                d = read_dicom(f)
                frames, sp = d.frames, d.pixel_spacing_mm
                source = "dicom" if sp is not None else None
            else:
                frames, sp, source = [fr for _, fr in iter_frames(f)], None, None
                listed = tables(f)
                if listed is not None:
                    sp, source = (listed, listed), "dataset csv"
        except DataError as exc:
            read_errors.append({"file": str(f), "frame": None, "error": exc.message})
            continue
        if sp is None and spacing is not None:
            sp, source = spacing, "option"
        for i, frame in enumerate(frames):
            pending.append((f, i, len(frames), frame, sp, source))
            yield frame, sp


def _record(result, f: Path, i: int, n: int, sp, source, hc_index) -> dict:
    h, w = (result.mask.shape if result.task == "seg" else (result.image.shape if result.task == "enhance" else (0, 0)))
    rec: dict = {"file": str(f), "frame": i, "frames_in_file": n, "timing_ms": round(float(result.timing_ms), 3),
                 "pixel_spacing_mm": list(sp) if sp is not None else None, "pixel_spacing_source": source}
    if result.task == "seg":
        rec.update(height=h, width=w, areas_px=result.areas_px,
                   areas_mm2={k: round(v, 4) for k, v in result.areas_mm2.items()} if result.areas_mm2 else None)
        if hc_index is not None:
            rec["hc_mm"], rec["hc_note"], rec["hc_ellipse_px"] = _hc(result.mask, hc_index, sp)
    elif result.task == "cls":
        rec.update(label=result.label_name, prob=round(float(result.probs[result.label]), 6),
                   probs={n_: round(float(p), 6) for n_, p in zip(result.labels, result.probs)})
    elif result.task == "features":
        rec["feature_norm"] = round(float(np.linalg.norm(result.features)), 6)
    return rec


def _overlay(result, frame: np.ndarray, rec: dict, labels: list[str]) -> np.ndarray | None:
    from usfm_edge.runtime import overlay

    gray = frame
    if result.task == "seg":
        lines = []
        for name in labels[1:]:
            px = rec["areas_px"].get(name, 0)
            mm2 = (rec["areas_mm2"] or {}).get(name)
            lines.append(f"{name}: {px} px" + (f" = {mm2:.1f} mm2" if mm2 is not None else ""))
        if "hc_mm" in rec:
            lines.append(f"HC {rec['hc_mm']:.1f} mm" if rec["hc_mm"] is not None else f"HC: {rec['hc_note']}")
        ellipses = [rec["hc_ellipse_px"]] if rec.get("hc_ellipse_px") else []
        return overlay.seg_overlay(gray, result.mask, labels, lines, ellipses=ellipses)
    if result.task == "cls":
        return overlay.cls_overlay(gray, result.label_name, rec["prob"], result.probs, result.labels)
    if result.task == "enhance":
        return overlay.enhance_overlay(gray, result.image)
    return None


def _csv(records: list[dict], task: str, labels: list[str], hc: bool) -> str:
    cols = ["file", "frame"]
    if task == "seg":
        cols += [f"area_px_{n}" for n in labels] + [f"area_mm2_{n}" for n in labels] + (["hc_mm"] if hc else [])
    elif task == "cls":
        cols += ["label", "prob"] + [f"prob_{n}" for n in labels]
    elif task == "features":
        cols += ["feature_norm"]
    cols += ["timing_ms", "overlay"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = dict(r)
        for n in labels:
            row[f"area_px_{n}"] = (r.get("areas_px") or {}).get(n)
            row[f"area_mm2_{n}"] = (r.get("areas_mm2") or {}).get(n)
            row[f"prob_{n}"] = (r.get("probs") or {}).get(n)
        writer.writerow(row)
    return buf.getvalue()


def _drain(src: deque, dst: list) -> int:
    n = 0
    while src:
        dst.append(src.popleft())
        n += 1
    return n


_STREAM_INDEX = re.compile(r"^frame \d+: ")  # the stream numbers frames across the whole run; we do per file


def _anonymize(summary: dict, files: list[Path], name_map: Path | None) -> None:
    """Replace every input path and name in ``summary`` by ``file_0001``...; write the mapping to ``name_map``."""
    ids = {str(f): f"file_{k:04d}" for k, f in enumerate(files, 1)}
    for entry in [*summary["records"], *summary["errors"]]:
        entry["file"] = ids.get(entry["file"], entry["file"])
    for e in summary["errors"]:
        for f in files:
            e["error"] = e["error"].replace(str(f), ids[str(f)]).replace(f.name, ids[str(f)])
    if name_map is not None:
        atomic_write_json(name_map, {v: k for k, v in ids.items()})


def run_predict(bundle: str | Path, inputs: Sequence[str | Path], out: str | Path, backend: str = "auto",
                device: str = "auto", pixel_spacing: float | None = None, threads: int | None = None,
                overlays: bool = True, progress: bool = True, anonymize_names: bool = False,
                name_map: str | Path | None = None, trusted_keys: Sequence[str | Path] | None = None) -> dict:
    """Predict every frame of ``inputs`` with ``bundle`` and write overlays, ``results.json`` and ``results.csv``.

    Args:
        bundle: the ``NAME.usfm`` folder.
        inputs: files and folders (PNG/JPEG/BMP/TIFF/DICOM, multi-frame DICOM cine).
        out: output folder (created).
        backend: ``auto``, ``onnxruntime``, ``openvino`` or ``tensorrt``.
        device: backend device (``auto``, ``cpu``, ``gpu``...).
        pixel_spacing: isotropic mm per pixel for files without their own (DICOM) spacing.
        threads: backend CPU threads.
        overlays: write the overlay PNGs.
        progress: show a click progress bar (on stderr).
        anonymize_names: never copy input names (which can carry patient data) into the outputs: overlays are
            ``frame_0001.png``... in record order, ``results.json``/``.csv`` name files ``file_0001``...
        name_map: with ``anonymize_names``, a JSON file (outside ``out``) to write ``{file_0001: input path}`` to.
        trusted_keys: Ed25519 public key files; when given, the bundle must be signed by one of them.

    Returns:
        the ``results.json`` content.

    Raises:
        DataError: an input could not be read or a frame was unusable (raised after every other frame was
            predicted and the outputs written; the message counts the failures).
        BundleError, BackendUnavailableError: the bundle cannot be opened.
    """
    import click

    from usfm_edge.runtime.engine import Engine

    out = Path(out)
    if name_map is not None:
        name_map = Path(name_map)
        if not anonymize_names:
            raise ConfigError("a name map is written only with anonymised names", hint="add --anonymize-names")
        if name_map.resolve().is_relative_to(out.resolve()):
            raise ConfigError("the name map must be kept out of the outputs (it links them to the input names)",
                              path=name_map, hint="choose a --name-map outside --out")
    files = expand_inputs(inputs)
    spacing = None if pixel_spacing is None else (float(pixel_spacing), float(pixel_spacing))
    engine = Engine.open(bundle, backend=backend, device=device, threads=threads,
                         trusted_keys=list(trusted_keys) if trusted_keys else None)
    hc_index = hc_label_index(engine.meta)
    records: list[dict] = []
    errors: list[dict] = []
    features: list[np.ndarray] = []
    names = _Names(anonymous=anonymize_names)
    pending: deque = deque()
    read_errors: deque = deque()  # appended by the stream's loader thread
    bar = click.progressbar(length=len(files), label="predict", file=sys.stderr if progress else io.StringIO(),
                            show_pos=True)
    done_files = 0

    def advance(n: int) -> None:
        nonlocal done_files
        bar.update(n)
        done_files += n

    with engine, bar:
        source = _frames_of(files, spacing, pending, read_errors)
        for result in engine.stream(source, on_error="yield"):
            f, i, n, frame, sp, src = pending.popleft()
            advance(_drain(read_errors, errors) + (i == n - 1))
            if isinstance(result, (InputError, DataError)):
                errors.append({"file": str(f), "frame": i, "error": _STREAM_INDEX.sub("", result.message)})
                continue
            rec = _record(result, f, i, n, sp, src, hc_index)
            if overlays:
                picture = _overlay(result, frame, rec, engine.labels)
                if picture is not None:
                    from usfm_edge.runtime.overlay import png_bytes

                    name = names(f, i, n)
                    atomic_write_bytes(out / "overlays" / name, png_bytes(picture))
                    rec["overlay"] = f"overlays/{name}"
            if result.task == "features":
                rec["feature_row"] = len(features)
                features.append(result.features)
            records.append(rec)
        _drain(read_errors, errors)
        advance(len(files) - done_files)
        backend_name = engine.backend.name
    summary = {"bundle": str(bundle), "name": engine.meta.name, "task": engine.task, "labels": engine.labels,
               "backend": backend_name, "precision": engine.meta.precision,
               "head_circumference": hc_index is not None, "files": len(files), "frames": len(records),
               "errors": errors, "mean_timing_ms": round(float(np.mean([r["timing_ms"] for r in records])), 3)
               if records else None, "records": records}
    if anonymize_names:
        _anonymize(summary, files, name_map)
    if features:
        atomic_save_npy(out / "features.npy", np.stack(features))
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.csv", _csv(records, engine.task, engine.labels, hc_index is not None))
    if errors:
        raise DataError(f"{len(errors)} input(s) failed, {len(records)} frame(s) predicted; the failures are listed "
                        f"in results.json: " + "; ".join(f"{e['file']}[frame {e['frame']}]: {e['error']}" if e["frame"] is not None
                                  else f"{e['file']}: {e['error']}" for e in errors[:3]),
                        path=out / "results.json")
    return summary
