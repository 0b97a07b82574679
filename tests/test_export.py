"""Export: targets, in-graph preprocessing, ONNX/OpenVINO/TensorRT-ready bundles, verification, parity gate.

Models are the ``usfm_vit_test`` preset at 64 px (random weights); parity runs on real bundled frames.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from usfm_edge.core.errors import BundleError, ConfigError, ExportError, ValidationError  # noqa: E402
from usfm_edge.core.preprocess import PreprocessSpec, preprocess, resize_gray  # noqa: E402
from usfm_edge.export import check_precision, get_target, list_targets  # noqa: E402
from usfm_edge.export.bundle import update_meta, verify_bundle, write_sums  # noqa: E402
from usfm_edge.export.exporter import export  # noqa: E402
from usfm_edge.export.onnx_export import check_onnx_ops, onnx_is_static, onnx_opset, torch2onnx  # noqa: E402
from usfm_edge.export.parity import default_frames  # noqa: E402
from usfm_edge.export.tensorrt_export import trtexec_command  # noqa: E402
from usfm_edge.models.raw_frame import PreprocessGraph, RawFrameModel  # noqa: E402
from usfm_edge.runtime import ClsResult, Engine, FeaturesResult, SegResult  # noqa: E402
from usfm_edge.runtime.bundle_io import read_meta  # noqa: E402

tasks = pytest.importorskip("usfm_edge.models.tasks")
S = 64


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return default_frames(2)  # one BUS-BRA frame, one HC18 540x800 frame


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from usfm_edge.models.checkpoint import save_checkpoint
    from usfm_edge.models.registry import create_model, model_args

    torch.manual_seed(0)
    seg = tasks.build_task_model("seg", "usfm_vit_test", img_size=S)
    cls = tasks.build_task_model("cls", "usfm_vit_test", labels=["benign", "malignant", "normal"], img_size=S)
    with torch.no_grad():  # a head that actually discriminates (the default init is near-uniform)
        cls.head.fc.weight.mul_(300.0)
    d = tmp_path_factory.mktemp("ckpt")
    seg_path = tasks.save_task_checkpoint(seg, d / "seg.safetensors")
    backbone = create_model("usfm_vit_test")
    bb_path = save_checkpoint(d / "backbone.safetensors", backbone.state_dict(),
                              {"model": "usfm_vit_test", "model_args": model_args("usfm_vit_test"), "task": "backbone"})
    return {"seg": seg_path, "cls": cls, "features": bb_path}


@pytest.fixture(scope="module")
def bundles(models, frames, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles")
    made = {}
    for task, src in models.items():
        for target in ("onnx", "openvino", "jetson"):
            made[(task, target)] = export(src, target, out=out / f"{task}-{target}", verify_frames=frames)
    return made


# -- target table -----------------------------------------------------------------------------------------
def test_target_table_and_aliases():
    names = {t.name for t in list_targets()}
    assert {"onnx", "openvino", "jetson", "tensorrt"} <= names
    assert get_target("intel-gpu").name == "openvino" and get_target("intel-gpu").device_for("intel-gpu") == "GPU"
    assert get_target("Jetson-Orin").name == "jetson"
    assert get_target("jetson").static_shapes and get_target("jetson").opset == 17
    assert get_target("onnx").dynamic_hw and get_target("onnx").dynamic_batch
    with pytest.raises(ConfigError, match="onnx.*openvino.*jetson.*tensorrt"):
        get_target("coreml")
    with pytest.raises(ConfigError, match="supported: fp16, int8"):
        check_precision("jetson", "fp32")
    assert check_precision("openvino", None) == "fp32" and check_precision("jetson", "half") == "fp16"


# -- in-graph preprocessing == core.preprocess ---------------------------------------------------------
def _pre_session(tmp_path, mask=None):
    spec = PreprocessSpec(img_size=S)
    module = PreprocessGraph(spec, mask)
    example = torch.zeros(1, 100, 90, dtype=torch.uint8)
    path = torch2onnx(module, tmp_path / "pre.onnx", example, input_names=["frame"], output_names=["x"],
                      dynamic_axes={"frame": {0: "b", 1: "h", 2: "w"}, "x": {0: "b"}}, op_profile="tensorrt")
    return spec, module, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_numpy_preprocessing_equals_graph(tmp_path, frames):
    spec, module, sess = _pre_session(tmp_path)
    rng = np.random.default_rng(0)
    for frame in [*frames, rng.integers(0, 256, (540, 800), dtype=np.uint8),
                  rng.integers(0, 256, (300, 260), dtype=np.uint8), rng.integers(0, 256, (40, 41), dtype=np.uint8)]:
        ref = preprocess(frame, spec)
        onnx_x = sess.run(None, {"frame": frame[None]})[0][0]
        with torch.no_grad():
            torch_x = module(torch.from_numpy(frame[None].copy()))[0].numpy()
        assert onnx_x.shape == ref.shape == (3, S, S)
        assert np.abs(onnx_x - ref).max() < 1e-4, frame.shape
        assert np.abs(torch_x - ref).max() < 1e-4, frame.shape


def test_band_stop_in_graph_matches_numpy_reference(tmp_path, frames):
    from usfm_edge.kernels.reference import band_stop_filter_np
    from usfm_edge.kernels.rings import band_stop_mask, ring_edges

    mask = band_stop_mask(S, S, [1, 3], ring_edges(S))
    spec, _, sess = _pre_session(tmp_path, mask)
    frame = frames[1]
    img = resize_gray(frame, (S, S)) / np.float32(255.0)
    filt = band_stop_filter_np(img.astype(np.float64), mask)
    ref = (filt[None] - np.asarray(spec.mean)[:, None, None]) / np.asarray(spec.std)[:, None, None]
    got = sess.run(None, {"frame": frame[None]})[0][0]
    assert np.abs(got - ref).max() < 1e-4
    ops = {n.op_type for n in onnx.load(str(tmp_path / "pre.onnx")).graph.node}
    assert "DFT" not in ops and "MatMul" in ops


# -- the export matrix ------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["seg", "cls", "features"])
@pytest.mark.parametrize("target", ["onnx", "openvino", "jetson"])
def test_export_matrix_runs_through_engine(bundles, frames, task, target):
    path = bundles[(task, target)]
    meta = verify_bundle(path)
    assert meta.task == task and meta.target == target
    assert meta.parity["passed"] and meta.parity["frames"] == len(frames)
    assert meta.source["sha256"] is None or len(meta.source["sha256"]) == 64
    thr = meta.thresholds
    for name, m in meta.parity["outputs"].items():
        if name == "mask":
            assert m["dice"] >= thr["dice"]
        else:
            assert m["cosine"] >= thr["cosine"]
    expected = {"onnx": {"model.onnx"}, "openvino": {"model.xml", "model.bin"},
                "jetson": {"model.onnx", "build_engine.sh"}}[target]
    assert expected <= {p.name for p in path.iterdir()}
    with Engine.open(path) as engine:
        frame = frames[0]
        if target == "jetson":  # static shapes: frames of the exported size only
            frame = np.clip(np.round(resize_gray(frame, (S, S))), 0, 255).astype(np.uint8)
        r = engine.predict(frame)
        if task == "seg":
            assert isinstance(r, SegResult) and r.mask.shape == frame.shape and r.mask.dtype == np.uint8
            assert r.probs.shape == (2, *frame.shape) and np.allclose(r.probs.sum(0), 1.0, atol=1e-4)
            assert sum(r.areas_px.values()) == frame.size
        elif task == "cls":
            assert isinstance(r, ClsResult) and r.probs.shape == (3,) and r.label_name in meta.labels
        else:
            assert isinstance(r, FeaturesResult) and r.features.shape == (64,)


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_one_bundle_serves_any_frame_size(bundles, target):
    rng = np.random.default_rng(1)
    with Engine.open(bundles[("seg", target)]) as engine:
        for hw in [(540, 800), (300, 260)]:
            r = engine.predict(rng.integers(0, 256, hw, dtype=np.uint8))
            assert r.mask.shape == hw and r.probs.shape == (2, *hw)


def test_jetson_bundle_is_tensorrt_ready(bundles):
    path = bundles[("seg", "jetson")]
    model = onnx.load(str(path / "model.onnx"))
    assert onnx_opset(model) == 17 and onnx_is_static(model)
    check_onnx_ops(model, "tensorrt")
    assert not {n.op_type for n in model.graph.node} & {"DFT", "STFT"}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)  # fp16 model body
    script = (path / "build_engine.sh").read_text()
    cmd = shlex.join(trtexec_command("model.onnx", "model.engine", "fp16", 4.0, "timing.cache"))
    assert cmd in script and "--fp16" in cmd and "--memPoolSize=workspace:4096M" in cmd
    assert "--timingCacheFile=timing.cache" in cmd and "--stronglyTyped" in script and "--useDLACore" in script
    assert (path / "build_engine.sh").stat().st_mode & 0o111
    meta = read_meta(path)
    assert meta.input.static_hw == [S, S] and meta.precision == "fp16" and meta.backend == "tensorrt"
    assert "model.engine" not in (path / "SHA256SUMS").read_text()


def test_trtexec_command_variants():
    cmd = trtexec_command(precision="int8", dla_core=0, workspace_gb=2, trt_major=10)
    assert {"--fp16", "--int8", "--useDLACore=0", "--allowGPUFallback", "--memPoolSize=workspace:2048M"} <= set(cmd)
    cmd11 = trtexec_command(precision="fp16", trt_major=11)
    assert "--stronglyTyped" in cmd11 and "--fp16" not in cmd11


# -- other exports ---------------------------------------------------------------------------------------
def test_fp16_and_bare_and_enhance_exports(tmp_path, frames):
    seg = tasks.build_task_model("seg", "usfm_vit_test", img_size=S)
    p16 = export(seg, "onnx", "fp16", out=tmp_path / "seg16", verify_frames=frames[:1])
    meta = verify_bundle(p16)
    assert meta.precision == "fp16" and meta.parity["passed"] and meta.thresholds["cosine"] == 0.999
    bare = export(seg, "onnx", out=tmp_path / "bare", bare=True, band_stop=[2], verify_frames=frames[:1])
    meta = verify_bundle(bare)
    assert meta.input.layout == "BCHW" and not meta.input.raw_frame and meta.band_stop["enabled"]
    with Engine.open(bare) as engine:  # numpy pre/post-processing in the runtime
        assert engine.predict(frames[0]).mask.shape == frames[0].shape
    enh = tasks.build_task_model("enhance", "usfm_vit_test", img_size=S)
    with Engine.open(export(enh, "openvino", "fp16", out=tmp_path / "enh", verify_frames=frames[:1])) as engine:
        r = engine.predict(frames[1])
        assert r.image.shape == frames[1].shape and r.image.dtype == np.uint8


def test_backbone_checkpoint_cannot_be_exported_as_a_task(models, tmp_path):
    with pytest.raises(ExportError, match="only a backbone.*features"):
        export(models["features"], "onnx", out=tmp_path / "x", task="seg")
    assert not (tmp_path / "x.usfm").exists()


def test_bad_options_raise_typed_errors(models, tmp_path):
    with pytest.raises(ConfigError, match="unknown target"):
        export(models["seg"], "tflite", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="supported: fp16, int8"):
        export(models["seg"], "jetson", "fp32", out=tmp_path / "x")
    with pytest.raises(ExportError, match="calibration"):
        export(models["seg"], "onnx", "int8", out=tmp_path / "x")


def test_forbidden_ops_are_named():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 2])
    dft = helper.make_model(helper.make_graph([helper.make_node("DFT", ["x"], ["y"], name="fft0")], "g", [x], [y]),
                            opset_imports=[helper.make_opsetid("", 17)])
    for profile in ("onnx", "openvino", "tensorrt"):
        with pytest.raises(ExportError, match="'DFT'.*fft0"):
            check_onnx_ops(dft, profile)
    contrib = helper.make_model(
        helper.make_graph([helper.make_node("Rfft", ["x"], ["y"], domain="com.microsoft", name="r")], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(ExportError, match="com.microsoft::Rfft"):
        check_onnx_ops(contrib, "onnx")


# -- verification ----------------------------------------------------------------------------------------
def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / path.name
    shutil.copytree(path, dst)
    return dst


def test_tampered_bundle_names_the_file(bundles, tmp_path):
    path = _copy(bundles[("seg", "onnx")], tmp_path)
    data = bytearray((path / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx"):
        verify_bundle(path)
    with pytest.raises(BundleError, match="model.onnx"):
        Engine.open(path)
    (path / "model.onnx").unlink()
    with pytest.raises(BundleError, match="'model.onnx'.*missing"):
        verify_bundle(path)


def test_unlisted_file_and_newer_schema(bundles, tmp_path):
    path = _copy(bundles[("cls", "onnx")], tmp_path)
    (path / "notes.txt").write_text("hi")
    with pytest.raises(BundleError, match="notes.txt"):
        verify_bundle(path)
    (path / "notes.txt").unlink()
    data = json.loads((path / "usfm.json").read_text())
    data["schema_version"] = 99
    (path / "usfm.json").write_text(json.dumps(data))
    write_sums(path)
    with pytest.raises(BundleError, match="newer usfm-edge"):
        verify_bundle(path)


def test_external_data_outside_the_bundle_is_refused(bundles, tmp_path):
    path = _copy(bundles[("cls", "onnx")], tmp_path)
    model = onnx.load(str(path / "model.onnx"))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    (tmp_path / "outside.bin").write_bytes(t.raw_data)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    for k, v in (("location", "../outside.bin"), ("offset", "0"), ("length", str((tmp_path / "outside.bin").stat().st_size))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    (path / "model.onnx").write_bytes(model.SerializeToString())  # onnx.save itself refuses '..'
    update_meta(path, read_meta(path))
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(path)


# -- the parity gate -------------------------------------------------------------------------------------
def test_failed_parity_leaves_no_bundle(models, frames, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(ValidationError, match="parity gate failed") as info:
        export(models["cls"], "onnx", out=out, verify_frames=frames[:1], thresholds={"cosine": 1.5})
    assert info.value.results["outputs"]["probs"]["cosine"] > 0.9999
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a temporary folder
    kept = export(models["cls"], "onnx", out=out, verify_frames=frames[:1], thresholds={"cosine": 1.5}, force=True)
    meta = verify_bundle(kept)
    assert meta.parity["passed"] is False and any("FAILED" in n for n in meta.notes)


def test_failed_conversion_leaves_no_bundle(models, tmp_path, monkeypatch):
    import usfm_edge.export.exporter as ex

    def boom(*a, **k):
        raise ExportError("converter crashed")

    monkeypatch.setattr(ex, "torch2onnx", boom)
    with pytest.raises(ExportError, match="converter crashed"):
        export(models["cls"], "onnx", out=tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# -- TensorRT (NVIDIA hardware only) ---------------------------------------------------------------------
def _has_trt_gpu() -> bool:
    from usfm_edge.export.tensorrt_export import tensorrt_available

    return tensorrt_available()[0]


@pytest.mark.trt
@pytest.mark.skipif(not _has_trt_gpu(), reason="needs TensorRT and an NVIDIA GPU")
def test_tensorrt_engine_build_and_run(models, frames, tmp_path):
    path = export(models["seg"], "tensorrt", "fp16", out=tmp_path / "trt", verify_frames=frames)
    meta = verify_bundle(path)
    assert (path / "model.engine").is_file() and meta.parity["backend"] == "tensorrt" and meta.parity["passed"]
    with Engine.open(path, backend="tensorrt") as engine:
        frame = np.zeros((S, S), np.uint8)
        assert engine.predict(frame).mask.shape == (S, S)


def test_raw_frame_model_rejects_unknown_task():
    class Bad(torch.nn.Module):
        task = "detect"

    with pytest.raises(ExportError, match="unknown task"):
        RawFrameModel(Bad(), PreprocessSpec(img_size=S))


def test_write_bundle_one_step(bundles, tmp_path):
    from usfm_edge.export.bundle import write_bundle

    src = bundles[("cls", "onnx")]
    meta = read_meta(src)
    meta.name = ""
    out = write_bundle(tmp_path / "copy", meta, {"model.onnx": src / "model.onnx"})
    assert out.name == "copy.usfm" and verify_bundle(out).name == "copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.usfm"]
    with pytest.raises(ExportError, match="not a usfm-edge bundle"):
        (tmp_path / "other.usfm").mkdir()
        (tmp_path / "other.usfm" / "keep.txt").write_text("user data")
        write_bundle(tmp_path / "other", meta, {"model.onnx": src / "model.onnx"})
    assert (tmp_path / "other.usfm" / "keep.txt").exists()


def test_parity_mask_dice_ignores_specks_not_regions():
    """A 5-pixel blob losing 2 pixels is not a conversion fault (pixel agreement 99.998%); a region is scored."""
    from usfm_edge.export.parity import compare_outputs, mask_dice

    ref = np.zeros((298, 277), np.uint8)
    ref[100, 100:105] = 1  # 5 px: below 0.1% of the frame
    got = ref.copy()
    got[100, 103:105] = 0
    assert mask_dice(ref, got) > 0.9999  # background only
    assert mask_dice(ref, got, min_fraction=0) == pytest.approx(0.875, abs=1e-4)
    m = compare_outputs({"mask": ref}, {"mask": got})["mask"]
    assert m["dice"] > 0.9999 and m["pixel_agreement"] == pytest.approx(1 - 2 / ref.size)
    ref[50:150, 50:150] = 1  # a 100x100 lesion, shifted by 10 px in the bundle: really different
    got = np.zeros_like(ref)
    got[60:160, 50:150] = 1
    n = ref.size  # lesion Dice 0.9; background Dice (n - 11000) / (n - 10000)
    assert mask_dice(ref, got) == pytest.approx((0.9 + (n - 11000) / (n - 10000)) / 2)


def test_cli_export_prints_its_decisions_and_never_overwrites_silently(models, tmp_path):
    """`usfm-edge export` names target, precision and static frame size; an existing bundle needs --force."""
    from click.testing import CliRunner

    from usfm_edge.cli import main

    out = tmp_path / "seg-jetson.usfm"
    args = ["export", str(models["seg"]), "--target", "jetson", "--frame-size", "540x800", "-o", str(out)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    for text in ("target jetson", "precision fp16", "static 540x800", "parity vs PyTorch", "passed"):
        assert text in first.output, (text, first.output)
    before = (out / "usfm.json").read_bytes()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1 and "already exists" in again.output and "--force" in again.output, again.output
    assert (out / "usfm.json").read_bytes() == before
    (out / "stale-marker").write_text("from the replaced bundle")  # not timing-dependent, unlike the creation time
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert not (out / "stale-marker").exists() and (out / "usfm.json").is_file()  # a new bundle replaced the old
