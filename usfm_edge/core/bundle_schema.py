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
        if not isinstance(self.name, str) or not self.name:
            raise BundleError(f"{where}: tensor name must be a non-empty string")
        if self.dtype not in DTYPES:
            raise BundleError(f"{where} '{self.name}': dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(self.shape, list) or not all(isinstance(d, (int, str)) for d in self.shape):
            raise BundleError(f"{where} '{self.name}': shape must be a list of ints and axis names")


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
        self.tensor.validate("input")
        if self.layout not in ("BHW", "BCHW"):
            raise BundleError(f"input layout {self.layout!r} must be 'BHW' or 'BCHW'")
        if self.raw_frame and self.tensor.dtype != "uint8":
            raise BundleError("a raw-frame input must be uint8")
        if not 1 <= self.min_side <= self.max_side:
            raise BundleError(f"input sides must satisfy 1 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if self.static_hw is not None and (len(self.static_hw) != 2 or min(self.static_hw) < 1):
            raise BundleError(f"static_hw must be [H, W], got {self.static_hw!r}")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise BundleError(f"{where} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BundleError(f"{where} has unknown keys {unknown}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise BundleError(f"{where} is incomplete: {exc}") from exc


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
        """Check types and allowed values; raise BundleError naming the field. Returns self."""
        self.validate_contract()
        if not isinstance(self.files, dict) or not self.files:
            raise BundleError("files must map roles to file names")
        for role, name in self.files.items():
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
                raise BundleError(f"files['{role}'] = {name!r} must be a plain file name inside the bundle")
        return self

    def validate_contract(self) -> BundleMeta:
        """Check the model-contract fields only (``CONTRACT_FIELDS``: what a model file carries). Returns self."""
        if not isinstance(self.schema_version, int) or self.schema_version < 1:
            raise BundleError(f"schema_version must be a positive int, got {self.schema_version!r}")
        if self.schema_version > SCHEMA_VERSION:
            raise BundleError(
                f"bundle schema version {self.schema_version} was written by a newer usfm-edge "
                f"(this one reads up to {SCHEMA_VERSION})", hint="upgrade usfm-edge: pip install -U usfm-edge")
        if self.task not in TASKS:
            raise BundleError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.precision not in PRECISIONS:
            raise BundleError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.backend not in BACKENDS:
            raise BundleError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if not isinstance(self.labels, list) or not all(isinstance(x, str) for x in self.labels):
            raise BundleError("labels must be a list of strings")
        if self.task in ("seg", "cls") and not self.labels:
            raise BundleError(f"a {self.task} bundle needs its class labels")
        self.input.validate()
        if not self.outputs:
            raise BundleError("a bundle needs at least one output")
        for out in self.outputs:
            out.validate("output")
        if not isinstance(self.preprocessing, dict) or "img_size" not in self.preprocessing:
            raise BundleError("preprocessing must be a PreprocessSpec dict with img_size")
        if not isinstance(self.band_stop, dict) or "enabled" not in self.band_stop:
            raise BundleError("band_stop must be a dict with 'enabled'")
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
        try:
            inp = dict(known["input"])
            inp["tensor"] = _build(TensorSpec, inp.get("tensor"), "input.tensor")
            known["input"] = _build(InputContract, inp, "input")
            known["outputs"] = [_build(TensorSpec, o, f"outputs[{i}]") for i, o in enumerate(known["outputs"])]
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{META_FILE} lacks a required entry: {exc}") from exc
        try:
            return cls(**known, extra=extra)
        except TypeError as exc:
            raise BundleError(f"{META_FILE} is incomplete: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> BundleMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{META_FILE} is not valid JSON: {exc}") from exc
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
