"""Latency x accuracy benchmarks of bundles against PyTorch fp32, measured side by side (``usfm-edge bench``)."""

from usfm_edge.bench.latency import BenchRow, machine_info, run_bench

__all__ = ["BenchRow", "machine_info", "run_bench"]
