"""Calibration sets: real ultrasound frames, balanced across organ and scanner, with a verifiable manifest.

    from usfm_edge.calibration import build_calibration_set, CalibrationSet
    calib = build_calibration_set(["busbra:data/busbra", "hc18:data/hc18"], n=300, seed=0)
    calib.save_manifest("calib.json")              # file list + SHA-256 of every file, seed, counts
    same = CalibrationSet.from_manifest("calib.json")   # exactly the same frames, or DataError

Sampling is a stratified round robin: records are grouped by ``(organ, scanner model)``, each group is
shuffled with the seed, and the groups are visited in turn (one frame each) until ``n`` frames are taken,
so a scanner with 40 images is not drowned by one with 1 000. Patients can be excluded (the held-out
patients of the accuracy gate). Frames are read as ``uint8 (H, W)`` by ``evaluation.read_frame``: exactly
what a bundle is fed.

Refusals (``DataError``) and warnings, never silent fallbacks:

* fewer than ``min_frames`` frames (default 32) -> DataError; fewer than 300 -> warning;
* an unreadable file -> DataError naming the file (never skipped);
* every frame (near-)constant, e.g. all black -> DataError "calibration frames carry no signal";
* one organ only while the model was trained on several (``organs``) -> warning;
* random data is never substituted for missing frames.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usfm_edge.core.errors import DataError
from usfm_edge.core.io import atomic_write_text
from usfm_edge.evaluation.records import Record, read_frame, select_records

__all__ = ["CalibrationSet", "build_calibration_set", "MANIFEST_FORMAT", "RECOMMENDED_FRAMES", "MIN_FRAMES",
           "no_signal", "sha256_bytes", "stratified_round_robin", "check_frames"]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "usfm_edge.calibration/1"
RECOMMENDED_FRAMES = 300  # NNCF's default subset; ModelOpt asks >= 500 for ViTs
MIN_FRAMES = 32
_FLAT_STD = 1.0  # grey levels: a frame whose std is below this carries no usable signal


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    try:
        return sha256_bytes(path.read_bytes())
    except OSError as exc:
        raise DataError(f"cannot read calibration file ({exc})", path=path) from exc


def _manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"


def no_signal(frame: np.ndarray) -> bool:
    """True when a frame is (near-)constant: standard deviation below one grey level."""
    return float(np.asarray(frame, np.float32).std()) < _FLAT_STD


@dataclass
class CalibrationSet:
    """Calibration frames and where they came from.

    Attributes:
        frames: uint8 ``(H, W)`` frames, each at its own size.
        entries: one dict per frame: ``path``, ``sha256``, ``organ``, ``device``, ``patient``.
        sources: the data source specs the frames were drawn from.
        seed: sampling seed.
        n_requested: the ``n`` asked for.
        exclude_patients: ``"organ/patient"`` keys left out (held-out patients).
        warnings: warnings raised while building the set (also stored in the report).
    """

    frames: list[np.ndarray]
    entries: list[dict]
    sources: list[str]
    seed: int = 0
    n_requested: int = 0
    exclude_patients: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.frames)

    # -- manifest ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, dict[str, int]]:
        """Frames per organ, per scanner model and per ``organ/scanner`` pair."""
        organ = Counter(e["organ"] for e in self.entries)
        device = Counter(e.get("device") or "unknown" for e in self.entries)
        pair = Counter(f"{e['organ']}/{e.get('device') or 'unknown'}" for e in self.entries)
        return {"organ": dict(sorted(organ.items())), "device": dict(sorted(device.items())),
                "organ_device": dict(sorted(pair.items()))}

    def manifest(self) -> dict:
        """The JSON-serialisable manifest (no timestamps: the same set always gives the same bytes)."""
        return {"format": MANIFEST_FORMAT, "sources": list(self.sources), "seed": int(self.seed),
                "n_requested": int(self.n_requested), "n": len(self), "exclude_patients": list(self.exclude_patients),
                "counts": self.counts(), "files": [dict(e) for e in self.entries]}

    @property
    def manifest_sha256(self) -> str:
        """SHA-256 of the manifest file :meth:`save_manifest` writes (``sha256sum calib.json`` gives the same)."""
        return sha256_bytes(_manifest_text(self.manifest()).encode())

    def save_manifest(self, path: str | Path) -> Path:
        """Write the manifest atomically (a crash never leaves half a file); returns the path."""
        return Path(atomic_write_text(path, _manifest_text(self.manifest())))

    @classmethod
    def from_manifest(cls, path: str | Path) -> CalibrationSet:
        """Re-read exactly the frames a manifest lists, checking every file's SHA-256.

        Relative or moved paths are looked up next to the manifest as a fallback.

        Raises:
            DataError: the manifest is unreadable, a file is missing, or a file changed (the message names it).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read calibration manifest ({exc})", path=path) from exc
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise DataError(f"not a calibration manifest (expected format {MANIFEST_FORMAT!r})", path=path)
        frames, entries = [], []
        for e in data.get("files", []):
            f = Path(e["path"])
            if not f.is_file():
                alt = path.parent / f.name if f.is_absolute() else path.parent / f
                f = alt if alt.is_file() else f
            if not f.is_file():
                raise DataError("calibration file listed in the manifest is missing", path=f,
                                hint=f"restore it or rebuild the calibration set (manifest {path.name})")
            raw = f.read_bytes()
            if sha256_bytes(raw) != e["sha256"]:
                raise DataError("calibration file changed since the manifest was written (SHA-256 mismatch)", path=f,
                                hint="restore the original file or rebuild the calibration set")
            frames.append(read_frame(f))
            entries.append(dict(e))
        return cls(frames=frames, entries=entries, sources=list(data.get("sources", [])), seed=int(data.get("seed", 0)),
                   n_requested=int(data.get("n_requested", len(frames))),
                   exclude_patients=list(data.get("exclude_patients", [])))

    # -- report -----------------------------------------------------------------------------------
    def report(self) -> dict:
        """Counts per organ/scanner, a 16-bin intensity histogram (fractions of pixels) and size statistics."""
        hist = np.zeros(16, np.float64)
        means = []
        for f in self.frames:
            hist += np.bincount(np.asarray(f, np.uint8).ravel() >> 4, minlength=16)
            means.append(float(f.mean()))
        total = hist.sum() or 1.0
        hs = np.array([f.shape[0] for f in self.frames] or [0])
        ws = np.array([f.shape[1] for f in self.frames] or [0])

        def stats(v: np.ndarray) -> dict:
            return {"min": int(v.min()), "median": float(np.median(v)), "max": int(v.max())}

        return {"n": len(self), "n_requested": self.n_requested, "seed": self.seed, "sources": list(self.sources),
                "counts": self.counts(), "patients": len({(e["organ"], e["patient"]) for e in self.entries}),
                "intensity_histogram": {"bin_edges": [int(i * 16) for i in range(17)],
                                        "fraction": [round(float(x / total), 5) for x in hist]},
                "mean_intensity": round(float(np.mean(means)) if means else 0.0, 2),
                "sizes": {"height": stats(hs), "width": stats(ws), "distinct": len({f.shape for f in self.frames})},
                "flat_frames": [e["path"] for e, f in zip(self.entries, self.frames) if no_signal(f)],
                "manifest_sha256": self.manifest_sha256, "warnings": list(self.warnings)}


def _patient_key(r: Record) -> str:
    return f"{r.organ}/{r.patient}"


def stratified_round_robin(records: Sequence[Record], n: int, seed: int = 0) -> list[Record]:
    """Pick up to ``n`` records, visiting the ``(organ, scanner)`` groups in turn (each group seeded-shuffled)."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.organ, r.device or "unknown")].append(r)
    rng = np.random.default_rng(seed)
    queues = []
    for key in sorted(groups):
        items = sorted(groups[key], key=lambda r: str(r.image))
        queues.append([items[i] for i in rng.permutation(len(items))])
    picked: list[Record] = []
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(picked) < n:
                picked.append(q[depth])
        depth += 1
    return picked


def _warn(msgs: list[str], text: str) -> None:
    msgs.append(text)
    warnings.warn(text, UserWarning, stacklevel=3)


def check_frames(frames: Sequence[np.ndarray], names: Sequence[str], min_frames: int = MIN_FRAMES,
                 strict: bool = True) -> list[str]:
    """Apply the refusal rules to frames; returns the warnings.

    Args:
        frames: uint8 frames.
        names: a name per frame (for messages).
        min_frames: fewer frames than this -> DataError (a warning when ``strict`` is False).
        strict: refuse too-small sets (False: warn only; used by ``force``).

    Raises:
        DataError: too few frames, or no frame carries signal.
    """
    msgs: list[str] = []
    if len(frames) < min_frames:
        text = (f"only {len(frames)} calibration frame(s); at least {min_frames} are needed "
                f"({RECOMMENDED_FRAMES} recommended)")
        if strict:
            raise DataError(text, hint="add frames: more --calib sources (repeatable), or -n/--frames of usfm-edge quantize; "
                                       "for a smoke test only, set USFM_EDGE_MIN_CALIB_FRAMES=8 in the environment "
                                       "or pass --force (the set is then accepted with a warning)")
        _warn(msgs, text + " (accepted because force=True)")
    elif len(frames) < RECOMMENDED_FRAMES:
        _warn(msgs, f"{len(frames)} calibration frames (< {RECOMMENDED_FRAMES} recommended): activation ranges may "
                    "miss rare anatomy or gain settings")
    flat = [name for f, name in zip(frames, names) if no_signal(f)]
    if frames and len(flat) == len(frames):
        raise DataError("calibration frames carry no signal: every frame is (near-)constant (e.g. all black)",
                        hint="use real B-mode frames; usfm-edge never calibrates on synthetic or blank data")
    if flat:
        _warn(msgs, f"{len(flat)} calibration frame(s) are (near-)constant, e.g. {flat[0]}")
    return msgs


def build_calibration_set(sources: str | Sequence[str], n: int = RECOMMENDED_FRAMES, seed: int = 0,
                          exclude_patients: Iterable[str] | None = None, organs: Sequence[str] | None = None,
                          min_frames: int = MIN_FRAMES, strict: bool = True,
                          records: Sequence[Record] | None = None) -> CalibrationSet:
    """Draw a calibration set from data sources, balanced across organ and scanner model.

    Args:
        sources: data source specs (``busbra:PATH``, ``hc18:PATH``, ``folder:PATH@organ``...).
        n: frames wanted (fewer when the sources hold fewer images).
        seed: sampling seed (same sources + seed -> same set).
        exclude_patients: ``"organ/patient"`` keys to leave out (e.g. the accuracy gate's held-out patients).
        organs: organs the model was trained on, if known (a single-organ set then warns).
        min_frames: refuse sets smaller than this.
        strict: False turns the too-few refusal into a warning (never the no-signal refusal).
        records: already loaded records of ``sources`` (skips loading them again).

    Returns:
        The calibration set (frames read as uint8, every file hashed).

    Raises:
        DataError: unreadable file (named), too few frames, no signal; ConfigError: malformed spec.
    """
    specs = [sources] if isinstance(sources, str) else [str(s) for s in sources]
    if records is None:
        records = select_records(specs, split="all")
    excluded = set(exclude_patients or [])
    pool = [r for r in records if _patient_key(r) not in excluded]
    picked = stratified_round_robin(pool, int(n), seed)
    frames, entries = [], []
    for r in picked:
        path = Path(r.image)
        frames.append(read_frame(path))  # DataError names the file; nothing is skipped
        entries.append({"path": str(path.resolve()), "sha256": _sha256_file(path), "organ": r.organ,
                        "device": r.device, "patient": r.patient})
    msgs = check_frames(frames, [e["path"] for e in entries], min_frames, strict)
    got = sorted({e["organ"] for e in entries})
    if organs and len(set(organs)) > 1 and len(got) == 1:
        _warn(msgs, f"calibration frames are all '{got[0]}' but the model was trained on {sorted(set(organs))}: "
                    "other organs' activation ranges are not covered")
    calib = CalibrationSet(frames=frames, entries=entries, sources=specs, seed=int(seed), n_requested=int(n),
                           exclude_patients=sorted(excluded), warnings=msgs)
    log.info("calibration set: %d frames, %s", len(calib), calib.counts()["organ_device"])
    return calib
