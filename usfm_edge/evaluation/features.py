"""Backbone embeddings of real frames (``usfm-edge features``): one row per frame, files or folders, cine loops.

    from usfm_edge.evaluation.features import extract_features, save_features
    res = extract_features(["scans/"], checkpoint="USFM_latest.pth", pool="cls")
    save_features("emb.npy", res)               # emb.npy (N, D) float32 + emb.npy.json (source of each row)

The frame is preprocessed with ``core.preprocess`` at the backbone's input size and run through
``forward_features``; ``pool`` takes the class token after the final norm (``cls``) or the mean of the patch
tokens (``avg``). torch is imported when called.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["extract_features", "save_features"]


def extract_features(inputs: Sequence[str | Path], checkpoint: str | Path | None = None,
                     model: str = "usfm_vit_base_patch16_224", pool: str = "cls", batch_size: int = 8,
                     progress: Callable | None = None) -> dict:
    """Embed every frame of ``inputs`` (PNG/JPEG/TIFF/DICOM files and folders; a cine DICOM gives one row a frame).

    Args:
        inputs: files and folders (expanded as ``usfm-edge predict`` does).
        checkpoint: ``USFM_latest.pth`` or a usfm-edge ``.safetensors``; None = RANDOM weights (warns).
        model: backbone preset (a usfm-edge checkpoint's own preset wins).
        pool: ``cls`` or ``avg``.
        batch_size: frames per forward pass.
        progress: optional wrapper of the file iterator (e.g. a progress bar).

    Returns:
        ``{"features": (N, D) float32, "rows": [{"file", "frame"}], "model", "checkpoint", "pool"}``.
    """
    import torch

    from usfm_edge.core.preprocess import PreprocessSpec, preprocess
    from usfm_edge.data.readers import iter_frames
    from usfm_edge.models import create_model
    from usfm_edge.models.checkpoint import read_checkpoint
    from usfm_edge.runtime.predict_cli import expand_inputs

    if checkpoint is None:
        warnings.warn("no checkpoint given: features come from RANDOM weights", UserWarning, stacklevel=2)
    elif Path(checkpoint).suffix == ".safetensors":
        _, cfg = read_checkpoint(checkpoint)
        model = (cfg or {}).get("model") or model
    net = create_model(model, checkpoint=checkpoint).eval()
    spec = PreprocessSpec(img_size=net.img_size[0])
    files = expand_inputs(inputs)
    out, rows, batch = [], [], []

    def flush():
        with torch.inference_mode():
            tokens = net.forward_features(torch.from_numpy(np.stack(batch)))
            out.append((tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)).numpy())
        batch.clear()

    for f in (progress(files) if progress else files):
        for i, frame in iter_frames(f):
            batch.append(preprocess(frame, spec))
            rows.append({"file": str(f), "frame": i})
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    return {"features": np.concatenate(out).astype(np.float32), "rows": rows, "model": model,
            "checkpoint": str(checkpoint) if checkpoint else None, "pool": pool}


def save_features(output: str | Path, result: dict) -> tuple[Path, Path]:
    """Write ``output`` (the ``(N, D)`` features, atomically) and ``output.json`` (model, pool, source of each row)."""
    from usfm_edge.core.io import atomic_save_npy, atomic_write_text

    output = Path(output)
    atomic_save_npy(output, result["features"])
    side = Path(str(output) + ".json")
    meta = {"model": result["model"], "checkpoint": result["checkpoint"], "pool": result["pool"], "rows": result["rows"]}
    atomic_write_text(side, json.dumps(meta, indent=1))
    return output, side
