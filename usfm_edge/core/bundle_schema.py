"""The model contract: ``BundleMeta``, the one description of a model's inputs, outputs, labels, preprocessing
and precision; its ``usfm.json`` form, its ONNX-metadata form, its version and its validation (stdlib only).

A bundle (``NAME.usfm/``) is what a device runs: the model file(s), ``usfm.json`` described here and
``SHA256SUMS``. ``usfm.json`` is the contract between the exporter (torch side) and every runtime (this
package's ``runtime.Engine``, or scanner software in C++/C#/Java reading the JSON itself): what the input
is, what the graph already does inside (resize, band-stop, normalisation), what comes out, and how
closely the artifact matched PyTorch when it was made.

The same contract fields travel inside the model file as ``usfm_edge.<field>`` metadata
(:meth:`BundleMeta.onnx_metadata`, read back by :meth:`BundleMeta.from_onnx_metadata`), so a bare ONNX/IR file
carries what a runtime or the INT8 calibration needs; there is no second schema.

Each field is validated with the typed checks of ``core.schema_checks`` (``check_int``, ``check_str`` and
``MAX_SIDE_LIMIT`` are re-exported here).

Versioning: ``SCHEMA_VERSION`` grows by one whenever a reader of the previous version would
misinterpret a bundle. A reader refuses bundles with a *newer* version (``BundleError``: "written by a
newer usfm-edge") and accepts older ones. Unknown top-level keys of the same version are kept in
``extra`` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from usfm_edge.core.errors import BundleError
from usfm_edge.core.schema_checks import (
    MAX_DIM,
    MAX_SIDE_LIMIT,
    check_int,
    check_preprocessing,
    check_str,
    check_str_list,
    check_type,
    invalid_value,
    show_value,
)

SCHEMA_VERSION = 1
META_FILE = "usfm.json"
SUMS_FILE = "SHA256SUMS"
BUNDLE_SUFFIX = ".usfm"

TASKS = ("features", "seg", "cls", "enhance")
PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
DTYPES = ("uint8", "float16", "float32", "int64")

ONNX_META_PREFIX = "usfm_edge."
#: the ``BundleMeta`` fields that describe the model itself, written into the model file's metadata too
CONTRACT_FIELDS = ("schema_version", "task", "labels", "input", "outputs", "preprocessing", "band_stop", "precision",
                   "backend", "target")
_TEXT_FIELDS = ("task", "precision", "backend", "target")  # stored as plain strings, the others as JSON
#: written into the model file's metadata too when set, but not required there (graphs exported before it lack it):
#: ``model`` (preset, head, img_size) lets the INT8 recipe choose what to keep float for the head it sees
OPTIONAL_FIELDS = ("model",)

__all__ = ["SCHEMA_VERSION", "META_FILE", "SUMS_FILE", "BUNDLE_SUFFIX", "TASKS", "PRECISIONS", "BACKENDS",
           "ONNX_META_PREFIX", "CONTRACT_FIELDS", "TensorSpec", "InputContract", "BundleMeta", "default_thresholds"]


def default_thresholds(precision: str) -> dict[str, float | None]:
    """Parity thresholds of a precision: min cosine per output, min Dice of seg masks.

    INT8 limits are loose placeholders; the quantisation work (``usfm_edge.calibration``) sets its own
    from held-out accuracy and records them in the bundle.
    """
    table = {
        "fp32": {"cosine": 0.9999, "dice": 0.99},
        "fp16": {"cosine": 0.999, "dice": 0.98},
        "int8": {"cosine": 0.98, "dice": 0.90},
    }
    if precision not in table:
        raise BundleError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return dict(table[precision])


@dataclass
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: tensor name in the model file.
        dtype: element type (``uint8``, ``float16``, ``float32``, ``int64``).
        shape: dims; an int is fixed, a string names a dynamic axis (``batch``, ``height``...).
        description: what the values mean (e.g. ``softmax over classes at frame size``).
    """

    name: str
    dtype: str
    shape: list[int | str]
    description: str = ""

    def validate(self, where: str) -> None:
        """Check every field; ``where`` is the field path used in messages (``input.tensor``, ``outputs[0]``)."""
        check_str(self.name, f"{where}.name")
        check_str(self.dtype, f"{where}.dtype", DTYPES)
        shape = check_type(self.shape, f"{where}.shape", list, "a list of dimensions (integers or axis names)")
        if not 1 <= len(shape) <= 8:
            raise invalid_value(f"{where}.shape", "a list of 1 to 8 dimensions", shape)
        for i, d in enumerate(shape):
            if isinstance(d, str):
                check_str(d, f"{where}.shape[{i}]")
            else:
                check_int(d, f"{where}.shape[{i}]", 0, MAX_DIM)
        check_type(self.description, f"{where}.description", str, "a string")


@dataclass
class InputContract:
    """What a caller feeds the graph.

    Attributes:
        tensor: the graph input (``frame`` uint8 ``(B, H, W)`` for raw-frame bundles; ``x`` float32
            ``(B, 3, S, S)`` already normalised for ``bare`` bundles).
        layout: ``BHW`` (raw grey frame) or ``BCHW`` (normalised model input).
        raw_frame: True when resize, filtering and normalisation happen inside the graph.
        dynamic_axes: names of the axes that may vary between calls.
        min_side: smallest accepted frame side in pixels.
        max_side: largest accepted frame side in pixels.
        static_hw: fixed ``(H, W)`` of the frame a static-shape graph (TensorRT/DLA) was built for, else None;
            ``runtime.Engine`` fits frames of other sizes to it and maps the outputs back.
        max_batch: largest batch the graph accepts (1 for static targets).
    """

    tensor: TensorSpec
    layout: str = "BHW"
    raw_frame: bool = True
    dynamic_axes: list[str] = field(default_factory=list)
    min_side: int = 8
    max_side: int = 4096
    static_hw: list[int] | None = None
    max_batch: int | None = None

    def validate(self) -> None:
        """Check every field with its type and range; a failure names the field (``input.max_side``...)."""
        self.tensor.validate("input.tensor")
        check_str(self.layout, "input.layout", ("BHW", "BCHW"))
        check_type(self.raw_frame, "input.raw_frame", bool, "true or false")
        if self.raw_frame and self.tensor.dtype != "uint8":
            raise BundleError(f"input.tensor.dtype must be \"uint8\" for a raw-frame input, got {show_value(self.tensor.dtype)}")
        rank = 3 if self.layout == "BHW" else 4
        if len(self.tensor.shape) != rank:
            raise invalid_value("input.tensor.shape", f"{rank} dimensions for layout {self.layout}", self.tensor.shape)
        check_str_list(self.dynamic_axes, "input.dynamic_axes")
        check_int(self.min_side, "input.min_side", 2, MAX_SIDE_LIMIT)
        check_int(self.max_side, "input.max_side", 8, MAX_SIDE_LIMIT)
        if self.min_side > self.max_side:
            raise BundleError(f"input.min_side ({self.min_side}) must not exceed input.max_side ({self.max_side})")
        if self.static_hw is not None:
            hw = check_type(self.static_hw, "input.static_hw", (list, tuple), "[H, W]", optional=True)
            if len(hw) != 2:
                raise invalid_value("input.static_hw", "[H, W]", hw)
            for i, v in enumerate(hw):
                check_int(v, f"input.static_hw[{i}]", 1, MAX_SIDE_LIMIT)
        if self.max_batch is not None:
            check_int(self.max_batch, "input.max_batch", 1, MAX_SIDE_LIMIT)


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise invalid_value(where, "a JSON object", data)
    fields = dataclasses.fields(cls)
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise BundleError(f"{where} has unknown keys {unknown}")
    for f in fields:
        if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BundleError(f"{where}.{f.name} is missing")
    return cls(**data)


@dataclass
class BundleMeta:
    """Everything ``usfm.json`` holds (see the module docstring and ``export/bundle.py``).

    Attributes:
        task: ``features``, ``seg``, ``cls`` or ``enhance``.
        labels: class names (seg/cls), else empty.
        input: the input contract.
        outputs: graph outputs in order.
        preprocessing: ``PreprocessSpec.to_dict()`` of the model.
        band_stop: ``{"enabled": bool, "rings": [...] | None, "mask_sha256": str | None}``.
        precision: ``fp32``, ``fp16`` or ``int8`` (of the computation the artifact asks for).
        backend: the backend the target is meant for.
        target: target name from ``usfm_edge.export.targets``.
        files: role -> file name in the bundle (``onnx``, ``openvino_xml``, ``openvino_bin``,
            ``tensorrt_engine``, ``build_script``).
        model: preset, head, img_size and other provenance of the network.
        source: ``{"checkpoint": name, "sha256": hex}`` of the exported checkpoint.
        calibration: ``{"manifest_sha256": hex | None, ...}`` (None unless INT8).
        parity: results of the parity gate (None until measured).
        thresholds: the limits the parity gate applied.
        tools: versions of the tools that made the bundle.
        created: ISO-8601 UTC time of creation.
        name: bundle name (folder name without ``.usfm``).
        device: default device of the runtime (``auto``, ``CPU``, ``GPU``, ``cuda``, ``dla:0``...).
        notes: free-form remarks (e.g. "engine must be built on the device").
        schema_version: version of this schema the bundle was written with.
        extra: unknown keys read from a same-version file, written back unchanged.
    """

    task: str
    input: InputContract
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any]
    precision: str
    backend: str
    target: str
    files: dict[str, str]
    labels: list[str] = field(default_factory=list)
    band_stop: dict[str, Any] = field(default_factory=lambda: {"enabled": False, "rings": None, "mask_sha256": None})
    model: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=lambda: {"manifest_sha256": None})
    parity: dict[str, Any] | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str | None] = field(default_factory=dict)
    created: str = ""
    name: str = ""
    device: str = "auto"
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> BundleMeta:
        """Check every field's type and range; a failure is a BundleError naming the field. Returns self."""
        self.validate_contract()
        files = check_type(self.files, "files", dict, "an object mapping roles to file names")
        if not files:
            raise BundleError("files must name at least one model file")
        for role, name in files.items():
            if not isinstance(name, str) or not name or name.startswith(".") or any(
                    c in name for c in '/\\:\0') or any(ord(c) < 32 for c in name) or len(name) > 255:
                raise BundleError(f"files['{role}'] = {show_value(name)} must be a plain file name inside the bundle")
        for key in ("model", "source", "thresholds", "tools", "extra"):
            check_type(getattr(self, key), key, dict, "an object")
        check_type(self.calibration, "calibration", dict, "an object", optional=True)
        check_type(self.parity, "parity", dict, "an object", optional=True)
        for key in ("created", "name", "device"):
            check_type(getattr(self, key), key, str, "a string")
        check_type(self.notes, "notes", list, "a list of strings")
        for i, note in enumerate(self.notes):
            check_type(note, f"notes[{i}]", str, "a string")
        return self

    def validate_contract(self) -> BundleMeta:
        """Check the model-contract fields only (``CONTRACT_FIELDS``: what a model file carries), field by field
        with types and ranges. Returns self."""
        check_int(self.schema_version, "schema_version", 1, 1 << 30)
        if self.schema_version > SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {self.schema_version} was written by a newer usfm-edge "
                f"(this one reads up to {SCHEMA_VERSION})", hint="upgrade usfm-edge: pip install -U usfm-edge")
        check_str(self.task, "task", TASKS)
        check_str(self.precision, "precision", PRECISIONS)
        check_str(self.backend, "backend", BACKENDS)
        check_str(self.target, "target")
        check_str_list(self.labels, "labels", unique=True)
        if self.task in ("seg", "cls") and not self.labels:
            raise BundleError(f"labels must name the classes of a {self.task} bundle, got []")
        if len(self.labels) > 256 and self.task == "seg":
            raise BundleError(f"labels: a seg bundle's mask is uint8, so at most 256 classes, got {len(self.labels)}")
        if not isinstance(self.input, InputContract):
            raise invalid_value("input", "an object", self.input)
        self.input.validate()
        outputs = check_type(self.outputs, "outputs", list, "a list of tensors")
        if not outputs:
            raise BundleError("outputs must list at least one tensor, got []")
        for i, out in enumerate(outputs):
            if not isinstance(out, TensorSpec):
                raise invalid_value(f"outputs[{i}]", "an object", out)
            out.validate(f"outputs[{i}]")
        names = [o.name for o in outputs]
        dup = [n for i, n in enumerate(names) if n in names[:i]]
        if dup:
            raise BundleError(f"outputs must not repeat a name, {show_value(dup[0])} appears twice")
        check_preprocessing(self.preprocessing)
        band = check_type(self.band_stop, "band_stop", dict, "an object with 'enabled'")
        if "enabled" not in band:
            raise BundleError("band_stop.enabled is missing")
        check_type(band["enabled"], "band_stop.enabled", bool, "true or false")
        check_type(band.get("rings"), "band_stop.rings", list, "a list", optional=True)
        check_type(band.get("mask_sha256"), "band_stop.mask_sha256", str, "a hex string", optional=True)
        return self

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> BundleMeta:
        """Parse and validate a ``usfm.json`` object (newer schema -> BundleError)."""
        return cls._parse(data).validate()

    @classmethod
    def _parse(cls, data: Any) -> BundleMeta:
        if not isinstance(data, dict):
            raise BundleError(f"{META_FILE} must hold a JSON object")
        version = data.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {version} was written by a newer usfm-edge (this one reads up to "
                f"{SCHEMA_VERSION})", hint="upgrade usfm-edge: pip install -U usfm-edge")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        for key in ("task", "input", "outputs", "preprocessing", "precision", "backend", "target", "files"):
            if key not in known:
                raise BundleError(f"{META_FILE} lacks the required entry '{key}'")
        inp = known["input"]
        if not isinstance(inp, dict):
            raise invalid_value("input", "a JSON object", inp)
        inp = dict(inp)
        if "tensor" not in inp:
            raise BundleError("input.tensor is missing")
        inp["tensor"] = _build(TensorSpec, inp["tensor"], "input.tensor")
        known["input"] = _build(InputContract, inp, "input")
        if not isinstance(known["outputs"], list):
            raise invalid_value("outputs", "a list of tensors", known["outputs"])
        known["outputs"] = [_build(TensorSpec, o, f"outputs[{i}]") for i, o in enumerate(known["outputs"])]
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, text: str | bytes) -> BundleMeta:
        """Parse and validate ``usfm.json`` text (or its raw bytes, which must be UTF-8)."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BundleError(f"{META_FILE} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                  f"{exc.start})") from None
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python converts
            raise BundleError(f"{META_FILE} is not valid JSON: {exc}") from exc
        except RecursionError:
            raise BundleError(f"{META_FILE} nests its JSON too deeply") from None
        return cls.from_dict(data)

    # -- the same contract inside a model file ---------------------------------------------------------
    def onnx_metadata(self) -> dict[str, str]:
        """The contract fields as ``usfm_edge.<field>`` string metadata (ONNX ``metadata_props``, OpenVINO
        ``rt_info``): plain strings for task/precision/backend/target, JSON for the others."""
        d = self.to_dict()
        out = {ONNX_META_PREFIX + k: d[k] if k in _TEXT_FIELDS else json.dumps(d[k], sort_keys=True)
               for k in CONTRACT_FIELDS}
        out.update({ONNX_META_PREFIX + k: json.dumps(d[k], sort_keys=True) for k in OPTIONAL_FIELDS if d.get(k)})
        return out

    @classmethod
    def from_onnx_metadata(cls, props: dict[str, str], files: dict[str, str] | None = None,
                           where: str = "the model file") -> BundleMeta:
        """Rebuild the contract from the metadata :meth:`onnx_metadata` wrote (``files`` as given, other
        bundle fields at their defaults); validated with :meth:`validate_contract`.

        Raises:
            BundleError: a contract field is missing or malformed (a graph not exported by this usfm-edge).
        """
        data: dict[str, Any] = {"files": dict(files or {})}
        missing = [ONNX_META_PREFIX + k for k in CONTRACT_FIELDS if ONNX_META_PREFIX + k not in props]
        if missing:
            raise BundleError(f"{where} lacks the model contract metadata {', '.join(missing)}: not a graph exported "
                              "by this usfm-edge", hint="export it again with usfm_edge.export (usfm-edge export)")
        present = [k for k in OPTIONAL_FIELDS if ONNX_META_PREFIX + k in props]
        for k in (*CONTRACT_FIELDS, *present):
            raw = props[ONNX_META_PREFIX + k]
            try:
                data[k] = raw if k in _TEXT_FIELDS else json.loads(raw)
            except json.JSONDecodeError as exc:
                raise BundleError(f"{where}: metadata {ONNX_META_PREFIX}{k} is not valid JSON: {exc}") from exc
        return cls._parse(data).validate_contract()

    def output(self, name: str) -> TensorSpec:
        for o in self.outputs:
            if o.name == name:
                return o
        raise BundleError(f"bundle has no output '{name}' (outputs: {', '.join(o.name for o in self.outputs)})")
