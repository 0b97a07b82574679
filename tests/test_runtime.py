"""Runtime: one-backend install, plain backend APIs, streaming, threads, robustness, bundles, predict CLI, overlays.

Bundles: ``usfm_vit_test`` at 64 px, random weights, exported once; frames: real BUS-BRA / HC18 sample images.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from usfm_edge.cli import main
from usfm_edge.core.errors import BundleError, ConfigError, DataError, InputError
from usfm_edge.core.metrics import head_circumference_mm
from usfm_edge.core.preprocess import check_frame
from usfm_edge.data.readers import read_dicom
from usfm_edge.runtime import Engine
from usfm_edge.runtime.bundle_io import read_meta
from usfm_edge.runtime.overlay import PALETTE, cls_overlay, contour, seg_overlay
from usfm_edge.runtime.predict_cli import hc_label_index

S = 64
SAMPLE = Path(__file__).resolve().parents[1] / "usfm_edge" / "assets" / "sample"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    import torch

    from usfm_edge.export.exporter import export
    from usfm_edge.export.parity import default_frames
    from usfm_edge.models.tasks import build_task_model

    out = tmp_path_factory.mktemp("rt2")
    frames = default_frames(1)
    torch.manual_seed(0)
    # segmentation: the bundled HC18 demo checkpoint (a trained tiny model), exported as a user would
    from usfm_edge.bench.demo import DEMO_CHECKPOINTS, checkpoints_dir
    from usfm_edge.models.tasks import load_task_model

    seg = load_task_model(checkpoints_dir() / DEMO_CHECKPOINTS["hc18"])
    cls = build_task_model("cls", "usfm_vit_test", labels=["benign", "malignant", "normal"], img_size=S)
    enh = build_task_model("enhance", "usfm_vit_test", img_size=S)
    with torch.no_grad():  # a head that is not near-uniform, so labels are not ties everywhere
        cls.head.fc.weight.mul_(300.0)
    kw = dict(verify_frames=frames)
    return {"onnx": export(seg, "onnx", out=out / "hc-onnx", **kw),
            "openvino": export(seg, "openvino", out=out / "hc-ov", **kw),
            "bare": export(seg, "onnx", out=out / "hc-bare", bare=True, **kw),
            "cls": export(cls, "onnx", out=out / "cls-onnx", **kw),
            "enhance": export(enh, "onnx", out=out / "enh-onnx", **kw)}


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Real frames of four different sizes (HC18 540x800, BUS-BRA ~300x270)."""
    paths = sorted((SAMPLE / "hc18" / "training_set").glob("*_HC.png"))[:2] + sorted(
        (SAMPLE / "busbra" / "Images").glob("*.png"))[:3]
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


def _same(a, b) -> bool:  # bit-identical results (seg: mask, probs, areas; cls: probs, label; enhance: image)
    keys = {"seg": ("mask", "probs"), "cls": ("probs",), "enhance": ("image",)}[a.task]
    same = [getattr(a, k, None) == getattr(b, k, None) for k in ("areas_px", "label", "task")]
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in keys) and all(same)


def write_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    pytest.importorskip("pydicom")  # a real multi-frame ultrasound DICOM (explicit VR little endian)
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UltrasoundMultiFrameImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    tags = dict(Modality="US", Rows=pixels.shape[1], Columns=pixels.shape[2], SamplesPerPixel=1,
                NumberOfFrames=pixels.shape[0], PhotometricInterpretation="MONOCHROME2", BitsAllocated=8,
                BitsStored=8, HighBit=7, PixelRepresentation=0, **tags)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# -- 1. numpy + one backend, fast import ---------------------------------------------------------------------
def test_runtime_runs_with_numpy_and_onnxruntime_only(bundles, frames, tmp_path):
    np.save(tmp_path / "f.npy", frames[0])
    code = f"""
import sys, time
BLOCK = {{"torch", "nncf", "onnx", "openvino", "tensorrt", "PIL", "pydicom", "click", "scipy"}}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
t = time.perf_counter(); import usfm_edge.runtime as rt; dt = time.perf_counter() - t
import numpy as np
with rt.Engine.open({str(bundles["onnx"])!r}) as e:
    frame, name = np.load({str(tmp_path / "f.npy")!r}), e.backend.name
    r, s = e.predict(frame), list(e.stream([frame, frame]))
print(dt, name, r.mask.shape == s[1].mask.shape, sorted(m for m in sys.modules if m.split(".")[0] in BLOCK))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    dt, backend, same, loaded = r.stdout.split(maxsplit=3)
    assert backend == "onnxruntime" and same == "True" and loaded.strip() == "[]"
    assert float(dt) < 1.0, f"import usfm_edge.runtime took {dt} s"


def test_backend_choice_by_files_and_installed(bundles, tmp_path, monkeypatch):
    from usfm_edge.export.bundle import update_meta

    both = shutil.copytree(bundles["onnx"], tmp_path / "both.usfm")
    for name in ("model.xml", "model.bin"):
        shutil.copy(bundles["openvino"] / name, both / name)
    (both / "model.engine").write_bytes(b"not an engine")  # device-built file: allowed unchecked
    meta = read_meta(both)
    meta.files.update(openvino_xml="model.xml", openvino_bin="model.bin", tensorrt_engine="model.engine")
    update_meta(both, meta)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # engine present, TensorRT not installed: skipped
    with Engine.open(both) as e:
        assert e.backend.name == "openvino"
    with Engine.open(both, backend="onnxruntime") as e:
        assert e.backend.name == "onnxruntime"
    monkeypatch.setitem(sys.modules, "openvino", None)
    with Engine.open(both) as e:
        assert e.backend.name == "onnxruntime"
    with pytest.raises(ConfigError, match="unknown backend"):
        Engine.open(both, backend="coreml")


# -- 2. plain backend APIs (what C++/C#/Java hosts do) give the engine's outputs ------------------------------
def test_plain_onnxruntime_and_openvino_match_engine(bundles, frames):
    import onnxruntime as ort
    import openvino as ov

    meta = json.loads((bundles["onnx"] / "usfm.json").read_text())
    name, outs = meta["input"]["tensor"]["name"], [o["name"] for o in meta["outputs"]]
    assert name == "frame" and outs == ["probs", "mask"] and meta["input"]["tensor"]["dtype"] == "uint8"
    sess = ort.InferenceSession(str(bundles["onnx"] / meta["files"]["onnx"]), providers=["CPUExecutionProvider"])
    core = ov.Core()
    ov_meta = json.loads((bundles["openvino"] / "usfm.json").read_text())
    compiled = core.compile_model(str(bundles["openvino"] / ov_meta["files"]["openvino_xml"]), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    with Engine.open(bundles["onnx"], backend="onnxruntime") as e_ort, \
            Engine.open(bundles["openvino"], backend="openvino") as e_ov:
        for frame in frames[1:4]:
            probs, mask = sess.run(outs, {name: frame[None]})
            r = e_ort.predict(frame)
            assert np.array_equal(r.mask, mask[0]) and np.allclose(r.probs, probs[0], atol=1e-6)
            res = request.infer({name: frame[None]})
            ov_probs, ov_mask = res[compiled.output("probs")], res[compiled.output("mask")]
            r2 = e_ov.predict(frame)
            assert np.array_equal(r2.mask, ov_mask[0]) and np.allclose(r2.probs, ov_probs[0], atol=1e-6)
            assert np.abs(ov_probs - probs).max() < 1e-4  # the two backends agree too


def test_openvino_compiles_for_batch_one_and_any_batch_on_demand(bundles, frames):
    """Single frames run on a batch-1 specialisation (a dynamic batch makes OpenVINO's CPU plugin run the whole
    graph dynamically); a larger batch compiles the any-batch graph on first use; the contract stays any-batch."""
    with Engine.open(bundles["openvino"], backend="openvino") as e:
        be = e.backend
        assert be.io()[0][0].shape == (None, None, None)  # the bundle's contract: any batch, any frame size
        assert be.compiled.inputs[0].get_partial_shape()[0].get_length() == 1
        single = [e.predict(f) for f in frames[1:4]]
        assert be._batched is None  # not compiled until a batch needs it
        batch = e.predict_batch([frames[2], frames[3], frames[2]])  # a batch of 2 and one of 1
        assert be._batched is not None and be._batched[0].inputs[0].get_partial_shape()[0].is_dynamic
        for r, b in zip([single[1], single[2], single[1]], batch):
            assert np.array_equal(r.mask, b.mask) and np.allclose(r.probs, b.probs, atol=1e-5)


def test_onnxruntime_spin_wait_option(bundles, frames):
    """``spin=False`` turns ONNX Runtime's spin-waiting workers off; the results do not change."""
    with Engine.open(bundles["onnx"], backend="onnxruntime", threads=2) as e_spin, \
            Engine.open(bundles["onnx"], backend="onnxruntime", threads=2, spin=False) as e_idle:
        entry = "session.intra_op.allow_spinning"
        assert e_spin.backend.session.get_session_options().get_session_config_entry(entry) == "1"
        assert e_idle.backend.session.get_session_options().get_session_config_entry(entry) == "0"
        for frame in frames[1:3]:
            a, b = e_spin.predict(frame), e_idle.predict(frame)
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.probs, b.probs)


# -- 1. streaming -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["onnx", "openvino", "bare", "cls", "enhance"])
def test_stream_yields_in_order_what_predict_gives(bundles, frames, which):
    with Engine.open(bundles[which]) as engine:
        serial = [engine.predict(f) for f in frames]
        streamed = list(engine.stream(iter(frames), depth=3))
        assert len(streamed) == len(frames) and all(_same(a, b) and b.timing_ms > 0 for a, b in zip(serial, streamed))
        if which in ("onnx", "openvino"):  # a source reusing one buffer (camera grabber) is safe
            buf = np.empty_like(frames[0])  # every item is the same array, refilled (np.copyto returns None)
            got = list(engine.stream(np.copyto(buf, f) or buf for f in (frames[0], frames[1], frames[0])))
            assert _same(got[0], serial[0]) and _same(got[1], serial[1]) and _same(got[2], serial[0])


def test_stream_cine_errors_and_early_stop(bundles, frames, tmp_path):
    cine = np.stack([frames[0], frames[1], 255 - frames[0]])
    path = write_dicom(tmp_path / "cine.dcm", cine, PixelSpacing=[0.1, 0.2])
    with Engine.open(bundles["openvino"]) as engine:
        got = list(engine.stream(read_dicom(path).frames, pixel_spacing_mm=0.5))
        assert [r.mask.shape for r in got] == [(540, 800)] * 3 and got[0].pixel_spacing_mm == (0.5, 0.5)
        assert _same(got[2], engine.predict(cine[2]))
        by_path = list(engine.stream([path, (frames[2], (0.3, 0.3))]))  # a DICOM path's own spacing wins
        assert by_path[0].pixel_spacing_mm == (0.1, 0.2) and by_path[1].pixel_spacing_mm == (0.3, 0.3)
        bad = [frames[2], frames[2].astype(np.float32), tmp_path / "missing.png", frames[3]]
        out = list(engine.stream(bad, on_error="yield"))
        assert isinstance(out[1], InputError) and "frame 1" in str(out[1]) and "dtype float32" in str(out[1])
        assert isinstance(out[2], DataError) and _same(out[3], engine.predict(frames[3]))
        seen = []
        with pytest.raises(InputError, match="frame 1"):
            seen.extend(engine.stream(bad))
        assert len(seen) == 1  # the results before the bad frame come first
        threads = threading.active_count()
        for _ in range(3):
            gen = engine.stream(itertools.repeat(frames[2]))  # endless source, stopped by the caller
            assert [next(gen).mask.shape for _ in range(2)] == [frames[2].shape] * 2
            gen.close()
        assert threading.active_count() <= threads  # the engine reuses its stream threads
        with pytest.raises(ConfigError, match="on_error"):
            engine.stream(frames, on_error="ignore")
        gen = engine.stream(itertools.repeat(frames[2]))
        next(gen)
        engine.close()  # ends a running stream with a typed error instead of leaving it hanging
        with pytest.raises(BundleError, match="closed"):
            list(gen)


@pytest.mark.parametrize("which", ["onnx", "openvino"])
def test_four_threads_give_results_identical_to_serial(bundles, frames, which):
    with Engine.open(bundles[which]) as engine:
        serial = [engine.predict(f) for f in frames]
        work = list(range(len(frames))) * 2
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(lambda i: engine.predict(frames[i]), work))
            streamed = pool.submit(lambda: list(engine.stream(frames)))  # a stream alongside the threads
            assert all(_same(serial[i], r) for i, r in zip(work, threaded))
            assert all(_same(a, b) for a, b in zip(serial, streamed.result(timeout=120)))


# -- 4. robustness of frames ---------------------------------------------------------------------------------
def test_bad_frames_are_named_and_the_engine_stays_usable(bundles, frames):
    good = frames[2]
    with Engine.open(bundles["onnx"], max_side=600) as engine:
        ref = engine.predict(good)
        nan, inf = good.astype(np.float32), good.astype(np.float64)
        nan[5, 5], inf[0, 0] = np.nan, np.inf
        cases = [(good.astype(np.int16), "dtype int16"), (good > 100, "dtype bool"), (nan, "NaN or infinite"),
                 (inf, "NaN or infinite"), (good.astype(np.float32), "dtype float32"),
                 (np.zeros((0, 0), np.uint8), "empty"), (np.zeros((0, 5, 3), np.uint8), "empty"),
                 (np.zeros((1, 1), np.uint8), "1x1"), (np.zeros((1, 300), np.uint8), "1x300"),
                 (np.zeros((4, 4), np.uint8), "at least 8 px"), (np.zeros((601, 80), np.uint8), "maximum side 600"),
                 (np.zeros((50, 50, 2), np.uint8), "shape"), (None, "numpy array")]
        for bad, match in cases:
            with pytest.raises(InputError, match=match):
                engine.predict(bad)
            assert _same(engine.predict(good), ref)  # usable after every bad frame
        with pytest.raises(InputError, match="frame 1: .*NaN"):
            engine.predict_batch([good, nan])
        with pytest.raises(ConfigError, match="min_side"):
            Engine.open(bundles["onnx"], max_side=4)


def test_layouts_and_rgb_give_the_grey_result(bundles, frames):
    g = frames[2]
    with Engine.open(bundles["onnx"]) as engine:
        ref = engine.predict(g)
        layouts = [np.asfortranarray(g), np.repeat(np.repeat(g, 2, 0), 2, 1)[::2, ::2], g.T.copy().T, g[:, :, None], g[None],
                   np.stack([g] * 3, -1), np.stack([g] * 3, 0), np.stack([g, g, g, np.full_like(g, 255)], -1),
                   np.stack([g] * 3, -1)[:, ::-1][:, ::-1]]
        for arr in layouts:
            assert _same(engine.predict(arr), ref), arr.shape
        rgb = np.stack([g, np.roll(g, 7, 1), 255 - g], -1)  # a real colour frame: its BT.601 luma is used
        assert _same(engine.predict(rgb), engine.predict(check_frame(rgb)))
        assert _same(engine.predict(np.ascontiguousarray(rgb.transpose(2, 0, 1))), engine.predict(rgb))


# -- 4. robustness of bundles --------------------------------------------------------------------------------
def _flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x10
    f.write_bytes(bytes(data))


def _newer(p: Path) -> None:
    data = json.loads((p / "usfm.json").read_text())
    data["schema_version"] += 1
    (p / "usfm.json").write_text(json.dumps(data))


BROKEN = {  # name: (source bundle, damage, refresh SHA256SUMS afterwards, expected message)
    "tampered": ("openvino", lambda p: _flip(p / "model.bin"), False, "'model.bin' does not match its SHA-256"),
    "truncated": ("onnx", lambda p: (p / "model.onnx").write_bytes((p / "model.onnx").read_bytes()[:5000]), True,
                  "not a readable ONNX model|cannot load the model"),
    "truncated-ir": ("openvino", lambda p: (p / "model.bin").write_bytes((p / "model.bin").read_bytes()[:1000]),
                     True, "OpenVINO cannot compile"),
    "bad-json": ("onnx", lambda p: (p / "usfm.json").write_text('{"schema_version": 1, "task": '), False,
                 "not valid JSON"),
    "missing-model": ("onnx", lambda p: (p / "model.onnx").unlink(), False,
                      "'model.onnx' listed in SHA256SUMS is missing"),
    "newer-schema": ("onnx", _newer, True, "newer usfm-edge"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_bundles_raise_bundle_error_naming_the_problem(bundles, frames, tmp_path, case):
    from usfm_edge.export.bundle import write_sums
    src, damage, refresh, match = BROKEN[case]
    p = shutil.copytree(bundles[src], tmp_path / f"{case}.usfm")
    damage(p)
    if refresh:  # a "fixer" refreshed the checksums: the backend or the schema check must still refuse it
        write_sums(p)
    with pytest.raises(BundleError, match=match):
        Engine.open(p)
    if case == "missing-model":
        with pytest.raises(BundleError, match="no model file"):
            Engine.open(p, verify=False)


def test_external_data_outside_the_bundle_is_refused_with_and_without_onnx(bundles, tmp_path, monkeypatch):
    from usfm_edge.export.bundle import update_meta
    onnx = pytest.importorskip("onnx")
    p = shutil.copytree(bundles["cls"], tmp_path / "external.usfm")
    model = onnx.load(str(p / "model.onnx"))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    n = (tmp_path / "outside.bin").write_bytes(t.raw_data)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    for k, v in (("location", "../outside.bin"), ("offset", "0"), ("length", str(n))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    (p / "model.onnx").write_bytes(model.SerializeToString())
    update_meta(p, read_meta(p))
    with pytest.raises(BundleError, match="outside the bundle"):
        Engine.open(p)
    monkeypatch.setitem(sys.modules, "onnx", None)  # a runtime-only install: ONNX Runtime refuses it itself
    with pytest.raises(BundleError, match="escapes model directory|outside"):
        Engine.open(p)


# -- 3. the predict command ----------------------------------------------------------------------------------
def test_predict_cli_seg_hc_cine_and_failures(bundles, frames, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    hc = sorted((SAMPLE / "hc18" / "training_set").glob("*_HC.png"))[:2]
    for f in hc:
        shutil.copy(f, inp / f.name)
    write_dicom(inp / "cine.dcm", np.stack([frames[2], 255 - frames[2]]), PixelSpacing=[0.2, 0.2])
    (inp / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out, runner = tmp_path / "out", CliRunner()
    r = runner.invoke(main, ["predict", str(bundles["onnx"]), str(inp), "--out", str(out), "--pixel-spacing", "0.1"])
    assert r.exit_code == 1 and "1 input(s) failed, 4 frame(s) predicted" in r.output, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["head_circumference"] and res["frames"] == 4 and res["errors"][0]["file"].endswith("broken.png")
    recs = {(Path(x["file"]).name, x["frame"]): x for x in res["records"]}
    assert recs[("cine.dcm", 1)]["pixel_spacing_mm"] == [0.2, 0.2] and recs[("cine.dcm", 1)]["pixel_spacing_source"] == "dicom"
    first = recs[(hc[0].name, 0)]
    with Engine.open(bundles["onnx"]) as engine:
        ref = engine.predict(inp / hc[0].name, pixel_spacing_mm=0.1)
    assert first["areas_px"] == ref.areas_px and first["pixel_spacing_source"] == "option"
    assert first["areas_mm2"]["fetal_head"] == pytest.approx(ref.areas_px["fetal_head"] * 0.01, rel=1e-3)
    expected_hc = head_circumference_mm(ref.mask == 1, 0.1) if ref.areas_px["fetal_head"] else None
    assert first["hc_mm"] == (pytest.approx(expected_hc, abs=1e-3) if expected_hc else None)
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["file", "frame", "area_px_background", "area_px_fetal_head"]
    assert "hc_mm" in rows[0] and "timing_ms" in rows[0] and len(rows) == 5
    pngs = sorted(x.name for x in (out / "overlays").iterdir())
    assert pngs == sorted([f"{f.stem}.png" for f in hc] + ["cine_f0000.png", "cine_f0001.png"])
    assert not [x for x in out.rglob("*.tmp")]  # atomic writes leave no temporary files
    (inp / "broken.png").unlink()
    r = runner.invoke(main, ["predict", str(bundles["onnx"]), str(inp / "cine.dcm"), "--out", str(tmp_path / "o2"),
                             "--backend", "onnxruntime", "--no-overlays"])
    assert r.exit_code == 0 and "2 frame(s) from 1 file(s)" in r.output, r.output
    assert not (tmp_path / "o2" / "overlays").exists()


def test_predict_numbers_frames_per_file_and_anonymizes_names(bundles, frames, tmp_path):
    """A DICOM's bad frames are numbered within the file in the messages, as in results.json; with
    --anonymize-names no input name reaches the outputs and the mapping is written only outside them."""
    inp = tmp_path / "in"
    inp.mkdir()
    patient = "DOE_JANE_1961"
    Image.fromarray(frames[0]).save(inp / f"a_{patient}.png")
    write_dicom(inp / f"{patient}.dcm", np.zeros((2, 4, 300), np.uint8))  # frames too small: refused per frame
    out, runner = tmp_path / "out", CliRunner()
    r = runner.invoke(main, ["predict", str(bundles["onnx"]), str(inp), "--out", str(out)])
    assert r.exit_code == 1 and "2 input(s) failed, 1 frame(s) predicted" in r.output, r.output
    res = json.loads((out / "results.json").read_text())
    assert [e["frame"] for e in res["errors"]] == [0, 1]
    assert all(e["error"].startswith("frame is 4x300 pixels; this model needs") for e in res["errors"]), res["errors"]
    assert f"{patient}.dcm[frame 0]" in r.output and f"{patient}.dcm[frame 1]" in r.output, r.output
    assert "frame 2" not in r.output  # the run-wide index of the second DICOM frame
    anon, mapping = tmp_path / "anon", tmp_path / "private" / "names.json"
    r = runner.invoke(main, ["predict", str(bundles["onnx"]), str(inp), "--out", str(anon), "--anonymize-names",
                             "--name-map", str(mapping)])
    assert r.exit_code == 1, r.output
    assert sorted(p.name for p in (anon / "overlays").iterdir()) == ["frame_0001.png"]
    for f in anon.rglob("*"):
        assert patient not in f.name and (f.is_dir() or patient.encode() not in f.read_bytes()), f
    res = json.loads((anon / "results.json").read_text())
    assert json.loads(mapping.read_text()) == {"file_0001": str(inp / f"{patient}.dcm"),  # input order
                                               "file_0002": str(inp / f"a_{patient}.png")}
    assert res["records"][0]["file"] == "file_0002" and [e["file"] for e in res["errors"]] == ["file_0001"] * 2
    r = runner.invoke(main, ["predict", str(bundles["onnx"]), str(inp), "--out", str(anon), "--anonymize-names",
                             "--name-map", str(anon / "names.json")])
    assert r.exit_code != 0 and "outside --out" in r.output, r.output


def test_predict_cli_cls_and_enhance(bundles, frames, tmp_path):
    img, runner = tmp_path / "frame.png", CliRunner()
    Image.fromarray(frames[2]).save(img)
    r = runner.invoke(main, ["predict", str(bundles["cls"]), str(img), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "c" / "results.json").read_text())["records"][0]
    assert rec["label"] in ("benign", "malignant", "normal") and rec["prob"] == max(rec["probs"].values())
    header = (tmp_path / "c" / "results.csv").read_text().splitlines()[0]
    assert header == "file,frame,label,prob,prob_benign,prob_malignant,prob_normal,timing_ms,overlay"
    assert hc_label_index(NS(task="seg", labels=["bg", "head"], notes=["HC18: head circumference"])) == 1
    assert hc_label_index(NS(task="seg", labels=["bg", "lesion"], notes=[])) is None
    r = runner.invoke(main, ["predict", str(bundles["enhance"]), str(img), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    side = np.asarray(Image.open(tmp_path / "e" / "overlays" / "frame.png"))
    assert side.shape[0] == frames[2].shape[0] and side.shape[1] > 2 * frames[2].shape[1] and side.shape[2] == 3
    r = runner.invoke(main, ["predict", str(bundles["cls"]), str(img), "--out", str(tmp_path / "x"),
                             "--backend", "openvino"])
    assert r.exit_code == 1 and "no model file for backend 'openvino'" in r.output


def test_overlay_drawing():
    m = np.zeros((40, 50), bool)
    m[10:30, 10:40] = True
    edge = contour(m, 2)
    assert edge.sum() == 2 * (20 + 30) * 2 - 16 and not edge[15:25, 15:35].any() and not edge[~m].any()
    gray, mask = np.full((120, 150), 60, np.uint8), np.zeros((120, 150), np.uint8)
    mask[60:100, 60:120] = 1
    pic = seg_overlay(gray, mask, ["background", "lesion"], alpha=0.0, thickness=1)
    assert pic.shape == (120, 150, 3) and tuple(pic[60, 90]) == PALETTE[0] and tuple(pic[80, 90]) == (60, 60, 60)
    pic = cls_overlay(gray, "malignant", 0.93, [0.05, 0.93, 0.02], ["benign", "malignant", "normal"])
    assert (pic[:20, :60] != 60).any() and (pic[-10:, -10:] == 60).all()
