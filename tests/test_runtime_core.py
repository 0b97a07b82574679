"""Runtime core: torch-free import, bundle schema, Engine input checks, batching, threads, backends."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from usfm_edge.core.bundle_schema import SCHEMA_VERSION, BundleMeta, InputContract, TensorSpec, default_thresholds
from usfm_edge.core.errors import BackendUnavailableError, BundleError, InputError

S = 64


def test_runtime_import_is_torch_free_and_fast():
    code = ("import sys, time; t = time.perf_counter(); import usfm_edge.runtime; dt = time.perf_counter() - t; "
            "heavy = [m for m in ('torch', 'nncf', 'onnx', 'onnxruntime', 'openvino', 'tensorrt') if m in sys.modules]; "
            "print(dt, ','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    dt, heavy = r.stdout.split()[0], r.stdout.split()[1:]
    assert heavy == [], f"usfm_edge.runtime imported {heavy}"
    assert float(dt) < 1.0, f"import took {dt} s"


# -- schema ------------------------------------------------------------------------------------------------
def _meta(**kw) -> BundleMeta:
    base = dict(task="seg", labels=["background", "lesion"],
                input=InputContract(TensorSpec("frame", "uint8", ["batch", "height", "width"]),
                                    dynamic_axes=["batch", "height", "width"]),
                outputs=[TensorSpec("probs", "float32", ["batch", 2, "height", "width"]),
                         TensorSpec("mask", "uint8", ["batch", "height", "width"])],
                preprocessing={"img_size": 224}, precision="fp32", backend="onnxruntime", target="onnx",
                files={"onnx": "model.onnx"}, thresholds=default_thresholds("fp32"))
    base.update(kw)
    return BundleMeta(**base)


def test_schema_round_trip_and_validation():
    meta = _meta()
    back = BundleMeta.from_json(meta.to_json())
    assert back == meta and back.schema_version == SCHEMA_VERSION
    data = json.loads(meta.to_json())
    data["future_key"] = {"x": 1}  # unknown keys of the same version survive a round trip
    assert json.loads(BundleMeta.from_dict(data).to_json())["future_key"] == {"x": 1}
    for bad, match in [(dict(task="detect"), "task"), (dict(precision="int4"), "precision"),
                       (dict(labels=[]), "labels"), (dict(files={"onnx": "../model.onnx"}), "plain file name")]:
        with pytest.raises(BundleError, match=match):
            _meta(**bad).validate()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(BundleError, match="newer usfm-edge"):
        BundleMeta.from_dict(data)
    with pytest.raises(BundleError, match="required entry"):
        BundleMeta.from_dict({"schema_version": 1, "task": "seg"})
    assert default_thresholds("fp16") == {"cosine": 0.999, "dice": 0.98}


# -- engines on real bundles -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from usfm_edge.export.exporter import export
    from usfm_edge.export.parity import default_frames
    from usfm_edge.models.tasks import build_task_model

    out = tmp_path_factory.mktemp("rt")
    frames = default_frames(1)
    seg = build_task_model("seg", "usfm_vit_test", img_size=S)
    return {"onnx": export(seg, "onnx", out=out / "seg-onnx", verify_frames=frames),
            "openvino": export(seg, "openvino", out=out / "seg-ov", verify_frames=frames),
            "jetson": export(seg, "jetson", out=out / "seg-jetson", verify_frames=frames, frame_size=(120, 160))}


@pytest.fixture(scope="module")
def sample_png() -> Path:
    from usfm_edge.data import sample_dir

    return sorted((sample_dir() / "busbra" / "Images").glob("*.png"))[0]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_bad_frames_raise_input_error_and_engine_stays_usable(bundles, backend):
    from usfm_edge.runtime import Engine

    with Engine.open(bundles["onnx" if backend == "onnxruntime" else "openvino"], backend=backend) as engine:
        assert engine.backend.name == backend
        good = np.random.default_rng(0).integers(0, 256, (200, 180), dtype=np.uint8)
        for bad, match in [(good.astype(np.float32), "dtype"), (np.zeros((4, 50, 50), np.uint8), "shape"),
                           (np.zeros((1, 1), np.uint8), "at least 8 px"), (np.zeros((2, 2, 2, 2), np.uint8), "dimensions"),
                           ([[1, 2], [3, 4]], "numpy array"), (np.zeros((5000, 10), np.uint8), "larger")]:
            with pytest.raises(InputError, match=match):
                engine.predict(bad)
        r = engine.predict(good)
        assert r.mask.shape == (200, 180)
        rgb = np.stack([good] * 3, axis=-1)
        assert np.array_equal(engine.predict(rgb).mask, r.mask)  # grey replicated to RGB gives the same frame


def test_predict_path_and_pixel_spacing(bundles, sample_png):
    from usfm_edge.data.readers import read_image
    from usfm_edge.runtime import Engine, SegResult

    with Engine.open(bundles["onnx"]) as engine:
        r = engine.predict(sample_png, pixel_spacing_mm=(0.1, 0.2))
        assert isinstance(r, SegResult) and r.mask.shape == read_image(sample_png).shape
        assert r.timing_ms > 0 and r.pixel_spacing_mm == (0.1, 0.2)
        for name, px in r.areas_px.items():
            assert r.areas_mm2[name] == pytest.approx(px * 0.02)
        assert engine.predict(sample_png).areas_mm2 is None
        from usfm_edge.core.errors import DataError

        with pytest.raises(DataError):
            engine.predict(sample_png.with_name("missing.png"))


@pytest.mark.parametrize("which", ["onnx", "openvino"])
def test_batching_and_threads_match_single_predictions(bundles, which):
    from usfm_edge.runtime import Engine

    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, hw, dtype=np.uint8) for hw in [(100, 120)] * 3 + [(90, 70)] * 2]
    with Engine.open(bundles[which]) as engine:
        assert engine.dynamic_batch
        single = [engine.predict(f) for f in frames]
        batched = engine.predict_batch(frames, batch_size=2)
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(engine.predict, frames * 2))
        for a, b, c in zip(single, batched, threaded[: len(frames)]):
            assert a.mask.shape == b.mask.shape == c.mask.shape
            assert np.abs(a.probs - b.probs).max() < 1e-4 and np.abs(a.probs - c.probs).max() < 1e-5


def test_static_bundle_takes_any_frame_size(bundles):
    """Static shapes belong to the Engine: a jetson bundle built for 120x160 frames takes any frame, fitted to its
    size and mapped back (predict, predict_batch and stream alike)."""
    from usfm_edge.runtime import Engine

    with Engine.open(bundles["jetson"]) as engine:  # TensorRT-ready ONNX, run by ONNX Runtime here
        assert engine.backend.name == "onnxruntime" and not engine.dynamic_batch
        assert engine.predict(np.zeros((120, 160), np.uint8)).mask.shape == (120, 160)
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, hw, dtype=np.uint8) for hw in ((160, 120), (540, 800), (352, 276))]
        one = [engine.predict(f) for f in frames]
        for f, r in zip(frames, one):
            assert r.mask.shape == f.shape and r.probs.shape[1:] == f.shape and sum(r.areas_px.values()) == f.size
            assert np.array_equal(r.mask, r.probs.argmax(0))
        for got in (engine.predict_batch(frames), list(engine.stream(frames))):  # looped, batch 1
            assert all(np.array_equal(a.mask, b.mask) and np.allclose(a.probs, b.probs) for a, b in zip(one, got))


def test_missing_backend_names_the_extra(bundles, monkeypatch):
    from usfm_edge.runtime import Engine

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"usfm-edge\[openvino\]"):
        Engine.open(bundles["openvino"], backend="openvino")
    with pytest.raises(BackendUnavailableError, match=r"usfm-edge\[openvino\]"):
        Engine.open(bundles["openvino"])  # auto: the bundle has only an IR
    with pytest.raises(BundleError, match="no model file for backend 'openvino'"):
        Engine.open(bundles["onnx"], backend="openvino")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BundleError, match="no model file for backend 'tensorrt'"):
        Engine.open(bundles["jetson"], backend="tensorrt")  # engine not built on this machine


def test_openvino_fp32_bundles_compile_with_f32_hint(bundles):
    from usfm_edge.runtime import Engine

    with Engine.open(bundles["openvino"]) as engine:
        assert str(engine.backend.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("f32", "<Type: 'float32'>")


def test_static_bundle_results_map_back_by_one_rule(bundles, sample_png):
    """The engine's static-shape rule: the frame is fitted to the static size with the bundle's interpolation
    (rounded to uint8), the graph runs, its probabilities are resized bilinearly to the frame and the mask is
    their argmax; the INT8 gate's engines (Engine.from_file on the bare model file) do exactly the same."""
    from usfm_edge.core.preprocess import fit_frame
    from usfm_edge.data import read_image
    from usfm_edge.runtime import Engine
    from usfm_edge.runtime.bundle_io import read_meta
    from usfm_edge.runtime.results import resize_maps

    frame = read_image(sample_png)
    assert frame.shape != (120, 160)
    meta = read_meta(bundles["jetson"])
    with Engine.open(bundles["jetson"], backend="onnxruntime") as engine:
        a = engine.predict(frame)
        raw = engine.run_raw(fit_frame(frame, (120, 160))[None])
    with Engine.from_file(bundles["jetson"] / meta.files["onnx"], meta) as gate:
        b = gate.predict(frame)
    probs = resize_maps(raw["probs"][0], frame.shape)
    for r in (a, b):
        assert r.mask.shape == frame.shape and r.probs.shape[1:] == frame.shape
        assert np.array_equal(r.mask, r.probs.argmax(0))
        assert sum(r.areas_px.values()) == frame.size
        assert np.abs(r.probs - probs).max() < 1e-6 and np.array_equal(r.mask, probs.argmax(0))
    assert np.array_equal(a.mask, b.mask) and np.abs(a.probs - b.probs).max() < 1e-6


def test_outputs_at_size_rules():
    from usfm_edge.runtime.results import outputs_at_size

    probs = np.zeros((1, 2, 4, 4), np.float32)
    probs[0, 1, 1:3, 1:3], probs[0, 0] = 1.0, 1.0
    probs[0, 0, 1:3, 1:3] = 0.0
    seg = {"probs": probs, "mask": probs.argmax(1).astype(np.uint8)}
    big = outputs_at_size(seg, "seg", (8, 12))
    assert big["mask"].shape == (1, 8, 12) and big["probs"].shape == (1, 2, 8, 12) and big["mask"].dtype == np.uint8
    assert np.array_equal(big["mask"], big["probs"].argmax(1)) and 0 < int((big["mask"] == 1).sum()) < 96
    assert seg["mask"].shape == (1, 4, 4)  # new arrays; the input is untouched
    assert outputs_at_size(seg, "seg", (4, 4)) is seg
    out = outputs_at_size({"restored": np.full((1, 4, 4), 200, np.uint8)}, "enhance", (6, 5))["restored"]
    assert out.shape == (1, 6, 5) and out.dtype == np.uint8 and (out == 200).all()
    cls = {"probs": np.array([[0.2, 0.8]], np.float32)}
    assert outputs_at_size(cls, "cls", (10, 10)) is cls
