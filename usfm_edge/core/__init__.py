"""numpy-only foundations shared by every other package: errors, preprocessing, configs."""

from usfm_edge.core.errors import (
    BackendUnavailableError,
    BundleError,
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    InputError,
    UsfmEdgeError,
    ValidationError,
)
from usfm_edge.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, preprocess, preprocess_batch

__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "InputError",
    "UsfmEdgeError",
    "ValidationError",
    "PreprocessSpec",
    "preprocess",
    "preprocess_batch",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
