"""Small file helpers (numpy only): atomic writes so a crash never leaves a half-written file, and the cache folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """usfm-edge's cache folder for files it can rebuild: ``$USFM_EDGE_CACHE``, else ``~/.cache/usfm-edge``."""
    return Path(os.environ.get("USFM_EDGE_CACHE", Path.home() / ".cache" / "usfm-edge"))


def atomic_write_with(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary sibling of ``path``, then rename it into place.

    A crash or an exception leaves ``path`` untouched and no temporary file behind; the result gets the usual
    permissions (``0666 & ~umask``; ``mkstemp`` alone would leave 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())
