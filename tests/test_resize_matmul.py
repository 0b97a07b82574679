"""Resize as MatMul: ``core.preprocess.resize_matrix`` reproduces ``F.interpolate`` (bicubic a = -0.75 and bilinear,
half-pixel, edge-clamped, no antialias) on real sample frames, up and down; static-shape graphs use it in place of
the Resize op and keep bundle parity."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from usfm_edge.core.preprocess import PreprocessSpec, resize_matrix  # noqa: E402
from usfm_edge.export.parity import default_frames  # noqa: E402
from usfm_edge.models.raw_frame import PreprocessGraph  # noqa: E402
from usfm_edge.models.resample import MatMulResize  # noqa: E402

#: (frame, out_hw): downsampling (the usual case), upsampling, and mixed
SIZES = [(224, 224), (64, 64), (97, 301), (600, 900), (1000, 333)]


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return default_frames(2)  # one BUS-BRA frame, one HC18 540x800 frame


def _torch_resize(img: np.ndarray, hw, mode: str) -> np.ndarray:
    x = torch.from_numpy(img.astype(np.float32))[None, None]
    return F.interpolate(x, size=tuple(hw), mode=mode, align_corners=False, antialias=False)[0, 0].numpy()


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_matrix_equals_interpolate_on_real_frames(frames, mode):
    """Measured (torch 2.13 CPU): max abs difference 1.8e-4 grey levels bicubic, 1.5e-5 bilinear, on 0..255 frames
    (7e-7 on the [0, 1] image the model sees): torch's own float32 coefficients and sums."""
    for frame in frames:
        for hw in SIZES:
            rh = resize_matrix(frame.shape[0], hw[0], mode)
            rw = resize_matrix(frame.shape[1], hw[1], mode)
            ours = rh @ frame.astype(np.float64) @ rw.T
            ref = _torch_resize(frame, hw, mode)
            assert np.abs(ours - ref).max() / 255.0 <= 1e-4, (frame.shape, hw, mode)  # the [0, 1] image
            assert np.abs(ours - ref).max() <= 5e-4, (frame.shape, hw, mode)  # grey levels


@pytest.mark.parametrize("n_in,n_out", [(277, 301), (298, 224), (800, 301), (540, 97), (64, 224)])
def test_resize_matrix_equals_torch_effective_weights(n_in, n_out):
    """Interpolating the identity gives torch's weights: equal to ours up to float32 rounding of the coefficients
    (the source coordinates are torch's float32 ones, fused multiply-add included)."""
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]
    for mode in ("bicubic", "bilinear"):
        weights = F.interpolate(eye, size=(n_out, n_in), mode=mode, align_corners=False)[0, 0].double().numpy()
        assert np.abs(weights - resize_matrix(n_in, n_out, mode)).max() < 1e-6, mode


def test_resize_matrix_rows_and_identity():
    for n_in, n_out in [(540, 224), (7, 224), (224, 224), (1, 5)]:
        m = resize_matrix(n_in, n_out, "bicubic")
        assert m.shape == (n_out, n_in) and np.allclose(m.sum(1), 1.0)
    assert np.array_equal(resize_matrix(224, 224, "bicubic"), np.eye(224))


@pytest.mark.parametrize("in_hw,out_hw", [((540, 800), (224, 224)), ((224, 224), (300, 260)), ((64, 64), (96, 40))])
def test_matmul_resize_module_equals_interpolate(frames, in_hw, out_hw):
    from usfm_edge.core.preprocess import resize_gray

    img = resize_gray(frames[1], in_hw)  # a real frame at the input size
    x = torch.from_numpy(np.stack([img, img[::-1].copy()]))[:, None].repeat(1, 2, 1, 1)  # (2, 2, H, W)
    for mode in ("bicubic", "bilinear"):
        mod = MatMulResize(in_hw, out_hw, mode)
        with torch.no_grad():
            got = mod(x).numpy()
        ref = F.interpolate(x, size=out_hw, mode=mode, align_corners=False).numpy()
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max() / 255)


def test_static_preprocess_graph_uses_matmuls(tmp_path, frames):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from usfm_edge.core.preprocess import fit_frame, preprocess
    from usfm_edge.export.onnx_export import torch2onnx

    spec, hw = PreprocessSpec(img_size=64), (540, 800)
    module = PreprocessGraph(spec, static_hw=hw)
    frame = fit_frame(frames[1], hw)
    path = torch2onnx(module, tmp_path / "pre.onnx", torch.from_numpy(frame[None].copy()), input_names=["frame"],
                      output_names=["x"], dynamic_axes={}, dynamic_batch=False, op_profile="tensorrt")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Resize" not in ops and ops.count("MatMul") == 2
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"frame": frame[None]})[0][0]
    assert np.abs(got - preprocess(frame, spec)).max() < 1e-4
    same = PreprocessGraph(spec, static_hw=(64, 64))
    assert same.resize is None  # a frame of the model size is not resized at all
    # resample="gather" (OpenVINO bundles): the static frame goes through resize_taps, constant tap indices
    taps = torch2onnx(PreprocessGraph(spec, static_hw=hw, resample="gather"), tmp_path / "pre_taps.onnx",
                      torch.from_numpy(frame[None].copy()), input_names=["frame"], output_names=["x"],
                      dynamic_axes={}, dynamic_batch=False)
    ops = [n.op_type for n in onnx.load(str(taps)).graph.node]
    assert "MatMul" not in ops and "Resize" not in ops and ops.count("Gather") >= 8  # 4 bicubic taps per axis
    got = ort.InferenceSession(str(taps), providers=["CPUExecutionProvider"]).run(None, {"frame": frame[None]})[0][0]
    assert np.abs(got - preprocess(frame, spec)).max() < 1e-4


def test_static_seg_bundle_has_no_resize_and_passes_parity(tmp_path, frames):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from usfm_edge.export import export
    from usfm_edge.models.tasks import build_task_model
    from usfm_edge.runtime import Engine

    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64)
    path = export(model, "jetson", "fp16", out=tmp_path / "seg-jetson", frame_size=(120, 160), verify_frames=frames)
    nodes = onnx.load(str(path / "model.onnx")).graph.node
    resizes = [n.name for n in nodes if n.op_type == "Resize"]
    assert resizes and all(n.startswith("/model/") for n in resizes), resizes  # only the head's own upsampling
    assert sum(n.op_type == "MatMul" and n.name.startswith(("/pre/", "/post_resize/")) for n in nodes) == 4
    with Engine.open(path) as eng:
        assert eng.meta.parity["passed"]
        r = eng.predict(frames[0])
        assert r.mask.shape == frames[0].shape


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_frame_size_on_a_dynamic_target_gives_a_static_frame_and_any_batch(tmp_path, frames, target):
    """--frame-size on onnx/openvino: the frame is static (ONNX Runtime: resizes as MatMuls; OpenVINO: as
    ``resize_taps``), the batch stays dynamic, and the engine still takes frames of any size."""
    pytest.importorskip("onnxruntime" if target == "onnx" else "openvino")
    onnx = pytest.importorskip("onnx")
    from usfm_edge.export import export
    from usfm_edge.models.tasks import build_task_model
    from usfm_edge.runtime import Engine

    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64)
    path = export(model, target, out=tmp_path / f"seg-{target}", frame_size=(120, 160), verify_frames=frames)
    meta_in = Engine.open(path).meta.input
    assert meta_in.static_hw == [120, 160] and meta_in.dynamic_axes == ["batch"] and meta_in.max_batch is None
    if target == "onnx":
        nodes = onnx.load(str(path / "model.onnx")).graph.node
        assert not [n.name for n in nodes if n.op_type == "Resize" and not n.name.startswith("/model/")]
        assert sum(n.op_type == "MatMul" and n.name.startswith(("/pre/", "/post_resize/")) for n in nodes) == 4
    else:  # OpenVINO: resize_taps both ways, its tap indices constants of the static frame
        import openvino as ov

        post = [op.get_type_name() for op in ov.Core().read_model(str(path / "model.xml")).get_ops()
                if not op.get_friendly_name().startswith("/model/")]
        assert "MatMul" not in post and "Interpolate" not in post and "Gather" in post
    with Engine.open(path) as eng:
        assert eng.meta.parity["passed"]
        one = [eng.predict(f) for f in frames[:2]]
        both = eng.predict_batch([frames[0], frames[0]])
        assert all(r.mask.shape == f.shape for r, f in zip(one, frames[:2]))
        assert np.array_equal(both[1].mask, one[0].mask)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_resize_taps_matches_interpolate_and_one_export_serves_every_size(tmp_path, runtime):
    """Any-size graphs resize with taps built from the traced sizes (int64 tap indices): within 0.05 grey levels
    of F.interpolate (torch's own float32 coordinates differ by that much from the exact ones), in eager mode and in
    the runtime, for frames smaller, larger and equal to the output, down (the frame to the model) and up (the
    logits back to a frame whose size only the second input gives)."""
    pytest.importorskip(runtime)
    from usfm_edge.models.resample import resize_dense, resize_taps

    class Down(torch.nn.Module):
        def forward(self, f):
            return resize_taps(f.to(torch.float32).unsqueeze(1), (64, 64), "bicubic")

    class Up(torch.nn.Module):
        def forward(self, x, f):
            return resize_taps(x, (f.shape[-2], f.shape[-1]), "bilinear")

    axes = {"f": {0: "b", 1: "h", 2: "w"}}
    torch.onnx.export(Down(), (torch.zeros(1, 81, 97, dtype=torch.uint8),), str(tmp_path / "down.onnx"),
                      input_names=["f"], output_names=["y"], dynamic_axes=axes, opset_version=17, dynamo=False)
    torch.onnx.export(Up(), (torch.zeros(1, 2, 64, 64), torch.zeros(1, 81, 97, dtype=torch.uint8)),
                      str(tmp_path / "up.onnx"), input_names=["x", "f"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, **axes}, opset_version=17, dynamo=False)
    if runtime == "onnxruntime":
        import onnxruntime as ort

        sessions = {k: ort.InferenceSession(str(tmp_path / f"{k}.onnx"), providers=["CPUExecutionProvider"])
                    for k in ("down", "up")}
        run = {k: (lambda feeds, s=s: s.run(None, feeds)[0]) for k, s in sessions.items()}
    else:
        import openvino as ov

        core = ov.Core()
        compiled = {k: core.compile_model(str(tmp_path / f"{k}.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
                    for k in ("down", "up")}
        run = {k: (lambda feeds, c=c: c(feeds)[0]) for k, c in compiled.items()}
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 120, 160), (1, 64, 64), (1, 40, 300), (1, 353, 274), (1, 540, 800)):
        f = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        x = f.float().unsqueeze(1)
        for mode in ("bicubic", "bilinear"):
            ref = F.interpolate(x, size=(64, 64), mode=mode, align_corners=False)
            assert (resize_taps(x, (64, 64), mode) - ref).abs().max() < 0.05, (shape, mode)
            assert (resize_dense(x, (64, 64), mode) - ref).abs().max() < 0.05, (shape, mode)
        ref = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False)
        assert np.abs(run["down"]({"f": f.numpy()}) - ref.numpy()).max() < 0.05, shape
        logits = torch.randn(shape[0], 2, 64, 64, generator=g) * 4
        ref = F.interpolate(logits, size=shape[1:], mode="bilinear", align_corners=False)
        assert (resize_taps(logits, shape[1:], "bilinear") - ref).abs().max() < 1e-3, shape  # float32 coordinates
        assert np.abs(run["up"]({"x": logits.numpy(), "f": f.numpy()}) - ref.numpy()).max() < 1e-3, shape


def test_binary_seg_post_equals_softmax_and_argmax_of_the_resized_logits():
    """Two classes: resizing the logit difference and taking sigmoid + compare gives the softmax and argmax of the
    two resized logit maps (a bilinear resize is linear); ties go to class 0 as with argmax."""
    from usfm_edge.models.raw_frame import binary_seg_post

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 31, 37) * 6
    logits[0, :, :3] = 1.5  # exact ties: class 0
    big = F.interpolate(logits, size=(101, 77), mode="bilinear", align_corners=False)
    probs, mask = binary_seg_post(F.interpolate(logits[:, 1:2] - logits[:, 0:1], size=(101, 77), mode="bilinear",
                                                align_corners=False))
    assert probs.shape == (2, 2, 101, 77) and mask.dtype == torch.uint8
    assert (probs - torch.softmax(big, 1)).abs().max() < 1e-5
    assert torch.equal(mask, probs.argmax(1).to(torch.uint8))
    margin = (big[:, 1] - big[:, 0]).abs() > 1e-4  # away from float ties the two masks agree pixel for pixel
    assert torch.equal(mask[margin], big.argmax(1).to(torch.uint8)[margin])
    assert not mask[0, :8].any()  # the tied rows (and their bilinear neighbours' exact ties) are background


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_seg_post_softmax_is_written_out_and_equals_torch(tmp_path, frames, classes, target):
    """The frame-size post-processing of a seg bundle has no ONNX ``Softmax`` on axis 1 (ONNX Runtime transposes
    the frame-size maps for it): two classes resize one logit difference and take ``Sigmoid``, more classes use
    ReduceMax/Exp/ReduceSum/Div; the values equal ``torch.softmax``, and the mask is the probabilities' argmax."""
    pytest.importorskip("onnxruntime" if target == "onnx" else "openvino")
    onnx = pytest.importorskip("onnx")
    from usfm_edge.export import export
    from usfm_edge.models.raw_frame import channel_softmax
    from usfm_edge.models.tasks import build_task_model
    from usfm_edge.runtime import Engine

    x = torch.randn(2, 3, 17, 23) * 20
    assert (channel_softmax(x) - torch.softmax(x, 1)).abs().max() < 1e-6
    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64, num_classes=classes)
    path = export(model, target, out=tmp_path / f"seg-{target}", verify_frames=frames)
    if target == "onnx":
        nodes = onnx.load(str(path / "model.onnx")).graph.node
        post = [n.op_type for n in nodes if not n.name.startswith("/model/")]
        assert "Softmax" not in post
        assert ("Sigmoid" in post) == (classes == 2) and ("ArgMax" in post) == (classes != 2)
        assert "Resize" in post  # ONNX Runtime bundles: its own bilinear Resize back to the frame
    else:
        import openvino as ov

        post = {op.get_type_name() for op in ov.Core().read_model(str(path / "model.xml")).get_ops()
                if not op.get_friendly_name().startswith("/model/")}
        assert "Interpolate" not in post and "SoftMax" not in post and "Gather" in post  # resize_taps' Gathers
    with Engine.open(path) as eng:
        assert eng.meta.parity["passed"]
        r = eng.predict(frames[1])
        assert r.probs.shape == (classes, *frames[1].shape)
        assert np.allclose(r.probs.sum(0), 1.0, atol=1e-5)
        top2 = np.sort(r.probs, axis=0)[-2:]
        clear = top2[1] - top2[0] > 1e-5  # a random model is near-uniform: float ties may go either way
        assert clear.mean() > 0.9 and np.array_equal(r.probs.argmax(0)[clear], r.mask[clear])
