"""Readers on real bundled frames and on real malformed files written into tmp_path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usfm_edge.core.errors import DataError
from usfm_edge.data.readers import DicomFrames, is_dicom, iter_frames, read_dicom, read_image, read_mask


@pytest.fixture(scope="module")
def png_path(sample_dir) -> Path:
    return sorted((sample_dir / "busbra" / "Images").glob("*.png"))[0]


@pytest.fixture(scope="module")
def frame(png_path) -> np.ndarray:
    return np.asarray(Image.open(png_path).convert("L"))


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    """Write a real DICOM Part 10 file (explicit VR little endian) with pydicom."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    colour = photometric in ("RGB", "YBR_FULL")
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        bits,
        tags.pop("BitsStored", bits),
        bits - 1,
        0,
    )
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixels.size:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ---- real images -----------------------------------------------------------------------------------------


def test_png_is_read_as_uint8_grey(png_path, frame):
    img = read_image(png_path)
    assert img.dtype == np.uint8 and img.shape == frame.shape and img.flags.c_contiguous
    np.testing.assert_array_equal(img, frame)
    assert [i for i, _ in iter_frames(png_path)] == [0]


def test_rgb_jpeg_comes_back_grey(tmp_path, frame):
    rgb = np.stack([frame, frame, frame], axis=-1)
    path = tmp_path / "frame.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == frame.shape
    assert np.abs(img.astype(int) - frame).mean() < 2.0


@pytest.mark.parametrize("mode", ["RGBA", "P", "1", "BMP"])
def test_colour_palette_and_bilevel_images_become_grey(tmp_path, frame, mode):
    if mode == "BMP":
        path = tmp_path / "frame.bmp"
        Image.fromarray(np.stack([frame] * 3, -1)).save(path)
        np.testing.assert_array_equal(read_image(path), frame)
        return
    img = Image.fromarray(frame).convert(mode)
    path = tmp_path / f"frame_{mode}.png"
    img.save(path)
    out = read_image(path)
    assert out.shape == frame.shape and out.dtype == np.uint8
    if mode == "RGBA":  # grey replicated into RGB: luma gives the frame back exactly
        np.testing.assert_array_equal(out, frame)
    elif mode == "1":
        assert set(np.unique(out)) <= {0, 255}


def test_16bit_tiff_is_mapped_by_bit_depth(tmp_path, frame):
    import tifffile

    deep = frame.astype(np.uint16) * 40 + 1000  # 1000..11200: far from the full 16-bit range
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, deep)
    img = read_image(path)
    expected = np.rint(deep * 255.0 / 65535.0).astype(np.uint8)  # never stretched from the file's min/max
    assert img.dtype == np.uint8
    np.testing.assert_array_equal(img, expected)


def test_same_frame_in_8_and_16_bit_reads_the_same(tmp_path, frame):
    """A 16-bit PNG of a frame (v * 257, the usual widening) reads back as the 8-bit frame: lesion areas do not
    depend on the file's bit depth (the old per-file min/max stretch doubled a dark lesion's area)."""
    import warnings

    from usfm_edge.data import readers

    dark = (frame // 3).astype(np.uint8)  # a frame that does not fill the range
    Image.fromarray(dark).save(tmp_path / "f8.png")
    Image.fromarray(dark.astype(np.uint16) * 257).save(tmp_path / "f16.png")
    readers._NOTED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = read_image(tmp_path / "f8.png"), read_image(tmp_path / "f16.png")
        read_image(tmp_path / "f16.png")
    np.testing.assert_array_equal(a, b)
    notes = [w for w in caught if "bit depth" in str(w.message)]
    assert len(notes) == 1 and "f16.png" in str(notes[0].message)  # said once, naming the first file


def test_float_tiff_by_range_and_unknown_scale_refused(tmp_path, frame):
    import tifffile

    unit = frame.astype(np.float32) / 255.0
    tifffile.imwrite(tmp_path / "unit.tif", unit)
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tif"), frame)
    tifffile.imwrite(tmp_path / "wide.tif", unit * 1000.0)
    err = _raises(tmp_path / "wide.tif")
    assert "scale is unknown" in err.message


def test_16bit_png_and_multipage_tiff(tmp_path, frame):
    import tifffile

    path = tmp_path / "deep.png"
    deep = frame.astype(np.uint16) * 256 + 7
    Image.fromarray(deep).save(path)
    np.testing.assert_array_equal(read_image(path), np.rint(deep * 255.0 / 65535.0).astype(np.uint8))
    stack = np.stack([frame, 255 - frame, frame // 2, frame])
    tifffile.imwrite(tmp_path / "cine.tif", stack, photometric="minisblack")
    frames = list(iter_frames(tmp_path / "cine.tif"))
    assert [i for i, _ in frames] == [0, 1, 2, 3]
    np.testing.assert_array_equal(frames[1][1], 255 - frame)


# ---- errors ----------------------------------------------------------------------------------------------


def _raises(path: Path, func=read_image) -> DataError:
    with pytest.raises(DataError) as info:
        func(path)
    assert info.value.path == Path(path) and str(path) in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    assert _raises(tmp_path / "nope.png").hint


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in _raises(tmp_path / "empty.png").message


def test_truncated_png(tmp_path, png_path):
    data = png_path.read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    assert "truncated" in _raises(tmp_path / "half.png").message


def test_truncated_jpeg(tmp_path, frame):
    path = tmp_path / "full.jpg"
    Image.fromarray(frame).save(path, quality=90)
    data = path.read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    _raises(tmp_path / "half.jpg")


def test_text_file_named_dcm(tmp_path):
    (tmp_path / "notes.dcm").write_text("patient was scanned twice\n" * 20)
    err = _raises(tmp_path / "notes.dcm")
    assert "DICOM" in err.message and err.hint
    _raises(tmp_path / "notes.dcm", read_dicom)


def test_unsupported_extension_and_garbage(tmp_path, png_path):
    (tmp_path / "frame.gif").write_bytes(png_path.read_bytes())
    assert "unsupported" in _raises(tmp_path / "frame.gif").message
    (tmp_path / "noise.png").write_bytes(bytes(range(256)) * 4)
    _raises(tmp_path / "noise.png")


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", np.zeros((0, 0), np.uint8))
    assert "pixel data" in _raises(path).message


def test_truncated_dicom_pixel_data(tmp_path, frame):
    path = write_dicom(tmp_path / "cut.dcm", np.stack([frame] * 3), NumberOfFrames=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - frame.size])
    _raises(path, read_dicom)


# ---- DICOM -----------------------------------------------------------------------------------------------


def test_multiframe_dicom_monochrome2(tmp_path, frame):
    crop = frame[:96, :128]
    cine = np.stack([crop, 255 - crop, crop // 2])
    path = write_dicom(
        tmp_path / "cine.dcm",
        cine,
        PatientName="Doe^Jane",
        PatientID="SECRET-42",
        PixelSpacing=[0.1, 0.12],
        FrameTime=33.3,
    )
    out = read_dicom(path)
    assert isinstance(out, DicomFrames) and out.frames.shape == (3, 96, 128) and out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.frames, cine)
    assert out.pixel_spacing_mm == pytest.approx((0.1, 0.12)) and out.frame_time_ms == pytest.approx(33.3)
    assert out.photometric == "MONOCHROME2"
    text = repr(out) + str(vars(out))
    assert "Doe" not in text and "SECRET" not in text and "Patient" not in text
    np.testing.assert_array_equal(read_image(path), crop)
    assert [i for i, _ in iter_frames(path)] == [0, 1, 2]


def test_dicom_detected_by_content_without_suffix(tmp_path, frame):
    path = write_dicom(tmp_path / "IM0001", frame[:64, :64])
    assert is_dicom(path)
    np.testing.assert_array_equal(read_image(path), frame[:64, :64])


def test_monochrome1_is_inverted(tmp_path, frame):
    path = write_dicom(tmp_path / "m1.dcm", frame, photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_image(path), 255 - frame)


def test_rgb_and_ybr_dicom_become_luma(tmp_path, frame):
    from pydicom.pixels import convert_color_space

    crop = frame[:80, :80].astype(np.int16)
    rgb = np.clip(np.stack([crop + 20, crop, crop - 20], -1), 0, 255).astype(np.uint8)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    out = read_image(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert out.shape == (80, 80) and np.abs(out - luma).max() <= 0.51
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = read_dicom(write_dicom(tmp_path / "ybr.dcm", np.stack([ybr, ybr]), photometric="YBR_FULL", NumberOfFrames=2))
    assert out.frames.shape == (2, 80, 80) and np.abs(out.frames[0] - luma).max() <= 2.0


def test_deep_dicom_windowing_and_region_spacing(tmp_path, frame):
    from pydicom.dataset import Dataset

    deep = frame.astype(np.uint16) * 16  # 12-bit data
    region = Dataset()
    region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3
    region.PhysicalDeltaX, region.PhysicalDeltaY = 0.012, 0.01  # cm per pixel
    path = write_dicom(tmp_path / "deep.dcm", deep, BitsStored=12, SequenceOfUltrasoundRegions=[region])
    out = read_dicom(path)
    assert out.pixel_spacing_mm == pytest.approx((0.1, 0.12))
    # no window: mapped by BitsStored (12 bit), not stretched from the file's min/max
    np.testing.assert_array_equal(out.frames[0], np.rint(deep * 255.0 / 4095.0).astype(np.uint8))
    windowed = read_dicom(write_dicom(tmp_path / "win.dcm", deep, BitsStored=12, WindowCenter=2048, WindowWidth=4096))
    expected = np.clip(np.rint(((deep - 2047.5) / 4095 + 0.5) * 255), 0, 255)
    np.testing.assert_array_equal(windowed.frames[0], expected)


# ---- masks -----------------------------------------------------------------------------------------------


def test_read_mask_binary_and_labels(tmp_path, sample_dir, png_path):
    mask_path = sample_dir / "busbra" / "Masks" / png_path.name.replace("bus_", "mask_")
    mask = read_mask(mask_path)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask.shape == read_image(png_path).shape
    assert read_mask(mask_path, size=(64, 48)).shape == (64, 48)
    labels = np.zeros((40, 40), np.uint8)
    labels[5:15], labels[20:30] = 1, 3
    Image.fromarray(labels).save(tmp_path / "labels.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.png"), labels)
    assert set(np.unique(read_mask(tmp_path / "labels.png", size=(17, 23)))) == {0, 1, 3}


def test_readers_import_keeps_torch_out():
    code = "import sys, usfm_edge.data.readers, usfm_edge.data; sys.exit('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
