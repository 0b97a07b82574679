"""The C++ host (examples/cpp_host): built with CMake against the openvino wheel's SDK, run on the bundled real
frames, its masks compared with ``usfm_edge.runtime.Engine``; refusals of tampered, too new and foreign bundles.

Bundles are the shipped demo checkpoint (``busbra_seg_tiny``) exported for openvino fp32, openvino int8 (NNCF,
calibrated on the bundled BUS-BRA sample) and onnx fp32 (read by OpenVINO's ONNX frontend in the host, by ONNX
Runtime in the Engine). The host is compiled once per module.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST_DIR = ROOT / "examples" / "cpp_host"
CKPT = ROOT / "usfm_edge" / "assets" / "checkpoints" / "busbra_seg_tiny.safetensors"
SPACING = 0.1  # mm, isotropic


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HOST_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_host = _load("build_host")
make_frames = _load("make_frames")


# -- the doc's C++ is the code that is compiled -------------------------------------------------------------
def _doc_blocks() -> list[str]:
    text = (ROOT / "docs" / "embedding.md").read_text()
    return re.findall(r"```cpp\n(.*?)```", text, flags=re.S)


def _source_regions() -> list[str]:
    regions = []
    for src in HOST_DIR.glob("*.cpp"):
        for body in re.findall(r"// \[doc:[\w-]+\]\n(.*?)\n[ \t]*// \[doc:end\]", src.read_text(), flags=re.S):
            lines = body.splitlines()
            indent = min(len(s) - len(s.lstrip()) for s in lines if s.strip())
            regions.append("\n".join(s[indent:] for s in lines).strip())
    return regions


def test_doc_cpp_snippets_are_the_compiled_host_code():
    blocks, regions = _doc_blocks(), _source_regions()
    assert blocks and len(regions) >= 2
    for block in blocks:
        assert block.strip() in regions, f"docs/embedding.md C++ block is not a [doc:...] region of examples/cpp_host:\n{block[:300]}"


def test_make_frames_writes_a_dicom_cine_as_pgm(tmp_path, capsys):
    pytest.importorskip("pydicom")
    spec = importlib.util.spec_from_file_location("test_readers", ROOT / "tests" / "test_readers.py")
    readers_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readers_test)
    cine = np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8)
    dcm = readers_test.write_dicom(tmp_path / "cine.dcm", cine, PixelSpacing=[0.2, 0.3])
    paths = make_frames.make_frames(tmp_path / "pgm", [dcm])
    assert [p.name for p in paths] == [f"{i:04d}_cine_f{i:03d}.pgm" for i in range(3)]
    assert all(np.array_equal(make_frames.read_pgm(p), f) for p, f in zip(paths, cine))
    assert "--pixel-spacing 0.2,0.3" in capsys.readouterr().err


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    reason = build_host.missing_tools()
    if reason:
        pytest.skip(reason)
    return build_host.build_host(tmp_path_factory.mktemp("cpp_host_build"))


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frames")
    make_frames.make_frames(out)  # the 39 bundled BUS-BRA + HC18 frames, sizes 200..800 px
    return out


@pytest.fixture(scope="module")
def bundles(host, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from usfm_edge.calibration import make_quantizer
    from usfm_edge.data import sample_dir
    from usfm_edge.export import export

    out = tmp_path_factory.mktemp("bundles")
    made = {"openvino-fp32": export(CKPT, "openvino", "fp32", out=out / "seg-openvino-fp32.usfm"),
            "onnx-fp32": export(CKPT, "onnx", "fp32", out=out / "seg-onnx-fp32.usfm")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("USFM_EDGE_MIN_CALIB_FRAMES", "8")  # the bundled sample holds 22 BUS-BRA frames
        # force: the accuracy gate is test_calibration's business; here the artifact itself is compared
        quantizer = make_quantizer([f"busbra:{sample_dir()}/busbra"], force=True)
        made["openvino-int8"] = export(CKPT, "openvino", "int8", out=out / "seg-openvino-int8.usfm", quantizer=quantizer)
    return made


def run_host(host: Path, bundle: Path, out: Path, frames, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(host), str(bundle), "--out", str(out), *extra, *[str(f) for f in frames]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def copy_bundle(src: Path, dst: Path, edit=None) -> Path:
    """A copy of a bundle; ``edit(meta)`` changes usfm.json and SHA256SUMS is rewritten to match (a consistent
    bundle, as an exporter would write it)."""
    from usfm_edge.runtime.bundle_io import format_sums, read_sums, sha256_file

    shutil.copytree(src, dst)
    if edit is not None:
        meta = json.loads((dst / "usfm.json").read_text())
        edit(meta)
        (dst / "usfm.json").write_text(json.dumps(meta, indent=2))
        sums = {name: sha256_file(dst / name) for name in read_sums(dst)}
        (dst / "SHA256SUMS").write_text(format_sums(sums))
    return dst


# -- the host's masks are the Engine's ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["openvino-fp32", "openvino-int8", "onnx-fp32"])
def test_host_masks_match_engine(host, bundles, frames_dir, kind, tmp_path):
    from usfm_edge.runtime import Engine

    out = tmp_path / "out"
    res = run_host(host, bundles[kind], out, [frames_dir], "--pixel-spacing", str(SPACING))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader((out / "frames.csv").open()))
    paths = sorted(frames_dir.glob("*.pgm"))
    assert [r["frame"] for r in rows] == [p.stem for p in paths]
    sizes = set()
    with Engine.open(bundles[kind]) as engine:
        labels = engine.labels
        for path, row in zip(paths, rows):
            frame = make_frames.read_pgm(path)
            sizes.add(frame.shape)
            ref = engine.predict(frame, pixel_spacing_mm=SPACING)
            got = make_frames.read_pgm(out / f"{path.stem}.mask.pgm")
            assert got.shape == frame.shape and set(np.unique(got)) <= {0, 255}  # two classes: 0/255
            cls = (got == 255).astype(np.uint8)
            agree = float((cls == ref.mask).mean())
            assert agree >= 0.999, f"{kind} {path.name}: {agree:.5f} of pixels agree with Engine"
            px = {lab: int(row[f"px_{lab}"]) for lab in labels}
            assert px == {lab: int((cls == k).sum()) for k, lab in enumerate(labels)}
            for lab in labels:
                assert float(row[f"mm2_{lab}"]) == pytest.approx(px[lab] * SPACING * SPACING, rel=1e-4, abs=1e-3)
                assert abs(px[lab] - ref.areas_px[lab]) <= 0.001 * frame.size
            assert 0 < float(row["infer_ms"]) <= float(row["total_ms"])
    assert len(sizes) >= 10  # frames of many sizes ran through one dynamic-shape bundle


# -- refusals ------------------------------------------------------------------------------------------------
def test_refuses_tampered_weights(host, bundles, frames_dir, tmp_path):
    bad = copy_bundle(bundles["openvino-fp32"], tmp_path / "tampered.usfm")
    data = bytearray((bad / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "model.bin").write_bytes(bytes(data))
    res = run_host(host, bad, tmp_path / "out", sorted(frames_dir.glob("*.pgm"))[:1])
    assert res.returncode == 3 and "'model.bin' does not match its SHA-256" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_refuses_newer_schema(host, bundles, frames_dir, tmp_path):
    newer = copy_bundle(bundles["openvino-fp32"], tmp_path / "newer.usfm", lambda m: m.update(schema_version=2))
    res = run_host(host, newer, tmp_path / "out", sorted(frames_dir.glob("*.pgm"))[:1])
    assert res.returncode == 3 and "schema version 2 was written by a newer usfm-edge" in res.stderr, res.stderr


def test_refuses_foreign_backends_links_and_unlisted_files(host, bundles, frames_dir, tmp_path):
    one = sorted(frames_dir.glob("*.pgm"))[:1]
    trt = copy_bundle(bundles["onnx-fp32"], tmp_path / "trt.usfm",
                      lambda m: m.update(backend="tensorrt", target="jetson"))
    res = run_host(host, trt, tmp_path / "o1", one)
    assert res.returncode == 3 and "made for TensorRT" in res.stderr, res.stderr

    linked = copy_bundle(bundles["openvino-fp32"], tmp_path / "linked.usfm")
    real = tmp_path / "elsewhere.bin"
    (linked / "model.bin").rename(real)
    (linked / "model.bin").symlink_to(real)
    res = run_host(host, linked, tmp_path / "o2", one)
    assert res.returncode == 3 and "'model.bin' is a symbolic link" in res.stderr, res.stderr

    extra = copy_bundle(bundles["openvino-fp32"], tmp_path / "extra.usfm")
    (extra / "notes.txt").write_text("not part of the export")
    res = run_host(host, extra, tmp_path / "o3", one)
    assert res.returncode == 3 and "'notes.txt' is not listed in SHA256SUMS" in res.stderr, res.stderr


def test_static_contract_refuses_other_sizes(host, bundles, frames_dir, tmp_path):
    paths = sorted(frames_dir.glob("*.pgm"))
    h, w = make_frames.read_pgm(paths[0]).shape
    other = next(p for p in paths if make_frames.read_pgm(p).shape != (h, w))
    static = copy_bundle(bundles["openvino-fp32"], tmp_path / "static.usfm",
                         lambda m: m["input"].update(static_hw=[h, w], dynamic_axes=["batch"]))
    res = run_host(host, static, tmp_path / "o1", [paths[0], other])
    assert res.returncode == 4 and f"static size {h}x{w}" in res.stderr and other.stem in res.stderr, res.stderr
    res = run_host(host, static, tmp_path / "o2", [paths[0]])
    assert res.returncode == 0, res.stderr


def test_refuses_bad_frames_and_usage(host, bundles, tmp_path):
    tiny = tmp_path / "tiny.pgm"
    make_frames.write_pgm(tiny, np.zeros((4, 300), np.uint8))
    res = run_host(host, bundles["openvino-fp32"], tmp_path / "o", [tiny])
    assert res.returncode == 4 and "at least 8 px" in res.stderr, res.stderr
    notpgm = tmp_path / "x.pgm"
    notpgm.write_bytes(b"P2\n2 2\n255\n0 0 0 0\n")
    res = run_host(host, bundles["openvino-fp32"], tmp_path / "o", [notpgm])
    assert res.returncode == 2 and "not a binary PGM" in res.stderr, res.stderr
    res = subprocess.run([str(host)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage: usfm_host" in res.stderr


def test_a_signed_bundle_still_opens(host, bundles, frames_dir, tmp_path):
    """SIGNATURE (usfm-edge sign) is allowed without a SHA256SUMS line; this host does not check it."""
    pytest.importorskip("cryptography")
    from usfm_edge.runtime.signing import generate_keypair, sign_bundle

    signed = copy_bundle(bundles["onnx-fp32"], tmp_path / "signed.usfm")
    sign_bundle(signed, generate_keypair(tmp_path / "keys")[0])
    res = run_host(host, signed, tmp_path / "out", sorted(frames_dir.glob("*.pgm"))[:1])
    assert res.returncode == 0, res.stderr[-2000:]
