"""Static-shape batching: canvas choice, epoch plans, eval plans, padding waste (numpy only)."""

import functools

import numpy as np
import pytest

from yolos_jax.data import batching as B
from yolos_jax.data import transforms as T


def _coco_like_sizes(n, seed=0):
    """An approximation of COCO 2017 train image sizes (longest side 640; ~70% landscape; short sides
    mostly 480 and 427). The real distribution is not available offline."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    short = np.select([u < 0.45, u < 0.75, u < 0.80, u < 0.84], [480, 427, 360, 640], rng.integers(400, 471, n))
    land = rng.random(n) < 0.7
    return np.where(land, short, 640), np.where(land, 640, short)


def test_assign_picks_smallest_holding_canvas():
    rng = np.random.default_rng(0)
    canv = rng.integers(1, 60, (9, 2)) * 16
    hw = rng.integers(1, 900, (500, 2))
    got = B.assign_canvases(hw, canv)
    for (h, w), k in zip(hw, got):
        fits = [j for j, (H, W) in enumerate(canv) if h <= H and w <= W]
        if not fits:
            assert k == -1
        else:
            best = min(canv[j, 0] * canv[j, 1] for j in fits)
            assert k in fits and canv[k, 0] * canv[k, 1] == best


def test_design_covers_everything_and_improves_with_more_canvases():
    h, w = _coco_like_sizes(3000)
    tcfg = T.TrainTransformConfig(scales=T.SCALES_S, max_size=1333)
    sample = B.simulate_train_sizes(h, w, tcfg, min_samples=3000)
    base = B.catch_all_canvases(*tcfg.max_output_hw(), 16)
    assert base == [(800, 1328), (1328, 800)]
    wastes = []
    for k in (2, 6, 12):
        canv = B.design_canvases(sample, base, k, 16)
        assert len(canv) <= k and set(base) <= set(canv)
        assert all(H % 16 == 0 and W % 16 == 0 for H, W in canv)
        # Any image the transform can produce fits some canvas (fresh draws, another seed).
        fresh = T.output_hw(T.sample_train_geometry(np.random.default_rng(9), h, w, tcfg))
        assert (B.assign_canvases(fresh, np.asarray(canv)) >= 0).all()
        wastes.append(B.padding_stats(fresh, np.asarray(canv)[B.assign_canvases(fresh, np.asarray(canv))])["token_waste"])
    assert wastes[0] > wastes[1] > wastes[2]
    with pytest.raises(ValueError, match="below"):
        B.design_canvases(sample, base, 1, 16)


def test_padding_stats_counts_partial_patches_as_real():
    s = B.padding_stats(np.asarray([[17, 32], [32, 32]]), np.asarray([[32, 32], [32, 64]]), 16)
    # Image 1 covers 2x2 patches of a 2x2 canvas; image 2 covers 2x2 of 2x4: waste 4 / 12 tokens.
    assert s["token_waste"] == pytest.approx(4 / 12)
    assert s["pixel_waste"] == pytest.approx(1 - (17 * 32 + 32 * 32) / (32 * 32 + 32 * 64))
    assert s["num_shapes"] == 2


@functools.lru_cache(maxsize=None)
def _designed(scales):
    h, w = _coco_like_sizes(20000, seed=1)
    sc = T.scales_for(scales)
    tcfg = T.TrainTransformConfig(scales=sc, max_size=max(sc) * 1333 // 800)
    sample = B.simulate_train_sizes(h, w, tcfg)
    return h, w, tcfg, B.design_canvases(sample, B.catch_all_canvases(*tcfg.max_output_hw(), 16), 12, 16)


@pytest.mark.parametrize("scales, leftover", [("s", "merge"), ("ti", "merge"), ("s", "drop")])
def test_epoch_plan_meets_padding_goals_on_coco_like_sizes(scales, leftover):
    """Issue item 4: multi-scale training with waste <= 20% and <= 12 shapes (COCO-like sizes)."""
    h, w, tcfg, canv = _designed(scales)
    plan = B.train_epoch_plan(7, 0, h, w, tcfg, canv, 64, leftover)
    st = plan.stats()
    assert st["token_waste"] <= 0.20 and st["num_shapes"] <= 12, st
    # 'merge': every example once, plus at most one partial batch's completion per orientation;
    # 'drop': each example at most once. Every batch's images fit its canvas, which is a declared one.
    ex = plan.example.reshape(-1)
    if leftover == "merge":
        assert set(ex.tolist()) == set(range(len(h))) and st["dropped"] == 0
        assert 0 <= st["repeated"] <= 2 * 63 and st["examples"] == len(h) + st["repeated"]
        assert len(ex) - len(np.unique(ex)) == st["repeated"]
    else:
        assert len(np.unique(ex)) == len(ex) and st["examples"] + st["dropped"] == len(h)
        assert st["dropped"] <= 12 * 63 and st["repeated"] == 0
    hw = T.output_hw(plan.geom)
    assert (hw <= plan.canvas[:, None, :]).all()
    assert {tuple(c) for c in plan.canvas} <= set(canv)


@pytest.mark.parametrize("n_land, n_port", [(5, 3), (4, 1), (9, 7), (0, 3)])
def test_merge_trains_every_example_every_epoch_also_a_small_orientation(n_land, n_port):
    """A small dataset whose portrait images are fewer than a batch: they used to be dropped in every epoch
    (leftovers were packed per orientation and a partial batch dropped); now each epoch has every example."""
    h = np.asarray([480] * n_land + [640] * n_port)
    w = np.asarray([640] * n_land + [480] * n_port)
    tcfg = T.TrainTransformConfig(scales=T.SCALES_S, max_size=1333)  # flips and the crop branch included
    canv = B.design_canvases(B.simulate_train_sizes(h, w, tcfg), B.catch_all_canvases(800, 1333, 16), 6, 16)
    for epoch in range(6):
        plan = B.train_epoch_plan(0, epoch, h, w, tcfg, canv, 4)
        ex = plan.example.reshape(-1)
        assert set(ex.tolist()) == set(range(n_land + n_port)), epoch
        st = plan.stats()
        assert st["dropped"] == 0 and st["examples"] == len(ex) == n_land + n_port + st["repeated"]
        assert (T.output_hw(plan.geom) <= plan.canvas[:, None, :]).all()
        assert {tuple(c) for c in plan.canvas} <= set(canv)
        again = B.train_epoch_plan(0, epoch, h, w, tcfg, canv, 4)
        np.testing.assert_array_equal(again.example, plan.example)  # repeats are seeded too


def test_merge_with_explicit_canvases_that_hold_no_mixed_batch():
    """Explicit input.canvases without catch-alls: a leftover chunk of one orientation may fit no single canvas;
    it is split by canvas (it used to land on canvas -1, i.e. the last one, too small for some images)."""
    canv = np.asarray([(608, 1008), (800, 800)])
    hw = np.asarray([(600, 1000), (800, 800), (600, 1000), (800, 800), (600, 1000)])
    batches, repeated = B._merge_leftovers(np.arange(5), hw, canv, 4, np.random.default_rng(0))
    assert sum(len(m) for m, _ in batches) == 5 + repeated and all(len(m) == 4 for m, _ in batches)
    for members, c in batches:
        assert c >= 0 and (hw[members] <= canv[c]).all()
    assert {int(i) for m, _ in batches for i in m} == set(range(5))


def test_epoch_plans_are_seeded():
    h, w = _coco_like_sizes(300, seed=2)
    tcfg = T.TrainTransformConfig(scales=T.SCALES_S, max_size=1333)
    canv = B.design_canvases(B.simulate_train_sizes(h, w, tcfg), B.catch_all_canvases(800, 1333, 16), 6, 16)
    a = B.train_epoch_plan(3, 5, h, w, tcfg, canv, 8)
    b = B.train_epoch_plan(3, 5, h, w, tcfg, canv, 8)
    c = B.train_epoch_plan(3, 6, h, w, tcfg, canv, 8)
    d = B.train_epoch_plan(4, 5, h, w, tcfg, canv, 8)
    for x, y in ((a.example, b.example), (a.geom, b.geom), (a.canvas, b.canvas)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.example[:5], c.example[:5]) and not np.array_equal(a.example[:5], d.example[:5])
    unshuffled = B.train_epoch_plan(3, 5, h, w, tcfg, canv, 8, shuffle=False)
    assert len(unshuffled) > 0


def test_eval_plan_covers_every_example_once():
    h, w = _coco_like_sizes(103, seed=3)
    g = T.eval_geometry(h, w, 800, 1333)
    hw = T.output_hw(g)
    canv = B.design_canvases(hw, [tuple(B.ceil_to(hw.max(0), 16))], 4, 16)
    plan = B.eval_plan(g, canv, 8)
    valid = plan.example[plan.valid]
    assert sorted(valid.tolist()) == list(range(103))
    assert (T.output_hw(plan.geom) <= plan.canvas[:, None, :]).all()
    # Fillers only at the end of a batch, at most one partial batch per canvas.
    assert all(v[: v.sum()].all() for v in plan.valid)
    assert (~plan.valid.all(axis=1)).sum() <= len(canv)
