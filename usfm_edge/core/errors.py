"""Typed errors of usfm-edge.

Every error carries the file it is about (``path``) and a ``hint`` that tells the user what to do.
The CLI maps each class to an exit code (see ``usfm_edge.cli``):

========================  ====  =====================================================
class                     exit  meaning
========================  ====  =====================================================
UsfmEdgeError             1     any domain failure (base class)
ConfigError               2     bad configuration or option value (a usage error)
DataError                 1     unreadable, empty, truncated or unsupported input file
CheckpointError           1     checkpoint of another architecture, corrupt or unsafe
ExportError               1     the export itself failed (op unsupported, converter crash)
BundleError               1     a bundle folder is corrupt, tampered or too new
InputError                1     a frame handed to the runtime is unusable
ValidationError           3     a parity or accuracy gate failed
BackendUnavailableError   4     a backend (torch, onnxruntime, openvino, ...) is missing
========================  ====  =====================================================
"""

from __future__ import annotations

from pathlib import Path


class UsfmEdgeError(Exception):
    """Base class of all usfm-edge errors.

    Args:
        message: what went wrong.
        path: the file or folder concerned, if any.
        hint: how to fix it, if known.
    """

    exit_code = 1

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else Path(path)
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.message
        if self.path is not None:
            text = f"{self.path}: {text}"
        if self.hint:
            text = f"{text} (hint: {self.hint})"
        return text

    def __reduce__(self):  # keep errors picklable across DataLoader workers
        return (_rebuild_error, (type(self), self.message, self.path, self.hint))


def _rebuild_error(cls, message, path, hint):
    return cls(message, path=path, hint=hint)


class ConfigError(UsfmEdgeError, ValueError):
    """A configuration key or option value is wrong."""

    exit_code = 2


class DataError(UsfmEdgeError):
    """An input image, mask, DICOM or dataset is missing, empty, corrupt or unsupported."""


class CheckpointError(UsfmEdgeError):
    """A checkpoint cannot be loaded: wrong architecture, truncated, or unsafe to unpickle."""


class ExportError(UsfmEdgeError):
    """An export step failed."""


class BundleError(UsfmEdgeError):
    """A bundle folder is incomplete, tampered, or written by a newer usfm-edge."""


class InputError(UsfmEdgeError, ValueError):
    """A frame given to the runtime has the wrong dtype, shape or values."""


class ValidationError(UsfmEdgeError):
    """A parity or accuracy gate failed; ``results`` holds the measured numbers."""

    exit_code = 3

    def __init__(self, message: str, *, path=None, hint=None, results: dict | None = None):
        self.results = results or {}
        super().__init__(message, path=path, hint=hint)


class BackendUnavailableError(UsfmEdgeError, ImportError):
    """A needed backend package is not installed; the hint names the extra to install."""

    exit_code = 4


def require(module: str, extra: str):
    """Import ``module`` or raise BackendUnavailableError naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(
            f"'{module}' is not installed ({exc})", hint=f"pip install 'usfm-edge[{extra}]'"
        ) from exc
