"""File integrity of exported models: a digest of the weights and one of the graph, recorded in
the file's metadata at export and checked wherever lowbit loads the file.

A flipped trit in a packed weight still loads and runs, off by a little (a corrupt copy, a
bad disk, a hand edit): only a digest notices. The digests are SHA-256 over the file's own
protobuf bytes, read from the wire format directly, so the edge install (numpy + onnxruntime,
neither torch nor onnx) checks them too:

- ``weights``: the graph's ``initializer`` and ``sparse_initializer`` entries (GraphProto
  fields 5 and 15), in file order;
- ``graph``: every other field of the graph (nodes, inputs, outputs, value_info), the opset
  imports and the functions (ModelProto fields 7 without the weights, 8 and 25).

The metadata (ModelProto field 14), which holds the digests, is not covered. Files in
onnxruntime's ORT format (flatbuffers) are not checked: ``convert_ort`` checks the ``.onnx``
it converts. The file format version is recorded beside the digests: a file written by a
newer lowbit, in a format this one does not read, is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from . import _onnx_meta as meta
from .errors import ModelError

_GRAPH, _OPSETS, _FUNCTIONS = 7, 8, 25  # ModelProto fields
_WEIGHTS = (5, 15)  # GraphProto: initializer, sparse_initializer
_ORT_MAGIC = b"ORTM"  # bytes 4..8 of an ORT-format file (the flatbuffer file identifier)


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview, memoryview]]:
    """(field number, the field's raw bytes with its tag, its payload) of a protobuf message."""
    i = 0
    while i < len(buf):
        start = i
        tag, i = _varint(buf, i)
        kind = tag & 7
        if kind == 0:
            _, i = _varint(buf, i)
            body = buf[start:i]
        elif kind in (1, 5):
            i += 8 if kind == 1 else 4
            body = buf[i - (8 if kind == 1 else 4):i]
        elif kind == 2:
            size, i = _varint(buf, i)
            body, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported wire type {kind}")
        if i > len(buf):
            raise ValueError("truncated field")
        yield tag >> 3, buf[start:i], body


def digests(model: bytes) -> dict[str, str]:
    """SHA-256 of the weights and of the graph of a serialized ONNX ``ModelProto``."""
    weights, graph = hashlib.sha256(), hashlib.sha256()
    for number, raw, body in _fields(memoryview(model)):
        if number == _GRAPH:
            for inner, inner_raw, _ in _fields(body):
                (weights if inner in _WEIGHTS else graph).update(inner_raw)
        elif number in (_OPSETS, _FUNCTIONS):
            graph.update(raw)
    return {"weights": weights.hexdigest(), "graph": graph.hexdigest()}


def seal(proto: Any) -> None:
    """Record the format version and the digests of ``proto`` (an ``onnx.ModelProto``) in its
    metadata: the last step before it is written, so that any later change is caught."""
    kept = [(p.key, p.value) for p in proto.metadata_props
            if p.key not in (meta.FORMAT, meta.DIGEST)]
    del proto.metadata_props[:]
    entries = [*kept, (meta.FORMAT, json.dumps(meta.FORMAT_VERSION)),
               (meta.DIGEST, json.dumps(digests(proto.SerializeToString()),
                                        separators=(",", ":")))]
    for key, value in entries:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def check(path: Path, props: dict[str, str], allow_modified: bool = False) -> None:
    """Refuse a file (``props``: its metadata) in a newer lowbit file format and, unless
    ``allow_modified``, one whose weights or graph changed since lowbit exported it."""
    check_format(path, props)
    if not allow_modified:
        check_digests(path, props)


def check_format(path: Path, props: dict[str, str]) -> None:
    """Refuse a file written in a newer lowbit file format than this lowbit reads."""
    if meta.FORMAT not in props:
        return  # written before formats were numbered: readable
    try:
        version = int(json.loads(props[meta.FORMAT]))
    except (ValueError, TypeError):
        raise ModelError(f"{path}: metadata {meta.FORMAT} is not a version number: "
                         f"{props[meta.FORMAT][:40]!r}") from None
    if version > meta.FORMAT_VERSION:
        raise ModelError(f"{path}: written by lowbit {props.get(meta.VERSION, '?')} in file "
                         f"format {version}; this lowbit {__version__} reads format "
                         f"{meta.FORMAT_VERSION} and older: upgrade lowbit "
                         f"(pip install -U lowbit)")


def check_digests(path: Path, props: dict[str, str]) -> None:
    """Refuse an ONNX file whose weights or graph differ from the digests its metadata records
    (files without recorded digests, from older lowbit or other tools, pass)."""
    if meta.DIGEST not in props:
        return
    try:
        recorded = json.loads(props[meta.DIGEST])
        if not (isinstance(recorded, dict) and all(isinstance(recorded.get(k), str)
                                                   for k in ("weights", "graph"))):
            raise ValueError
    except ValueError:
        raise ModelError(f"{path}: metadata {meta.DIGEST} is not a lowbit digest record: "
                         f"{props[meta.DIGEST][:60]!r}") from None
    data = path.read_bytes()
    if data[4:8] == _ORT_MAGIC:
        return  # ORT format: checked as .onnx when converted (see the module docstring)
    try:
        found = digests(data)
    except ValueError as exc:
        raise ModelError(f"{path}: not a well-formed ONNX protobuf ({exc})") from None
    changed = [part for part in ("weights", "graph") if found[part] != recorded[part]]
    if changed:
        raise ModelError(f"{path}: its {' and '.join(changed)} differ from what lowbit "
                         f"{props.get(meta.VERSION, '?')} exported (SHA-256 digest mismatch): "
                         f"the file was changed or corrupted after export; export it again, "
                         f"or pass --allow-modified (allow_modified=True) if you changed it on "
                         f"purpose")
