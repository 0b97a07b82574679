"""One owner for the model contract (issue 16).

* Bundles exported now compute what bundles exported before the change computed (``data/contract_d44070c.npz``,
  written by ``data/make_contract_fixture.py`` with the code of d44070c), static-shape (jetson) bundles included:
  the Engine's own fitting gives exactly what callers' ``StaticSizeAdapter`` gave.
* A static jetson bundle fed 540x800 and 352x276 frames gives the same results through ``usfm-edge predict``,
  ``evaluate`` and ``bench``, and nearly the masks of a dynamic bundle of the same checkpoint.
* ``usfm.json`` and the ONNX metadata carry one contract, from which the export settings are rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

DATA = Path(__file__).resolve().parent / "data"
FIXTURE = DATA / "contract_d44070c.npz"


def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_contract_fixture", DATA / "make_contract_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _fixture_script()


@pytest.fixture(scope="module")
def bundles(script, tmp_path_factory):
    """The fixture's bundles (seeded test model: onnx fp32, jetson fp16 at its default frame size), exported now."""
    from usfm_edge.export import export

    out = tmp_path_factory.mktemp("contract")
    ckpt = script.fixture_checkpoint(out)
    return {t: export(ckpt, target=t, out=out / f"{t}.usfm") for t in ("onnx", "jetson")}


@pytest.fixture(scope="module")
def scans(script, tmp_path_factory):
    """A ``pairs:`` source of two real frames, 540x800 (HC18, filled head outline) and 352x276 (BUS-BRA crop)."""
    from usfm_edge.core.geometry import fill_outline_mask
    from usfm_edge.data import read_mask, sample_dir

    root, out = sample_dir(), tmp_path_factory.mktemp("scans")
    frames = script.fixture_frames()
    masks = {"hc18_540x800": fill_outline_mask(read_mask(root / "hc18" / "training_set" / "007_HC_Annotation.png")),
             "busbra_352x276": read_mask(root / "busbra" / "Masks" / "mask_0856-l.png")[:352, :276]}
    (out / "images").mkdir()
    (out / "masks").mkdir()
    for name, mask in masks.items():
        Image.fromarray(frames[name]).save(out / "images" / f"{name}.png")
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(out / "masks" / f"mask_{name}.png")
    return out / "images", out / "masks"


def test_bundles_give_the_outputs_of_bundles_exported_before(script, bundles):
    ref = np.load(FIXTURE)
    for target, path in bundles.items():
        for key, got in script.outputs(path).items():
            want = ref[f"{target}/{key}"]
            assert got.shape == want.shape, key
            if key.endswith("/mask"):
                assert np.mean(got == want) >= 0.999, (target, key)
            else:
                assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() <= 2e-3, (target, key)


def test_static_bundle_predict_evaluate_bench_agree(bundles, scans, tmp_path):
    from usfm_edge.bench.latency import run_bench
    from usfm_edge.cli import main
    from usfm_edge.core.metrics import seg_metrics
    from usfm_edge.data import read_image, read_mask
    from usfm_edge.evaluation import evaluate
    from usfm_edge.runtime import Engine

    images, masks = scans
    frames = {p.name: read_image(p) for p in sorted(images.iterdir())}
    assert sorted(f.shape for f in frames.values()) == [(352, 276), (540, 800)]
    jetson, data = bundles["jetson"], f"pairs:{images},{masks}"
    with Engine.open(jetson) as static, Engine.open(bundles["onnx"]) as dynamic:
        assert static.meta.input.static_hw == [64, 64]
        direct = {n: static.predict(f) for n, f in frames.items()}
        for n, f in frames.items():
            assert direct[n].mask.shape == f.shape and sum(direct[n].areas_px.values()) == f.size
            assert np.mean(direct[n].mask == dynamic.predict(f).mask) > 0.99  # the dynamic bundle, nearly

    r = CliRunner().invoke(main, ["predict", str(jetson), str(images), "-o", str(tmp_path / "pred"), "--no-overlays"])
    assert r.exit_code == 0, r.output
    records = json.loads((tmp_path / "pred" / "results.json").read_text())["records"]
    assert len(records) == 2
    for rec in records:
        res = direct[Path(rec["file"]).name]
        assert (rec["height"], rec["width"]) == res.mask.shape and rec["areas_px"] == res.areas_px

    names = sorted(frames)
    want = seg_metrics([direct[n].mask for n in names], [read_mask(masks / f"mask_{n}") for n in names])
    every = evaluate(jetson, data, split="all")
    assert every["metrics"]["dice"] == pytest.approx(want["dice"], abs=1e-9) and every["metrics"]["n"] == 2
    assert every["frames_resized_to"] == [64, 64]

    held = evaluate(jetson, data, split="val")
    bench = run_bench([jetson], data=data, eval_frames=2, runs=2, warmup=1, isolate=False, memory=False)
    (row,) = bench["rows"]
    assert row["metric"] == "dice" and row["metric_value"] == pytest.approx(held["metrics"]["dice"], abs=1e-9)
    assert row["p50_ms"] > 0 and not bench["skipped"]


def test_evaluate_says_what_it_scored(bundles, scans):
    from usfm_edge.cli import main

    images, masks = scans
    data = f"pairs:{images},{masks}"
    r = CliRunner().invoke(main, ["evaluate", str(bundles["onnx"]), "--data", data, "--split", "all"])
    assert r.exit_code == 0, r.output
    assert "scored every frame of the source: 2 frames of 2 patients (split 'all')" in r.stderr
    res = json.loads(r.stdout)
    assert res["scored"]["frames"] == 2 and res["scored"]["patients"] == 2 and res["scored"]["split"] == "all"
    r = CliRunner().invoke(main, ["evaluate", str(bundles["onnx"]), "--data", data])
    assert r.exit_code == 0, r.output
    assert "scored 1 frames of 1 patients: split 'val' (20% of patients held out, seed 0)" in r.stderr


def test_one_contract_in_usfm_json_and_onnx_metadata(bundles):
    from usfm_edge.calibration.backends import read_contract
    from usfm_edge.core.bundle_schema import CONTRACT_FIELDS
    from usfm_edge.export import export_config_from_meta
    from usfm_edge.runtime import read_meta

    for target, path in bundles.items():
        meta = read_meta(path)
        inside = read_contract(path / meta.files["onnx"])
        assert {k: getattr(inside, k) for k in CONTRACT_FIELDS} == {k: getattr(meta, k) for k in CONTRACT_FIELDS}
        cfg = export_config_from_meta(meta, precision="int8")
        assert (cfg.target, cfg.precision, cfg.task, cfg.bare, cfg.band_stop) == (target, "int8", "seg", False, False)
        assert cfg.frame_size == ((64, 64) if target == "jetson" else None)
    notes = " ".join(read_meta(bundles["jetson"]).notes)
    assert "64x64" in notes and "no frame_size was given" in notes


def test_static_target_without_frame_size_warns_loudly(capsys):
    from usfm_edge.export.config import resolve_frame_size

    assert resolve_frame_size((540, 800), True, False, 224, "jetson") == (540, 800)
    assert capsys.readouterr().err == ""
    assert resolve_frame_size(None, False, False, 224, "onnx") is None  # dynamic target: any frame size
    assert resolve_frame_size(None, True, True, 224, "jetson") is None  # bare graph: normalised model input
    assert resolve_frame_size(None, True, False, 224, "jetson") == (224, 224)
    err = capsys.readouterr().err
    assert "WARNING" in err and "224x224" in err and "--frame-size HxW" in err and "jetson" in err


def test_bundle_metadata_without_the_contract_is_refused():
    from usfm_edge.core.bundle_schema import BundleMeta
    from usfm_edge.core.errors import BundleError

    with pytest.raises(BundleError, match="usfm_edge.input"):
        BundleMeta.from_onnx_metadata({"usfm_edge.task": "seg", "usfm_edge.schema_version": "1"})
