"""Prepared records -> numpy, without Python protobuf: random access to a split's serialized `tf.train.Example`s
(`RecordReader`) and their wire-format parser (`parse_example`).

Why not tfds's own deserialisation: it parses each record with Python protobuf, whose upb runtime calls
`malloc_trim(0)` every 10 000 arena frees. In the one-arena heap that `malloc.keep_freed_memory` keeps, each
trim hands the freed pages of the XLA step's temporaries back to the kernel and the next steps fault them in
again: bursts of 60-190k page faults, ~40% of the demo's faults (BENCHMARKS.md). TensorFlow's C++
parser avoids protobuf, but a TF call from the input generator (which runs in tf.data's py_func, on a fresh
Python thread state each element) builds and drops a thread-local graph each time: protobuf again. The wire
format of an Example is small and fixed, so it is read here with numpy; `tests/test_data_example_reader.py`
checks it against tfds's parser on every record.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from yolos_jax.data.coco_json import DataError

# Wire types (protobuf encoding): varint, 64-bit, length-delimited, 32-bit.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at `pos`, which must end before `end`."""
    value = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >= 1 << 64:
                raise ValueError("malformed varint")
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """Yields (field number, wire type, value) over one message in buf[start:end]: the value is an int for
    varints and the (start, end) span of the bytes for the other wire types."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
            continue
        if wire == _LEN:
            n, pos = _varint(buf, pos, end)
        elif wire in (_I64, _I32):
            n = 8 if wire == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos + n > end:
            raise ValueError("truncated message")
        yield field, wire, (pos, pos + n)
        pos += n


def _list_values(buf: bytes, kind: str, span: tuple[int, int]) -> list:
    """The values of one BytesList / FloatList / Int64List (`kind` 'bytes' / 'float' / 'int64'): bytes, float32
    arrays, ints. Repeated numbers may be packed (what writers emit) or not (both are valid encodings)."""
    values: list = []
    for f, w, v in _fields(buf, *span):
        if f != 1:
            continue
        if kind == "bytes" and w == _LEN:
            values.append(buf[v[0]:v[1]])
        elif kind == "float" and w in (_LEN, _I32):
            if (v[1] - v[0]) % 4:
                raise ValueError("packed floats of a length not a multiple of 4")
            values.append(np.frombuffer(buf, "<f4", (v[1] - v[0]) // 4, v[0]))
        elif kind == "int64" and w == _LEN:  # packed varints
            pos, stop = v
            while pos < stop:
                x, pos = _varint(buf, pos, stop)
                values.append(x)
        elif kind == "int64" and w == _VARINT:
            values.append(v)
        else:
            raise ValueError(f"wire type {w} in a {kind} list")
    return values


def _feature_values(buf: bytes, start: int, end: int) -> tuple[str, Any]:
    """One `Feature` (a oneof: the last list present wins, as in protobuf) -> ('bytes', [bytes]),
    ('float', float32 [n]), ('int64', int64 [n]), or ('empty', []) for a Feature with no list."""
    kind, values = "empty", []
    for field, wire, span in _fields(buf, start, end):
        if field in (1, 2, 3) and wire == _LEN:
            kind = {1: "bytes", 2: "float", 3: "int64"}[field]
            values = _list_values(buf, kind, span)
    if kind == "float":
        return kind, np.concatenate(values) if values else np.zeros([0], np.float32)
    if kind == "int64":  # varints are two's complement in 64 bits
        return kind, np.asarray([x - (1 << 64) if x >= 1 << 63 else x for x in values], np.int64)
    return kind, values


def parse_example(serialized: bytes) -> dict[str, tuple[str, Any]]:
    """A serialized `tf.train.Example` -> {feature key: (kind, values)} (see `_feature_values`).
    Raises ValueError on a malformed or truncated message."""
    out = {}
    for field, wire, span in _fields(serialized):
        if field != 1 or wire != _LEN:
            continue  # Example.features is field 1
        for f, w, entry in _fields(serialized, *span):
            if f != 1 or w != _LEN:
                continue  # Features.feature: map<string, Feature> entries
            key, value = None, None
            for ef, ew, ev in _fields(serialized, *entry):
                if ef == 1 and ew == _LEN:
                    key = serialized[ev[0]:ev[1]].decode("utf-8")
                elif ef == 2 and ew == _LEN:
                    value = ev
            if key is not None:
                out[key] = _feature_values(serialized, *value) if value is not None else ("empty", [])
    return out


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One stored feature: its place in the nested record (`path`), its key on disk ('/'-joined path), its shape
    (None: any length) and numpy dtype."""

    path: tuple[str, ...]
    key: str
    shape: tuple
    dtype: np.dtype


def feature_leaves(serialized_info: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """tfds's `features.get_serialized_info()` (nested dicts of TensorInfo) -> its leaves, in order."""
    out = []
    for name, info in serialized_info.items():
        path = prefix + (name,)
        if isinstance(info, Mapping):
            out += feature_leaves(info, path)
        else:
            out.append(Leaf(path, "/".join(path), tuple(info.shape), np.dtype(info.np_dtype)))
    return out


def _to_feature(kind_values: tuple[str, Any], leaf: Leaf) -> Any:
    """A parsed feature as the leaf's value: bytes (or a list of bytes) for strings; a numpy scalar or an array
    of the leaf's shape for numbers. Raises ValueError if the stored kind or count does not fit the leaf."""
    kind, values = kind_values
    if leaf.dtype.kind in "SUO":  # strings: bytes
        if kind not in ("bytes", "empty"):
            raise ValueError(f"feature '{leaf.key}' holds {kind} values, expected bytes")
        if leaf.shape == ():
            if len(values) != 1:
                raise ValueError(f"feature '{leaf.key}' has {len(values)} values, expected 1")
            return values[0]
        return list(values)
    expected = "float" if leaf.dtype.kind == "f" else "int64"  # how tfds stores floats; ints and bools
    if kind not in (expected, "empty"):
        raise ValueError(f"feature '{leaf.key}' holds {kind} values, expected {expected}")
    arr = np.asarray(values if kind != "empty" else [], leaf.dtype)
    if leaf.shape == ():
        if arr.size != 1:
            raise ValueError(f"feature '{leaf.key}' has {arr.size} values, expected 1")
        return arr[0]
    if arr.size % max(1, int(np.prod([d for d in leaf.shape if d is not None]))):
        raise ValueError(f"feature '{leaf.key}' has {arr.size} values, not a whole number of {leaf.shape}")
    return arr.reshape([-1 if d is None else d for d in leaf.shape])


def decode(serialized: bytes, leaves: list[Leaf]) -> dict[str, Any]:
    """A record -> its features, nested like tfds's FeaturesDict (`leaves` = `feature_leaves(...)`). Strings and
    encoded images are bytes; numbers numpy arrays of the feature's dtype and shape (scalars as numpy scalars).
    Raises ValueError on a malformed record or a missing or mistyped feature."""
    parsed = parse_example(serialized)
    out: dict[str, Any] = {}
    for leaf in leaves:
        if leaf.key not in parsed:
            raise ValueError(f"feature '{leaf.key}' is missing")
        node = out
        for name in leaf.path[:-1]:
            node = node.setdefault(name, {})
        node[leaf.path[-1]] = _to_feature(parsed[leaf.key], leaf)
    return out


class RecordReader:
    """Random access to a prepared split: `reader[i]` -> record i (`decode`: the image left encoded, as bytes;
    'objects' fields as arrays, bbox [N, 4] xyxy pixels). `len(reader)` records. `builder` is the split's
    tfds builder; records are read as raw bytes (ArrayRecord) and decoded here."""

    def __init__(self, builder: Any, split: str, tfds: Any):
        self._raw = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        self._leaves = feature_leaves(builder.info.features.get_serialized_info())
        self._where = f"{builder.data_path} split '{split}'"

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Record i (0 <= i < len); IndexError outside, DataError (naming the split and record) if unreadable."""
        i = int(i)
        if not 0 <= i < len(self._raw):
            raise IndexError(f"record {i} of {self._where} (it has {len(self._raw)})")
        try:
            return decode(self._raw[i], self._leaves)
        except (ValueError, IndexError, TypeError, OverflowError) as e:  # what damaged bytes can raise
            raise DataError(f"{self._where}, record {i}: unreadable ({e}); prepare the dataset again "
                            "(python -m yolos_jax.data.prepare ... --force)") from None
