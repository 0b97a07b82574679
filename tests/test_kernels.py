"""Band-stop kernels: ring geometry, and every filter form against the numpy reference on real frames.

Tolerances (images scaled to [0, 1]): float32 forms vs the float64 reference within 2e-5 absolute
(measured ~1e-6 for torch.fft, ~2e-6 for the MatMul form); bf16 input within 2e-2 (bf16 has 8 bits of
mantissa); float64 forms within 1e-10.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from usfm_edge.core.errors import ConfigError, InputError
from usfm_edge.kernels import (
    BandStopMaskGenerator,
    band_stop_filter_np,
    band_stop_mask,
    frequency_radius,
    ring_edges,
    ring_index,
    symmetrize_mask,
)

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = [
    ROOT / "usfm_edge" / "assets" / "sample" / "busbra" / "Images",
    ROOT / "usfm_edge" / "assets" / "sample" / "hc18" / "training_set",
    Path("/work/shared/data/busbra/Images"),
    Path("/work/shared/data/hc18/training_set"),
]
SIZES = [(224, 224), (96, 128)]
ATOL32 = 2e-5


@pytest.fixture(scope="module")
def frames() -> dict[tuple[int, int], np.ndarray]:
    """Three real ultrasound frames per size, float32 in [0, 1], shape (3, H, W)."""
    from PIL import Image

    paths = []
    for folder in FOLDERS:
        paths += [p for p in sorted(folder.glob("*.png")) if "Annotation" not in p.name][:2]
        if len(paths) >= 3:
            break
    if not paths:
        pytest.skip(f"no ultrasound PNGs found in {[str(f) for f in FOLDERS]}")
    grey = [Image.open(p).convert("L") for p in paths[:3]]
    return {
        (h, w): np.stack([np.asarray(g.resize((w, h), Image.BILINEAR), np.float32) / 255.0 for g in grey])
        for h, w in SIZES
    }


def masks_for(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    gen = BandStopMaskGenerator((h, w))
    rng = np.random.default_rng(seed)
    return np.stack([gen(rng) for _ in range(n)])


# ----------------------------------------------------------------------------- rings (numpy only)


def test_default_edges_grow_geometrically_until_capped():
    edges = ring_edges(224)
    widths = np.diff(edges)
    assert edges[0] == 4 and edges[-1] == 112 and len(widths) == 10
    assert np.all(widths > 0)
    expected = np.minimum(2.0 * 1.5 ** np.arange(len(widths)), 16.0)
    np.testing.assert_allclose(widths[:-1], expected[:-1])  # the last ring is clipped at Nyquist
    assert widths[-1] <= 16 + 8  # ... or merged with a thin remainder


def test_unit_growth_terminates():
    # the official loop never ends when int(width * factor) == 0; here widths never shrink below 1 bin
    edges = ring_edges(224, base_width=1, growth=1.0, max_width=1, center_protect=1)
    assert len(edges) == 112 and np.all(np.diff(edges) == 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"growth": 0.5},
        {"growth": 0.0},
        {"base_width": 0},
        {"base_width": 0.5},
        {"max_width": 1.0},
        {"center_protect": 0},
        {"center_protect": 111},
        {"growth": float("nan")},
        {"img_size": 1},
    ],
)
def test_bad_ring_params_raise(kwargs):
    kwargs = {"img_size": 224, **kwargs}
    with pytest.raises(ConfigError):
        ring_edges(**kwargs)


def test_bad_generator_params_raise():
    with pytest.raises(ConfigError):
        BandStopMaskGenerator(224, drop_ratio=0.0)
    with pytest.raises(ConfigError):
        BandStopMaskGenerator(224, drop_ratio=1.5)
    with pytest.raises(ConfigError):
        band_stop_mask(64, 64, [99], ring_edges(64))


@pytest.mark.parametrize("shape", [(224, 224), (96, 128), (63, 50)])
def test_ring_index_layout(shape):
    h, w = shape
    edges = ring_edges(shape)
    idx = ring_index(h, w, edges)
    assert idx.shape == shape and idx[0, 0] == -1  # DC is in the protected centre
    assert set(np.unique(idx)) == set(range(-1, len(edges) - 1))  # every ring holds bins
    if h == w:  # square: the radius is the distance from the centre of the fftshifted spectrum
        yy, xx = np.mgrid[:h, :w]
        centred = np.hypot(yy - h // 2, xx - w // 2)
        np.testing.assert_allclose(np.fft.fftshift(frequency_radius(h, w)), centred, atol=1e-9)
    corner = (h // 2, w // 2)  # Nyquist in both axes: beyond the last edge, so in the last ring
    assert idx[corner] == len(edges) - 2


@pytest.mark.parametrize("shape", [(224, 224), (96, 128), (63, 50)])
def test_masks_are_point_symmetric_and_keep_the_centre(shape):
    h, w = shape
    gen = BandStopMaskGenerator(shape)
    assert gen.symmetric
    rng = np.random.default_rng(1)
    for _ in range(5):
        m = gen(rng)
        assert m.dtype == np.float32 and m.shape == shape
        mirrored = m[(-np.arange(h)) % h][:, (-np.arange(w)) % w]
        np.testing.assert_array_equal(m, mirrored)
        assert np.all(m[gen.index == -1] == 1)
        assert (m == 0).any()
    x = np.random.default_rng(2).random(shape)
    y = np.fft.ifft2(np.fft.fft2(x) * gen(rng))
    assert np.abs(y.imag).max() < 1e-12  # a symmetric mask keeps real images real
    everything = band_stop_mask(h, w, range(gen.n_rings), gen.edges)
    np.testing.assert_allclose(band_stop_filter_np(x, everything).mean(), x.mean())  # brightness kept


def test_generator_is_deterministic_and_drops_the_right_count():
    gen = BandStopMaskGenerator(224, drop_ratio=0.3)
    assert gen.n_rings == 10 and gen.n_drop == 3
    a = [gen(np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    draws = {tuple(gen.draw(np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 5 and all(len(d) == 3 and len(set(d)) == 3 for d in draws)
    assert BandStopMaskGenerator(224, drop_ratio=0.01).n_drop == 1


def test_reference_identities():
    x = np.random.default_rng(0).random((2, 16, 12)).astype(np.float32)
    y = band_stop_filter_np(x, np.ones((16, 12)))
    assert y.dtype == np.float32 and np.allclose(y, x, atol=1e-6)
    dc = np.zeros((16, 12))
    dc[0, 0] = 1
    np.testing.assert_allclose(band_stop_filter_np(x, dc), np.broadcast_to(x.mean((1, 2), keepdims=True), x.shape),
                               atol=1e-6)
    with pytest.raises(InputError):
        band_stop_filter_np(x, np.ones((12, 16)))


def test_numpy_modules_do_not_import_torch():
    code = ("import sys; import usfm_edge.kernels, usfm_edge.kernels.rings, usfm_edge.kernels.reference; "
            "usfm_edge.kernels.BandStopMaskGenerator(64); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- torch forms

torch = pytest.importorskip("torch")
from usfm_edge.kernels.dft_matmul import (  # noqa: E402
    BandStopMatMul,
    band_stop_filter_matmul,
    dft_matrices,
    export_band_stop_onnx,
)
from usfm_edge.kernels.torch_fft import band_stop_filter  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 7, 8, 224])
def test_real_dft_matrices_invert(n):
    mats = dft_matrices(n, torch.float64)
    torch.testing.assert_close(mats.synthesis @ mats.analysis, torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("impl", ["fft", "matmul"])
@pytest.mark.parametrize("size", SIZES)
def test_parity_on_real_frames(frames, impl, size):
    x = frames[size]
    m = masks_for(*size, 1)[0]
    y = band_stop_filter(torch.from_numpy(x), m, impl=impl, symmetric=True)
    assert y.dtype == torch.float32 and y.shape == x.shape
    np.testing.assert_allclose(y.numpy(), band_stop_filter_np(x.astype(np.float64), m), atol=ATOL32, rtol=0)


@pytest.mark.parametrize("impl", ["fft", "matmul"])
@pytest.mark.parametrize("mask_shape", ["b1hw", "bhw"])
def test_per_sample_masks(frames, impl, mask_shape):
    x = np.repeat(frames[(96, 128)][:, None], 3, axis=1)  # (B, 3, H, W): channels share their sample's mask
    masks = masks_for(96, 128, len(x), seed=3)
    assert not np.array_equal(masks[0], masks[1])
    m = masks[:, None] if mask_shape == "b1hw" else masks
    y = band_stop_filter(torch.from_numpy(x), torch.from_numpy(m), impl=impl).numpy()
    for b in range(len(x)):
        np.testing.assert_allclose(y[b], band_stop_filter_np(x[b].astype(np.float64), masks[b]), atol=ATOL32)


@pytest.mark.parametrize("impl", ["fft", "matmul"])
def test_any_real_mask_matches_reference(impl):
    rng = np.random.default_rng(4)
    x, m = rng.standard_normal((2, 15, 10)), rng.random((15, 10))  # odd size, not symmetric
    y = band_stop_filter(torch.from_numpy(x), m, impl=impl).numpy()
    np.testing.assert_allclose(y, band_stop_filter_np(x, m), atol=1e-10)
    sym = symmetrize_mask(m)  # point-symmetric but not even in each axis: the odd-odd part is non-zero
    y = band_stop_filter(torch.from_numpy(x), sym, impl=impl, symmetric=True).numpy()
    np.testing.assert_allclose(y, band_stop_filter_np(x, m), atol=1e-10)


@pytest.mark.parametrize("path", ["serial", "pool"])
@pytest.mark.parametrize("shared", [True, False])
def test_chunked_fft_path_matches_reference_and_gradients(monkeypatch, frames, shared, path):
    """Large batches are filtered in cache-sized chunks (serially, or concurrently on a thread pool without
    autograd); results and gradients must not change, and torch's thread count is restored."""
    import usfm_edge.kernels.torch_fft as tf

    x = np.concatenate([frames[(96, 128)]] * 3)  # 9 real frames
    masks = masks_for(96, 128, len(x), seed=7)
    m = masks[0] if shared else masks
    monkeypatch.setattr(tf, "_CHUNK_ELEMENTS", 2 * 96 * 128)  # chunks of 2 frames -> 5 chunks, last one odd
    monkeypatch.setattr(tf, "_USE_POOL", path == "pool")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calls = []
        monkeypatch.setattr(torch, "set_num_threads", lambda n, _orig=torch.set_num_threads: (calls.append(n),
                                                                                               _orig(n)))
        y = band_stop_filter(torch.from_numpy(x), torch.from_numpy(m), symmetric=True).numpy()
        assert calls == ([1, 2] if path == "pool" else [])
        assert torch.get_num_threads() == 2
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    monkeypatch.setattr(tf, "_CHUNK_ELEMENTS", 2 * 96 * 128)
    for b in range(len(x)):
        ref = band_stop_filter_np(x[b].astype(np.float64), masks[0] if shared else masks[b])
        np.testing.assert_allclose(y[b], ref, atol=ATOL32)
    xt = torch.from_numpy(x).requires_grad_(True)
    band_stop_filter(xt, torch.from_numpy(m), symmetric=True).pow(2).sum().backward()
    xt2 = torch.from_numpy(x).requires_grad_(True)
    monkeypatch.setattr(tf, "_CHUNK_ELEMENTS", 10**9)  # one call
    band_stop_filter(xt2, torch.from_numpy(m), symmetric=True).pow(2).sum().backward()
    torch.testing.assert_close(xt.grad, xt2.grad, atol=1e-5, rtol=1e-5)


def test_bf16_is_computed_in_fp32(frames):
    x = frames[(96, 128)]
    m = masks_for(96, 128, 1)[0]
    y = band_stop_filter(torch.from_numpy(x).to(torch.bfloat16), m, symmetric=True)
    assert y.dtype == torch.bfloat16
    np.testing.assert_allclose(y.float().numpy(), band_stop_filter_np(x, m), atol=2e-2)


@pytest.mark.parametrize("impl", ["fft", "matmul"])
def test_gradcheck(impl):
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.standard_normal((1, 1, 8, 8)), requires_grad=True)
    m = torch.tensor(band_stop_mask(8, 8, [1], ring_edges(8, base_width=1, center_protect=1)), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: band_stop_filter(t, m, impl=impl, symmetric=True), (x,), fast_mode=True)
    # arbitrary masks as well, including the mask's own gradient
    mr = torch.tensor(rng.random((8, 8)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, k: band_stop_filter(t, k, impl=impl), (x, mr), fast_mode=True)


def test_impl_selection_and_errors():
    x = torch.rand(1, 1, 8, 8)
    m = torch.ones(8, 8)
    torch.testing.assert_close(band_stop_filter(x, m, impl="auto"), x)
    with pytest.raises(ConfigError):
        band_stop_filter(x, m, impl="cufft")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ConfigError):
            band_stop_filter(x, m, impl="triton")  # CPU tensor without the interpreter
    with pytest.raises(InputError):
        band_stop_filter(x, torch.ones(8, 9))
    with pytest.raises(InputError):
        band_stop_filter(x.repeat(2, 1, 1, 1), torch.ones(3, 1, 8, 8))


def test_triton_kernel_in_interpreter(frames, tmp_path):
    """The fused GPU kernel, run by Triton's CPU interpreter: parity with numpy and gradients."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("needs triton (pip install triton; its interpreter runs on CPU) — not installed here")
    np.save(tmp_path / "x.npy", frames[(96, 128)])
    np.save(tmp_path / "m.npy", masks_for(96, 128, 3, seed=11))
    code = f"""
import numpy as np, torch
from usfm_edge.kernels.torch_fft import band_stop_filter
from usfm_edge.kernels.reference import band_stop_filter_np
x = np.load({str(tmp_path / "x.npy")!r}).astype(np.float64); m = np.load({str(tmp_path / "m.npy")!r})
ref = np.stack([band_stop_filter_np(x[b], m[b]) for b in range(3)])
for sym in (True, False):  # ring masks are symmetric: both kernel variants must agree with numpy
    y = band_stop_filter(torch.from_numpy(x)[:, None], m[:, None], impl='triton', symmetric=sym)
    assert np.abs(y[:, 0].numpy() - ref).max() < 1e-10, sym
y = band_stop_filter(torch.from_numpy(x), m[0], impl='triton')  # shared mask, 3-D input
assert np.abs(y.numpy() - np.stack([band_stop_filter_np(f, m[0]) for f in x])).max() < 1e-10
rng = np.random.default_rng(0); xr = rng.random((2, 3, 12, 10)); mr = rng.random((2, 1, 12, 10))  # any real mask
xt = torch.tensor(xr, requires_grad=True); y = band_stop_filter(xt, mr, impl='triton')
assert np.abs(y.detach().numpy() - np.stack([band_stop_filter_np(xr[b], mr[b, 0]) for b in range(2)])).max() < 1e-10
w = torch.tensor(rng.standard_normal(y.shape)); (y * w).sum().backward()
xf = torch.tensor(xr, requires_grad=True); (band_stop_filter(xf, mr, impl='fft') * w).sum().backward()
assert torch.allclose(xt.grad, xf.grad, atol=1e-10)
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=300)


# ----------------------------------------------------------------------------- MatMul module and ONNX


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("kind", ["ring", "random"])
def test_band_stop_matmul_module(frames, prune, kind):
    x = frames[(96, 128)][:, None].astype(np.float64)
    m = masks_for(96, 128, 1)[0] if kind == "ring" else np.random.default_rng(6).random((96, 128))
    module = BandStopMatMul(m, dtype=torch.float64, prune=prune)
    assert module.has_odd == (kind == "random")
    y = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, band_stop_filter_np(x, m), atol=1e-10)
    torch.testing.assert_close(module(torch.from_numpy(x)), band_stop_filter_matmul(torch.from_numpy(x),
                                                                                    torch.from_numpy(m)))


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, frames):
    pytest.importorskip("onnx")
    m = masks_for(224, 224, 1, seed=11)[0]
    path = export_band_stop_onnx(m, tmp_path_factory.mktemp("onnx") / "band_stop.onnx")
    x = frames[(224, 224)][:2, None]  # batch 2 through the dynamic batch axis
    return path, m, x, band_stop_filter_np(x.astype(np.float64), m)


def test_onnx_graph_is_matmul_only(onnx_model):
    import onnx

    model = onnx.load(onnx_model[0])
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert set(ops) <= {"MatMul", "Mul", "Add", "Sub"} and "DFT" not in ops, ops
    assert model.opset_import[0].version == 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_onnx_runs_in_onnxruntime(onnx_model):
    ort = pytest.importorskip("onnxruntime")
    path, _, x, ref = onnx_model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], ref, atol=ATOL32, rtol=0)


def test_onnx_runs_in_openvino(onnx_model):
    ov = pytest.importorskip("openvino")
    path, _, x, ref = onnx_model
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(x)[0], ref, atol=ATOL32, rtol=0)


@pytest.mark.slow  # ~7 s, mostly importing the dynamo exporter; run with --runslow
def test_dynamo_export_is_also_clean(tmp_path, frames):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    m = masks_for(96, 128, 1)[0]
    path = export_band_stop_onnx(m, tmp_path / "dyn.onnx", dynamo=True)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ops <= {"MatMul", "Mul", "Add", "Sub"}, ops
    x = frames[(96, 128)][:, None]
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, band_stop_filter_np(x.astype(np.float64), m), atol=ATOL32, rtol=0)
