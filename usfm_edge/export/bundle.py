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
import uuid
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from usfm_edge.core.bundle_schema import BUNDLE_SUFFIX, META_FILE, SUMS_FILE, BundleMeta
from usfm_edge.core.errors import BundleError, ExportError
from usfm_edge.core.io import atomic_write_text
from usfm_edge.runtime.bundle_io import (
    DEVICE_BUILT_FILES,
    format_sums,
    read_meta,
    read_sums,
    sha256_file,
    verify_bundle,
)

__all__ = ["BundleWriter", "write_bundle", "bundle_summary", "write_sums", "update_meta", "verify_bundle", "read_meta", "read_sums",
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
        if f.is_dir():
            raise BundleError(f"bundles are flat folders; found a sub-folder '{f.name}'", path=folder)
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
    export never leaves a bundle (complete or partial) behind.

    Args:
        out: the bundle folder to create (``.usfm`` is appended when missing).
        overwrite: replace an existing bundle at ``out`` (a non-bundle folder is never replaced).
    """

    def __init__(self, out: str | Path, overwrite: bool = True):
        self.out = bundle_path(out)
        self.overwrite = overwrite
        if self.out.exists():
            if not self.out.is_dir() or not ((self.out / META_FILE).is_file() or not any(self.out.iterdir())):
                raise ExportError("output exists and is not a usfm-edge bundle; refusing to replace it", path=self.out)
            if not overwrite:
                raise ExportError("bundle already exists", path=self.out, hint="pass overwrite=True")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
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
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        try:
            os.replace(self.path, self.out)
        except OSError:
            if old is not None:
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
    """A few lines for people: size, task, target, backend, precision, the parity result per output, the files."""
    path = Path(path)
    meta = read_meta(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
    parity = meta.parity or {}
    lines = [f"bundle  {path}  ({size:.1f} MB)",
             f"  task {meta.task}  target {meta.target}  backend {meta.backend}  precision {meta.precision}",
             f"  parity vs PyTorch on {parity.get('frames', '?')} real frames via {parity.get('backend', '?')}: "
             f"{'passed' if parity.get('passed') else 'FAILED'}"]
    for name, o in (parity.get("outputs") or {}).items():
        stats = ", ".join(f"{k} {o[k]:.6g}" for k in ("cosine", "max_abs", "dice") if o.get(k) is not None)
        lines.append(f"    {name}: {stats}")
    lines += [f"  {name}" for name in sorted(p.name for p in path.iterdir())]
    return "\n".join(lines)
