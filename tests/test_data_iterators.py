"""The train and eval iterators end to end on a tiny synthetic dataset: batch schema and declared shapes,
alignment of images and targets, determinism and exact resume, multi-process sharding, eval coverage,
bad data."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from yolos_jax import data
from yolos_jax.data import assembly, coco_json, input_config
from yolos_jax.data import transforms as T

SIZES = [(48, 64), (64, 48), (48, 80)]  # mixed aspect ratios


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    """The synthetic input config of the iterator tests (also imported by other test_data_* modules): made
    under the session's base temp dir, so the dataset is generated and prepared once per session."""
    root = tmp_path_factory.getbasetemp() / "data_iterators"
    c = input_config.synthetic_input_config(str(root), num_train=24, num_val=10, image_size=SIZES)
    data.dataset_info(c)  # generate + prepare once
    return c


def take(it, n):
    """The next `n` batches of `it`, then closes it."""
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_follow_the_schema_and_declared_shapes(cfg):
    info = data.dataset_info(cfg)
    it = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
    n_epoch = len(it.plan(0))
    batches = take(it, n_epoch + 1)
    idx = it.index
    for b in batches:
        assert tuple(b) == assembly.BATCH_KEYS
        n, H, W, _ = b["image"].shape
        assert (H, W) in it.canvases and n == 4
        assert b["image"].dtype == np.float32 and b["pixel_mask"].dtype == bool
        assert b["boxes"].shape == (4, 8, 4) and b["labels"].dtype == np.int32 and b["image_id"].dtype == np.int64
        assert b["orig_size"].dtype == np.int32 and b["size"].dtype == np.int32 and b["valid"].all()
        rows = np.arange(H)[None, :, None] < b["size"][:, 0, None, None]
        cols = np.arange(W)[None, None, :] < b["size"][:, 1, None, None]
        np.testing.assert_array_equal(b["pixel_mask"], rows & cols)
        assert not b["image"][~b["pixel_mask"]].any()  # zeros in the padding
        assert (b["size"] % 16 == 0).all() and (b["size"] <= [H, W]).all()
        m = b["box_mask"]
        assert (b["boxes"][m] >= 0).all() and (b["boxes"][m] <= 1).all() and (b["boxes"][m][:, 2:] > 0).all()
        assert not b["boxes"][~m].any() and not b["labels"][~m].any()
        assert (b["labels"] < info.num_classes).all()
        for j in range(n):
            i = int(np.nonzero(idx.image_id == b["image_id"][j])[0][0])
            assert tuple(b["orig_size"][j]) == (idx.height[i], idx.width[i])
    ids = np.concatenate([b["image_id"] for b in batches[:n_epoch]])
    st = it.epoch_stats(0)
    assert set(ids.tolist()) == set(idx.image_id.tolist())  # an epoch sees every example ('merge')
    assert len(ids) - len(set(ids.tolist())) == st["repeated"] <= 2 * 3  # plus fill-ins of partial batches
    assert st["num_shapes"] <= cfg.num_canvases and st["examples"] == 24 + st["repeated"] and st["dropped"] == 0


def test_any_epoch_plan_can_be_asked_for_after_later_epochs(cfg):
    """The plan cache keeps two epochs; asking for an evicted one rebuilds the same plan (it used to KeyError
    when the evicted epoch was the oldest)."""
    it = data.make_train_iterator(cfg, seed=2, process_index=0, process_count=1)
    first = it.plan(0)
    stats = it.epoch_stats(0)
    for epoch in (1, 2, 3):
        it.plan(epoch)
    again = it.plan(0)
    assert again is not first  # really rebuilt, not kept
    np.testing.assert_array_equal(again.example, first.example)
    np.testing.assert_array_equal(again.geom, first.geom)
    assert it.epoch_stats(0) == stats
    assert not np.array_equal(it.plan(1).example, first.example)  # epochs differ (shuffled)


def test_images_and_targets_come_from_the_planned_examples(cfg):
    """The parallel pipeline keeps every image with its own targets: recompute batches from the plan."""
    it = data.make_train_iterator(cfg, seed=5, process_index=0, process_count=1)
    batches = take(it, 3)
    src = it.dataset.source_for(cfg.train_split)
    lm = it.label_map
    for k, b in enumerate(batches):
        for j in range(4):
            i, g = int(it.plan(0).example[k, j]), it.plan(0).geom[k, j]
            rec = src[i]
            h2, w2 = g[7:9]
            img = T.tf_apply_geometry(rec["image"], g, "float32").numpy()
            np.testing.assert_allclose(b["image"][j, :h2, :w2], img, atol=1e-5)
            o = rec["objects"]
            keep = ~np.asarray(o["is_crowd"], bool)
            boxes, kept = T.transform_boxes(np.asarray(o["bbox"], np.float32).reshape(-1, 4)[keep],
                                            (it.index.height[i], it.index.width[i]), g)
            labels = lm.to_labels(np.asarray(o["category_id"])[keep])[kept]
            nb = min(len(boxes), 8)
            np.testing.assert_array_equal(b["boxes"][j, :nb], boxes[:nb])
            np.testing.assert_array_equal(b["labels"][j, :nb], labels[:nb])
            assert b["box_mask"][j].sum() == nb


def test_same_seed_same_batches_and_exact_resume(cfg):
    ref = take(data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1), 10)
    it = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
    first = take(it, 4)
    assert all(_same(a, b) for a, b in zip(first, ref[:4]))
    state = json.loads(json.dumps(it.get_state()))  # saved with a checkpoint
    resumed = data.make_train_iterator(cfg, seed=3, process_index=0, process_count=1)
    resumed.set_state(state)
    rest = take(resumed, 6)  # crosses into the next epoch
    assert all(_same(a, b) for a, b in zip(rest, ref[4:10]))
    assert resumed.get_state()["epoch"] >= 1
    other = take(data.make_train_iterator(cfg, seed=4, process_index=0, process_count=1), 1)[0]
    assert not _same(other, ref[0])
    changed = cfg.copy_and_resolve_references()
    changed.hflip_prob = 0.0
    with pytest.raises(ValueError, match="different data configuration"):
        data.make_train_iterator(changed, seed=3, process_index=0, process_count=1).set_state(state)


def test_processes_read_disjoint_shards_of_the_global_batch(cfg):
    glob = take(data.make_train_iterator(cfg, seed=1, process_index=0, process_count=1), 6)
    parts = [take(data.make_train_iterator(cfg, seed=1, process_index=p, process_count=2), 6) for p in range(2)]
    for g, p0, p1 in zip(glob, *parts):
        assert p0["image"].shape == p1["image"].shape  # same canvas on every process
        assert not set(p0["image_id"].tolist()) & set(p1["image_id"].tolist())
        assert _same(g, {k: np.concatenate([p0[k], p1[k]]) for k in g})


def test_eval_covers_every_example_once_across_processes(cfg):
    info = data.dataset_info(cfg)
    gt = json.loads(open(info.instances_json[cfg.val_split]).read())
    all_ids = sorted(im["id"] for im in gt["images"])
    single = list(data.make_eval_iterator(cfg, process_index=0, process_count=1))
    parts = [list(data.make_eval_iterator(cfg, process_index=p, process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(single)
    seen = []
    for g, p0, p1 in zip(single, *parts):
        assert _same(g, {k: np.concatenate([p0[k], p1[k]]) for k in g})
        seen += g["image_id"][g["valid"]].tolist()
        assert (g["image_id"][~g["valid"]] == -1).all()
    assert sorted(seen) == all_ids
    # Targets: eval only resizes, so normalised boxes equal the JSON boxes / original size (crowd dropped).
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    ev_sizes = {}
    for b in single:
        for j in np.nonzero(b["valid"])[0]:
            iid = int(b["image_id"][j])
            h, w = b["orig_size"][j]
            anns = [a for a in by_image.get(iid, []) if not a["iscrowd"]]
            want = np.asarray([[(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h] for x, y, bw, bh in
                               (a["bbox"] for a in anns)], np.float32).reshape(-1, 4)[:8]
            np.testing.assert_allclose(b["boxes"][j][b["box_mask"][j]], want, atol=1e-6)
            ev_sizes[iid] = tuple(b["size"][j])
            oh, ow = T.eval_resize_hw(h, w, cfg.eval_size, cfg.eval_max_size)
            assert ev_sizes[iid] == (oh, ow)
    # batch_size override and an image hook (e.g. a corruption) on the decoded original.
    plain = list(data.make_eval_iterator(cfg, batch_size=2, process_index=0, process_count=1))
    fmt = cfg.copy_and_resolve_references()
    fmt.image_format = "uint8"
    u8 = list(data.make_eval_iterator(fmt, batch_size=2, process_index=0, process_count=1))
    inv = list(data.make_eval_iterator(fmt, batch_size=2, process_index=0, process_count=1,
                                       image_fn=lambda im, iid: 255 - im))
    assert len(plain) == len(u8) == len(inv) == 5
    for a, b in zip(u8, inv):
        m = a["pixel_mask"]
        # PIL (the eval resampler) rounds half up after each of its two passes: resize(255 - x) and
        # 255 - resize(x) may differ by one grey level per pass.
        assert np.abs(a["image"][m].astype(int) + b["image"][m].astype(int) - 255).max() <= 2




def test_eval_batch_size_override_is_checked_against_the_process_count(cfg):
    with pytest.raises(ValueError, match="eval batch_size=3 must be a positive multiple of the process count 2"):
        data.make_eval_iterator(cfg, batch_size=3, process_index=0, process_count=2)


def test_large_scale_jitter_and_box_truncation(cfg):
    lsj = cfg.copy_and_resolve_references()
    lsj.large_scale_jitter = True
    lsj.max_boxes = 2
    it = data.make_train_iterator(lsj, seed=0, process_index=0, process_count=1)
    assert it.canvases == [(128, 128)]
    for b in take(it, 3):
        assert b["image"].shape[1:3] == (128, 128) and (b["size"] <= 128).all()
        assert b["box_mask"].sum(axis=1).max() <= 2
    assert it.stats.truncated_boxes > 0


def test_bad_data_folder_trains_without_crashing(tmp_path):
    from test_data_coco_source import _bad_folder

    _bad_folder(tmp_path / "bad")
    c = input_config.synthetic_input_config(str(tmp_path / "unused"), num_train=1, num_val=1)
    c.source_dir, c.dataset_name, c.data_dir = str(tmp_path / "bad"), "bad", str(tmp_path / "tfds")
    c.train_split = c.val_split = "train"
    c.batch_size = c.eval_batch_size = 2
    batches = take(data.make_train_iterator(c, seed=0, process_index=0, process_count=1), 8)
    assert all(b["image"].shape[-1] == 3 and np.isfinite(b["image"]).all() for b in batches)
    ev = list(data.make_eval_iterator(c, process_index=0, process_count=1))
    assert sorted(np.concatenate([b["image_id"][b["valid"]] for b in ev]).tolist()) == [1, 2, 3, 4, 5, 6, 9, 10]




def test_undecodable_image_at_read_time_names_the_image(tmp_path):
    """With verify_images=False a truncated JPEG passes preparation (header only); reading it then
    raises a DataError naming the image, not a bare error from inside tf.data."""
    import io as _io

    root = tmp_path / "src"
    os.makedirs(root / "train")
    os.makedirs(root / "annotations")
    buf = _io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 120, 3)).astype(np.uint8)).save(buf, format="JPEG")
    (root / "train" / "ok.jpg").write_bytes(buf.getvalue())
    (root / "train" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header intact
    doc = {"images": [{"id": 1, "file_name": "ok.jpg"}, {"id": 2, "file_name": "cut.jpg"}], "annotations": [],
           "categories": [{"id": 1, "name": "a"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    c = input_config.synthetic_input_config(str(tmp_path / "unused"), num_train=1, num_val=1)
    c.source_dir, c.dataset_name, c.data_dir = str(root), "unverified", str(tmp_path / "tfds")
    c.train_split = c.val_split = "train"
    c.verify_images = False
    c.eval_batch_size = 1
    with pytest.raises(coco_json.DataError, match="decoding image id 2 failed"):
        list(data.make_eval_iterator(c, process_index=0, process_count=1))
