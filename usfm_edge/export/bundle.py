"""Write bundles atomically: a temporary sibling folder, renamed into place only when complete.

A bundle is a flat folder ``NAME.usfm/``::

    NAME.usfm/
      model.onnx | model.xml + model.bin      the graph (raw uint8 frames in, task outputs out)
      build_engine.sh                         TensorRT targets: the exact trtexec command for the device
      model.engine                            TensorRT targets, only where it was built on the device
      usfm.json                               core.bundle_schema.BundleMeta
      SHA256SUMS                              sha256sum format, every file except itself and device-built ones

Reading and verification live in ``usfm_edge.runtime.bundle_io`` (the runtime must not import this
package) and are re-exported here. ``model.engine`` and ``timing.cache`` are device products (rebuilt by
``build_engine.sh``), so they are not listed in ``SHA256SUMS``; an engine built at export time is recorded
in ``usfm.json`` (``extra.engine``) instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from usfm_edge.core.bundle_schema import BUNDLE_SUFFIX, META_FILE, SUMS_FILE, BundleMeta
from usfm_edge.core.errors import BundleError, ExportError
from usfm_edge.core.io import atomic_write_text, clean_before_write, owner_tag
from usfm_edge.runtime.bundle_io import (
    DEVICE_BUILT_FILES,
    format_sums,
    read_meta,
    read_sums,
    sha256_file,
    verify_bundle,
)

__all__ = ["BundleWriter", "write_bundle", "bundle_summary", "gate_passed", "write_sums", "update_meta", "verify_bundle", "read_meta", "read_sums",
           "sha256_file", "tool_versions", "bundle_path"]


def bundle_path(out: str | Path) -> Path:
    """``out`` with the ``.usfm`` suffix added when missing."""
    out = Path(out)
    return out if out.suffix == BUNDLE_SUFFIX else out.with_name(out.name + BUNDLE_SUFFIX)


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools that make and run bundles (None = not installed)."""
    out: dict[str, str | None] = {}
    for dist in ("usfm-edge", "torch", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["tensorrt"] = None
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12"):
        try:
            out["tensorrt"] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            continue
    if out["usfm-edge"] is None:
        from usfm_edge import __version__

        out["usfm-edge"] = __version__
    return out


def write_sums(folder: str | Path) -> Path:
    """(Re)write ``SHA256SUMS`` over every file of the folder except itself and device-built files."""
    folder = Path(folder)
    sums = {}
    for f in sorted(folder.iterdir()):
        if f.is_symlink():
            raise BundleError(f"'{f.name}' is a symbolic link; a bundle holds regular files only", path=f)
        if f.is_dir():
            raise BundleError(f"bundles are flat folders; found a sub-folder '{f.name}'", path=folder)
        if not f.is_file():
            raise BundleError(f"'{f.name}' is not a regular file; a bundle holds regular files only", path=f)
        if f.name == SUMS_FILE or f.name in DEVICE_BUILT_FILES:
            continue
        sums[f.name] = sha256_file(f)
    path = Path(atomic_write_text(folder / SUMS_FILE, format_sums(sums)))
    path.chmod(0o644)  # readable by the service account that runs the device software
    return path


def update_meta(folder: str | Path, meta: BundleMeta) -> Path:
    """Validate and write ``usfm.json``, then refresh ``SHA256SUMS``."""
    folder = Path(folder)
    meta.validate()
    missing = [n for n in meta.files.values() if not (folder / n).is_file() and n not in DEVICE_BUILT_FILES]
    if missing:
        raise BundleError(f"usfm.json names files that are not in the bundle: {missing}", path=folder)
    atomic_write_text(folder / META_FILE, meta.to_json()).chmod(0o644)
    return write_sums(folder)


class BundleWriter:
    """Build a bundle in a temporary sibling folder; ``commit`` renames it into place.

    Used as a context manager, an exception inside the block removes the temporary folder, so a failed
    export never leaves a bundle (complete or partial) behind. A killed export leaves its temporary folder
    (named with its PID, ``.NAME.usfm.tmp-<pid>-<host>-<hex>``); the next writer of ``out`` removes it, and
    when a kill fell between ``commit``'s two renames it first puts the previous bundle back at ``out``
    (``core.io.clean_before_write``), before it checks ``out``.

    Args:
        out: the bundle folder to create (``.usfm`` is appended when missing).
        overwrite: replace an existing bundle at ``out`` (a non-bundle folder is never replaced).
    """

    def __init__(self, out: str | Path, overwrite: bool = True):
        self.out = bundle_path(out)
        self.overwrite = overwrite
        clean_before_write(self.out)
        if self.out.exists():
            if not self.out.is_dir() or not ((self.out / META_FILE).is_file() or not any(self.out.iterdir())):
                raise ExportError("output exists and is not a usfm-edge bundle; refusing to replace it", path=self.out)
            if not overwrite and any(self.out.iterdir()):
                raise ExportError("bundle already exists; refusing to replace it", path=self.out,
                                  hint="pass --force (Python: overwrite=True) or choose another --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.out.parent / f".{self.out.name}.tmp-{owner_tag()}"
        self.path.mkdir()
        self.committed = False

    def file(self, name: str) -> Path:
        """Path of a file inside the (temporary) bundle."""
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise BundleError(f"bundle file names must be plain names, got {name!r}")
        return self.path / name

    def add(self, src: str | Path, name: str | None = None) -> Path:
        """Copy a file into the bundle."""
        src = Path(src)
        dst = self.file(name or src.name)
        shutil.copyfile(src, dst)
        return dst

    def write_meta(self, meta: BundleMeta) -> Path:
        """Write ``usfm.json`` and ``SHA256SUMS`` (call again after changing the metadata)."""
        return update_meta(self.path, meta)

    def commit(self) -> Path:
        """Verify the temporary bundle and move it to ``out`` (replacing an old bundle). Returns ``out``."""
        verify_bundle(self.path)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{owner_tag()}"
            os.replace(self.out, old)
        try:
            os.replace(self.path, self.out)
        except BaseException:  # an error or an interrupt between the renames: the previous bundle goes back
            if old is not None and not self.out.exists():
                os.replace(old, self.out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.out

    def abort(self) -> None:
        """Delete the temporary folder."""
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.committed:
            self.abort()


def write_bundle(out: str | Path, meta: BundleMeta, files: Mapping[str, str | Path], overwrite: bool = True) -> Path:
    """Write a complete bundle in one step (e.g. from the quantisation work).

    Args:
        out: the bundle folder (``.usfm`` appended when missing).
        meta: its metadata; ``meta.files`` must name the copied files.
        files: bundle file name -> source path to copy.
        overwrite: replace an existing bundle.

    Returns:
        the bundle path.
    """
    with BundleWriter(out, overwrite=overwrite) as w:
        for name, src in files.items():
            w.add(src, name)
        meta.name = meta.name or w.out.name[: -len(BUNDLE_SUFFIX)]
        w.write_meta(meta)
        return w.commit()


def bundle_summary(path: str | Path) -> str:
    """What an export decided, for people: target, precision, input contract, parity, calibration, INT8 gate.

    Every line comes from the bundle's ``usfm.json``: the input (raw frames, static ``HxW`` or any size),
    the parity record (against PyTorch, or against the fp32 bundle when the INT8 bundle was made from its
    files) with each output's numbers, the calibration set (frames, patients, sources, manifest hash) and the
    INT8 gate's metric fp32 -> int8 with its limit and verdict.
    """
    path = Path(path)
    meta = read_meta(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    lines = [f"bundle  {path}  ({size:.1f} MB)",
             f"  task {meta.task}  target {meta.target}  backend {meta.backend}  precision {meta.precision}"]
    hw = meta.input.static_hw
    kind = "raw uint8 frames" if meta.input.raw_frame else "normalised (B, 3, S, S) tensors"
    lines.append(f"  input  {kind}, " + (f"static {hw[0]}x{hw[1]} (the runtime fits other frames to it)" if hw
                                         else "any frame size") + f"; model input {meta.preprocessing.get('img_size')} px")
    parity = meta.parity or {}
    reference = parity.get("reference") or "PyTorch"
    lines.append(f"  parity vs {reference} on {parity.get('frames', '?')} real frames via "
                 f"{parity.get('backend', '?')}: {'passed' if parity.get('passed') else 'FAILED'}")
    for name, o in (parity.get("outputs") or {}).items():
        stats = ", ".join(f"{k} {v:.4g}" for k, v in o.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        lines.append(f"    {name}: {stats or 'no numbers recorded'}")
    for failure in parity.get("failures") or []:
        lines.append(f"    failed: {failure}")
    lines += _calibration_lines(meta.calibration or {})
    lines += [f"  {name}" for name in sorted(p.name for p in path.iterdir())]
    return "\n".join(lines)


def gate_passed(path: str | Path) -> bool:
    """False when the bundle's parity check or its INT8 accuracy gate failed (a bundle kept with ``force``)."""
    meta = read_meta(Path(path))
    gate = ((meta.calibration or {}).get("report") or {}).get("gate") or {}
    return bool((meta.parity or {}).get("passed", True)) and bool(gate.get("passed", True))


def _calibration_lines(calibration: dict) -> list[str]:
    report = calibration.get("report") or {}
    if not report:
        return []
    cal = report.get("calibration") or {}
    sha = calibration.get("manifest_sha256") or cal.get("manifest_sha256") or "?"
    lines = [f"  calibration  {cal.get('n', '?')} frames of {cal.get('patients', '?')} patients from "
             f"{', '.join(cal.get('sources') or []) or '?'} (manifest sha256 {sha[:12]})"]
    gate = report.get("gate") or {}
    if gate:
        metric = gate.get("metric", "?")
        fp32, int8 = (gate.get("fp32") or {}).get(metric), (gate.get("int8") or {}).get(metric)
        pair = f"{fp32:.4f} -> {int8:.4f}" if fp32 is not None and int8 is not None else "not scored"
        verdict = "passed" if gate.get("passed") else "FAILED"
        lines.append(f"  INT8 gate  {metric} fp32 -> int8 {pair} (drop {gate.get('drop', '?')}, limit "
                     f"{gate.get('max_drop', '?')}) on {gate.get('scored_frames', gate.get('frames', '?'))} "
                     f"held-out frames: {verdict}")
        if gate.get("hc_increase_mm") is not None:
            hc32, hc8 = (gate.get("fp32") or {}).get("hc_mae_mm"), (gate.get("int8") or {}).get("hc_mae_mm")
            limit = gate.get("max_hc_increase_mm")
            lines.append(f"             HC error {hc32:.2f} -> {hc8:.2f} mm ({gate['hc_increase_mm']:+.2f} mm, "
                         + (f"limit {limit} mm)" if limit is not None else "reported, not gated)"))
        for failure in gate.get("failures") or []:
            lines.append(f"    failed: {failure}")
    return lines
