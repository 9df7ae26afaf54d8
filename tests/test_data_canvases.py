"""Canvas sets of a split: explicit canvases are used as given, LSJ has its one square canvas, designed train
canvases respect their count and multiple, and every eval image fits a designed eval canvas; the
resize_on_device source canvas holds the split's largest image; configs/vitdet_b.py's one fixed 1024 x 1024 eval
canvas holds every eval size."""

import os
import sys

import numpy as np
import pytest

from yolos_jax.data import batching, canvases, input_config
from yolos_jax.data.canvases import eval_canvases, eval_geometry
from yolos_jax.data.prepared_dataset import SplitIndex


def _index(n=60, seed=0):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(200, 640, n), rng.integers(200, 640, n)
    zeros = np.zeros(n, np.int32)
    return SplitIndex(image_id=np.arange(n, dtype=np.int64), height=h.astype(np.int32), width=w.astype(np.int32),
                      num_objects=zeros, num_crowd=zeros)


def test_train_canvases():
    cfg = input_config.default_input_config("s")
    index = _index()
    designed = canvases.train_canvases(cfg, index)
    assert 2 <= len(designed) <= cfg.num_canvases
    assert all(h % cfg.canvas_multiple == 0 and w % cfg.canvas_multiple == 0 for h, w in designed)
    assert designed == canvases.train_canvases(cfg, index)  # deterministic
    plan = batching.train_epoch_plan(0, heights=index.height, widths=index.width,
                                     tcfg=input_config.train_transform_config(cfg), canvases=designed, batch_size=4,
                                     leftover="merge", shuffle=True, epoch=0)
    assert len(plan) > 0
    cfg.canvases = ((640, 480), (320, 320))
    assert canvases.train_canvases(cfg, index) == [(320, 320), (640, 480)]
    cfg.canvases, cfg.large_scale_jitter, cfg.lsj_size = (), True, 1000
    assert canvases.train_canvases(cfg, index) == [(1008, 1008)]


def test_eval_canvases_hold_every_eval_image():
    cfg = input_config.default_input_config("s")
    cfg.eval_size, cfg.eval_max_size = 320, 533
    index = _index(seed=1)
    designed = canvases.eval_canvases(cfg, index)
    assert len(designed) <= cfg.eval_num_canvases
    plan = batching.eval_plan(canvases.eval_geometry(cfg, index), designed, 8)  # raises if one fits no canvas
    assert sorted(set(plan.example[plan.valid].tolist())) == list(range(len(index)))
    geom = canvases.eval_geometry(cfg, index)
    assert geom.shape == (len(index), 9) and (geom[:, 7:9] % 16 == 0).all() and geom[:, 7:9].min(1).max() <= 320


def test_source_canvas_only_with_resize_on_device():
    cfg = input_config.default_input_config("s")
    index = _index(seed=2)
    assert canvases.source_canvas(cfg, index) is None
    cfg.resize_on_device = "on"
    hs, ws = canvases.source_canvas(cfg, index)
    assert hs % 32 == 0 and ws % 32 == 0 and hs - 32 < index.height.max() <= hs and ws - 32 < index.width.max() <= ws


def test_vitdet_b_eval_fits_its_canvas_at_any_aspect_ratio():
    """configs/vitdet_b.py evaluates on one fixed 1024 x 1024 canvas: every eval size fits it (640 x 256 used
    to become 410 x 1025), and a fixed canvas set too small for the rule fails early, naming the field."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    import vitdet_b

    cfg = vitdet_b.get_config().input
    rng = np.random.default_rng(2)
    h = np.concatenate([[256, 640, 41, 1150, 17, 1055, 1, 3000, 480, 427], rng.integers(1, 4000, 3000)])
    w = np.concatenate([[640, 256, 1150, 41, 1055, 17, 3000, 1, 640, 640], rng.integers(1, 4000, 3000)])

    class Index:
        height, width = h, w

    canvases = eval_canvases(cfg, Index)
    assert canvases == [(1024, 1024)]
    plan = batching.eval_plan(eval_geometry(cfg, Index), canvases, 8)  # raises if one fits no canvas
    assert sorted(plan.example[plan.valid].tolist()) == list(range(len(h)))
    small = cfg.copy_and_resolve_references()
    small.eval_canvases = ((1024, 1008),)
    with pytest.raises(ValueError, match="input.eval_canvases"):
        eval_canvases(small, Index)
