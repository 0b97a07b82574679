"""Write frames as binary PGM (P5) for the C++ host: the bundled sample's PNGs, or any image / DICOM cine.

Frames are read with ``usfm_edge.data.readers`` (the readers the Python runtime uses: colour -> BT.601 grey,
16-bit and DICOM windowing -> uint8), so the host gets exactly the uint8 frames ``Engine.predict`` sees.

    python examples/cpp_host/make_frames.py --out frames                 # the bundled BUS-BRA + HC18 sample
    python examples/cpp_host/make_frames.py --out frames cine.dcm        # every frame of a DICOM cine
    python examples/cpp_host/make_frames.py --out frames --count 30      # 30 frames, cycling through the inputs

Files are numbered in order (``0000_<stem>.pgm``, DICOM frames ``0000_<stem>_f003.pgm``); a DICOM's pixel
spacing is printed for the host's ``--pixel-spacing``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def sample_images() -> list[Path]:
    """The bundled sample's frames: 22 BUS-BRA breast images and 17 HC18 fetal-head images of various sizes."""
    from usfm_edge.data import sample_dir

    s = sample_dir()
    return sorted((s / "busbra" / "Images").glob("*.png")) + sorted((s / "hc18" / "training_set").glob("*HC.png"))


def read_frames(path: Path) -> list[tuple[str, np.ndarray]]:
    """``(name, uint8 grey frame)`` for every frame of an image or DICOM file."""
    from usfm_edge.data.readers import is_dicom, iter_frames, read_dicom

    if is_dicom(path):
        d = read_dicom(path)
        if d.pixel_spacing_mm:
            print(f"{path.name}: pixel spacing {d.pixel_spacing_mm[0]},{d.pixel_spacing_mm[1]} mm "
                  f"(usfm_host --pixel-spacing {d.pixel_spacing_mm[0]},{d.pixel_spacing_mm[1]})", file=sys.stderr)
        if len(d.frames) > 1:
            return [(f"{path.stem}_f{i:03d}", np.ascontiguousarray(f)) for i, f in enumerate(d.frames)]
    return [(path.stem, f) for _, f in iter_frames(path)]


def write_pgm(path: Path, frame: np.ndarray) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 2:
        raise ValueError(f"{path.name}: expected a uint8 (H, W) frame, got {frame.dtype} {frame.shape}")
    h, w = frame.shape
    path.write_bytes(f"P5\n{w} {h}\n255\n".encode("ascii") + np.ascontiguousarray(frame).tobytes())


def read_pgm(path: str | Path) -> np.ndarray:
    """A P5 PGM written by this script or by usfm_host (its masks) -> uint8 (H, W)."""
    data = Path(path).read_bytes()
    fields, pos = [], 0
    while len(fields) < 4:  # magic, width, height, maxval; no comments in the files we write
        while data[pos:pos + 1].isspace():
            pos += 1
        start = pos
        while not data[pos:pos + 1].isspace():
            pos += 1
        fields.append(data[start:pos])
    if fields[0] != b"P5" or int(fields[3]) > 255:
        raise ValueError(f"{path}: not an 8-bit binary PGM")
    w, h = int(fields[1]), int(fields[2])
    return np.frombuffer(data[pos + 1:pos + 1 + w * h], np.uint8).reshape(h, w).copy()


def make_frames(out: str | Path, inputs: list[str | Path] | None = None, count: int | None = None) -> list[Path]:
    """Write the frames of ``inputs`` (default: the bundled sample) to ``out`` as numbered PGMs; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frames = [nf for p in (inputs or sample_images()) for nf in read_frames(Path(p))]
    if not frames:
        raise SystemExit("no frames found")
    n = count or len(frames)
    written = []
    for i in range(n):
        name, frame = frames[i % len(frames)]
        path = out / f"{i:04d}_{name}.pgm"
        write_pgm(path, frame)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="*", help="images / DICOM files (default: the bundled sample)")
    ap.add_argument("--out", required=True, help="folder for the PGM frames")
    ap.add_argument("--count", type=int, default=None, help="write this many frames, cycling through the inputs")
    args = ap.parse_args(argv)
    paths = make_frames(args.out, args.inputs or None, args.count)
    print(f"wrote {len(paths)} frames to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
