"""The matcher against HF transformers' HungarianMatcher and scipy; the per-shard host callback."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy.optimize import linear_sum_assignment
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import HungarianMatcher, generalized_box_iou

from yolos_jax import matcher

Q, C = 12, 7


def random_batch(seed, counts, m_slots, q=Q, num_classes=C, interleave=True):
    """Predictions and padded targets; image i has counts[i] real boxes spread over m_slots slots."""
    rng = np.random.default_rng(seed)
    b = len(counts)
    logits = rng.normal(0, 2, (b, q, num_classes + 1)).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, q, 2)), rng.uniform(0.05, 0.5, (b, q, 2))], -1)
    labels = np.zeros((b, m_slots), np.int32)
    tboxes = np.zeros((b, m_slots, 4), np.float32)
    mask = np.zeros((b, m_slots), bool)
    for i, n in enumerate(counts):
        # Real boxes at random slots (not only a prefix) to prove that padded slots are excluded anywhere.
        slots = np.sort(rng.choice(m_slots, n, replace=False)) if interleave else np.arange(n)
        mask[i, slots] = True
        labels[i, slots] = rng.integers(0, num_classes, n)
        tboxes[i, slots] = np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.5, (n, 2))], -1)
    targets = dict(labels=labels, boxes=tboxes, box_mask=mask)
    return logits, boxes.astype(np.float32), targets


def hf_pred_index(logits, boxes, targets, cfg):
    """HF's matcher, its (query, target) pairs written into our [B, M] contract."""
    hf = HungarianMatcher(class_cost=cfg.cost_class, bbox_cost=cfg.cost_bbox, giou_cost=cfg.cost_giou)
    hf_targets = [
        dict(class_labels=torch.tensor(targets["labels"][i][targets["box_mask"][i]], dtype=torch.int64),
             boxes=torch.tensor(targets["boxes"][i][targets["box_mask"][i]]))
        for i in range(len(logits))
    ]
    indices = hf(dict(logits=torch.tensor(logits), pred_boxes=torch.tensor(boxes)), hf_targets)
    out = np.full(targets["box_mask"].shape, -1, np.int32)
    for i, (src, tgt) in enumerate(indices):
        slots = np.flatnonzero(targets["box_mask"][i])
        out[i, slots[tgt.numpy()]] = src.numpy()
    return out


@functools.lru_cache(maxsize=None)
def jitted_match(implementation, mesh=None, batch_axes=None):
    cfg = matcher.default_matcher_config()
    cfg.implementation = implementation
    return jax.jit(lambda l, b, t: matcher.match(l, b, t, cfg, mesh=mesh, batch_axes=batch_axes))


COUNTS = (0, 1, 9, 3, 0, 10, 1, 6)  # 0, 1 and many targets, M = 10 slots, Q = 12 queries


@pytest.mark.parametrize("implementation", ["host", "device"])
def test_matches_hf_hungarian_matcher(implementation):
    cfg = matcher.default_matcher_config()
    for seed in range(3):
        logits, boxes, targets = random_batch(seed, COUNTS, 10)
        ref = hf_pred_index(logits, boxes, targets, cfg)
        got = np.asarray(jitted_match(implementation)(logits, boxes, targets))
        np.testing.assert_array_equal(got, ref)
        assert np.all(got[~targets["box_mask"]] == -1)
        assert np.all(got[0] == -1) and np.sum(got[1] >= 0) == 1


def test_more_targets_than_queries_on_host_leaves_the_rest_unmatched():
    logits, boxes, targets = random_batch(5, (15, 2), 16, q=Q)
    cfg = matcher.default_matcher_config()
    got = np.asarray(jitted_match("host")(logits, boxes, targets))
    np.testing.assert_array_equal(got, hf_pred_index(logits, boxes, targets, cfg))
    assert np.sum(got[0] >= 0) == Q and len(set(got[0][got[0] >= 0])) == Q
    with pytest.raises(ValueError, match="implementation='device' needs at most"):
        matcher.match(logits, boxes, targets, dict(cfg, implementation="device"))


def test_cost_matrix_equals_hf_cost():
    logits, boxes, targets = random_batch(7, (4, 4), 4, interleave=False)
    cfg = matcher.default_matcher_config()
    cost_fn = jax.jit(lambda *a: matcher.cost_matrix(*a, cfg))
    cost = np.asarray(cost_fn(logits, boxes, targets["labels"], targets["boxes"]))
    for i in range(2):
        prob = torch.tensor(logits[i]).softmax(-1)
        pb, tb = torch.tensor(boxes[i]), torch.tensor(targets["boxes"][i])
        giou = generalized_box_iou(center_to_corners_format(pb), center_to_corners_format(tb))
        ref = (cfg.cost_bbox * torch.cdist(pb, tb, p=1) - cfg.cost_class * prob[:, targets["labels"][i]]
               - cfg.cost_giou * giou)
        np.testing.assert_allclose(cost[i], ref.numpy(), atol=2e-6)


def test_sharded_host_matching_runs_per_device_shard():
    assert jax.device_count() == 8, "tests/conftest.py provides 8 simulated CPU devices"
    counts = COUNTS + (2, 0, 5, 7, 1, 10, 4, 3)  # B = 16
    logits, boxes, targets = random_batch(11, counts, 10)
    ref = hf_pred_index(logits, boxes, targets, matcher.default_matcher_config())
    for shape, axes, local_b in [((4, 2), ("data", "fsdp"), 2), ((4, 2), ("data",), 4)]:
        names = ("data", "fsdp") if axes == ("data", "fsdp") else ("data", "model")
        mesh = Mesh(np.array(jax.devices()).reshape(shape), names)
        args = jax.device_put((logits, boxes, targets), NamedSharding(mesh, P(axes)))
        fn = jitted_match("host", mesh, axes)
        matcher.host_call_log.shapes.clear()
        matcher.host_call_log.enabled = True
        try:
            got = fn(*args)
            got.block_until_ready()
        finally:
            matcher.host_call_log.enabled = False
        np.testing.assert_array_equal(np.asarray(got), ref)
        # Every call saw only its device's images; 8 calls in all (on the ('data', 'model') mesh the two
        # 'model' replicas each solve their copy). Never one call with the whole batch.
        assert matcher.host_call_log.shapes == [(local_b, Q, 10)] * 8
        assert got.sharding.spec == P(axes)
        if axes == ("data", "fsdp"):  # the device solver under the same shard_map agrees
            np.testing.assert_array_equal(np.asarray(jitted_match("device", mesh, axes)(*args)), ref)


def test_bad_mesh_arguments_and_config_fail_clearly():
    logits, boxes, targets = random_batch(0, (1, 2, 3), 4)
    cfg = matcher.default_matcher_config()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    with pytest.raises(ValueError, match="not divisible"):
        matcher.match(logits, boxes, targets, cfg, mesh=mesh, batch_axes=("data",))
    with pytest.raises(ValueError, match="not axes of the mesh"):
        matcher.match(logits, boxes, targets, cfg, mesh=mesh, batch_axes=("batch",))
    with pytest.raises(ValueError, match="config.matcher.implementation"):
        matcher.match(logits, boxes, targets, dict(cfg, implementation="gpu"))
    with pytest.raises(ValueError, match="config.matcher.cost_bbox"):
        matcher.match(logits, boxes, targets, dict(cfg, cost_bbox=-1.0))
    with pytest.raises(ValueError, match="all 0"):
        matcher.match(logits, boxes, targets, dict(cfg, cost_bbox=0.0, cost_class=0.0, cost_giou=0.0))


@pytest.mark.parametrize("implementation", ["host", "device"])
def test_no_gradient_through_matching(implementation):
    logits, boxes, targets = random_batch(3, COUNTS, 10)
    cfg = matcher.default_matcher_config()
    cfg.implementation = implementation

    def f(lg, bx):  # a loss that depends on the boxes only through the matching's gather
        idx = matcher.match(lg, bx, targets, cfg)
        return jnp.sum(jnp.take_along_axis(bx, jnp.maximum(idx, 0)[..., None], axis=1))

    g = jax.jit(jax.grad(f, argnums=(0, 1)))(logits, boxes)
    assert np.all(np.asarray(g[0]) == 0)  # logits only reach the sum through the (constant) indices
    idx = np.asarray(jitted_match(implementation)(logits, boxes, targets))
    expected = np.zeros_like(boxes)
    for i, j in zip(*np.nonzero(idx >= 0)):
        expected[i, idx[i, j]] += 1.0
    np.add.at(expected, (np.nonzero(idx < 0)[0], 0), 1.0)  # unmatched slots gather query 0 in f
    np.testing.assert_array_equal(np.asarray(g[1]), expected)


# --------------------------------------------------------------------- the on-device solver vs scipy


def scipy_pred_index(cost, mask):
    out = np.full(mask.shape, -1, np.int64)
    for i in range(len(cost)):
        cols = np.flatnonzero(mask[i])
        if cols.size:
            r, c = linear_sum_assignment(cost[i][:, cols])
            out[i, cols[c]] = r
    return out


def total_cost(cost, idx):
    b, m = np.nonzero(idx >= 0)
    return np.array([cost[i, idx[i, j], j].astype(np.float64) for i, j in zip(b, m)]).sum() if b.size else 0.0


device_solve = jax.jit(matcher.device_assignment)


@pytest.mark.parametrize("q,m", [(6, 6), (100, 50)])
def test_device_solver_equals_scipy(q, m):
    rng = np.random.default_rng(q * 100 + m)
    b = 6
    mask = rng.random((b, m)) < 0.75
    mask[0] = False  # an image without targets
    mask[1] = True  # a full one (square when q == m: scipy then takes the queries as rows)
    # Tie-free random costs: the same assignment; integer costs with many ties: scipy's tie-breaking too,
    # since float32 arithmetic on small integers is exact.
    for cost in [rng.normal(size=(b, q, m)).astype(np.float32),
                 rng.integers(0, 4, (b, q, m)).astype(np.float32)]:
        got = np.asarray(device_solve(cost, mask))
        ref = scipy_pred_index(cost, mask)
        np.testing.assert_array_equal(got, ref)
        assert total_cost(cost, got) == total_cost(cost, ref)
        assert np.all(got[0] == -1)


def test_device_solver_handles_non_finite_costs():
    rng = np.random.default_rng(0)
    cost = rng.normal(size=(6, 6, 6)).astype(np.float32)  # the shape of a case above: no new compile
    cost[0, :, 1] = np.nan  # a target whose every cost is NaN still gets a query, the only one left
    cost[1, 2:, :] = np.inf
    cost[2, 3, 3] = -np.inf
    mask = np.ones((6, 6), bool)
    mask[3:, 4:] = False
    got = np.asarray(device_solve(cost, mask))
    for i in range(6):
        assert len(set(got[i][mask[i]])) == mask[i].sum() and np.all(got[i][mask[i]] >= 0)
    # Finite part: same as scipy on HF's clean-up (non-finite -> float32 max).
    big = np.finfo(np.float32).max
    clean = np.nan_to_num(cost, nan=big, posinf=big, neginf=big)
    np.testing.assert_array_equal(got, scipy_pred_index(clean, mask))
