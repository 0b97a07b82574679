"""Read and verify a bundle folder (stdlib + numpy only; shared by the runtime and the exporter).

``verify_bundle`` is what ``Engine.open`` runs before loading anything:

* ``usfm.json`` parses and its schema version is not newer than ours (else "written by a newer usfm-edge");
* every file listed in ``SHA256SUMS`` exists and has the listed SHA-256 (a flipped byte names the file);
* every file the metadata refers to is listed; no other file is present except the engine products a
  device adds after export (``model.engine``, ``timing.cache``, build logs);
* ONNX external-data locations stay inside the bundle (checked when ``onnx`` is importable).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from usfm_edge.core.bundle_schema import META_FILE, SUMS_FILE, BundleMeta
from usfm_edge.core.errors import BundleError

__all__ = ["sha256_file", "read_sums", "format_sums", "read_meta", "verify_bundle", "DEVICE_BUILT_FILES"]

#: files ``build_engine.sh`` writes on the device after export; allowed without a checksum.
DEVICE_BUILT_FILES = frozenset({"model.engine", "timing.cache", "build_engine.log"})


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def format_sums(sums: dict[str, str]) -> str:
    """``sha256sum``-compatible text (``<hex>  <name>`` per line, sorted), checkable with ``sha256sum -c``."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def read_sums(folder: str | Path) -> dict[str, str]:
    """Parse ``SHA256SUMS`` -> ``{file name: hex digest}``.

    Raises:
        BundleError: the file is missing or a line is malformed.
    """
    path = Path(folder) / SUMS_FILE
    if not path.is_file():
        raise BundleError(f"{SUMS_FILE} is missing: not a usfm-edge bundle or an incomplete copy", path=folder)
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        name = name.lstrip("*")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise BundleError(f"{SUMS_FILE} line {n} is malformed: {line[:120]!r}", path=path)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise BundleError(f"{SUMS_FILE} line {n} names a path outside the bundle: {name!r}", path=path)
        sums[name] = digest
    return sums


def read_meta(folder: str | Path) -> BundleMeta:
    """Parse and validate ``usfm.json`` without checking hashes (see ``verify_bundle``)."""
    folder = Path(folder)
    path = folder / META_FILE
    if not folder.is_dir():
        raise BundleError("bundle folder not found", path=folder)
    if not path.is_file():
        raise BundleError(f"{META_FILE} is missing: not a usfm-edge bundle", path=folder)
    try:
        return BundleMeta.from_json(path.read_text())
    except BundleError as exc:
        raise BundleError(exc.message, path=path, hint=exc.hint) from None


def _check_external_data(folder: Path, onnx_name: str) -> None:
    try:
        import onnx
        from onnx.external_data_helper import uses_external_data
    except ImportError:  # the runtime may be installed without the onnx package; ORT checks paths itself
        return
    try:
        model = onnx.load(str(folder / onnx_name), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors
        raise BundleError(f"'{onnx_name}' is not a readable ONNX model: {exc}", path=folder / onnx_name) from exc
    root = folder.resolve()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.t.name:
                tensors.append(attr.t)
    for t in tensors:
        if not uses_external_data(t):
            continue
        location = {e.key: e.value for e in t.external_data}.get("location", "")
        target = (folder / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise BundleError(f"'{onnx_name}' tensor '{t.name}' points to external data outside the bundle: "
                              f"{location!r}", path=folder / onnx_name)


def verify_bundle(folder: str | Path, check_external: bool = True) -> BundleMeta:
    """Verify a bundle folder and return its metadata.

    Args:
        folder: the ``NAME.usfm`` folder.
        check_external: check ONNX external-data locations (needs ``onnx``; skipped when absent).

    Returns:
        the validated ``BundleMeta``.

    Raises:
        BundleError: newer schema, missing/tampered/unlisted file, or data outside the bundle; the message
            names the file.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    sums = read_sums(folder)
    if META_FILE not in sums:
        raise BundleError(f"{META_FILE} is not covered by {SUMS_FILE}", path=folder)
    for name, digest in sums.items():
        f = folder / name
        if not f.is_file():
            raise BundleError(f"file '{name}' listed in {SUMS_FILE} is missing", path=f)
        if sha256_file(f) != digest:
            raise BundleError(f"file '{name}' does not match its SHA-256 in {SUMS_FILE} (corrupt or modified)",
                              path=f, hint="re-copy the bundle or export it again")
    for role, name in meta.files.items():
        if name in DEVICE_BUILT_FILES and name not in sums:
            continue
        if name not in sums:
            raise BundleError(f"file '{name}' ({role}) is not covered by {SUMS_FILE}", path=folder / name)
    for f in folder.iterdir():
        if f.name not in sums and f.name != SUMS_FILE and f.name not in DEVICE_BUILT_FILES:
            raise BundleError(f"file '{f.name}' is not listed in {SUMS_FILE}", path=f,
                              hint="remove it, or export the bundle again")
    onnx_name = meta.files.get("onnx")
    if check_external and onnx_name and (folder / onnx_name).is_file():
        _check_external_data(folder, onnx_name)
    return meta
