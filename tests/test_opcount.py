"""What the runtimes run: fused attention in OpenVINO's CPU runtime graph, ORT's optimised graph, NNCF's INT8
coverage of the attention/Linear MatMuls (SmoothQuant on and off), and the per-stage time split of a bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from usfm_edge.bench import opcount  # noqa: E402
from usfm_edge.export.parity import default_frames  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "usfm_edge" / "assets" / "sample"
SPECS = [f"busbra:{SAMPLE / 'busbra'}", f"hc18:{SAMPLE / 'hc18'}"]
DEPTH = 4  # usfm_vit_test


@pytest.fixture(scope="module")
def model():
    from usfm_edge.models.tasks import build_task_model

    torch.manual_seed(0)
    return build_task_model("features", "usfm_vit_test", img_size=64).eval()


@pytest.fixture(scope="module")
def fp32_bundles(model, tmp_path_factory):
    pytest.importorskip("openvino")
    from usfm_edge.export import export

    out = tmp_path_factory.mktemp("fp32")
    frames = default_frames(1)
    return {t: export(model, t, "fp32", out=out / t, verify_frames=frames) for t in ("onnx", "openvino")}


def test_openvino_fuses_attention_iff_supported(fp32_bundles):
    counts = opcount.bundle_op_counts(fp32_bundles["openvino"])
    supported = opcount.openvino_supports_fused_attention()
    assert counts["backend"] == "openvino" and counts["op_types"].get("FullyConnected", 0) >= 4 * DEPTH
    assert counts["fused_attention"] == (DEPTH if supported else 0), counts
    assert counts["ir_sdpa"] in (0, DEPTH)  # OpenVINO 2026.4: DEPTH (convert_model's SDPA fusion, bias included)


def test_ort_optimised_graph_counts(fp32_bundles):
    counts = opcount.bundle_op_counts(fp32_bundles["onnx"])
    ops = counts["op_types"]
    assert counts["backend"] == "onnxruntime" and ops.get("MatMul", 0) >= 4 * DEPTH
    assert "Sqrt" not in ops  # the attention scale is a constant (no Shape -> Sqrt -> Div per block)
    assert counts["fused_attention"] in (0, DEPTH)  # ORT 1.32 CPU: 0 (no Attention fusion for this ViT)


def test_sdpa_scale_is_the_default_scale(model):
    import torch.nn.functional as F

    attn = model.backbone.blocks[0].attn
    q, k, v = (torch.randn(2, attn.num_heads, 17, attn.head_dim) for _ in range(3))
    bias = torch.randn(1, attn.num_heads, 17, 17)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    assert torch.equal(a, b)


def test_stage_shares_split_pre_model_post(fp32_bundles):
    frame = default_frames(1)[0]
    rows = opcount.perf_counters(fp32_bundles["openvino"] / "model.xml", frame, threads=1, runs=2, top=None)
    shares = opcount.stage_shares(rows)
    assert set(shares) == {"pre-processing", "model", "post-processing"}
    assert shares["pre-processing"]["ms"] > 0 and shares["model"]["share"] > 0.3
    assert abs(sum(s["share"] for s in shares.values()) - 1.0) < 1e-3


@pytest.mark.parametrize("smooth_quant", [True, False])
def test_nncf_quantises_attention_and_linear_matmuls(model, tmp_path, monkeypatch, smooth_quant):
    pytest.importorskip("nncf")
    from usfm_edge.calibration import QuantRecipe, make_quantizer
    from usfm_edge.export import export

    monkeypatch.setenv("USFM_EDGE_MIN_CALIB_FRAMES", "8")
    recipe = QuantRecipe(smooth_quant=smooth_quant)
    q = make_quantizer(SPECS, n=16, seed=0, force=True, recipe=recipe, min_frames=8)
    path = export(model, "openvino", "int8", out=tmp_path / "int8", quantizer=q, force=True)
    cov = opcount.nncf_quantized_matmuls(path / "model.xml")
    # every Linear of the body (qkv, proj, fc1, fc2 per block) is int8 but the last (kept float by the recipe);
    # NNCF's transformer preset also quantises q @ k^T (attn @ v, after the Softmax, stays float): measured
    # linear 15 / 16, attention 4 / 8 with SmoothQuant on and off
    assert cov["linear"][0] >= 4 * DEPTH - 1 and cov["attention"][1] == 2 * DEPTH, cov
    assert cov["attention"][0] >= DEPTH, cov
    fused = opcount.bundle_op_counts(path)["fused_attention"]
    # still fused at INT8 where the CPU has int8 dot products: measured 12 of 12 ViT-B blocks on an AVX-512 VNNI
    # EPYC, none on an AVX2-only one (whose fp32 graph fuses every block; benchmarks/RESULTS.md §4.4)
    from usfm_edge.bench.sysinfo import has_int8_dot_products, machine_info

    int8_dot = has_int8_dot_products(machine_info()["isa"])
    assert fused == (DEPTH if int8_dot and opcount.openvino_supports_fused_attention() else 0)
    import json

    gate = json.loads((path / "usfm.json").read_text())["calibration"]["report"]["gate"]
    cc = gate.get("fidelity", {}).get("features", {}).get("centred_cosine_mean")
    print(f"smooth_quant={smooth_quant}: coverage {cov}, centred cosine {cc}")
    assert cc is None or np.isfinite(cc)
