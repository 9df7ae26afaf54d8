"""The set loss against HF transformers' ForObjectDetectionLoss (YOLOS's loss), values and gradients."""

import functools
import types

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss, HungarianMatcher, box_iou

from yolos_jax import losses, matcher

B, Q, C, M, N_AUX = 8, 10, 5, 8, 2
COUNTS = (0, 1, 8, 3, 0, 5, 1, 2)  # 0, 1 and many targets per image


def random_inputs(seed, counts=COUNTS):
    rng = np.random.default_rng(seed)

    def head():
        logits = rng.normal(0, 2, (B, Q, C + 1)).astype(np.float32)
        boxes = np.concatenate([rng.uniform(0.2, 0.8, (B, Q, 2)), rng.uniform(0.05, 0.5, (B, Q, 2))], -1)
        return dict(logits=logits, boxes=boxes.astype(np.float32))

    outputs = head()
    outputs["aux_outputs"] = [head() for _ in range(N_AUX)]
    labels = np.zeros((B, M), np.int32)
    tboxes = np.zeros((B, M, 4), np.float32)
    mask = np.zeros((B, M), bool)
    for i, n in enumerate(counts):
        slots = np.sort(rng.choice(M, n, replace=False))
        mask[i, slots] = True
        labels[i, slots] = rng.integers(0, C, n)
        tboxes[i, slots] = np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.5, (n, 2))], -1)
    return outputs, dict(labels=labels, boxes=tboxes, box_mask=mask)


def hf_loss(outputs, targets, aux):
    """HF's YOLOS loss (weights from YolosConfig's defaults = ours) with torch gradients."""
    cfg = types.SimpleNamespace(class_cost=1, bbox_cost=5, giou_cost=2, num_labels=C, eos_coefficient=0.1,
                                bbox_loss_coefficient=5, giou_loss_coefficient=2, auxiliary_loss=aux,
                                decoder_layers=N_AUX + 1)
    heads = outputs["aux_outputs"] + [outputs]  # HF: intermediate layers first, the last one last
    logits = [torch.tensor(h["logits"], requires_grad=True) for h in heads]
    boxes = [torch.tensor(h["boxes"], requires_grad=True) for h in heads]
    labels = [dict(class_labels=torch.tensor(targets["labels"][i][targets["box_mask"][i]], dtype=torch.int64),
                   boxes=torch.tensor(targets["boxes"][i][targets["box_mask"][i]])) for i in range(B)]
    loss, loss_dict, _ = ForObjectDetectionLoss(logits[-1], labels, "cpu", boxes[-1], cfg,
                                                outputs_class=torch.stack(logits), outputs_coord=torch.stack(boxes))
    loss.backward()
    return loss, loss_dict, logits, boxes, labels


@functools.lru_cache(maxsize=None)
def loss_and_grad(aux, mesh=None, batch_axes=None):
    loss_cfg = losses.default_loss_config()
    loss_cfg.aux_loss = aux
    matcher_cfg = matcher.default_matcher_config()

    def f(outputs, targets):
        return losses.set_loss(outputs, targets, loss_cfg, matcher_cfg, mesh=mesh, batch_axes=batch_axes)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


@pytest.mark.parametrize("aux", [False, True])
def test_loss_and_gradients_equal_hf(aux):
    outputs, targets = random_inputs(0)
    (total, metrics), grads = loss_and_grad(aux)(outputs, targets)
    ref_loss, ref_dict, ref_logits, ref_boxes, ref_labels = hf_loss(outputs, targets, aux)
    assert float(total) == pytest.approx(ref_loss.item(), abs=1e-5)
    suffixes = [""] + ([f"_{k}" for k in range(N_AUX)] if aux else [])
    for s in suffixes:
        for key in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert float(metrics[key + s]) == pytest.approx(ref_dict[key + s].item(), abs=1e-5), key + s
    assert not any(k.endswith("_0") for k in metrics) or aux
    # Gradients w.r.t. every head's logits and boxes (HF's heads are aux first, final last).
    ours = [grads["aux_outputs"][k] for k in range(N_AUX)] + [grads]
    for k, (ref_l, ref_b) in enumerate(zip(ref_logits, ref_boxes)):
        if not aux and k < N_AUX:
            assert np.all(np.asarray(ours[k]["logits"]) == 0) and ref_l.grad is None
            continue
        np.testing.assert_allclose(np.asarray(ours[k]["logits"]), ref_l.grad.numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours[k]["boxes"]), ref_b.grad.numpy(), atol=1e-5)

    # matched_iou: mean IoU of HF's matched pairs.
    hf_matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    final = dict(logits=torch.tensor(outputs["logits"]), pred_boxes=torch.tensor(outputs["boxes"]))
    ious = []
    for i, (src, tgt) in enumerate(hf_matcher(final, ref_labels)):
        a = center_to_corners_format(final["pred_boxes"][i][src].double())
        t = center_to_corners_format(ref_labels[i]["boxes"][tgt].double())
        ious += list(box_iou(a, t)[0].diagonal().numpy())
    assert float(metrics["matched_iou"]) == pytest.approx(np.mean(ious), abs=1e-6)
    assert float(metrics["num_boxes"]) == sum(COUNTS)


def test_empty_batch_normalises_by_one():
    outputs, targets = random_inputs(1, counts=(0,) * B)
    (total, metrics), grads = loss_and_grad(False)(outputs, targets)
    ref_loss, ref_dict, *_ = hf_loss(outputs, targets, False)
    assert float(metrics["loss_bbox"]) == 0.0 and float(metrics["loss_giou"]) == 0.0
    assert float(total) == pytest.approx(ref_loss.item(), abs=1e-5)
    assert float(metrics["num_boxes"]) == 1.0 and np.all(np.isfinite(np.asarray(grads["boxes"])))


def test_sharded_loss_equals_unsharded():
    outputs, targets = random_inputs(2)
    del outputs["aux_outputs"]  # the aux heads call the same sharded matcher; spare their compile time
    (total, metrics), grads = loss_and_grad(False)(outputs, targets)
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    args = jax.device_put((outputs, targets), sharding)
    (total_s, metrics_s), grads_s = loss_and_grad(False, mesh, ("data", "fsdp"))(*args)
    # Same matching; only float32 summation order differs.
    assert float(total_s) == pytest.approx(float(total), rel=1e-6)
    for k in metrics:
        assert float(metrics_s[k]) == pytest.approx(float(metrics[k]), rel=1e-6, abs=1e-6), k
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                 grads_s, grads)


def test_bad_config_and_missing_aux_fail_clearly():
    outputs, targets = random_inputs(3)
    matcher_cfg = matcher.default_matcher_config()
    cfg = losses.default_loss_config()
    cfg.aux_loss = True
    no_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
    with pytest.raises(ValueError, match="aux_layers"):
        losses.set_loss(no_aux, targets, cfg, matcher_cfg)
    with pytest.raises(ValueError, match="config.loss.eos_coef"):
        losses.set_loss(outputs, targets, dict(losses.default_loss_config(), eos_coef=-0.1), matcher_cfg)
    missing = {k: v for k, v in losses.default_loss_config().items() if k != "giou_weight"}
    with pytest.raises(ValueError, match="config.loss.giou_weight"):
        losses.set_loss(outputs, targets, missing, matcher_cfg)
