"""Data: readers (PNG/JPEG/BMP/TIFF/DICOM incl. cine), dataset sources (BUS-BRA, HC18, folders), splits.

Importing this package never imports torch: :class:`OrganBalancedSampler` (a ``torch.utils.data.Sampler``)
is resolved lazily on first access, and is left out of ``__all__`` so ``from usfm_edge.data import *`` stays
torch-free.
"""

from __future__ import annotations

from pathlib import Path

from usfm_edge.core.geometry import ellipse_perimeter, fill_outline_mask, fit_ellipse, head_circumference_mm
from usfm_edge.data.readers import DicomFrames, is_dicom, iter_frames, read_dicom, read_image, read_mask
from usfm_edge.data.sources import (
    BUSBRA_LABELS,
    DataSource,
    Record,
    label_names,
    load_records,
    parse_source,
    read_record_mask,
)
from usfm_edge.data.splits import label_fraction, patient_split

__all__ = [
    "BUSBRA_LABELS",
    "DataSource",
    "DicomFrames",
    "Record",
    "ellipse_perimeter",
    "fill_outline_mask",
    "fit_ellipse",
    "head_circumference_mm",
    "is_dicom",
    "iter_frames",
    "label_fraction",
    "label_names",
    "load_records",
    "parse_source",
    "patient_split",
    "read_dicom",
    "read_image",
    "read_mask",
    "read_record_mask",
    "sample_dir",
]


def sample_dir() -> Path:
    """Folder of the real-data sample bundled with the package.

    Returns:
        Path holding ``busbra/`` and ``hc18/`` (use ``busbra:<dir>/busbra`` and ``hc18:<dir>/hc18``).
    """
    return Path(__file__).resolve().parent.parent / "assets" / "sample"


def __getattr__(name: str):
    if name == "OrganBalancedSampler":
        from usfm_edge.data.sampler import OrganBalancedSampler

        return OrganBalancedSampler
    raise AttributeError(f"module 'usfm_edge.data' has no attribute {name!r}")
