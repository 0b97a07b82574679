"""A corpus of malformed inputs: each one must end in a typed ``UsfmEdgeError`` (never a bare ValueError, KeyError,
IndexError, MemoryError, UnicodeDecodeError or a torch/PIL/onnxruntime exception), and on the CLI in its documented
exit code with one ``error: ...`` line and no traceback.

The corpus is a data table (``CASES``): ``(id, target, build, expected error class)``. ``build(tmp, ctx)`` writes the
malformed thing into ``tmp`` and returns what the target takes; add a row to grow it. Targets:

* ``file``       ``Engine.predict(path)`` (the image/DICOM readers, then the frame checks)
* ``frame``      ``Engine.predict(array)`` on a healthy engine, which must stay usable afterwards
* ``bundle``     ``Engine.open(folder)``
* ``checkpoint`` ``export.exporter.load_for_export(path)``
* ``cli``        ``usfm-edge ARGS...`` in a fresh interpreter: ``(args, exit code)``

An expected class of None marks an odd but valid input that must simply work (a 16-bit PNG).

Bundle: ``usfm_vit_test`` at 64 px (seg, random weights) exported to ONNX once per module; frames: real BUS-BRA.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import export_test_seg
from PIL import Image

from usfm_edge.core.errors import (
    BundleError,
    CheckpointError,
    DataError,
    ExportError,
    InputError,
    UsfmEdgeError,
)
from usfm_edge.runtime import Engine
from usfm_edge.runtime.bundle_io import format_sums

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "usfm_edge" / "assets" / "sample"
REAL_PNG = sorted((SAMPLE / "busbra" / "Images").glob("*.png"))[0]
S = 64


# -- builders: files ---------------------------------------------------------------------------------------------
def _write(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_declaring(w: int, h: int) -> bytes:
    """A PNG header declaring ``w x h`` grey pixels with a tiny IDAT (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _png16(tmp, ctx):
    p = tmp / "deep.png"
    arr = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(arr).save(p)
    return p


def _png_1x1(tmp, ctx):
    p = tmp / "one.png"
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(p)
    return p


def _png_bad_crc(tmp, ctx):
    data = bytearray(REAL_PNG.read_bytes())
    data[29] ^= 0xFF  # inside IHDR's CRC
    return _write(tmp, "crc.png", bytes(data))


def _png_dir(tmp, ctx):
    p = tmp / "x.png"
    p.mkdir()
    return p


def _dicom(tmp: Path, name: str, pixels: bytes | None, rows: int = 8, cols: int = 8, **raw) -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # US image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    if pixels is not None:
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels
    for key, value in raw.items():  # raw string values, as a broken writer would store them
        if value is None:  # 16-bit samples
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        else:
            ds.add_new(key, "LO", value)
    p = tmp / name
    pydicom.dcmwrite(p, ds, enforce_file_format=True)
    return p


def _dicom_truncated(tmp, ctx):
    p = _dicom(tmp, "cut.dcm", bytes(64 * 64), 64, 64)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 3000])
    return p


FILE_CASES = [
    ("empty-png", lambda t, c: _write(t, "empty.png", b""), DataError),
    ("truncated-png", lambda t, c: _write(t, "cut.png", REAL_PNG.read_bytes()[: REAL_PNG.stat().st_size // 2]),
     DataError),
    ("png-header-only", lambda t, c: _write(t, "head.png", REAL_PNG.read_bytes()[:33]), DataError),
    ("random-bytes-png", lambda t, c: _write(t, "rnd.png", np.random.default_rng(0).bytes(4096)), DataError),
    ("text-named-png", lambda t, c: _write(t, "text.png", b"this is not an image\n" * 20), DataError),
    ("png-bad-crc", _png_bad_crc, DataError),
    ("png-1x1", _png_1x1, InputError),
    ("png-16bit-accepted", _png16, None),
    ("png-16bit-1x40", lambda t, c: _save(t, "d.png", np.full((1, 40), 4000, np.uint16)), InputError),
    ("png-huge-declared", lambda t, c: _write(t, "bomb.png", _png_declaring(200_000, 200_000)), DataError),
    ("png-zero-declared", lambda t, c: _write(t, "zero.png", _png_declaring(0, 0)), DataError),
    ("folder-named-png", _png_dir, DataError),
    ("missing-file", lambda t, c: t / "nope.png", DataError),
    ("truncated-jpeg", lambda t, c: _write(t, "cut.jpg", _jpeg()[:200]), DataError),
    ("random-bytes-tif", lambda t, c: _write(t, "rnd.tif", b"II*\x00" + np.random.default_rng(1).bytes(512)),
     DataError),
    ("bmp-header-only", lambda t, c: _write(t, "b.bmp", b"BM" + bytes(12)), DataError),
    ("unknown-suffix", lambda t, c: _write(t, "notes.docx", b"PK\x03\x04 zip"), DataError),
    ("dicom-without-pixels", lambda t, c: _dicom(t, "report.dcm", None), DataError),
    ("dicom-short-pixel-data", lambda t, c: _dicom(t, "short.dcm", bytes(10), 64, 64), DataError),
    ("dicom-truncated", _dicom_truncated, DataError),
    ("non-dicom-dcm", lambda t, c: _write(t, "fake.dcm", b"hello, not DICOM\n" * 40), DataError),
    ("dicom-preamble-only", lambda t, c: _write(t, "pre.dcm", bytes(128) + b"DICM"), DataError),
    ("dicom-zero-rows", lambda t, c: _dicom(t, "zero.dcm", b"", 0, 0), DataError),
    ("dicom-frames-not-a-number", lambda t, c: _dicom(t, "nf.dcm", bytes(64 * 64), 64, 64, NumberOfFrames="abc"),
     DataError),
    ("dicom-frames-too-many", lambda t, c: _dicom(t, "nf2.dcm", bytes(64 * 64), 64, 64, NumberOfFrames="5000"),
     DataError),
    ("dicom-pixel-spacing-text", lambda t, c: _dicom(t, "ps.dcm", bytes(64 * 64), 64, 64, PixelSpacing="a\\b"),
     DataError),
    ("dicom-frame-time-text", lambda t, c: _dicom(t, "ft.dcm", bytes(64 * 64), 64, 64, FrameTime="fast"), DataError),
    ("dicom-window-text", lambda t, c: _dicom(t, "w.dcm", bytes(64 * 64 * 2), 64, 64, BitsAllocated=None,
                                              WindowCenter="mid", WindowWidth="wide"), DataError),
    ("tiff-float-nan", lambda t, c: _tiff(t, np.full((64, 64), np.nan, np.float32)), DataError),
    ("tiff-float-inf", lambda t, c: _tiff(t, np.where(np.eye(64) > 0, np.inf, 1.0).astype(np.float32)), DataError),
]


def _save(tmp: Path, name: str, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(tmp / name)
    return tmp / name


def _tiff(tmp: Path, arr: np.ndarray) -> Path:
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp / "f.tif", arr)
    return tmp / "f.tif"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.open(REAL_PNG).convert("L").save(buf, "JPEG")
    return buf.getvalue()


# -- frames ------------------------------------------------------------------------------------------------------
def _frame(arr_fn):
    return lambda t, c: arr_fn(c["frame"])


FRAME_CASES = [
    ("object-array", _frame(lambda f: f.astype(object)), InputError),
    ("nan-float", _frame(lambda f: np.where(f > 100, np.nan, f.astype(np.float32))), InputError),
    ("inf-float", _frame(lambda f: np.full(f.shape, np.inf, np.float64)), InputError),
    ("4-d", _frame(lambda f: f[None, :, :, None]), InputError),
    ("empty", _frame(lambda f: np.zeros((0, 0), np.uint8)), InputError),
    ("1xN", _frame(lambda f: f[:1]), InputError),
    ("Nx1", _frame(lambda f: f[:, :1]), InputError),
    ("bool", _frame(lambda f: f > 100), InputError),
    ("complex", _frame(lambda f: f.astype(np.complex64)), InputError),
    ("strings", _frame(lambda f: np.full((64, 64), "a")), InputError),
    ("bytes-array", _frame(lambda f: np.full((64, 64), b"a")), InputError),
    ("0-d", _frame(lambda f: np.uint8(7)), InputError),
    ("5-channels", _frame(lambda f: np.repeat(f[..., None], 5, axis=2)), InputError),
    ("negative-int", _frame(lambda f: f.astype(np.int16) - 300), InputError),
    ("none", _frame(lambda f: None), InputError),
    ("ragged-list", _frame(lambda f: [[1, 2, 3], [4, 5]]), InputError),
    ("huge-side-no-memory", _frame(lambda f: np.broadcast_to(np.uint8(0), (200_000, 200_000))), InputError),
    ("2-channels", _frame(lambda f: np.dstack([f, f])), InputError),
    ("pil-image", _frame(lambda f: Image.fromarray(f)), InputError),
    ("png-bytes", _frame(lambda f: REAL_PNG.read_bytes()), InputError),
    ("uint16", _frame(lambda f: f.astype(np.uint16) * 200), InputError),
    ("datetime", _frame(lambda f: np.zeros((64, 64), "datetime64[s]")), InputError),
    ("rgb-float-nan", _frame(lambda f: np.dstack([f.astype(np.float32)] * 3) * np.nan), InputError),
    ("structured-dtype", _frame(lambda f: np.zeros((64, 64), dtype=[("a", np.uint8), ("b", np.uint8)])),
     InputError),
]


# -- bundles -----------------------------------------------------------------------------------------------------
def _bundle(edit, resum: bool = True):
    def build(tmp, ctx):
        p = Path(shutil.copytree(ctx["bundle"], tmp / "b.usfm"))
        edit(p)
        if resum:
            _resum(p)
        return p

    return build


def _resum(p: Path) -> None:
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.iterdir())
            if f.is_file() and f.name not in ("SHA256SUMS", "model.engine", "SIGNATURE")}
    (p / "SHA256SUMS").write_text(format_sums(sums))


def _meta(p: Path, fn) -> None:
    d = json.loads((p / "usfm.json").read_text())
    fn(d)
    (p / "usfm.json").write_text(json.dumps(d))


def _setitem(d, k, v):
    d[k] = v


def _bundle_file_is_folder(tmp, ctx):
    return _write(tmp, "file.usfm", b"not a folder")


BUNDLE_CASES = [
    ("missing-usfm-json", _bundle(lambda p: (p / "usfm.json").unlink()), BundleError),
    ("usfm-json-not-json", _bundle(lambda p: (p / "usfm.json").write_text("{not json")), BundleError),
    ("usfm-json-empty", _bundle(lambda p: (p / "usfm.json").write_bytes(b"")), BundleError),
    ("usfm-json-array", _bundle(lambda p: (p / "usfm.json").write_text("[1, 2, 3]")), BundleError),
    ("usfm-json-null", _bundle(lambda p: (p / "usfm.json").write_text("null")), BundleError),
    ("usfm-json-deeply-nested", _bundle(lambda p: (p / "usfm.json").write_text("[" * 100_000 + "]" * 100_000)),
     BundleError),
    ("usfm-json-latin1", _bundle(lambda p: (p / "usfm.json").write_bytes(b'{"task": "s\xe9g"}')), BundleError),
    ("schema-version-string", _bundle(lambda p: _meta(p, lambda d: _setitem(d, "schema_version", "1"))), BundleError),
    ("schema-version-newer", _bundle(lambda p: _meta(p, lambda d: _setitem(d, "schema_version", 999))), BundleError),
    ("schema-version-huge", _bundle(lambda p: _meta(p, lambda d: _setitem(d, "schema_version", 10 ** 400))),
     BundleError),
    ("files-not-a-dict", _bundle(lambda p: _meta(p, lambda d: _setitem(d, "files", ["model.onnx"]))), BundleError),
    ("files-path-outside", _bundle(lambda p: _meta(p, lambda d: d["files"].update(onnx="../model.onnx"))),
     BundleError),
    ("labels-not-a-list", _bundle(lambda p: _meta(p, lambda d: _setitem(d, "labels", 7))), BundleError),
    ("empty-sums", _bundle(lambda p: (p / "SHA256SUMS").write_bytes(b""), resum=False), BundleError),
    ("missing-sums", _bundle(lambda p: (p / "SHA256SUMS").unlink(), resum=False), BundleError),
    ("sums-bad-line", _bundle(lambda p: open(p / "SHA256SUMS", "a").write("zz  model.onnx extra\n"), resum=False),
     BundleError),
    ("sums-path-traversal", _bundle(lambda p: open(p / "SHA256SUMS", "a").write("0" * 64 + "  ../etc/passwd\n"),
                                    resum=False), BundleError),
    ("listed-file-missing", _bundle(lambda p: open(p / "SHA256SUMS", "a").write("0" * 64 + "  gone.bin\n"),
                                    resum=False), BundleError),
    ("extra-unlisted-file", _bundle(lambda p: (p / "extra.txt").write_text("hi"), resum=False), BundleError),
    ("tampered-model", _bundle(lambda p: open(p / "model.onnx", "ab").write(b"\0"), resum=False), BundleError),
    ("onnx-random-bytes-matching-sums", _bundle(lambda p: (p / "model.onnx").write_bytes(
        np.random.default_rng(2).bytes(8192))), BundleError),
    ("onnx-empty-matching-sums", _bundle(lambda p: (p / "model.onnx").write_bytes(b"")), BundleError),
    ("onnx-truncated-matching-sums", _bundle(lambda p: (p / "model.onnx").write_bytes(
        (p / "model.onnx").read_bytes()[:5000])), BundleError),
    ("onnx-valid-protobuf-not-a-model", _bundle(lambda p: (p / "model.onnx").write_bytes(b"\x08\x07")), BundleError),
    ("usfm-json-5000-digit-int", _bundle(lambda p: (p / "usfm.json").write_text(
        '{"schema_version": ' + "9" * 5000 + "}")), BundleError),
    ("usfm-json-bom", _bundle(lambda p: (p / "usfm.json").write_bytes(b"\xef\xbb\xbf" + (p / "usfm.json").read_bytes())),
     BundleError),
    ("usfm-json-nan-version", _bundle(lambda p: _meta(p, lambda d: _setitem(d, "schema_version", float("nan")))),
     BundleError),
    ("signature-folder", _bundle(lambda p: (p / "SIGNATURE").mkdir()), BundleError),
    ("bundle-is-a-file", _bundle_file_is_folder, BundleError),
    ("bundle-missing", lambda t, c: t / "nothing.usfm", BundleError),
]


# -- checkpoints -------------------------------------------------------------------------------------------------
def _safetensors(tensors: dict, metadata: dict | None = None) -> bytes:
    header, blobs, off = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for k, arr in tensors.items():
        data = np.ascontiguousarray(arr, np.float32).tobytes()
        header[k] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [off, off + len(data)]}
        blobs += data
        off += len(data)
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + blobs


def _task_checkpoint(tmp, ctx, **config):
    """A real task checkpoint (seg, usfm_vit_test) whose stored config was edited."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from usfm_edge.models.tasks import build_task_model, save_task_checkpoint

    p = tmp / "seg.safetensors"
    save_task_checkpoint(build_task_model("seg", "usfm_vit_test", img_size=S), p)
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["__metadata__"]
    cfg = json.loads(meta["usfm_edge"])
    cfg.update(config)
    meta["usfm_edge"] = json.dumps(cfg)
    save_file({k: v.contiguous() for k, v in load_file(str(p)).items()}, str(p), metadata=meta)
    assert torch is not None
    return p


def _zip_not_torch(tmp, ctx):
    p = tmp / "notes.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "a zip archive, not a torch checkpoint")
    return p


def _torch_save(name, obj_fn):
    def build(tmp, ctx):
        torch = pytest.importorskip("torch")
        p = tmp / name
        torch.save(obj_fn(torch), p)
        return p

    return build


EXEC_PICKLE = b"\x80\x02cbuiltins\nexec\nq\x00X\x0b\x00\x00\x00print(\"hi\")q\x01\x85q\x02Rq\x03."

CHECKPOINT_CASES = [
    ("empty-pth", lambda t, c: _write(t, "e.pth", b""), CheckpointError),
    ("empty-safetensors", lambda t, c: _write(t, "e.safetensors", b""), CheckpointError),
    ("text-pth", lambda t, c: _write(t, "t.pth", b"model weights go here\n"), CheckpointError),
    ("random-bytes-pth", lambda t, c: _write(t, "r.pth", np.random.default_rng(3).bytes(4096)), CheckpointError),
    ("random-bytes-safetensors", lambda t, c: _write(t, "r.safetensors", np.random.default_rng(4).bytes(4096)),
     CheckpointError),
    ("truncated-safetensors", lambda t, c: _write(t, "cut.safetensors",
                                                  _safetensors({"w": np.ones((64, 64))})[:300]), CheckpointError),
    ("safetensors-header-not-json", lambda t, c: _write(t, "h.safetensors", struct.pack("<Q", 6) + b"{oops}"),
     CheckpointError),
    ("safetensors-huge-header-length", lambda t, c: _write(t, "big.safetensors", struct.pack("<Q", 2 ** 62) + b"{}"),
     CheckpointError),
    ("safetensors-wrong-keys", lambda t, c: _write(t, "wk.safetensors", _safetensors({"foo.bar": np.ones((3, 3))})),
     ExportError),
    ("pickle-with-exec", lambda t, c: _write(t, "evil.pth", EXEC_PICKLE), CheckpointError),
    ("zip-not-torch", _zip_not_torch, CheckpointError),
    ("torch-list-not-dict", _torch_save("list.pth", lambda torch: [torch.zeros(2)]), CheckpointError),
    ("torch-wrong-keys", _torch_save("wk.pth", lambda torch: {"foo": torch.zeros(2)}), ExportError),
    ("training-state-checkpoint-pt", _torch_save("checkpoint.pt", lambda torch: {
        "format": "usfm_edge.train_state/1", "model": {"w": torch.zeros(2)}, "epoch": 3}), ExportError),
    ("checkpoint-missing", lambda t, c: t / "nope.safetensors", CheckpointError),
    ("safetensors-config-not-json", lambda t, c: _write(t, "cfg.safetensors", _safetensors(
        {"w": np.ones(2)}, {"usfm_edge": "{not json"})), CheckpointError),
    ("safetensors-config-a-list", lambda t, c: _write(t, "cfgl.safetensors", _safetensors(
        {"w": np.ones(2)}, {"usfm_edge": "[1, 2]"})), CheckpointError),
    ("task-config-without-model", lambda t, c: _write(t, "task.safetensors", _safetensors(
        {"w": np.ones(2)}, {"usfm_edge": json.dumps({"task": "seg", "format": "usfm_edge.task/1"})})), UsfmEdgeError),
    ("task-config-unknown-preset", lambda t, c: _task_checkpoint(t, c, model="no_such_vit", model_args=None),
     CheckpointError),
    ("task-config-img-size-text", lambda t, c: _task_checkpoint(t, c, img_size="big"), CheckpointError),
    ("task-config-head-args-list", lambda t, c: _task_checkpoint(t, c, head_args=[1, 2]), CheckpointError),
    ("task-config-model-args-text", lambda t, c: _task_checkpoint(t, c, model_args="wide"), CheckpointError),
    ("task-checkpoint-weights-of-another-size", lambda t, c: _task_checkpoint(t, c, img_size=128), UsfmEdgeError),
    ("checkpoint-is-folder", lambda t, c: (t / "d.pth").mkdir() or t / "d.pth", CheckpointError),
]


# -- CLI ---------------------------------------------------------------------------------------------------------
def _cli_predict_bad_bundle(tmp, ctx):
    p = _bundle(lambda p: (p / "usfm.json").write_text("[]"))(tmp, ctx)
    return ["predict", p, REAL_PNG, "--out", tmp / "out"], 1


def _cli_predict_tiny_png(tmp, ctx):
    return ["predict", ctx["bundle"], _png_1x1(tmp, ctx), "--out", tmp / "out"], 1


def _cli_predict_text_png(tmp, ctx):
    return ["predict", ctx["bundle"], _write(tmp, "t.png", b"text"), "--out", tmp / "out"], 1


def _cli_export_text_checkpoint(tmp, ctx):
    return ["export", _write(tmp, "t.pth", b"not weights\n"), "--target", "onnx", "-o", tmp / "x.usfm"], 1


def _cli_export_training_state(tmp, ctx):
    p = _torch_save("checkpoint.pt", lambda torch: {"format": "usfm_edge.train_state/1", "model": {}})(tmp, ctx)
    return ["export", p, "--target", "onnx", "-o", tmp / "x.usfm"], 1


def _cli_sign_with_public_key(tmp, ctx):
    pytest.importorskip("cryptography")
    from usfm_edge.runtime.signing import generate_keypair

    _, pub = generate_keypair(tmp / "k")
    b = Path(shutil.copytree(ctx["bundle"], tmp / "b.usfm"))
    return ["sign", b, "--key", pub], 1


def _cli_predict_trusted_key_not_pem(tmp, ctx):
    pytest.importorskip("cryptography")
    return ["predict", ctx["bundle"], REAL_PNG, "--out", tmp / "out", "--trusted-key",
            _write(tmp, "k.pub", b"not a key")], 1


def _cli_sign_tampered_bundle(tmp, ctx):
    pytest.importorskip("cryptography")
    from usfm_edge.runtime.signing import generate_keypair

    key, _ = generate_keypair(tmp / "k")
    b = _bundle(lambda p: open(p / "model.onnx", "ab").write(b"\0"), resum=False)(tmp, ctx)
    return ["sign", b, "--key", key], 1  # a tampered bundle is never signed


def _cli_name_map_without_anonymize(tmp, ctx):
    return ["predict", ctx["bundle"], REAL_PNG, "--out", tmp / "out", "--name-map", tmp / "map.json"], 2


def _cli_evaluate_trusted_key_on_unsigned(tmp, ctx):
    pytest.importorskip("cryptography")
    from usfm_edge.runtime.signing import generate_keypair

    _, pub = generate_keypair(tmp / "k")
    return ["evaluate", ctx["bundle"], "--data", f"busbra:{SAMPLE / 'busbra'}", "--trusted-key", pub], 1


CLI_CASES = [
    ("sign-tampered-bundle", _cli_sign_tampered_bundle, None),
    ("predict-name-map-without-anonymize", _cli_name_map_without_anonymize, None),
    ("evaluate-trusted-key-unsigned", _cli_evaluate_trusted_key_on_unsigned, None),
    ("predict-bundle-json-array", _cli_predict_bad_bundle, None),
    ("predict-1x1-png", _cli_predict_tiny_png, None),
    ("predict-text-png", _cli_predict_text_png, None),
    ("export-text-checkpoint", _cli_export_text_checkpoint, None),
    ("export-training-state", _cli_export_training_state, None),
    ("sign-with-public-key", _cli_sign_with_public_key, None),
    ("predict-trusted-key-not-pem", _cli_predict_trusted_key_not_pem, None),
]

CASES = ([("file", *c) for c in FILE_CASES] + [("frame", *c) for c in FRAME_CASES]
         + [("bundle", *c) for c in BUNDLE_CASES] + [("checkpoint", *c) for c in CHECKPOINT_CASES]
         + [("cli", *c) for c in CLI_CASES])
XFAIL: dict[str, str] = {}  # case id -> reason (strict): a known gap still to fix


# -- fixtures and the runner -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    bundle = export_test_seg(tmp_path_factory.mktemp("corpus"))["onnx"]
    engine = Engine.open(bundle)
    yield {"bundle": bundle, "engine": engine, "frame": np.asarray(Image.open(REAL_PNG).convert("L"))}
    engine.close()


def _params():
    for target, cid, build, expected in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[cid])] if cid in XFAIL else []
        yield pytest.param(target, build, expected, id=f"{target}-{cid}", marks=marks)


def test_corpus_is_large_enough():
    assert len(CASES) >= 50
    assert len({(t, c) for t, c, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("target,build,expected", list(_params()))
def test_malformed_input_gives_a_typed_error(ctx, tmp_path, target, build, expected):
    made = build(tmp_path, ctx)
    if target == "cli":
        args, code = made
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-c", "from usfm_edge.cli import main; main()", *map(str, args)],
                           capture_output=True, text=True, timeout=300, env=env)
        assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
        assert r.returncode == code, (r.returncode, r.stderr[-2000:])
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert lines and lines[-1].startswith("error: "), r.stderr[-2000:]
        return
    if expected is None:  # an odd but valid input: read and predicted
        ctx["engine"].predict(made)
        return
    with pytest.raises(UsfmEdgeError) as err:
        if target in ("file", "frame"):
            ctx["engine"].predict(made)
        elif target == "bundle":
            Engine.open(made).close()
        elif target == "checkpoint":
            from usfm_edge.export.exporter import load_for_export

            load_for_export(made)
    assert isinstance(err.value, expected), f"{type(err.value).__name__}: {err.value}"
    if target == "frame":  # the engine stays usable
        assert ctx["engine"].predict(ctx["frame"]).mask.shape == ctx["frame"].shape
