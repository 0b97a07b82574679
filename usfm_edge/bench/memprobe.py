"""Peak resident memory of one variant in a process of its own (``python -m usfm_edge.bench.memprobe``).

The latency benchmark holds every variant in one process, where memory freed by one engine is reused by the
next, so per-variant growth there is not a peak. This probe starts a fresh interpreter, opens ONE bundle
(or the PyTorch checkpoint), runs it on a real frame a few times and reports the process's peak resident set
(``VmHWM``): what scanner software embedding that variant would hold, interpreter and libraries included.
On a GPU this is host memory only (device memory is not counted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

__all__ = ["isolated_peak_rss_mb"]


def isolated_peak_rss_mb(kind: str, path: str | Path, frame: str | Path, threads: int = 2, device: str = "cpu",
                         backend: str = "auto", timeout: float = 300.0) -> float | None:
    """Peak RSS in MB of a process that opens ``path`` and runs it 3 times on ``frame``; None when it fails.

    Args:
        kind: ``bundle`` (runtime.Engine) or ``torch`` (task checkpoint through the raw-frame graph).
        path: the bundle folder or checkpoint.
        frame: an image file (read with ``data.readers.read_image``).
        threads, device, backend: as for the benchmark.
        timeout: seconds before the probe is abandoned.
    """
    cmd = [sys.executable, "-m", "usfm_edge.bench.memprobe", kind, str(path), str(frame), str(threads), device,
           backend]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
        return float(json.loads(out.strip().splitlines()[-1])["peak_rss_mb"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError, OSError):
        return None


def _probe(kind: str, path: str, frame_path: str, threads: int, device: str, backend: str) -> dict:
    # opened and fed exactly as the benchmark opens and feeds the variant
    from usfm_edge.bench.latency import _frames_for, _open_bundle, _open_torch, process_rss_mb
    from usfm_edge.data.readers import read_image

    v = _open_torch(Path(path), threads, device) if kind == "torch" else _open_bundle(Path(path), threads, device,
                                                                                        backend)
    frame = _frames_for(v, [read_image(frame_path)])[0]
    for _ in range(3):
        v.predictor.predict(frame)
    return {"peak_rss_mb": process_rss_mb("VmHWM")}


if __name__ == "__main__":
    k, p, f, t, d, b = sys.argv[1:7]
    print(json.dumps(_probe(k, p, f, int(t), d, b)))
