"""The tfds builder: a generated COCO-format folder round-trips exactly; every bad-data case follows its
stated policy (skip and count, clip, convert, or a clear error); tfds's coco/2017 converts."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from yolos_jax.data import coco_builder as cb
from yolos_jax.data import synthetic


def _xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def test_builder_round_trips_a_generated_folder(tmp_path):
    src = tmp_path / "src"
    synthetic.generate(str(src), 7, 3, seed=4, image_size=[(48, 64), (64, 48)], num_classes=3,
                       category_ids=[3, 7, 11], crowd_fraction=0.3)
    ds = cb.prepare(str(tmp_path / "tfds"), "rt", source_dir=str(src), quiet=True)
    assert ds.splits == ["train", "val"]
    assert ds.categories == [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 11, "name": "triangle"}]
    for split, n in (("train", 7), ("val", 3)):
        doc = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        images = sorted(doc["images"], key=lambda d: d["id"])
        idx = ds.index(split)
        assert idx.image_id.tolist() == [d["id"] for d in images] and len(idx) == n
        assert idx.height.tolist() == [d["height"] for d in images] and idx.width.tolist() == [d["width"] for d in images]
        source = ds.source_for(split)
        n_crowd = 0
        for i, im in enumerate(images):
            rec = source[i]
            assert rec["image"] == (src / split / im["file_name"]).read_bytes()  # stored as read
            anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
            o = rec["objects"]
            np.testing.assert_array_equal(np.asarray(o["bbox"], np.float32).reshape(-1, 4),
                                          np.asarray([_xyxy(a["bbox"]) for a in anns], np.float32).reshape(-1, 4))
            assert [int(c) for c in o["category_id"]] == [a["category_id"] for a in anns]
            assert [bool(c) for c in o["is_crowd"]] == [bool(a["iscrowd"]) for a in anns]
            assert [int(c) for c in o["id"]] == [a["id"] for a in anns]
            np.testing.assert_allclose(o["area"], [a["area"] for a in anns])
            n_crowd += sum(a["iscrowd"] for a in anns)
            assert idx.num_crowd[i] == sum(a["iscrowd"] for a in anns)
        assert n_crowd > 0 or split == "val"
        gt = json.loads(open(ds.gt_json(split)).read())
        strip = lambda a: {k: a[k] for k in ("id", "image_id", "category_id", "bbox", "iscrowd")}
        assert sorted(map(json.dumps, map(strip, gt["annotations"]))) == sorted(map(json.dumps, map(strip, doc["annotations"])))
        assert ds.report(split)["counts"] == {}
    # Preparing again is a no-op; another source under the same name is refused.
    assert cb.prepare(str(tmp_path / "tfds"), "rt", source_dir=str(src)).path == ds.path
    with pytest.raises(cb.DataError, match="was prepared from"):
        cb.prepare(str(tmp_path / "tfds"), "rt", source_dir=str(tmp_path))


def test_prepare_notices_a_changed_source_and_force_prepares_again(tmp_path, capsys):
    """Fixing the source folder and preparing again used to reuse the stale dataset silently."""
    from yolos_jax.data import prepare as prepare_cli

    src, data = tmp_path / "src", tmp_path / "tfds"
    synthetic.generate(str(src), 5, 2, seed=1, image_size=[(48, 64)], num_classes=2)
    args = [f"--data_dir={data}", "--name=fix", f"--coco_dir={src}", "--no_verify"]
    prepare_cli.main(args)
    first = cb.load(str(data), "fix")
    assert first.source_changes() == [] and len(first.index("train")) == 5
    prepare_cli.main(args)  # unchanged: reused, and said so
    assert "already prepared from this source, unchanged since; reused" in capsys.readouterr().out

    ann = src / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    doc["images"] = doc["images"][:4]  # the user removes an image from the split
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in {im["id"] for im in doc["images"]}]
    ann.write_text(json.dumps(doc))
    os.utime(ann, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    (src / "train" / "extra.jpg").write_bytes((src / "train" / doc["images"][0]["file_name"]).read_bytes())
    changes = cb.load(str(data), "fix").source_changes()
    assert any("instances_train.json was modified" in c for c in changes)
    assert any("'train' image folder" in c for c in changes)
    with pytest.raises(SystemExit, match="error: .*source changed since.*--force"):
        prepare_cli.main(args)
    assert cb.prepare(str(data), "fix", source_dir=str(src)).path == first.path  # train/eval: reused (warned)

    # --force with a broken source: fails, and the previous version never left its place.
    good = ann.read_text()
    ann.write_text("{ not json")
    with pytest.raises(SystemExit, match="error: .*instances_train.json"):
        prepare_cli.main(args + ["--force"])
    assert len(cb.load(str(data), "fix").index("train")) == 5
    ann.write_text(good)
    prepare_cli.main(args + ["--force"])
    again = cb.load(str(data), "fix")
    assert len(again.index("train")) == 4 and again.source_changes() == []
    assert again.source_dir() == str(src)  # the relative source path fits the final place, not the scratch one
    assert json.loads(open(os.path.join(again.path, cb.SOURCE_FILE)).read())["source_dir_relative"] == \
        os.path.relpath(src, again.path)
    assert not [p for p in os.listdir(data) if p.startswith(".yolos_")]

    # A --force killed between the two renames of the swap: the next prepare puts the previous version back;
    # killed while building: its scratch folder is dropped.
    os.rename(again.path, data / ".yolos_previous-fix-999")
    (data / ".yolos_rebuild-fix-998").mkdir()
    assert len(cb.prepare(str(data), "fix", source_dir=str(src)).index("train")) == 4
    assert not [p for p in os.listdir(data) if p.startswith(".yolos_")]

    # Deleting the source after preparing is not a change.
    import shutil

    shutil.rmtree(src)
    assert cb.load(str(data), "fix").source_changes() == []


def test_a_copied_workdir_keeps_its_prepared_dataset(tmp_path):
    """WORKDIR/data/{synthetic,tfds} copied elsewhere (cp -r: new modification times) is still the same source."""
    import shutil

    first = tmp_path / "run1"
    synthetic.generate(str(first / "synthetic"), 4, 2, seed=2, image_size=[(48, 64)], num_classes=2)
    cb.prepare(str(first / "tfds"), "d", source_dir=str(first / "synthetic"), quiet=True)
    second = tmp_path / "run2"
    shutil.copytree(first, second, copy_function=shutil.copy)  # contents only, not times
    ds = cb.load(str(second / "tfds"), "d")
    ds.check_source(str(second / "synthetic"), None)  # was: "was prepared from .../run1/synthetic"
    assert ds.source_changes() == []
    shutil.rmtree(first)
    assert ds.source_dir() == str(second / "synthetic") and ds.source_changes() == []
    with pytest.raises(cb.DataError, match="set --config.input.source_dir=.*choose another input.dataset_name"):
        ds.check_source(str(tmp_path), None)


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
    ds = cb.prepare(str(tmp_path / "tfds"), "bad", source_dir=str(tmp_path / "bad"), quiet=True)
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


def _bad_json(tmp_path, text):
    p = tmp_path / "instances_x.json"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"images": [', r"not valid JSON \(line 1, column 13"),
        ("[1, 2]", "top level must be a JSON object"),
        ('{"images": [], "annotations": []}', "missing field 'categories'"),
        ('{"images": {}, "annotations": [], "categories": []}', "field 'images' must be a list"),
    ],
)
def test_unreadable_json_raises_naming_file_and_field(tmp_path, text, match):
    path = _bad_json(tmp_path, text)
    with pytest.raises(cb.DataError, match=match) as e:
        cb.read_instances_json(path)
    assert path in str(e.value)


@pytest.mark.parametrize(
    "images, categories, match",
    [
        ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], [{"id": 1, "name": "x"}], "repeats image id 1"),
        ([{"id": 1}], [{"id": 1, "name": "x"}], r"images\[0\] \(id 1\) field 'file_name'"),
        ([{"id": "7", "file_name": "a.jpg"}], [{"id": 1, "name": "x"}], r"images\[0\] field 'id' must be an integer"),
        ([], [{"id": 1, "name": "x"}, {"id": 1, "name": "y"}], "field 'categories': duplicate category ids"),
    ],
)
def test_bad_json_structure_raises(tmp_path, images, categories, match):
    path = _bad_json(tmp_path, json.dumps({"images": images, "annotations": [], "categories": categories}))
    doc = cb.read_instances_json(path)
    with pytest.raises(cb.DataError, match=match):
        cb.parse_instances(doc, path, cb.Report())


def test_prepare_surfaces_json_errors_and_missing_data(tmp_path):
    root = tmp_path / "src"
    os.makedirs(root / "annotations")
    os.makedirs(root / "train")
    (root / "annotations" / "instances_train.json").write_text('{"images": [}')
    with pytest.raises(cb.DataError, match="instances_train.json: not valid JSON"):
        cb.prepare(str(tmp_path / "tfds"), "broken", source_dir=str(root), quiet=True)
    assert not (tmp_path / "tfds" / "coco_folder" / "broken" / "1.0.0").exists()  # nothing half-written
    with pytest.raises(cb.DataError, match="does not exist"):
        cb.prepare(str(tmp_path / "tfds"), "x", source_dir=str(tmp_path / "nowhere"))
    with pytest.raises(cb.DataError, match="python -m yolos_jax.data.prepare"):
        cb.load(str(tmp_path / "tfds"), "never_prepared")


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

    read_coco = cb._tfds_examples

    def mocked_read(*args, **kwargs):  # only the coco/2017 read is mocked, not our own builder
        with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset_fn):
            return iter(list(read_coco(*args, **kwargs)))

    monkeypatch.setattr(cb, "_tfds_examples", mocked_read)
    ds = cb.prepare(str(tmp_path / "tfds"), "coco_from_tfds", tfds_source="coco/2017", splits=["validation"],
                    tfds_data_dir=str(tmp_path / "none"), quiet=True)
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE):
        names = tfds.builder("coco/2017").info.features["objects"]["label"].names
    assert [c["id"] for c in ds.categories] == list(cb.COCO80_TO_91) and [c["name"] for c in ds.categories] == names
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


def test_generator_options_classes_sizes_background(tmp_path):
    """`classes` names the categories and draws those shapes; sizes stay in [min, max] of the short side;
    'plain' backgrounds have no stripes/checks; bad options are refused naming them."""
    h, w = 96, 120
    summary = synthetic.generate(str(tmp_path / "plain"), 12, 0, seed=1, image_size=(h, w), num_classes=2,
                                 max_objects=3, classes=("square", "circle"), min_size_frac=0.3, max_size_frac=0.5,
                                 background="plain")
    assert [c["name"] for c in summary["categories"]] == ["square", "circle"]
    doc = json.loads(open(summary["splits"]["train"]["ann_file"]).read())
    inside = 0
    for a in doc["annotations"]:
        x, y, bw, bh = a["bbox"]
        if x > 0 and y > 0 and x + bw < w and y + bh < h:  # not cut by the border: the full size
            inside += 1
            assert 0.3 * h - 1.5 <= bw <= 0.5 * h + 1.5 and abs(bw - bh) <= 1.5, a["bbox"]
            # A square fills its box, a circle pi/4 of it: the class really draws its shape.
            fill = a["area"] / (bw * bh)
            assert (fill > 0.93) if a["category_id"] == 1 else (0.7 < fill < 0.85), (a, fill)
    assert inside >= 10

    def background_roughness(kind):  # without pixel noise: mean |horizontal step| of the pattern alone
        imgs = [synthetic._background(np.random.default_rng(i), h, w, 0.0, kind) for i in range(6)]
        return np.mean([np.abs(np.diff(img.astype(np.float32), axis=1)).mean() for img in imgs])

    assert background_roughness("plain") < 0.4 * background_roughness("textured")  # measured 0.93 vs 4.9
    for kwargs, match in ((dict(classes=("circle", "blob")), "classes"), (dict(classes=("circle",)), "classes"),
                          (dict(min_size_frac=0.5, max_size_frac=0.3), "min_size_frac"),
                          (dict(background="noisy"), "background")):
        with pytest.raises(ValueError, match=match):
            synthetic.generate(str(tmp_path / "bad"), 2, 0, num_classes=2, **kwargs)
    assert not (tmp_path / "bad").exists()
