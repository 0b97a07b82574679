"""Small file helpers (numpy only): atomic writes so a crash never leaves a half-written file, and the cache folder."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """usfm-edge's cache folder for files it can rebuild: ``$USFM_EDGE_CACHE``, else ``~/.cache/usfm-edge``."""
    return Path(os.environ.get("USFM_EDGE_CACHE", Path.home() / ".cache" / "usfm-edge"))


def atomic_write_with(path: str | Path, write, mode: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then rename it into place.

    A crash or an exception leaves ``path`` untouched and no temporary file behind (a killed process leaves one
    named with its PID, which ``remove_stale_temps(path)`` removes later); the result gets ``mode``, or the usual
    permissions (``0666 & ~umask``) when None. The temporary file is created 0600, so a private ``mode`` such as
    0600 is never wider, even while it is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}-{_host_tag()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None, fsync: bool = False) -> Path:
    """``data`` to ``path`` atomically (``atomic_write_with``); ``fsync`` flushes it to disk before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    return atomic_write_with(path, write, mode)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())


# -- temporaries a dead writer left behind ----------------------------------------------------------------------
# A writer's temporary names carry its PID and a short host tag: ``.NAME.tmp-<pid>-<host>-<hex>`` (folders, plus
# ``-scratch`` / ``-work`` siblings), ``.NAME.old-<pid>-<host>-<hex>`` (the replaced bundle during a commit) and
# ``NAME.<pid>-<host>-<hex>.tmp`` (``atomic_write_with``). The next writer of ``NAME`` removes the ones whose owner
# is gone, so a concurrent writer on this machine is never harmed. Names without a PID (older versions) or from
# another host count as stale only after ``STALE_AFTER_S`` without a change.
STALE_AFTER_S = 6 * 3600
_OWNED = re.compile(r"(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-\w+$")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def owner_tag() -> str:
    """``<pid>-<host>-<random hex>``: the part of a temporary name that says which process made it."""
    return f"{os.getpid()}-{_host_tag()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def owner_gone(path: str | Path, tag: str | None, max_age_s: float = STALE_AFTER_S) -> bool:
    """True when the process named in ``tag`` (see ``owner_tag``) is dead, or the tag names none on this host
    and ``path`` has not changed for ``max_age_s``."""
    m = _OWNED.match(tag or "")
    if m and m["host"] == _host_tag():
        pid = int(m["pid"])
        return pid != os.getpid() and not _pid_alive(pid)
    return _age_s(Path(path)) > max_age_s


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temps(path: str | Path, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporaries of ``path`` (folder or file) whose writer died; returns what was removed.

    Covers ``.NAME.tmp-*`` folders with their ``-scratch`` / ``-work`` siblings and ``NAME.*.tmp`` files of
    ``atomic_write_with``. ``.NAME.old-*`` folders are removed only while ``path`` itself exists (otherwise
    ``recover_interrupted_replace`` puts them back first).
    """
    path = Path(path)
    parent, name = path.parent, path.name
    if not parent.is_dir():
        return []
    removed = []
    for p in parent.iterdir():
        tag = None
        if p.name.startswith(f".{name}.tmp-"):
            tag = p.name[len(f".{name}.tmp-"):].removesuffix("-scratch").removesuffix("-work")
        elif p.name.startswith(f".{name}.old-"):
            if not path.exists():
                continue
            tag = p.name[len(f".{name}.old-"):]
        elif p.name.startswith(f"{name}.") and p.name.endswith(".tmp") and p.is_file():
            tag = p.name[len(name) + 1: -len(".tmp")]
        else:
            continue
        if owner_gone(p, tag, max_age_s):
            _remove(p)
            removed.append(p)
    return removed


def recover_interrupted_replace(path: str | Path) -> Path | None:
    """Put ``.NAME.old-*`` back at ``path`` when a writer died between moving the old version aside and moving
    the new one into place (so ``path`` is missing). Returns the restored folder's former name, or None."""
    path = Path(path)
    if path.exists() or path.is_symlink() or not path.parent.is_dir():
        return None
    olds = [p for p in path.parent.glob(f".{glob.escape(path.name)}.old-*")
            if owner_gone(p, p.name[len(f".{path.name}.old-"):], max_age_s=0)]
    if not olds:
        return None
    newest = max(olds, key=lambda p: p.lstat().st_ctime)  # the most recently moved aside (a rename sets ctime)
    os.replace(newest, path)
    return newest


def clean_before_write(path: str | Path) -> list[Path]:
    """What every writer of ``path`` runs first: restore an interrupted replace, then remove dead writers'
    temporaries. Returns the removed paths (and the restored one)."""
    restored = recover_interrupted_replace(path)
    return ([restored] if restored else []) + remove_stale_temps(path)
