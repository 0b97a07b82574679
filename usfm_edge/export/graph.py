"""Moved: the raw-frame graph is ``usfm_edge.models.raw_frame`` (evaluation runs it too, and may not import export).

Kept as an alias module because ``benchmarks/bench_int8.py`` imports ``usfm_edge.export.graph.RawFrameModel``.
"""

from usfm_edge.models.raw_frame import PreprocessGraph, RawFrameModel, output_names

__all__ = ["PreprocessGraph", "RawFrameModel", "output_names"]
