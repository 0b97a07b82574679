"""`usfm-edge predict` takes the pixel spacing from the dataset table beside HC18 images and draws the HC fit."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hc18_bundle(tmp_path_factory):
    from usfm_edge.bench.demo import DEMO_CHECKPOINTS, checkpoints_dir
    from usfm_edge.export import export

    return export(checkpoints_dir() / DEMO_CHECKPOINTS["hc18"], "onnx",
                  out=tmp_path_factory.mktemp("b") / "hc18-onnx")


def test_spacing_from_the_dataset_csv_then_the_option(hc18_bundle, sample_dir, tmp_path):
    from usfm_edge.runtime.predict_cli import run_predict

    root = tmp_path / "hc18"
    (root / "training_set").mkdir(parents=True)
    src = sample_dir / "hc18"
    frames = sorted((src / "training_set").glob("*_HC.png"))[:2]
    for f in frames:
        shutil.copy(f, root / "training_set" / f.name)
    shutil.copy(src / "training_set_pixel_size_and_HC.csv", root)  # HC18 layout: the table one level up
    other = tmp_path / "other.png"
    shutil.copy(frames[0], other)  # not listed anywhere: falls back to --pixel-spacing
    res = run_predict(hc18_bundle, [root / "training_set", other], tmp_path / "out", pixel_spacing=0.5,
                      progress=False)
    table = {}
    for line in (src / "training_set_pixel_size_and_HC.csv").read_text().splitlines()[1:]:
        name, size = line.split(",")[:2]
        table[name] = float(size)
    recs = {r["file"]: r for r in res["records"]}
    for f in frames:
        rec = recs[str(root / "training_set" / f.name)]
        assert rec["pixel_spacing_source"] == "dataset csv"
        assert rec["pixel_spacing_mm"] == [table[f.name], table[f.name]]
        if rec["hc_mm"] is not None:
            assert rec["hc_ellipse_px"] and len(rec["hc_ellipse_px"]) == 5
    assert recs[str(other)]["pixel_spacing_source"] == "option" and recs[str(other)]["pixel_spacing_mm"] == [0.5, 0.5]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["records"]) == 3 and (tmp_path / "out" / "overlays").is_dir()
