"""The element stream: each process reads its slots of each planned batch, with the example's own targets
(crowd boxes dropped, labels mapped, boxes normalised, extra boxes truncated and counted), fillers marked."""

import numpy as np
import pytest

from yolos_jax.data import batching, stream
from yolos_jax.data import transforms as T
from yolos_jax.data.labels import LabelMap
from yolos_jax.data.prepared_dataset import SplitIndex

HW = [(40, 60), (60, 40), (40, 60), (50, 50), (40, 60)]


def _setup(max_boxes=8):
    n = len(HW)
    h, w = np.asarray(HW).T
    index = SplitIndex(image_id=np.arange(100, 100 + n, dtype=np.int64), height=h.astype(np.int32),
                       width=w.astype(np.int32), num_objects=np.full(n, 3, np.int32), num_crowd=np.ones(n, np.int32))
    source = []
    for i, (hh, ww) in enumerate(HW):
        boxes = [[0, 0, ww / 2, hh / 2], [ww / 4, hh / 4, ww, hh], [1, 1, 5, 5], [2, 2, 8, 8]]
        source.append({"image": f"jpeg{i}".encode(), "objects": {
            "bbox": np.asarray(boxes, np.float32), "category_id": np.asarray([3, 9, 3, 9], np.int64),
            "is_crowd": np.asarray([False, False, True, False])}})
    label_map = LabelMap.from_categories([{"id": 3, "name": "a"}, {"id": 9, "name": "b"}], "contiguous")
    geom = T.eval_geometry(index.height, index.width, 32, 64)
    plan = batching.eval_plan(geom, [(48, 48)], 2)
    return index, source, label_map, plan


def test_elements_carry_their_own_targets():
    index, source, label_map, plan = _setup()
    stats = stream.StreamStats()
    els = list(stream.element_stream(lambda e: plan, (0, 0), 1, slice(0, 2), source, index, label_map, 8, stats))
    assert len(els) == 2 * len(plan) == 6 and stats.examples == 6 and stats.truncated_boxes == 0
    for k, e in enumerate(els):
        b, j = divmod(k, 2)
        i = int(plan.example[b, j])
        assert e["encoded"] == source[i]["image"] and tuple(e["position"]) == (0, b)
        assert e["valid"] == bool(plan.valid[b, j]) and tuple(e["canvas"]) == (48, 48)
        assert e["image_id"] == (index.image_id[i] if e["valid"] else -1)
        hh, ww = HW[i]
        assert tuple(e["orig_size"]) == (hh, ww) and tuple(e["size"]) == tuple(plan.geom[b, j, 7:9])
        # eval only resizes: boxes normalised by the original size, the crowd box (index 2) dropped
        want = np.asarray([[0.25, 0.25, 0.5, 0.5], [0.625, 0.625, 0.75, 0.75], [5 / ww, 5 / hh, 6 / ww, 6 / hh]])
        np.testing.assert_allclose(e["boxes"][:3], want, atol=1e-6)
        assert e["labels"][:3].tolist() == [0, 1, 1] and e["box_mask"].tolist() == [True] * 3 + [False] * 5
    assert not els[-1]["valid"] and els[-1]["image_id"] == -1  # 5 examples in batches of 2: one filler


def test_process_slots_truncation_and_resume():
    index, source, label_map, plan = _setup()
    stats = stream.StreamStats()
    second = list(stream.element_stream(lambda e: plan, (0, 1), 1, slice(1, 2), source, index, label_map, 2, stats))
    assert [tuple(e["position"]) for e in second] == [(0, 1), (0, 2)]  # from batch 1 on, slot 1 of each
    assert [int(e["image_id"]) for e in second] == [index.image_id[plan.example[1, 1]], -1]
    assert stats.truncated_boxes == 2 and all(e["box_mask"].sum() == 2 for e in second)
    endless = stream.element_stream(lambda e: plan, (0, 0), None, slice(0, 2), source, index, label_map, 8, stats)
    assert [tuple(next(endless)["position"]) for _ in range(8)][-2:] == [(1, 0), (1, 0)]  # on into epoch 1
    empty = batching.Plan(np.zeros((0, 2), np.int64), np.zeros((0, 2), bool), np.zeros((0, 2, 9), np.int64),
                          np.zeros((0, 2), np.int64))
    with pytest.raises(ValueError, match="epoch 0 has no batch"):
        next(stream.element_stream(lambda e: empty, (0, 0), None, slice(0, 2), source, index, label_map, 8, stats))


def test_decode_dataset_leaves_nothing_to_autotune_when_parallelism_is_fixed():
    """With num_parallel_calls fixed, tf.data's autotuning thread has nothing to tune, and destroying the
    iterator (every training run's end, every evaluation's) waited for it to wake: up to a minute, 28 s at the
    end of a 300-step demo. -1 (AUTOTUNE) keeps it."""
    from yolos_jax.data.stream import decode_dataset

    def gen():
        yield from ()

    assert decode_dataset(gen, 2, 4).options().autotune.enabled is False
    assert decode_dataset(gen, 0, 4).options().autotune.enabled is False  # 0 runs as 1
    assert decode_dataset(gen, -1, 4).options().autotune.enabled is not False
