"""A COCO-format source as examples: every bad-data case follows its stated policy (skip and count, clip,
convert, or a clear error); tfds's coco/2017 converts."""

import io
import json
import os

import numpy as np
from PIL import Image

from yolos_jax.data import coco_source, prepared_dataset


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bad_folder(root):
    """One folder holding every bad-data case of the input issue."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3)).astype(np.uint8))
    files = {
        "good.jpg": _encode(rgb, "JPEG"),
        "gray.jpg": _encode(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "rgba.png": _encode(Image.fromarray(np.dstack([np.asarray(rgb), np.full((40, 50), 90, np.uint8)])), "PNG"),
        "pal.png": _encode(rgb.convert("P"), "PNG"),
        "pic.tif": _encode(rgb, "TIFF"),
        "corrupt.jpg": b"definitely not an image",
        "trunc.jpg": _encode(rgb, "JPEG")[:200],
        "empty.jpg": _encode(rgb, "JPEG"),
        "sizewrong.jpg": _encode(rgb, "JPEG"),
    }
    os.makedirs(root / "train")
    os.makedirs(root / "annotations")
    for name, data in files.items():
        (root / "train" / name).write_bytes(data)
    names = list(files) + ["missing.jpg"]
    images = [{"id": i + 1, "file_name": n, "height": 40, "width": 50} for i, n in enumerate(names)]
    images[names.index("sizewrong.jpg")].update(height=100, width=100)
    anns = [  # on good.jpg (id 1)
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10]},  # zero width
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, -3]},  # negative height
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [40, 30, 20, 20]},  # partly outside -> clipped
        {"id": 5, "image_id": 1, "category_id": 2, "bbox": [60, 50, 5, 5]},  # wholly outside
        {"id": 6, "image_id": 1, "category_id": 1, "bbox": "oops"},  # malformed
        {"id": 7, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
        {"id": 8, "image_id": 1, "category_id": 77, "bbox": [1, 1, 5, 5]},  # unknown category
        {"id": 9, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10], "iscrowd": 1},  # crowd
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [-5, 2, 10, 10]},  # partly outside (left)
    ]
    for im in images[1:]:  # every other image gets one good box, except empty.jpg
        if im["file_name"] != "empty.jpg":
            anns.append({"id": 100 + im["id"], "image_id": im["id"], "category_id": 2, "bbox": [2, 3, 20, 15]})
    doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    return rgb


def test_bad_data_is_skipped_counted_clipped_or_converted(tmp_path):
    rgb = _bad_folder(tmp_path / "bad")
    ds = prepared_dataset.prepare(str(tmp_path / "tfds"), "bad", source_dir=str(tmp_path / "bad"), quiet=True)
    counts = ds.report("train")["counts"]
    assert counts == {
        "ann_bad_bbox": 1, "ann_clipped_box": 2, "ann_degenerate_box": 2, "ann_outside_box": 1,
        "ann_unknown_category": 1, "ann_unknown_image": 1, "image_missing": 1, "image_undecodable": 2,
        "image_mode_CMYK": 1, "image_mode_L": 1, "image_mode_P": 1, "image_mode_RGBA": 1,
        "image_mode_TIFF:RGB->PNG": 1, "image_no_annotations": 1, "image_size_mismatch": 1,
    }, counts
    idx = ds.index("train")
    kept = ["good.jpg", "gray.jpg", "cmyk.jpg", "rgba.png", "pal.png", "pic.tif", "empty.jpg", "sizewrong.jpg"]
    assert idx.image_id.tolist() == [1, 2, 3, 4, 5, 6, 9, 10]
    assert (idx.height == 40).all() and (idx.width == 50).all()  # the file's size, not the JSON's
    src = ds.source_for("train")
    good = src[0]["objects"]
    np.testing.assert_array_equal(np.asarray(good["bbox"]),
                                  [[5, 5, 15, 15], [40, 30, 50, 40], [20, 20, 30, 30], [0, 2, 5, 12]])
    assert [bool(c) for c in good["is_crowd"]] == [False, False, True, False]
    # Every kept image decodes to the RGB that PIL's convert('RGB') gives (the original's loader).
    from yolos_jax.data import transforms as T

    ident = np.asarray([0, 40, 50, 0, 0, 40, 50, 40, 50])
    for i, name in enumerate(kept):
        got = T.tf_apply_geometry(src[i]["image"], ident, "uint8").numpy().astype(int)
        ref = np.asarray(Image.open(tmp_path / "bad" / "train" / name).convert("RGB")).astype(int)
        diff = np.abs(got - ref)
        if name.endswith(".jpg"):  # JPEG decoders (TF's libjpeg-turbo, PIL's libjpeg) differ in the last bits
            assert diff.mean() < 1.5 and diff.max() <= 10, name
        else:
            assert diff.max() == 0, name
    assert np.abs(np.asarray(Image.open(tmp_path / "bad" / "train" / "pal.png").convert("RGB")).astype(int)
                  - np.asarray(rgb)).mean() < 40



def _fake_tfds_coco():
    """Examples in the structure of tfds coco/2017: (image/id, JPEG bytes, [ymin, xmin, ymax, xmax]
    normalised boxes, 80-class labels, is_crowd)."""
    rng = np.random.default_rng(1)
    out = []
    for iid, (h, w) in ((42, (30, 40)), (7, (50, 20)), (19, (24, 24))):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
        bbox = np.asarray([[0.1, 0.2, 0.5, 0.9], [0.3, 0.3, 0.3, 0.6], [0.0, 0.5, 1.0, 1.0]], np.float32)  # 2nd: empty
        out.append({"image": _encode(img, "JPEG"), "image/filename": f"{iid}.jpg", "image/id": iid,
                    "objects": {"bbox": bbox, "label": np.asarray([0, 5, 79], np.int64),
                                "is_crowd": np.asarray([False, False, True]), "area": np.asarray([1, 2, 3], np.float32),
                                "id": np.asarray([iid * 10, iid * 10 + 1, iid * 10 + 2], np.int64)}})
    return out


def test_prepare_from_tfds_coco(tmp_path, monkeypatch):
    """tfds's own coco/2017 (its reader mocked with known examples) -> our format, COCO category ids."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    fake = _fake_tfds_coco()

    def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
        assert decoders is not None  # the adapter reads the JPEG bytes as stored (SkipDecoding)
        sig = {"image": tf.TensorSpec([], tf.string), "image/filename": tf.TensorSpec([], tf.string),
               "image/id": tf.TensorSpec([], tf.int64),
               "objects": {"bbox": tf.TensorSpec([None, 4], tf.float32), "label": tf.TensorSpec([None], tf.int64),
                           "is_crowd": tf.TensorSpec([None], tf.bool), "area": tf.TensorSpec([None], tf.float32),
                           "id": tf.TensorSpec([None], tf.int64)}}
        return tf.data.Dataset.from_generator(lambda: iter(fake), output_signature=sig)

    read_coco = coco_source.tfds_examples

    def mocked_read(*args, **kwargs):  # only the coco/2017 read is mocked, not our own builder
        with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset_fn):
            return iter(list(read_coco(*args, **kwargs)))

    monkeypatch.setattr(coco_source, "tfds_examples", mocked_read)
    ds = prepared_dataset.prepare(str(tmp_path / "tfds"), "coco_from_tfds", tfds_source="coco/2017", splits=["validation"],
                    tfds_data_dir=str(tmp_path / "none"), quiet=True)
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
        names = tfds.builder("coco/2017").info.features["objects"]["label"].names
    assert [c["id"] for c in ds.categories] == list(coco_source.COCO80_TO_91) and [c["name"] for c in ds.categories] == names
    assert ds.report("validation")["counts"] == {"ann_degenerate_box": 3}
    idx = ds.index("validation")
    assert idx.image_id.tolist() == [7, 19, 42] and idx.height.tolist() == [50, 24, 30] and idx.width.tolist() == [20, 24, 40]
    src = ds.source_for("validation")
    for i, ex in enumerate(sorted(fake, key=lambda e: e["image/id"])):
        h, w = int(idx.height[i]), int(idx.width[i])
        rec = src[i]
        assert rec["image"] == ex["image"]
        np.testing.assert_allclose(np.asarray(rec["objects"]["bbox"]),
                                   [[0.2 * w, 0.1 * h, 0.9 * w, 0.5 * h], [0.5 * w, 0.0, w, h]], rtol=1e-6)
        assert [int(c) for c in rec["objects"]["category_id"]] == [1, 90]
        assert [bool(c) for c in rec["objects"]["is_crowd"]] == [False, True]



def test_an_undecodable_image_is_reported_with_tfs_reason_not_its_op_wrapper():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    truncated = buf.getvalue()[:60]
    try:
        coco_source.probe_image(truncated)
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("a truncated PNG decoded")
    assert message.startswith("cannot decode image (") and "PIL: " in message, message
    assert "{{" not in message and "[Op:" not in message and "device:CPU" not in message, message
