"""Shared fixtures: real ultrasound frames from the bundled sample (usfm_edge/assets/sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "usfm_edge" / "assets" / "sample"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_benchmark(name: str):
    """Import ``benchmarks/NAME.py`` (a script folder, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def export_test_seg(out: Path, targets=("onnx",)) -> dict:
    """Bundles of the seeded ``usfm_vit_test`` seg model (64 px), one per target, gated on one real frame:
    ``{target: bundle path}`` (the small model the runtime-trust, signing and corpus tests open)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    import torch

    from usfm_edge.export.exporter import export
    from usfm_edge.export.parity import default_frames
    from usfm_edge.models.tasks import build_task_model

    torch.manual_seed(0)
    seg = build_task_model("seg", "usfm_vit_test", img_size=64)
    frames = default_frames(1)
    return {t: export(seg, t, out=out / f"seg-{t}", verify_frames=frames) for t in targets}


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"needs the full datasets at {SHARED} (only in the developers' checkout)")
    return SHARED


@pytest.fixture(scope="session")
def sample_frames() -> list[np.ndarray]:
    """A few real grey uint8 frames (BUS-BRA breast and HC18 fetal head) of their native sizes."""
    from PIL import Image

    paths = sorted((SAMPLE / "busbra" / "Images").glob("*.png"))[:2] + sorted(
        (SAMPLE / "hc18" / "training_set").glob("*_HC.png"))[:2]
    if not paths:
        pytest.fail(f"bundled sample missing under {SAMPLE}")
    return [np.asarray(Image.open(p).convert("L")) for p in paths]
