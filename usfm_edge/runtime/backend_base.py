"""What every runtime backend shares: the ``Backend`` interface, ``Port`` (one graph input or output as a backend
sees it), the extra that installs each backend, and the helpers that read a model's bytes and check its outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from usfm_edge.core.errors import BundleError
from usfm_edge.runtime.bundle_io import read_bundle_file

__all__ = ["BACKEND_EXTRAS", "Backend", "Port", "check_output_names", "model_bytes"]

BACKEND_EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino", "tensorrt": "tensorrt"}


class Port(NamedTuple):
    """One graph input or output as the backend sees it.

    Attributes:
        names: its names (OpenVINO ports may have several).
        dtype: numpy dtype name (``float32``, ``uint8``...) or None when the backend does not say.
        shape: dims, None for a dynamic one; None when even the rank is dynamic.
    """

    names: frozenset[str]
    dtype: str | None
    shape: tuple[int | None, ...] | None


class Backend:
    """Interface: ``run(x) -> {output name: array}`` for one input array, ``io()`` and ``close()``."""

    name = "base"
    device = "cpu"
    version = ""

    def io(self) -> tuple[list[Port], list[Port]] | None:
        """``(inputs, outputs)`` of the loaded graph, or None when the backend cannot tell (no static check)."""
        return None

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release the session / compiled model."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, version={self.version!r})"


def model_bytes(model: bytes | bytearray | str | Path, writable: bool = False) -> bytes | bytearray:
    """A model given as bytes is used as is; a path is read once (links and special files refused)."""
    if isinstance(model, (bytes, bytearray)):
        return model
    path = Path(model)
    return read_bundle_file(path.parent, path.name, writable=writable)


def check_output_names(names: list[str], graph: list[Port], source) -> None:
    """Refuse output names that the loaded graph does not have (a ``usfm.json`` that does not match its model)."""
    have = {n for p in graph for n in p.names}
    for i, name in enumerate(names):
        if name not in have:
            listed = ", ".join(sorted(n for p in graph for n in p.names)) or "none"
            raise BundleError(f"usfm.json outputs[{i}].name {name!r} is not an output of the model (its outputs: "
                              f"{listed})", path=source, hint="fix usfm.json or export the bundle again")
