"""ONNX external data, found without the ``onnx`` package: a plain protobuf scan of a model's bytes.

A bundle's ONNX model must hold its weights inside the verified file; ONNX Runtime would read a tensor stored as
external data from outside the bundle, unverified. :func:`onnx_external_data` lists such tensors and
:func:`check_onnx_self_contained` refuses a model that has any (used by ``runtime.bundle_io.verify_bundle`` and the
backends, which check the exact bytes they load).
"""

from __future__ import annotations

from pathlib import Path

from usfm_edge.core.errors import BundleError

__all__ = ["ONNX_TENSOR_FIELDS", "onnx_external_data", "check_onnx_self_contained"]

#: onnx.proto3 field numbers of the messages that can hold a TensorProto (tests/test_bundle_trust.py checks this
#: table against onnx's own descriptors); TensorProto: name = 8, external_data = 13, data_location = 14.
ONNX_TENSOR_FIELDS = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "FunctionProto": {7: "NodeProto", 11: "AttributeProto"},
    "NodeProto": {5: "AttributeProto"},
    "AttributeProto": {5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto",
                       22: "SparseTensorProto", 23: "SparseTensorProto"},
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
}


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed(i)
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, i: int, end: int):
    """``(field, wire type, a, b)`` of one protobuf message: varints give their value in ``a``,
    length-delimited fields their byte range ``[a, b)``."""
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
            yield field, wire, value, 0
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise _Malformed(i)
            yield field, wire, i, i + n
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise _Malformed(i)
    if i != end:
        raise _Malformed(i)


def onnx_external_data(data: bytes | bytearray) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor of an ONNX model stored as external data (graphs, subgraphs,
    functions, sparse tensors); a plain protobuf scan, no ``onnx`` package.

    Raises:
        ValueError: the bytes are not a well-formed protobuf message.
    """
    buf = memoryview(data)
    found: list[tuple[str, str]] = []
    stack = [("ModelProto", 0, len(buf), 0)]
    try:
        while stack:
            kind, start, end, depth = stack.pop()
            if depth > 64:
                raise _Malformed(start)
            if kind != "TensorProto":
                sub = ONNX_TENSOR_FIELDS[kind]
                stack.extend((sub[f], a, b, depth + 1) for f, w, a, b in _fields(buf, start, end) if w == 2 and f in sub)
                continue
            name, location, external = "", "", False
            for f, w, a, b in _fields(buf, start, end):
                if f == 8 and w == 2:
                    name = bytes(buf[a:b]).decode("utf-8", "replace")
                elif f == 14 and w == 0:
                    external = external or a == 1  # DataLocation.EXTERNAL
                elif f == 13 and w == 2:
                    external = True
                    entry = {ef: bytes(buf[ea:eb]).decode("utf-8", "replace")
                             for ef, ew, ea, eb in _fields(buf, a, b) if ew == 2}
                    if entry.get(1) == "location":
                        location = entry.get(2, "")
            if external:
                found.append((name, location))
    except _Malformed as exc:
        raise ValueError(f"malformed protobuf near byte {exc.args[0]}") from None
    return found


def check_onnx_self_contained(data: bytes | bytearray, path: str | Path) -> None:
    """Refuse an ONNX model that is not a readable protobuf or keeps any tensor in external data.

    Raises:
        BundleError: names the model file and the first external tensor.
    """
    name = Path(path).name
    try:
        external = onnx_external_data(data)
    except ValueError as exc:
        raise BundleError(f"'{name}' is not a readable ONNX model ({exc})", path=path) from None
    if external:
        tensor, location = external[0]
        raise BundleError(f"'{name}' tensor '{tensor}' keeps its data in an external file {location!r} ({len(external)} "
                          "tensor(s) in all): refused, external data would be read from outside the bundle's verified "
                          "bytes", path=path, hint="export the model with its weights inside the .onnx file")
