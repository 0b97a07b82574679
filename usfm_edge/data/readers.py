"""Read ultrasound frames from PNG, JPEG, BMP, TIFF and DICOM files as uint8 grey arrays.

Everything returned is a ``uint8`` array in row-major (H, W) layout (or (N, H, W) for DICOM cine), whatever the
file held. The rules:

* colour (RGB, RGBA, palette, YCbCr, DICOM RGB / YBR_FULL / YBR_FULL_422 / PALETTE COLOR) becomes grey with
  ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (alpha is dropped);
* samples deeper than 8 bit are mapped by their **bit depth**, never by the file's own min/max (which would
  make the same anatomy brighter or darker from file to file, and a lesion's area depend on the export):
  16-bit PNG/TIFF ``v * 255 / 65535`` (a TIFF's BitsPerSample, e.g. 12, sets the full scale when it is below
  the container's), float samples in [0, 1] times 255, float samples in [0, 255] as they are (anything
  else is refused: its scale is unknown). The first rescaled frame of a process says so once (a warning);
* DICOM with BitsStored > 8 is windowed with WindowCenter/WindowWidth when present, else mapped by BitsStored
  (``v * 255 / (2**BitsStored - 1)``; signed data from its lowest value); MONOCHROME1 is inverted so that bright
  always means echo.

Patient tags (PatientName, PatientID, ...) are never copied into anything returned, logged or raised.
Failures raise :class:`usfm_edge.core.errors.DataError` naming the file and a fix; half-read data is never
returned. This module imports numpy and Pillow only; pydicom and tifffile are imported inside the functions
that need them, and torch never (the torch-free runtime uses these readers).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from usfm_edge.core.errors import DataError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES + DICOM_SUFFIXES
_LUMA = np.array([0.299, 0.587, 0.114], np.float64)
_FORMATS_HINT = "supported: " + ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES) + " (DICOM also without suffix)"


@dataclass(frozen=True, repr=False)
class DicomFrames:
    """Pixel data of one DICOM file, without any patient information.

    Attributes:
        frames: uint8 array (N, H, W); N = 1 for a single-frame image.
        pixel_spacing_mm: (row, column) spacing in mm, or None when the file does not record it.
        frame_time_ms: time between cine frames in ms, or None.
        photometric: the file's PhotometricInterpretation (e.g. ``MONOCHROME2``, ``YBR_FULL_422``).
    """

    frames: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    frame_time_ms: float | None
    photometric: str

    def __repr__(self) -> str:
        n, h, w = self.frames.shape
        return (
            f"DicomFrames(frames=<{n}x{h}x{w} uint8>, pixel_spacing_mm={self.pixel_spacing_mm}, "
            f"frame_time_ms={self.frame_time_ms}, photometric={self.photometric!r})"
        )


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path, hint="check the path and the current directory")
    if not path.is_file():
        raise DataError("not a regular file", path=path, hint="give an image or DICOM file, not a folder")
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", path=path, hint="the copy or export was interrupted; copy it again")
    return path


def is_dicom(path: str | Path) -> bool:
    """Tell whether a file is DICOM, by its 'DICM' magic at offset 128 or its .dcm/.dicom suffix.

    Args:
        path: file to test (it is not required to exist when the suffix decides).

    Returns:
        True for DICOM files.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


_NOTED: set[str] = set()


def _note_rescale(kind: str, path: Path | None) -> None:
    """Warn once per process and kind of rescaling (16-bit, float, n-bit DICOM...)."""
    if kind in _NOTED:
        return
    _NOTED.add(kind)
    import warnings

    where = f" (first seen in {path.name})" if path is not None else ""
    warnings.warn(f"{kind} samples are mapped to 8 bit by their bit depth{where}", UserWarning, stacklevel=3)


def to_uint8(arr: np.ndarray, bits: int | None = None, path: Path | None = None) -> np.ndarray:
    """Map an array to uint8 by its bit depth (see the module doc); uint8 passes through unchanged.

    Args:
        arr: integer, float or bool array of any shape.
        bits: significant bits of integer samples (e.g. DICOM BitsStored, TIFF BitsPerSample); default the
            dtype's width.
        path: the file, named in the one-time warning and in errors.

    Returns:
        uint8 array of the same shape.

    Raises:
        DataError: float samples outside [0, 255], or NaN/inf values.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    if arr.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise DataError("image holds NaN or infinite samples", path=path, hint="export the frame again")
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo < 0.0 or hi > 255.0:
            raise DataError(f"float samples span [{lo:g}, {hi:g}]: not [0, 1] nor [0, 255], so their scale is "
                            "unknown", path=path, hint="save the frame as 8- or 16-bit integers")
        scale = 255.0 if hi <= 1.0 else 1.0
        _note_rescale("float [0, 1]" if scale == 255.0 else "float [0, 255]", path)
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    info = np.iinfo(arr.dtype)
    nbits = int(bits) if bits else info.bits
    if not 1 <= nbits <= info.bits:
        nbits = info.bits
    lo = float(-(2 ** (nbits - 1))) if info.min < 0 else 0.0
    full = float(2 ** nbits - 1)
    _note_rescale(f"{nbits}-bit {'signed' if lo < 0 else 'unsigned'}", path)
    return np.clip(np.rint((a - lo) * (255.0 / full)), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3 or 4) colour array -> (...) grey float64 with BT.601 weights (alpha ignored)."""
    return rgb[..., :3].astype(np.float64) @ _LUMA


def _grey_from_pil(img: Image.Image, path: Path | None = None) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return to_uint8(np.asarray(img).astype(np.uint16), path=path)
    if mode in ("I", "F"):  # Pillow opens 16-bit PNGs as mode I (int32): their depth is 16
        arr = np.asarray(img)
        if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
            arr = arr.astype(np.uint16)
        return to_uint8(arr, path=path)
    # 1, P, PA, LA, RGB, RGBA, CMYK, YCbCr, ...: Pillow's own BT.601 luma conversion (alpha dropped)
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _read_pil_frames(path: Path) -> list[np.ndarray]:
    try:
        with Image.open(path) as img:
            frames = []
            for i in range(getattr(img, "n_frames", 1)):
                img.seek(i)
                img.load()  # force the full decode so a truncated file fails here, not later
                frames.append(_grey_from_pil(img, path))
            return frames
    except UnidentifiedImageError as exc:
        raise DataError("not a readable image (unknown or corrupt header)", path=path, hint=_FORMATS_HINT) from exc
    except Image.DecompressionBombError as exc:
        raise DataError(f"image is implausibly large: {exc}", path=path, hint="is this really a frame?") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(
            f"image is truncated or corrupt ({exc})", path=path, hint="copy the file again from its source"
        ) from exc


def _read_tiff_frames(path: Path) -> list[np.ndarray]:
    try:
        import tifffile
    except ImportError:  # Pillow reads most 8/16-bit TIFFs too
        return _read_pil_frames(path)
    bits = None
    try:
        with tifffile.TiffFile(path) as tif:
            pages = []
            for page in tif.pages:
                arr = page.asarray()
                bits = int(getattr(page, "bitspersample", 0) or 0) or None
                if arr.ndim == 3 and arr.shape[-1] not in (3, 4) and arr.shape[0] in (3, 4):
                    arr = np.moveaxis(arr, 0, -1)  # planar RGB
                if arr.ndim == 3 and arr.shape[-1] in (3, 4):
                    arr = np.rint(_luma(arr)).astype(arr.dtype) if arr.dtype.kind in "ui" else _luma(arr)
                if arr.ndim != 2:
                    raise DataError(f"TIFF page has shape {arr.shape}; expected a 2-D grey or RGB frame", path=path)
                if int(getattr(page, "photometric", 1)) == 0:  # MINISWHITE
                    arr = arr.max() - arr if arr.dtype.kind == "f" else np.iinfo(arr.dtype).max - arr
                pages.append(arr)
    except DataError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise DataError(f"TIFF is truncated or corrupt ({exc})", path=path, hint="copy the file again") from exc
    if not pages:
        raise DataError("TIFF holds no pages", path=path)
    if pages[0].dtype == np.uint8:
        return pages
    return [to_uint8(p, bits=bits, path=path) for p in pages]


def _dicom_pixels(ds, path: Path) -> np.ndarray:
    """Decoded pixel array with colour already in RGB (pydicom 3 converts YBR itself; pydicom 2 does not)."""
    import pydicom

    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing decoder plugin, truncated PixelData, bad tags
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if getattr(syntax, "is_compressed", False):
            hint = f"install a decoder for {syntax.name}: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
        else:
            hint = "the pixel data does not match the header (truncated copy?): copy the file again"
        raise DataError(
            f"cannot decode the DICOM pixel data ({type(exc).__name__}: {exc})", path=path, hint=hint
        ) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:  # pydicom 2
            from pydicom.pixel_data_handlers.util import apply_color_lut
        arr = apply_color_lut(arr, ds)
    elif photometric.startswith("YBR") and int(pydicom.__version__.split(".")[0]) < 3:
        from pydicom.pixel_data_handlers.util import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
    return arr


def _first_value(value) -> float:
    return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)


def _window(arr: np.ndarray, ds, path: Path | None = None) -> np.ndarray:
    """> 8-bit samples to uint8: WindowCenter/Width (DICOM linear function) when present, else by BitsStored."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c, w = _first_value(center), _first_value(width)  # several windows may be listed: use the first
        if w >= 1:
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            y = ((arr.astype(np.float64) * slope + intercept - (c - 0.5)) / (w - 1) + 0.5) * 255.0
            return np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return to_uint8(arr, bits=int(ds.get("BitsStored", 0) or 0) or None, path=path)


def _spacing(ds) -> tuple[float, float] | None:
    ps = ds.get("PixelSpacing")
    if ps is not None and len(ps) == 2 and float(ps[0]) > 0 and float(ps[1]) > 0:
        return float(ps[0]), float(ps[1])
    for region in ds.get("SequenceOfUltrasoundRegions", []) or []:
        # PhysicalUnitsX/YDirection 3 = cm; PhysicalDeltaX/Y is the size of one pixel in those units
        if region.get("PhysicalUnitsXDirection") == 3 and region.get("PhysicalUnitsYDirection") == 3:
            dx, dy = float(region.get("PhysicalDeltaX", 0)), float(region.get("PhysicalDeltaY", 0))
            if dx > 0 and dy > 0:
                return abs(dy) * 10.0, abs(dx) * 10.0
    return None


def _frame_time(ds) -> float | None:
    if ds.get("FrameTime") is not None:
        return float(ds.FrameTime)
    for key in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = ds.get(key)
        if rate is not None and float(rate) > 0:
            return 1000.0 / float(rate)
    return None


def read_dicom(path: str | Path) -> DicomFrames:
    """Read every frame of a DICOM file (single image or cine loop) as uint8 grey.

    Args:
        path: the DICOM file (any suffix; detected by content or .dcm).

    Returns:
        DicomFrames with frames (N, H, W) uint8, pixel spacing in mm (PixelSpacing, or the ultrasound region's
        PhysicalDeltaX/Y converted from cm), frame time in ms and the photometric interpretation.

    Raises:
        DataError: missing/empty file, not DICOM, no pixel data, or undecodable pixel data.
    """
    path = _check_file(path)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise DataError("pydicom is needed to read DICOM", path=path, hint="pip install 'usfm-edge[dicom]'") from exc
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise DataError(
            "not a DICOM file (no 'DICM' marker at byte 128)", path=path, hint="export the image as DICOM Part 10"
        ) from exc
    except Exception as exc:
        raise DataError(f"DICOM is truncated or corrupt ({type(exc).__name__})", path=path) from exc
    if "PixelData" not in ds:
        raise DataError(
            "DICOM has no pixel data (a report, structured report or DICOMDIR?)",
            path=path,
            hint="give the image or cine file of the study",
        )
    try:
        return _dicom_frames(ds, path)
    except (ValueError, TypeError, OverflowError, IndexError, KeyError, AttributeError) as exc:
        # a header value a broken writer stored as text ('fast', 'a\\b') or out of range
        raise DataError(f"DICOM header value is malformed ({type(exc).__name__}: {exc})", path=path,
                        hint="the file was written by a non-conforming tool: export it again from the scanner") from exc


def _dicom_frames(ds, path: Path) -> DicomFrames:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    arr = _dicom_pixels(ds, path)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1)) > 1 or photometric == "PALETTE COLOR"
    if n_frames == 1:
        arr = arr[None]
    if colour:
        arr = _luma(arr)
        frames = (np.clip(np.rint(arr), 0, 255).astype(np.uint8) if arr.max() <= 255
                  else to_uint8(np.rint(arr).astype(np.uint16), bits=int(ds.get("BitsStored", 0) or 0) or None,
                                path=path))
    elif int(ds.get("BitsStored", 8)) > 8 or arr.dtype.itemsize > 1 or arr.dtype.kind == "f":
        frames = _window(arr, ds, path)
    else:
        frames = arr.astype(np.uint8)
    if photometric == "MONOCHROME1":
        frames = 255 - frames
    if frames.ndim != 3:
        raise DataError(f"unexpected DICOM pixel array shape {arr.shape}", path=path)
    return DicomFrames(np.ascontiguousarray(frames), _spacing(ds), _frame_time(ds), photometric)


def _frames(path: str | Path) -> list[np.ndarray] | np.ndarray:
    path = _check_file(path)
    suffix = path.suffix.lower()
    if is_dicom(path):
        return read_dicom(path).frames
    if suffix in TIFF_SUFFIXES:
        return _read_tiff_frames(path)
    if suffix in PIL_SUFFIXES or suffix == "":
        return _read_pil_frames(path)
    raise DataError(f"unsupported file type '{suffix}'", path=path, hint=_FORMATS_HINT)


def read_image(path: str | Path) -> np.ndarray:
    """Read one frame as a uint8 grey (H, W) array.

    PNG, JPEG, BMP, TIFF (8 or 16 bit; deeper samples mapped by their bit depth) and DICOM (first frame;
    use :func:`read_dicom` for all frames) are supported; colour becomes BT.601 luma.

    Args:
        path: the image file.

    Returns:
        C-contiguous uint8 array (H, W).

    Raises:
        DataError: missing, empty, truncated/corrupt or unsupported file.
    """
    return np.ascontiguousarray(_frames(path)[0])


def iter_frames(path: str | Path) -> Iterator[tuple[int, np.ndarray]]:
    """Yield every frame of a file: one for still images, all frames of a DICOM cine or multi-page TIFF.

    Args:
        path: any file :func:`read_image` supports.

    Yields:
        (index, uint8 (H, W) frame) pairs. The whole file is decoded before the first yield, so a corrupt file
        raises before any frame is produced.
    """
    for i, frame in enumerate(_frames(path)):
        yield i, np.ascontiguousarray(frame)


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a segmentation mask as uint8 labels.

    Rule: if any pixel is >= 128 the mask is binary (0/255 exports, antialiased or JPEG masks) and becomes
    ``(value > 127)`` as 0/1; otherwise the values (0..127) are class labels and are kept as they are, so 0/1
    masks and multi-class label maps with small integer labels pass through unchanged.

    Args:
        path: mask image (any format :func:`read_image` reads; colour masks are converted to grey first).
        size: optional (height, width) to resize to, with nearest-neighbour so labels stay labels.

    Returns:
        uint8 (H, W) array of 0/1 (binary masks) or small integer labels.
    """
    mask = read_image(path)
    if mask.max() >= 128:
        mask = (mask > 127).astype(np.uint8)
    if size is not None and tuple(mask.shape) != (int(size[0]), int(size[1])):
        resized = Image.fromarray(mask).resize((int(size[1]), int(size[0])), Image.NEAREST)
        mask = np.asarray(resized, dtype=np.uint8)
    return np.ascontiguousarray(mask)
