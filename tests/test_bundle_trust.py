"""Bundles a device can trust: verify-then-use under a racing file swap, links and special files refused, every
edited ``usfm.json`` field a ``BundleError`` naming it, the contract checked against the loaded graph, oversized
frames refused on their shape before any memory is used, and the CLI ending each case with ``error: ...``.

Bundles: ``usfm_vit_test`` at 64 px (seg, random weights), exported to ONNX and OpenVINO once per module; frames:
real BUS-BRA / HC18 sample images.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import export_test_seg
from PIL import Image

from usfm_edge.core.errors import BundleError, InputError
from usfm_edge.runtime import Engine
from usfm_edge.runtime.bundle_io import ONNX_TENSOR_FIELDS, format_sums, onnx_external_data, verify_bundle

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "usfm_edge" / "assets" / "sample"
S = 64


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    pytest.importorskip("openvino")
    return export_test_seg(tmp_path_factory.mktemp("trust"), ("onnx", "openvino"))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    """Real grey frames: BUS-BRA (~300x270) and HC18 (540x800)."""
    paths = sorted((SAMPLE / "busbra" / "Images").glob("*.png"))[:2] + sorted(
        (SAMPLE / "hc18" / "training_set").glob("*_HC.png"))[:1]
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


def _same(a, b) -> bool:
    return np.array_equal(a.mask, b.mask) and np.array_equal(a.probs, b.probs)


def _copy(bundle: Path, tmp_path: Path, name: str = "b.usfm") -> Path:
    return Path(shutil.copytree(bundle, tmp_path / name))


def _sums(folder: Path, follow: dict[str, Path] | None = None) -> None:
    """Regenerate SHA256SUMS as a "fixer" would (``follow``: names hashed through their link targets)."""
    follow = follow or {}
    sums = {}
    for f in sorted(folder.iterdir()):
        if f.name in ("SHA256SUMS", "model.engine"):
            continue
        sums[f.name] = hashlib.sha256(Path(follow.get(f.name, f)).read_bytes()).hexdigest()
    (folder / "SHA256SUMS").write_text(format_sums(sums))


def _modified_model(bundle: Path, backend: str, onnx_path: Path) -> tuple[str, bytes, bytes]:
    """(file name, good bytes, modified bytes): one float weight tensor of the ONNX graph ``onnx_path`` negated; for
    OpenVINO the same tensor found in the IR weights, so the IR stays loadable and only the numbers change."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    name = "model.onnx" if backend == "onnxruntime" else "model.bin"
    good = (bundle / name).read_bytes()
    for t in sorted(model.graph.initializer, key=lambda t: -len(t.raw_data)):
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32 or a.size < 1000:
            continue
        if backend == "onnxruntime":
            t.CopyFrom(numpy_helper.from_array(-a, t.name))
            return name, good, model.SerializeToString()
        at = good.find(a.tobytes())
        if at >= 0:
            return name, good, good[:at] + (-a).tobytes() + good[at + a.nbytes:]
    pytest.skip("no float weight of the ONNX graph found verbatim in the IR weights")


# -- 1. verify-then-use under a racing swap ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_racing_model_swap_never_loads_a_modified_model(bundles, frames, tmp_path, backend):
    bundle = _copy(bundles["onnx" if backend == "onnxruntime" else "openvino"], tmp_path)
    frame = frames[0]
    name, good, bad = _modified_model(bundle, backend, bundles["onnx"] / "model.onnx")
    with Engine.open(bundle, backend=backend) as engine:
        ref = engine.predict(frame)
    fixed = _copy(bundle, tmp_path, "fixed.usfm")  # the modified model with its checksums regenerated: it loads,
    (fixed / name).write_bytes(bad)  # and its outputs differ, so a modified load would be seen below
    _sums(fixed)
    with Engine.open(fixed, backend=backend) as engine:
        assert not _same(engine.predict(frame), ref)

    stash = tmp_path / "stash"  # outside the bundle, same file system: os.replace is atomic
    stash.mkdir()
    (stash / "good").write_bytes(good)
    (stash / "bad").write_bytes(bad)
    stop, swaps = threading.Event(), [0]

    def swapper():
        # bursts of 40 swaps 0.5 ms apart, each ending on the good file and followed by a 20 ms pause: an open
        # that spans a burst must be refused, one inside a pause loads the verified model (on a slow machine a
        # steady 0.5 ms swap raced every single open, and the test could not tell the two outcomes apart)
        i = 0
        while not stop.is_set():
            tmp = stash / f"t{i}"
            os.link(stash / ("bad" if i % 2 == 0 else "good"), tmp)
            os.replace(tmp, bundle / name)
            i += 1
            swaps[0] = i
            time.sleep(0.02 if i % 40 == 0 else 0.0005)

    opens = 60 if backend == "onnxruntime" else 30
    counts = {"refused": 0, "original": 0, "modified": 0}
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        for _ in range(opens):
            try:
                with Engine.open(bundle, backend=backend) as engine:
                    result = engine.predict(frame)
            except BundleError as exc:
                assert f"'{name}' does not match its SHA-256" in exc.message, exc
                counts["refused"] += 1
                continue
            counts["original" if _same(result, ref) else "modified"] += 1
    finally:
        stop.set()
        thread.join(10)
        os.replace(stash / "good", bundle / name)
    print(f"\nrace {backend}: {opens} opens, {counts['refused']} refused (hash mismatch), {counts['original']} loaded "
          f"the verified model, {counts['modified']} loaded a modified model; {swaps[0]} swaps")
    assert counts["modified"] == 0, counts
    assert counts["refused"] + counts["original"] == opens
    assert counts["refused"] > 0 and counts["original"] > 0, f"the swap did not race the opens: {counts}"
    verify_bundle(bundle)


# -- 2. links and special files -----------------------------------------------------------------------------------
def _link_model_outside(p: Path) -> None:
    outside = p.parent / "outside.onnx"
    shutil.copy(p / "model.onnx", outside)
    (p / "model.onnx").unlink()
    (p / "model.onnx").symlink_to(outside)
    _sums(p, follow={"model.onnx": outside})  # the checksum even matches the link's target


def _link_extra_file(p: Path) -> None:
    (p / "notes.txt").symlink_to("/etc/hostname")


def _fifo_model(p: Path) -> None:
    (p / "model.onnx").unlink()
    os.mkfifo(p / "model.onnx")


def _folder_model(p: Path) -> None:
    (p / "model.onnx").unlink()
    (p / "model.onnx").mkdir()


SPECIAL = {
    "symlink-to-outside": (_link_model_outside, r"'model.onnx' is a symbolic link \(to '.*outside.onnx'\)"),
    "symlink-extra-file": (_link_extra_file, "'notes.txt' is a symbolic link"),
    "fifo-as-model": (_fifo_model, r"'model.onnx' is a FIFO \(named pipe\), not a regular file"),
    "folder-as-model": (_folder_model, "'model.onnx' is a folder, not a regular file"),
}


@pytest.mark.timeout(120)  # a FIFO opened for reading would block: it must be refused before any open
@pytest.mark.parametrize("case", list(SPECIAL))
def test_links_and_special_files_are_refused(bundles, tmp_path, case):
    if not hasattr(os, "mkfifo") or not hasattr(os, "O_NOFOLLOW"):
        pytest.skip("POSIX only")
    damage, match = SPECIAL[case]
    p = _copy(bundles["onnx"], tmp_path)
    damage(p)
    with pytest.raises(BundleError, match=match):
        Engine.open(p)
    with pytest.raises(BundleError, match=match):
        verify_bundle(p)
    if case != "symlink-extra-file":  # without checksums the model file itself is still read with no-follow
        with pytest.raises(BundleError, match=match):
            Engine.open(p, verify=False)


# -- 3. an edited usfm.json: BundleError naming the field ---------------------------------------------------------
def _edit(**changes):
    def apply(d: dict) -> None:
        for path, value in changes.items():
            *parents, key = path.split("__")
            node = d
            for part in parents:
                node = node[int(part)] if part.isdigit() else node[part]
            node[int(key) if key.isdigit() else key] = value
    return apply


INF = float("inf")
META = {  # name: (edit of the usfm.json dict, expected message)
    "output-name": (_edit(outputs__0__name="probz"), r"outputs\[0\]\.name 'probz' is not an output of the model"),
    "max_side-string": (_edit(input__max_side="4096"),
                        r'input\.max_side must be an integer in \[8, 65536\], got "4096"'),
    "max_side-null": (_edit(input__max_side=None), r"input\.max_side must be an integer in \[8, 65536\], got null"),
    "max_side-infinity": (_edit(input__max_side=INF),
                          r"input\.max_side must be an integer in \[8, 65536\], got Infinity"),
    "max_side-negative": (_edit(input__max_side=-1), r"input\.max_side must be an integer in \[8, 65536\], got -1"),
    "min_side-above-max": (_edit(input__min_side=5000), r"input\.min_side \(5000\) must not exceed input\.max_side"),
    "task-seg-to-cls": (_edit(task="cls"), r"task 'cls' needs 'probs' as \(batch, classes\) probabilities"),
    "task-seg-to-enhance": (_edit(task="enhance"), r"task 'enhance' needs the output 'restored'"),
    "labels-count": (_edit(labels=["background", "lesion", "extra"]),
                     r"'probs' has 2 classes but usfm.json labels names 3"),
    "labels-and-shape": (_edit(labels=["background", "lesion", "extra"], outputs__0__shape=["batch", 3, "height", "width"]),
                         r"outputs\[0\]\.shape\[1\] is 3, the model's output 'probs' has 2|'probs' has 2 classes"),
    "labels-repeated": (_edit(labels=["lesion", "lesion"]), r'labels must not repeat a name, "lesion" appears twice'),
    "dtype-unknown": (_edit(outputs__1__dtype="bfloat16"),
                      r'outputs\[1\]\.dtype must be one of uint8, float16, float32, int64, got "bfloat16"'),
    "dtype-wrong": (_edit(outputs__1__dtype="int64"),
                    r"outputs\[1\]\.dtype 'int64' does not match the model's output 'mask' \(uint8\)"),
    "input-name": (_edit(input__tensor__name="image"), r"input\.tensor\.name 'image' is not the model's input"),
    "img_size-string": (_edit(preprocessing__img_size="64"),
                        r'preprocessing\.img_size must be an integer in \[1, 65536\], got "64"'),
    "std-zero": (_edit(preprocessing__std=[0.2, 0.0, 0.2]),
                 r"preprocessing\.std\[1\] must be a positive finite number, got 0\.0"),
    "raw_frame-string": (_edit(input__raw_frame="yes"), r'input\.raw_frame must be true or false, got "yes"'),
    "outputs-not-a-list": (_edit(outputs={"probs": 1}), r'outputs must be a list of tensors, got \{"probs": 1\}'),
    "file-outside": (_edit(files__onnx="../model.onnx"), r"files\['onnx'\] = \"../model.onnx\" must be a plain file name"),
}


@pytest.mark.parametrize("case", list(META))
def test_edited_usfm_json_is_a_bundle_error_naming_the_field(bundles, frames, tmp_path, case):
    edit, match = META[case]
    p = _copy(bundles["onnx"], tmp_path)
    data = json.loads((p / "usfm.json").read_text())
    edit(data)
    (p / "usfm.json").write_text(json.dumps(data))  # Infinity is written as JSON's Infinity
    _sums(p)  # the "fixer" regenerated the checksums: only the content checks can refuse it
    with pytest.raises(BundleError, match=match):
        Engine.open(p)


@pytest.mark.parametrize("case", ["output-name", "task-seg-to-cls", "labels-count", "dtype-wrong"])
def test_edited_usfm_json_on_openvino(bundles, tmp_path, case):
    edit, match = META[case]
    p = _copy(bundles["openvino"], tmp_path)
    data = json.loads((p / "usfm.json").read_text())
    edit(data)
    (p / "usfm.json").write_text(json.dumps(data))
    _sums(p)
    with pytest.raises(BundleError, match=match):
        Engine.open(p, backend="openvino")


def test_non_utf8_sums_and_meta(bundles, tmp_path):
    p = _copy(bundles["onnx"], tmp_path)
    with open(p / "SHA256SUMS", "ab") as f:
        f.write(b"0" * 64 + b"  caf\xe9.txt\n")
    with pytest.raises(BundleError, match=r"SHA256SUMS is not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        Engine.open(p)
    p = _copy(bundles["onnx"], tmp_path, "meta.usfm")
    raw = (p / "usfm.json").read_bytes().replace(b'"notes": []', b'"notes": ["caf\xe9"]')
    (p / "usfm.json").write_bytes(raw)
    _sums(p)
    with pytest.raises(BundleError, match=r"usfm.json is not UTF-8 text \(byte 0xe9"):
        Engine.open(p)


def test_the_verified_bundle_still_opens_and_predicts(bundles, frames):
    """The checks cost no behaviour: both bundles open (auto, openvino, onnxruntime) and agree on real frames."""
    results = {}
    for key, backend in (("onnx", "auto"), ("openvino", "openvino"), ("onnx", "onnxruntime")):
        with Engine.open(bundles[key], backend=backend, warmup=0) as engine:
            results[(key, backend)] = [engine.predict(f) for f in frames]
    for a, b in zip(results[("onnx", "auto")], results[("openvino", "openvino")]):
        assert np.mean(a.mask == b.mask) > 0.99


# -- 4. ONNX external data: refused wherever it hides, without the onnx package ----------------------------------
def test_onnx_scan_table_matches_the_onnx_schema():
    onnx = pytest.importorskip("onnx")
    memo: dict[str, bool] = {}

    def reaches(d, seen=()) -> bool:
        if d.full_name == "onnx.TensorProto":
            return True
        if d.full_name not in memo:
            memo[d.full_name] = d.full_name not in seen and any(
                f.message_type is not None and reaches(f.message_type, (*seen, d.full_name)) for f in d.fields)
        return memo[d.full_name]

    table, todo, done = {}, [onnx.ModelProto.DESCRIPTOR], set()
    while todo:
        d = todo.pop()
        if d.full_name in done or d.full_name == "onnx.TensorProto":
            continue
        done.add(d.full_name)
        for f in d.fields:
            if f.message_type is not None and reaches(f.message_type):
                table.setdefault(d.name, {})[f.number] = f.message_type.name
                todo.append(f.message_type)
    assert table == ONNX_TENSOR_FIELDS
    fields = onnx.TensorProto.DESCRIPTOR.fields_by_name
    assert (fields["name"].number, fields["external_data"].number, fields["data_location"].number) == (8, 13, 14)


def test_external_data_in_a_subgraph_is_refused(bundles, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    p = _copy(bundles["onnx"], tmp_path)
    model = onnx.load(str(p / "model.onnx"))
    assert onnx_external_data(model.SerializeToString()) == []
    w = numpy_helper.from_array(np.ones(4, np.float32), "hidden_w")
    w.data_location = TensorProto.EXTERNAL
    w.ClearField("raw_data")
    for k, v in (("location", "weights.bin"), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = k, v
    branch = helper.make_graph([helper.make_node("Identity", ["hidden_w"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    const = helper.make_node("Constant", [], ["c"], value=w)
    cond = helper.make_node("If", ["c_bool"], ["z"], then_branch=branch, else_branch=branch)
    model.graph.node.extend([const, cond])
    found = onnx_external_data(model.SerializeToString())
    assert found == [("hidden_w", "weights.bin")] * 3  # the Constant's tensor and both branches' initializers
    (tmp_path / "weights.bin").write_bytes(np.ones(4, np.float32).tobytes())
    (p / "weights.bin").write_bytes(np.ones(4, np.float32).tobytes())  # even inside the bundle and listed
    (p / "model.onnx").write_bytes(model.SerializeToString())
    _sums(p)
    with pytest.raises(BundleError, match="tensor 'hidden_w' keeps its data in an external file 'weights.bin'"):
        Engine.open(p)
    (p / "model.onnx").write_bytes((p / "model.onnx").read_bytes()[:-7])  # truncated: not a protobuf
    _sums(p)
    with pytest.raises(BundleError, match="not a readable ONNX model"):
        Engine.open(p)


# -- 5. oversized frames: refused on their shape, nothing allocated ----------------------------------------------
def test_oversized_frames_are_refused_before_any_memory_is_used(bundles, frames, tmp_path):
    tiny = np.zeros((1, 1, 3), np.uint8)
    huge = {
        "20000x20000 RGB (broadcast)": np.broadcast_to(tiny, (20000, 20000, 3)),
        "20000x20000 RGB (strided)": np.lib.stride_tricks.as_strided(tiny, (20000, 20000, 3), (0, 0, 1)),
        "10000x10000 RGBA": np.broadcast_to(np.zeros((1, 1, 4), np.uint8), (10000, 10000, 4)),
        "3x20000x20000 channels first": np.broadcast_to(np.zeros((3, 1, 1), np.uint8), (3, 20000, 20000)),
        "20000x20000 float64 grey": np.broadcast_to(np.zeros((1, 1)), (20000, 20000)),
    }
    with Engine.open(bundles["onnx"]) as engine:
        ref = engine.predict(frames[0])
        for what, frame in huge.items():
            side = "10000x10000" if what.startswith("10000") else "20000x20000"
            tracemalloc.start()
            try:
                with pytest.raises(InputError, match=f"frame is {side} pixels, larger than the configured maximum "
                                                     "side 4096 px"):
                    engine.predict(frame)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < 1 << 20, f"{what}: {peak} bytes allocated before the refusal"
            assert _same(engine.predict(frames[0]), ref)  # the engine stays usable
        with pytest.raises(InputError, match="frame 1: frame is 20000x20000 pixels"):
            engine.predict_batch([frames[0], huge["20000x20000 RGB (broadcast)"]])
        out = list(engine.stream([frames[0], huge["20000x20000 RGB (broadcast)"], frames[1]], on_error="yield"))
        assert isinstance(out[1], InputError) and "20000x20000" in out[1].message and _same(out[0], ref)
        rgb = np.stack([frames[0]] * 3, -1)  # a real colour frame within the limits is converted as before
        assert _same(engine.predict(rgb), ref)
    with Engine.open(bundles["onnx"], max_side=600) as engine:
        with pytest.raises(InputError, match="frame is 800x601 pixels, larger than the configured maximum side 600"):
            engine.predict(np.broadcast_to(tiny, (800, 601, 3)))


def test_small_frames_name_the_bundles_own_minimum(bundles, frames, tmp_path):
    with Engine.open(bundles["onnx"]) as engine:
        with pytest.raises(InputError, match="frame is 4x300 pixels; this model needs sides of at least 8 px"):
            engine.predict(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (4, 300, 3)))
    p = _copy(bundles["onnx"], tmp_path)
    data = json.loads((p / "usfm.json").read_text())
    data["input"]["min_side"] = 16
    (p / "usfm.json").write_text(json.dumps(data))
    _sums(p)
    with Engine.open(p) as engine:
        with pytest.raises(InputError, match="frame is 12x100 pixels; this model needs sides of at least 16 px"):
            engine.predict(frames[0][:12, :100])
        assert engine.predict(frames[0][:16, :100]).mask.shape == (16, 100)


# -- 6. the CLI: error: ..., exit code 1, never a traceback --------------------------------------------------------
CLI_CASES = ["output-name", "max_side-string", "max_side-infinity", "task-seg-to-cls", "non-utf8-sums",
             "symlink-to-outside"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_predict_cli_on_a_bad_bundle_prints_one_error_line(bundles, frames, tmp_path, case):
    p = _copy(bundles["onnx"], tmp_path)
    if case == "non-utf8-sums":
        with open(p / "SHA256SUMS", "ab") as f:
            f.write(b"\xff\xfe garbage\n")
    elif case == "symlink-to-outside":
        _link_model_outside(p)
    else:
        data = json.loads((p / "usfm.json").read_text())
        META[case][0](data)
        (p / "usfm.json").write_text(json.dumps(data))
        _sums(p)
    img = tmp_path / "frame.png"
    Image.fromarray(frames[0]).save(img)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", "from usfm_edge.cli import main; main()", "predict", str(p), str(img),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: ") and str(p) in lines[-1], r.stderr[-2000:]
    assert not (tmp_path / "out" / "results.json").exists()


# -- 7. TensorRT: the engine is deserialised from the bytes read once (a fake tensorrt; no GPU here) --------------
def test_tensorrt_engine_is_deserialised_from_the_bytes_read_once(bundles, tmp_path, monkeypatch):
    import types

    from usfm_edge.runtime import backends
    from usfm_edge.runtime.bundle_io import BundleFiles

    seen: list[bytes] = []

    class FakeEngine:
        names = {"frame": (np.uint8, (1, 64, 64), "in"), "probs": (np.float32, (1, 2, 64, 64), "out"),
                 "mask": (np.uint8, (1, 64, 64), "out")}
        num_io_tensors = 3

        def get_tensor_name(self, i):
            return list(self.names)[i]

        def get_tensor_mode(self, n):
            return self.names[n][2]

        def get_tensor_dtype(self, n):
            return self.names[n][0]

        def get_tensor_shape(self, n):
            return self.names[n][1]

        def create_execution_context(self):
            return object()

    class FakeRuntime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            seen.append(bytes(data))
            return FakeEngine() if bytes(data).startswith(b"ENGINE") else None

    trt = types.SimpleNamespace(__version__="10.fake", Runtime=FakeRuntime, Logger=lambda level: None,
                                TensorIOMode=types.SimpleNamespace(INPUT="in"), nptype=lambda t: t)
    trt.Logger.WARNING = 0
    cudart = types.SimpleNamespace(cudaSetDevice=lambda i: (0,), cudaStreamCreate=lambda: (0, 1))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(backends, "_cudart", lambda: cudart)
    p = _copy(bundles["onnx"], tmp_path)
    data = json.loads((p / "usfm.json").read_text())
    data["files"]["tensorrt_engine"] = "model.engine"
    (p / "usfm.json").write_text(json.dumps(data))
    _sums(p)  # model.engine is device-built: no SHA256SUMS line
    (p / "model.engine").write_bytes(b"ENGINE v1")
    with BundleFiles(p) as files:
        be = backends.make_backend(p, files.meta, "tensorrt", files=files)
    assert seen == [b"ENGINE v1"] and sorted(n for port in be.io()[1] for n in port.names) == ["mask", "probs"]
    assert be.io()[1][0].dtype == "float32" and be.io()[0][0].shape == (1, 64, 64)
    (p / "model.engine").unlink()
    (p / "model.engine").symlink_to(tmp_path / "elsewhere.engine")
    (tmp_path / "elsewhere.engine").write_bytes(b"ENGINE v2")
    with pytest.raises(BundleError, match="'model.engine' is a symbolic link"):
        Engine.open(p, backend="tensorrt")
    assert seen == [b"ENGINE v1"]  # the linked engine was never handed to TensorRT
