"""Records decoded without Python protobuf equal tfds's own decoding (every record, every field); the wire
parser agrees with protobuf on the encodings a writer may choose; a damaged record is a clear error."""

import json

import numpy as np
import pytest

from yolos_jax.data import coco_json, example_reader, prepared_dataset, synthetic


def _same(ours, ref, path=""):
    """tfds's numpy data source gives Python ints for int scalars and lists for sequences; ours gives numpy
    values of the feature's dtype. Equal values, and our dtypes are the declared ones (checked separately)."""
    if isinstance(ref, dict):
        assert set(ours) == set(ref), path
        for k in ref:
            _same(ours[k], ref[k], f"{path}/{k}")
    elif isinstance(ref, bytes):
        assert isinstance(ours, bytes) and ours == ref, path
    else:
        a, b = np.asarray(ours), np.asarray(ref)
        if b.size == 0:  # tfds gives [] for an empty sequence; ours keeps the declared trailing shape (below)
            assert a.size == 0, path
        else:
            assert a.shape == b.shape and np.array_equal(a, b), (path, a, b)


def test_every_record_equals_tfds_decoding(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    synthetic.generate(str(tmp_path / "src"), 24, 6, seed=3, image_size=[(40, 56), (64, 48)], num_classes=4,
                       max_objects=5, crowd_fraction=0.3)
    ann_file = tmp_path / "src" / "annotations" / "instances_train.json"
    doc = json.loads(ann_file.read_text())  # one image without any box: empty sequences
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != doc["images"][0]["id"]]
    ann_file.write_text(json.dumps(doc))
    ds = prepared_dataset.prepare(str(tmp_path / "tfds"), "d", source_dir=str(tmp_path / "src"), quiet=True)
    info = ds.builder.info.features.get_serialized_info()
    counts = ds.index("train").num_objects + ds.index("train").num_crowd
    assert counts.min() == 0 and ds.index("train").num_crowd.max() > 0  # the cases below really occur
    for split in ds.splits:
        ours = ds.source_for(split)
        ref = ds.builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        assert len(ours) == len(ref) > 0
        for i in range(len(ref)):
            rec = ours[i]
            _same(rec, ref[i], f"{split}[{i}]")
            for name, leaf in info["objects"].items():  # the declared dtypes and shapes, also for 0 objects
                arr = rec["objects"][name]
                assert arr.dtype == np.dtype(leaf.np_dtype), name
                assert arr.shape[1:] == tuple(leaf.shape[1:]), name
            assert rec["image/height"].dtype == np.int32 and rec["image/id"].dtype == np.int64
        with pytest.raises(IndexError, match=f"record {len(ref)} of"):
            ours[len(ref)]


def test_wire_parser_matches_protobuf_encodings():
    tf = pytest.importorskip("tensorflow")
    feature = tf.train.Feature
    example = tf.train.Example(features=tf.train.Features(feature={
        "img": feature(bytes_list=tf.train.BytesList(value=[b"\xff\xd8jpeg\x00bytes", b""])),
        "f": feature(float_list=tf.train.FloatList(value=[1.5, -2.25, 3e38, 0.0])),
        "i": feature(int64_list=tf.train.Int64List(value=[0, 1, 300, -1, -(2 ** 63), 2 ** 63 - 1])),
        "empty_f": feature(float_list=tf.train.FloatList(value=[])),
        "nothing": feature(),
    }))
    got = example_reader.parse_example(example.SerializeToString())
    assert got["img"] == ("bytes", [b"\xff\xd8jpeg\x00bytes", b""])
    assert got["f"][0] == "float" and got["f"][1].dtype == np.float32
    np.testing.assert_array_equal(got["f"][1], np.float32([1.5, -2.25, 3e38, 0.0]))
    assert got["i"][0] == "int64"
    np.testing.assert_array_equal(got["i"][1], np.int64([0, 1, 300, -1, -(2 ** 63), 2 ** 63 - 1]))
    assert got["empty_f"][0] == "float" and got["empty_f"][1].shape == (0,)
    assert got["nothing"] == ("empty", [])

    # Unpacked repeated numbers (valid protobuf, written by some encoders), parsed by protobuf as the reference.
    def key(field, wire):
        return bytes([field << 3 | wire])

    def length(b):
        return bytes([len(b)]) + b

    unpacked_ints = key(1, 0) + b"\x05" + key(1, 0) + b"\xac\x02"  # 5, 300
    unpacked_floats = key(1, 5) + np.float32(0.5).tobytes() + key(1, 5) + np.float32(-4).tobytes()
    entry_i = key(1, 2) + length(b"u") + key(2, 2) + length(key(3, 2) + length(unpacked_ints))
    entry_f = key(1, 2) + length(b"v") + key(2, 2) + length(key(2, 2) + length(unpacked_floats))
    raw = key(1, 2) + length(key(1, 2) + length(entry_i) + key(1, 2) + length(entry_f))
    reference = tf.train.Example.FromString(raw)
    got = example_reader.parse_example(raw)
    np.testing.assert_array_equal(got["u"][1], list(reference.features.feature["u"].int64_list.value))
    np.testing.assert_array_equal(got["v"][1], list(reference.features.feature["v"].float_list.value))


def _key(field, wire):
    return bytes([field << 3 | wire])


def _len(b):
    return bytes([len(b)]) + b


def _example(**features):
    """A hand-encoded Example: features = {key: Feature bytes}."""
    entries = b"".join(_key(1, 2) + _len(_key(1, 2) + _len(k.encode()) + _key(2, 2) + _len(v))
                       for k, v in features.items())
    return _key(1, 2) + _len(entries)


def test_damaged_or_mistyped_features_are_value_errors():
    tf = pytest.importorskip("tensorflow")
    # Two lists in one Feature (a oneof): the last wins, as in protobuf.
    both = _key(1, 2) + _len(_key(1, 2) + _len(b"xy")) + _key(3, 2) + _len(_key(1, 2) + _len(b"\x07"))
    raw = _example(k=both)
    assert example_reader.parse_example(raw)["k"][0] == "int64"
    assert list(tf.train.Example.FromString(raw).features.feature["k"].int64_list.value) == [7]
    bad = {
        "a varint in a bytes list": _key(1, 2) + _len(_key(1, 0) + b"\x05"),
        "a fixed64 in an int64 list": _key(3, 2) + _len(_key(1, 1) + b"\x00" * 8),
        "packed floats of 5 bytes": _key(2, 2) + _len(_key(1, 2) + _len(b"\x00" * 5)),
        "a packed varint running past its list": _key(3, 2) + _len(_key(1, 2) + _len(b"\x80")),
        "a varint of 2^64": _key(3, 2) + _len(_key(1, 0) + b"\xff" * 9 + b"\x02"),
    }
    for what, feature in bad.items():
        with pytest.raises(ValueError):
            example_reader.parse_example(_example(k=feature))
            pytest.fail(what)
    leaves = [example_reader.Leaf(("s",), "s", (), np.dtype(object)), example_reader.Leaf(("b",), "b", (None, 4),
                                                                                              np.dtype(np.float32))]
    floats = _key(2, 2) + _len(_key(1, 2) + _len(np.float32([1, 2, 3, 4]).tobytes()))
    two_strings = _key(1, 2) + _len(_key(1, 2) + _len(b"a") + _key(1, 2) + _len(b"b"))
    assert example_reader.decode(_example(s=_key(1, 2) + _len(_key(1, 2) + _len(b"a")), b=floats), leaves)["s"] == b"a"
    with pytest.raises(ValueError, match="'s' has 2 values, expected 1"):
        example_reader.decode(_example(s=two_strings, b=floats), leaves)
    with pytest.raises(ValueError, match="'s' holds float values, expected bytes"):
        example_reader.decode(_example(s=floats, b=floats), leaves)
    three = _key(2, 2) + _len(_key(1, 2) + _len(np.float32([1, 2, 3]).tobytes()))
    with pytest.raises(ValueError, match="'b' has 3 values, not a whole number"):
        example_reader.decode(_example(s=two_strings[:0] + _key(1, 2) + _len(_key(1, 2) + _len(b"a")), b=three),
                              leaves)
    ints = _key(3, 2) + _len(_key(1, 2) + _len(b"\x01\x02\x03\x04"))
    with pytest.raises(ValueError, match="'b' holds int64 values, expected float"):
        example_reader.decode(_example(s=_key(1, 2) + _len(_key(1, 2) + _len(b"a")), b=ints), leaves)


def test_a_damaged_record_names_the_split_and_record(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    synthetic.generate(str(tmp_path / "src"), 4, 2, seed=1, image_size=[(40, 56)], num_classes=2)
    ds = prepared_dataset.prepare(str(tmp_path / "tfds"), "d", source_dir=str(tmp_path / "src"), quiet=True)
    reader = ds.source_for("train")
    raw = reader._raw[1]
    leaves = example_reader.feature_leaves(ds.builder.info.features.get_serialized_info())
    with pytest.raises(ValueError, match="truncated|malformed"):
        example_reader.decode(raw[:-3], leaves)
    with pytest.raises(ValueError, match="feature 'image' is missing"):
        example_reader.decode(b"", leaves)

    class Cut:  # the same reader over a record cut short
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return raw[: len(raw) // 2]

    reader._raw = Cut()
    with pytest.raises(coco_json.DataError, match=r"split 'train', record 1: unreadable .*prepare the dataset again"):
        reader[1]
