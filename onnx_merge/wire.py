"""An ONNX file read at the protobuf wire level, without parsing its weights.

onnxruntime, given a model file with embedded weights, reads the whole file into memory, parses
it and copies every weight into tensors of its own: three fresh copies of the weights, and on
VGG-16 (528 MiB) two seconds spent mostly zeroing new pages. Given instead the file's structure
with each large weight pointing at its own bytes *inside the same file* (external data with an
offset), it maps the file and reads the weights in place. ``mapped_model`` writes that
structure: every field copied byte for byte, except that a graph initializer's ``raw_data``
becomes a (location, offset, length) reference to where those bytes already lie.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx

_MODEL = onnx.ModelProto.DESCRIPTOR.fields_by_name
_GRAPH = onnx.GraphProto.DESCRIPTOR.fields_by_name
_TENSOR = onnx.TensorProto.DESCRIPTOR.fields_by_name
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


class WireError(ValueError):
    """Bytes that are not the protobuf encoding expected."""


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireError("truncated varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def fields(buf, start: int, end: int):
    """(field number, wire type, start of the field's key, start of its value, end) of each field
    of the message encoded in buf[start:end]; a length-delimited value spans [value start, end)."""
    i = start
    while i < end:
        key_start = i
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, j = _varint(buf, i)
        elif wire == _FIXED64:
            j = i + 8
        elif wire == _FIXED32:
            j = i + 4
        elif wire == _LENGTH_DELIMITED:
            length, i = _varint(buf, i)
            j = i + length
        else:  # groups: never used by onnx.proto
            raise WireError(f"wire type {wire} at byte {key_start}")
        if j > end:
            raise WireError(f"field {number} runs past its message at byte {key_start}")
        yield number, wire, key_start, i, j
        i = j


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def _external_tensor(buf, start: int, end: int, location: str, min_bytes: int) -> bytes | None:
    """The tensor at buf[start:end] with its raw_data replaced by a reference into the file; None
    when it keeps its bytes (small, or already external)."""
    raw = None
    for number, wire, key, value, stop in fields(buf, start, end):
        if number == _TENSOR["data_location"].number or number == _TENSOR["external_data"].number:
            return None
        if number == _TENSOR["raw_data"].number and wire == _LENGTH_DELIMITED:
            raw = (key, value, stop)
    if raw is None or raw[2] - raw[1] < min_bytes:
        return None
    key, value, stop = raw
    entries = b"".join(_field(_TENSOR["external_data"].number, _field(1, k.encode()) + _field(2, v.encode()))
                       for k, v in (("location", location), ("offset", str(value)), ("length", str(stop - value))))
    where = _encode_varint(_TENSOR["data_location"].number << 3 | _VARINT) + _encode_varint(onnx.TensorProto.EXTERNAL)
    return bytes(buf[start:key]) + bytes(buf[stop:end]) + entries + where


def _graph(buf, start: int, end: int, location: str, min_bytes: int) -> tuple[bytes, int]:
    """The graph's encoding with its large initializers made references; how many were."""
    out, moved = bytearray(), 0
    for number, wire, key, value, stop in fields(buf, start, end):
        tensor = None
        if number == _GRAPH["initializer"].number and wire == _LENGTH_DELIMITED:
            tensor = _external_tensor(buf, value, stop, location, min_bytes)
        out += buf[key:stop] if tensor is None else _field(number, tensor)
        moved += tensor is not None
    return bytes(out), moved


def raw_spans(path: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Each top-level initializer's raw_data as (offset, length) in the file, found without
    reading the weights; a name given twice is left out, and so is everything when the file is
    not a well-formed model encoding."""
    spans: dict[str, tuple[int, int]] = {}
    twice: set[str] = set()
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for number, wire, _, value, stop in fields(buf, 0, len(buf)):
                if number != _MODEL["graph"].number or wire != _LENGTH_DELIMITED:
                    continue
                for g_number, g_wire, _, g_value, g_stop in fields(buf, value, stop):
                    if g_number != _GRAPH["initializer"].number or g_wire != _LENGTH_DELIMITED:
                        continue
                    name, raw = None, None
                    for t_number, t_wire, _, t_value, t_stop in fields(buf, g_value, g_stop):
                        if t_number == _TENSOR["name"].number and t_wire == _LENGTH_DELIMITED:
                            name = bytes(buf[t_value:t_stop]).decode("utf-8", "replace")
                        elif t_number == _TENSOR["raw_data"].number and t_wire == _LENGTH_DELIMITED:
                            raw = (t_value, t_stop - t_value)
                    if name in spans:
                        twice.add(name)
                    elif name is not None and raw is not None:
                        spans[name] = raw
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in spans.items() if k not in twice}


def mapped_model(path: str | os.PathLike, *, min_bytes: int = 4096, ir_version: int | None = None) -> bytes | None:
    """The model at ``path`` with each top-level initializer of ``min_bytes`` or more read from
    its place in the file (external data, location the file's own name: load with the file's
    folder as the external-data folder); ``ir_version``: stamped where the file's is higher.
    None when that changes nothing, or the file is not a well-formed model encoding."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out, moved = bytearray(), 0
            for number, wire, key, value, stop in fields(buf, 0, len(buf)):
                if number == _MODEL["graph"].number and wire == _LENGTH_DELIMITED:
                    graph, count = _graph(buf, value, stop, path.name, min_bytes)
                    moved += count
                    out += _field(number, graph)
                elif number == _MODEL["ir_version"].number and wire == _VARINT and ir_version is not None \
                        and _varint(buf, value)[0] > ir_version:
                    out += _encode_varint(number << 3 | _VARINT) + _encode_varint(ir_version)
                    moved += 1
                else:
                    out += buf[key:stop]
    except (OSError, ValueError):  # empty (mmap refuses), unreadable, or not this encoding
        return None
    return bytes(out) if moved else None
