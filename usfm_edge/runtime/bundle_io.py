"""Read and verify a bundle folder (stdlib + numpy only; shared by the runtime and the exporter).

Verify-then-use: what a backend loads is exactly what was hashed. :class:`BundleFiles` opens the folder once
(a directory descriptor, so every name is looked up in that same folder) and

* refuses symbolic links and anything but regular files anywhere in the bundle (``lstat`` / ``O_NOFOLLOW``;
  a FIFO is refused without blocking on it);
* reads ``usfm.json`` once, parses those bytes (UTF-8, field-by-field validation in ``core.bundle_schema``) and
  checks the same bytes against ``SHA256SUMS``; refuses a schema newer than ours ("written by a newer usfm-edge");
* checks that every file listed in ``SHA256SUMS`` is there, every model file the metadata names is listed, and no
  other file is present except the engine products a device adds after export (``model.engine``,
  ``timing.cache``, build logs);
* ``read(name)`` reads a file into memory once, hashes those bytes and returns them: the backend is created from
  that buffer (ONNX Runtime from bytes, OpenVINO from an XML string and a weights tensor, TensorRT deserialised
  from bytes) and never opens the file again, so a file swapped after the check cannot be loaded;
* ``check_rest()`` hashes the listed files nobody read (the other backend's model, ``build_engine.sh``).

ONNX models must hold their weights inside the verified file: :func:`onnx_external_data` (in
``runtime.onnx_scan``, re-exported here) scans the protobuf (no ``onnx`` package needed) and any tensor stored as
external data is refused, since ONNX Runtime would read it from outside the bundle, unverified.

``verify_bundle`` runs all of it without loading a backend (the exporter's final check, ``quantize``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path

from usfm_edge.core.bundle_schema import META_FILE, SUMS_FILE, BundleMeta
from usfm_edge.core.errors import BundleError
from usfm_edge.runtime.onnx_scan import ONNX_TENSOR_FIELDS, check_onnx_self_contained, onnx_external_data

__all__ = ["sha256_file", "read_sums", "parse_sums", "format_sums", "read_meta", "verify_bundle", "BundleFiles",
           "read_bundle_file", "onnx_external_data", "check_onnx_self_contained", "DEVICE_BUILT_FILES",
           "SIGNATURE_FILE", "UNLISTED_FILES",
           "ONNX_TENSOR_FIELDS"]

#: files ``build_engine.sh`` writes on the device after export; allowed without a checksum.
DEVICE_BUILT_FILES = frozenset({"model.engine", "timing.cache", "build_engine.log"})
#: the detached signature of ``SHA256SUMS`` (``runtime.signing``); allowed without a checksum, a regular file.
SIGNATURE_FILE = "SIGNATURE"
UNLISTED_FILES = DEVICE_BUILT_FILES | {SIGNATURE_FILE}
_META_LIMIT = 16 << 20  # usfm.json larger than this is not ours
_SUMS_LIMIT = 1 << 20
_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_DIR_FD = (os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd and os.stat in os.supports_follow_symlinks
           and os.scandir in os.supports_fd and hasattr(os, "O_DIRECTORY"))


def sha256_file(path: str | Path, chunk: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def format_sums(sums: dict[str, str]) -> str:
    """``sha256sum``-compatible text (``<hex>  <name>`` per line, sorted), checkable with ``sha256sum -c``."""
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


class _Dir:
    """A bundle folder opened once; names are looked up in it with ``dir_fd`` where the OS has it."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder)
        self.fd: int | None = None
        try:
            if _DIR_FD:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
            elif not self.path.is_dir():
                raise NotADirectoryError(self.path)
        except (FileNotFoundError, NotADirectoryError):
            raise BundleError("bundle folder not found", path=self.path) from None
        except OSError as exc:  # permission denied, I/O error...
            raise BundleError(f"bundle folder cannot be opened: {exc.strerror}", path=self.path) from None

    def lstat(self, name: str) -> os.stat_result:
        if self.fd is None:
            return os.lstat(self.path / name)
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def names(self) -> list[str]:
        try:
            if self.fd is None:
                return sorted(os.listdir(self.path))
            with os.scandir(self.fd) as it:
                return sorted(e.name for e in it)
        except OSError as exc:
            raise BundleError(f"bundle folder cannot be listed: {exc.strerror}", path=self.path) from None

    def link_target(self, name: str) -> str:
        try:
            return os.readlink(name, dir_fd=self.fd) if self.fd is not None else os.readlink(self.path / name)
        except OSError:
            return "?"

    def open_regular(self, name: str, missing: str | None = None) -> int:
        """A read-only descriptor of the regular file ``name``; BundleError for a link, a folder, a FIFO..."""
        path = self.path / name
        try:
            st = self.lstat(name)
        except FileNotFoundError:
            raise BundleError(missing or f"file '{name}' is missing", path=path) from None
        except OSError as exc:
            raise BundleError(f"'{name}' cannot be read: {exc.strerror}", path=path) from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"'{name}' is a symbolic link (to {self.link_target(name)!r}); a bundle holds regular "
                              "files only", path=path,
                              hint="replace the link by a copy of the file (cp -L) and check SHA256SUMS again")
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"'{name}' is {_kind(st.st_mode)}, not a regular file; a bundle holds regular files "
                              "only", path=path)
        try:
            fd = os.open(name, _FLAGS, dir_fd=self.fd) if self.fd is not None else os.open(path, _FLAGS)
        except OSError as exc:  # ELOOP: replaced by a link since the lstat above
            why = "it was replaced by a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise BundleError(f"'{name}' cannot be opened: {why}", path=path) from None
        fst = os.fstat(fd)
        same = _NOFOLLOW or (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino)  # no O_NOFOLLOW: compare inodes
        if not stat.S_ISREG(fst.st_mode) or not same:
            os.close(fd)
            what = f"changed into {_kind(fst.st_mode)}" if not stat.S_ISREG(fst.st_mode) else "was replaced"
            raise BundleError(f"'{name}' {what} while it was opened", path=path)
        return fd

    def read(self, name: str, *, writable: bool = False, limit: int | None = None,
             missing: str | None = None) -> bytes | bytearray:
        """The whole regular file ``name``, read once (``bytearray`` when ``writable``)."""
        fd = self.open_regular(name, missing)
        try:
            return self._read_fd(fd, name, writable, limit)
        except OSError as exc:  # an I/O error while reading
            raise BundleError(f"'{name}' cannot be read: {exc.strerror}", path=self.path / name) from None

    def _read_fd(self, fd: int, name: str, writable: bool, limit: int | None) -> bytes | bytearray:
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if limit is not None and size > limit:
                raise BundleError(f"'{name}' is {size} bytes, more than the {limit} bytes such a file may have",
                                  path=self.path / name)
            if not writable:
                data = f.readall()
            else:
                data = bytearray(size)
                view, n = memoryview(data), 0
                while n < size:
                    k = f.readinto(view[n:])
                    if not k:  # the file shrank while read: keep what was read (its hash will tell)
                        del view
                        del data[n:]
                        break
                    n += k
                else:
                    del view
                    data += f.readall()  # it grew while read
        if limit is not None and len(data) > limit:
            raise BundleError(f"'{name}' grew past {limit} bytes while it was read", path=self.path / name)
        return data

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        try:
            with os.fdopen(self.open_regular(name), "rb", buffering=0) as f:
                for block in iter(lambda: f.read(_CHUNK), b""):
                    h.update(block)
        except OSError as exc:
            raise BundleError(f"'{name}' cannot be read: {exc.strerror}", path=self.path / name) from None
        return h.hexdigest()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_bundle_file(folder: str | Path, name: str, *, writable: bool = False) -> bytes | bytearray:
    """One file of a folder read whole, once, refusing links and non-regular files (no checksum: see
    :class:`BundleFiles` for the verified read)."""
    d = _Dir(folder)
    try:
        return d.read(name, writable=writable)
    finally:
        d.close()


def parse_sums(data: bytes, path: str | Path) -> dict[str, str]:
    """``SHA256SUMS`` bytes -> ``{file name: hex digest}``.

    Raises:
        BundleError: not UTF-8, a malformed line, a path outside the bundle or a file listed twice.
    """
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{SUMS_FILE} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start})", path=path) from None
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        name = name.lstrip("*")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise BundleError(f"{SUMS_FILE} line {n} is malformed: {line[:120]!r}", path=path)
        if "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
            raise BundleError(f"{SUMS_FILE} line {n} names a path outside the bundle: {name!r}", path=path)
        if name in sums:
            raise BundleError(f"{SUMS_FILE} line {n} lists '{name}' a second time", path=path)
        sums[name] = digest
    return sums


def _parse_meta(data: bytes, path: Path) -> BundleMeta:
    try:
        return BundleMeta.from_json(data)
    except BundleError as exc:
        raise BundleError(exc.message, path=path, hint=exc.hint) from None


class BundleFiles:
    """A bundle folder opened for verify-then-use (see the module docstring); a context manager.

    Args:
        folder: the ``NAME.usfm`` folder.
        verify: check ``SHA256SUMS`` and the file listing; False still refuses links and non-regular files and
            validates ``usfm.json``, but hashes nothing.

    Attributes:
        meta: the validated ``usfm.json``, parsed from the bytes that were hashed.
        sums: ``SHA256SUMS`` (empty when not verifying).
        sums_bytes: the exact ``SHA256SUMS`` bytes that were parsed (None when not verifying): a signature is
            checked over these (``runtime.signing``).

    Raises:
        BundleError: the folder or ``usfm.json`` is missing, a link or non-regular file, a missing, unlisted or
            tampered file, a non-UTF-8 or malformed ``usfm.json`` / ``SHA256SUMS``; the message names the file.
    """

    def __init__(self, folder: str | Path, verify: bool = True):
        self._dir = _Dir(folder)
        self.folder = self._dir.path
        self.verify = verify
        self._verified: set[str] = set()
        try:
            raw = self._dir.read(META_FILE, limit=_META_LIMIT, missing=f"{META_FILE} is missing: not a usfm-edge bundle")
            self.meta = _parse_meta(raw, self.folder / META_FILE)
            self.sums: dict[str, str] = {}
            self.sums_bytes: bytes | None = None
            if verify:
                self.sums_bytes = bytes(self._dir.read(SUMS_FILE, limit=_SUMS_LIMIT, missing=(
                    f"{SUMS_FILE} is missing: not a usfm-edge bundle or an incomplete copy")))
                self.sums = parse_sums(self.sums_bytes, self.folder / SUMS_FILE)
                if META_FILE not in self.sums:
                    raise BundleError(f"{META_FILE} is not covered by {SUMS_FILE}", path=self.folder)
                self._check_listing()
                self._check_digest(META_FILE, raw)
        except BaseException:
            self.close()
            raise

    def _check_listing(self) -> None:
        names = self._dir.names()
        for name in names:  # links and special files are refused wherever they are
            try:
                mode = self._dir.lstat(name).st_mode
            except FileNotFoundError:  # removed since the listing: a listed file is reported missing below
                continue
            if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
                os.close(self._dir.open_regular(name))  # raises the message naming the file
        present = set(names)
        for name in self.sums:
            if name not in present:
                raise BundleError(f"file '{name}' listed in {SUMS_FILE} is missing", path=self.folder / name)
        for role, name in self.meta.files.items():
            if name not in self.sums and name not in DEVICE_BUILT_FILES:
                raise BundleError(f"file '{name}' ({role}) is not covered by {SUMS_FILE}", path=self.folder / name)
        for name in names:
            if name not in self.sums and name != SUMS_FILE and name not in UNLISTED_FILES:
                raise BundleError(f"file '{name}' is not listed in {SUMS_FILE}", path=self.folder / name,
                                  hint="remove it, or export the bundle again")

    def _check_digest(self, name: str, data: bytes | bytearray) -> None:
        if hashlib.sha256(data).hexdigest() != self.sums[name]:
            raise BundleError(f"file '{name}' does not match its SHA-256 in {SUMS_FILE} (corrupt or modified)",
                              path=self.folder / name, hint="re-copy the bundle or export it again")
        self._verified.add(name)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is in the folder (a link counts: reading it is refused with its own message)."""
        try:
            self._dir.lstat(name)
            return True
        except FileNotFoundError:
            return False

    def read(self, name: str, *, writable: bool = False) -> bytes | bytearray:
        """The bytes of one bundle file, read once and checked against ``SHA256SUMS``: hand these to the backend.

        A device-built file (``model.engine``) not listed in ``SHA256SUMS`` is read without a checksum (the device
        made it); ``writable`` returns a ``bytearray`` (OpenVINO shares it as its weights tensor without a copy).
        """
        if self.verify and name not in self.sums and name not in DEVICE_BUILT_FILES:
            raise BundleError(f"file '{name}' is not covered by {SUMS_FILE}", path=self.folder / name)
        data = self._dir.read(name, writable=writable)
        if self.verify and name in self.sums:
            self._check_digest(name, data)
        return data

    def read_unlisted(self, name: str, *, limit: int | None = None) -> bytes:
        """A file allowed without a checksum (``SIGNATURE``, a device-built file): read once, links refused."""
        if name not in UNLISTED_FILES:
            raise BundleError(f"file '{name}' is not one that a bundle may hold without a checksum",
                              path=self.folder / name)
        return bytes(self._dir.read(name, limit=limit))

    def check_rest(self) -> None:
        """Hash every listed file that :meth:`read` has not verified yet."""
        for name, digest in sorted(self.sums.items()):
            if name in self._verified:
                continue
            if self._dir.sha256(name) != digest:
                raise BundleError(f"file '{name}' does not match its SHA-256 in {SUMS_FILE} (corrupt or modified)",
                                  path=self.folder / name, hint="re-copy the bundle or export it again")
            self._verified.add(name)

    def close(self) -> None:
        self._dir.close()

    def __enter__(self) -> BundleFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_sums(folder: str | Path) -> dict[str, str]:
    """Parse ``SHA256SUMS`` -> ``{file name: hex digest}``.

    Raises:
        BundleError: the file is missing, a link, not UTF-8 or a line is malformed.
    """
    folder = Path(folder)
    d = _Dir(folder)
    try:
        data = d.read(SUMS_FILE, limit=_SUMS_LIMIT,
                      missing=f"{SUMS_FILE} is missing: not a usfm-edge bundle or an incomplete copy")
    finally:
        d.close()
    return parse_sums(data, folder / SUMS_FILE)


def read_meta(folder: str | Path) -> BundleMeta:
    """Parse and validate ``usfm.json`` without checking hashes (see ``verify_bundle``)."""
    with BundleFiles(folder, verify=False) as files:
        return files.meta


def verify_bundle(folder: str | Path, check_external: bool = True) -> BundleMeta:
    """Verify a bundle folder and return its metadata (see :class:`BundleFiles`; loads no backend).

    Args:
        folder: the ``NAME.usfm`` folder.
        check_external: refuse an ONNX model with external data.

    Returns:
        the validated ``BundleMeta``.

    Raises:
        BundleError: newer schema, link or special file, missing/tampered/unlisted file, or external data; the
            message names the file.
    """
    with BundleFiles(folder) as files:
        onnx_name = files.meta.files.get("onnx")
        if check_external and onnx_name in files.sums:
            check_onnx_self_contained(files.read(onnx_name), files.folder / onnx_name)
        files.check_rest()
        return files.meta
