"""The tfds builder: a generated COCO-format folder round-trips exactly (records, index, ground truth); splits
must agree on category names."""

import json

import numpy as np
import pytest

from yolos_jax.data import coco_json, prepared_dataset, synthetic, tfds_builder


def _xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def test_builder_round_trips_a_generated_folder(tmp_path):
    src = tmp_path / "src"
    synthetic.generate(str(src), 7, 3, seed=4, image_size=[(48, 64), (64, 48)], num_classes=3,
                       category_ids=[3, 7, 11], crowd_fraction=0.3)
    ds = prepared_dataset.prepare(str(tmp_path / "tfds"), "rt", source_dir=str(src), quiet=True)
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
    assert prepared_dataset.prepare(str(tmp_path / "tfds"), "rt", source_dir=str(src)).path == ds.path
    with pytest.raises(coco_json.DataError, match="was prepared from"):
        prepared_dataset.prepare(str(tmp_path / "tfds"), "rt", source_dir=str(tmp_path))


def test_splits_must_share_category_names():
    merged = tfds_builder.merged_categories({"val": [{"id": 7, "name": "b"}],
                                             "train": [{"id": 7, "name": "b"}, {"id": 2, "name": "a"}]})
    assert merged == [{"id": 2, "name": "a"}, {"id": 7, "name": "b"}]  # the union, sorted by id
    with pytest.raises(coco_json.DataError, match="category id 7 is named 'b' in one split and 'c' in split 'val'"):
        tfds_builder.merged_categories({"train": [{"id": 7, "name": "b"}], "val": [{"id": 7, "name": "c"}]})
