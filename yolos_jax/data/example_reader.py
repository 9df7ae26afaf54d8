"""Prepared records -> numpy, without Python protobuf: random access to a split's serialized `tf.train.Example`s
(`RecordReader`) and their wire-format parser (`parse_example`).

Why not tfds's own deserialisation: it parses each record with Python protobuf, whose upb runtime calls
`malloc_trim(0)` every 10 000 arena frees. In the one-arena heap that `runtime.keep_freed_memory` keeps, each
trim hands the freed pages of the XLA step's temporaries back to the kernel and the next steps fault them in
again: bursts of 100k+ page faults, most of the demo's remaining system time (BENCHMARKS.md). TensorFlow's C++
parser avoids protobuf, but a TF call from the input generator (which runs in tf.data's py_func, on a fresh
Python thread state each element) builds and drops a thread-local graph each time: protobuf again. The wire
format of an Example is small and fixed, so it is read here with numpy; `tests/test_data_example_reader.py`
checks it against tfds's parser on every record.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from yolos_jax.data.coco_json import DataError

# Wire types (protobuf encoding): varint, 64-bit, length-delimited, 32-bit.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at `pos`."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf: bytes, start: int = 0, end: int | None = None):
    """Yields (field number, wire type, value) over one message: the value is an int for varints and the
    (start, end) span of the bytes for the other wire types."""
    pos, end = start, len(buf) if end is None else end
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            if pos > end:
                raise ValueError("truncated message")
            yield field, wire, value
            continue
        if wire == _LEN:
            n, pos = _varint(buf, pos)
        elif wire in (_I64, _I32):
            n = 8 if wire == _I64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos + n > end:
            raise ValueError("truncated message")
        yield field, wire, (pos, pos + n)
        pos += n


def _feature_values(buf: bytes, start: int, end: int) -> tuple[str, Any]:
    """One `Feature` -> ('bytes', [bytes]), ('float', float32 [n]) or ('int64', int64 [n]).
    Repeated numbers may be packed (what writers emit) or not (both are valid encodings)."""
    kind, values = "empty", []
    for field, wire, span in _fields(buf, start, end):
        if field not in (1, 2, 3) or wire != _LEN:
            continue
        kind = {1: "bytes", 2: "float", 3: "int64"}[field]
        for f, w, v in _fields(buf, *span):
            if f != 1:
                continue
            if kind == "bytes":
                values.append(buf[v[0]:v[1]])
            elif kind == "float":
                values.append(np.frombuffer(buf, "<f4", (v[1] - v[0]) // 4, v[0]) if w == _LEN
                              else np.frombuffer(buf, "<f4", 1, v[0]))
            elif w == _LEN:  # packed varints
                pos, stop = v
                while pos < stop:
                    x, pos = _varint(buf, pos)
                    values.append(x)
            else:
                values.append(v)
    if kind == "float":
        return kind, np.concatenate(values) if values else np.zeros([0], np.float32)
    if kind == "int64":  # varints are two's complement in 64 bits
        return kind, np.asarray([x - (1 << 64) if x >= 1 << 63 else x for x in values], np.int64)
    return kind, values


def parse_example(serialized: bytes) -> dict[str, tuple[str, Any]]:
    """A serialized `tf.train.Example` -> {feature key: (kind, values)} (see `_feature_values`)."""
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


def _to_feature(kind_values: tuple[str, Any], shape: tuple, dtype: np.dtype, key: str) -> Any:
    kind, values = kind_values
    if dtype.kind in "SUO":  # strings: bytes
        if kind not in ("bytes", "empty"):
            raise ValueError(f"feature '{key}' holds {kind} values, expected bytes")
        return values[0] if shape == () else list(values)
    if kind == "bytes":
        raise ValueError(f"feature '{key}' holds bytes, expected numbers")
    arr = np.asarray(values if kind != "empty" else [], dtype)
    if shape == ():
        if arr.size != 1:
            raise ValueError(f"feature '{key}' has {arr.size} values, expected 1")
        return arr[()] if arr.ndim == 0 else arr[0]
    return arr.reshape([-1 if d is None else d for d in shape])


def decode(serialized: bytes, serialized_info: Mapping[str, Any]) -> dict[str, Any]:
    """A record -> its features, nested like tfds's FeaturesDict (`serialized_info` =
    `features.get_serialized_info()`: leaves have .shape and .dtype; nested keys are joined by '/' on disk).
    Strings and encoded images are bytes; numbers numpy arrays of the feature's dtype and shape (scalars as
    numpy scalars)."""
    parsed = parse_example(serialized)

    def walk(info: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for name, leaf in info.items():
            key = prefix + name
            if isinstance(leaf, Mapping):
                out[name] = walk(leaf, key + "/")
                continue
            if key not in parsed:
                raise ValueError(f"feature '{key}' is missing")
            dtype = np.dtype(leaf.dtype.as_numpy_dtype if hasattr(leaf.dtype, "as_numpy_dtype") else leaf.dtype)
            out[name] = _to_feature(parsed[key], tuple(leaf.shape), dtype, key)
        return out

    return walk(serialized_info, "")


class RecordReader:
    """Random access to a prepared split: `reader[i]` -> record i (`decode`: the image left encoded, as bytes;
    'objects' fields as arrays, bbox [N, 4] xyxy pixels). `len(reader)` records. `builder` is the split's
    tfds builder; records are read as raw bytes (ArrayRecord) and decoded here."""

    def __init__(self, builder: Any, split: str, tfds: Any):
        self._raw = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        self._info = builder.info.features.get_serialized_info()
        self._where = f"{builder.data_path} split '{split}'"

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self._raw):
            raise IndexError(f"record {i} of {self._where} (it has {len(self._raw)})")
        try:
            return decode(self._raw[i], self._info)
        except ValueError as e:
            raise DataError(f"{self._where}, record {int(i)}: unreadable ({e}); prepare the dataset again "
                            "(python -m yolos_jax.data.prepare ... --force)") from None
