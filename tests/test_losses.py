"""The set loss against HF transformers' ForObjectDetectionLoss (YOLOS's loss), values and gradients; the
'per_image' CE normalisation (the original's at one image per GPU) and fillers against a float64 reference."""

import functools
import importlib.util
import os
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
def loss_and_grad(aux, mesh=None, batch_axes=None, ce_normalization="batch"):
    loss_cfg = losses.default_loss_config()
    loss_cfg.aux_loss = aux
    loss_cfg.ce_normalization = ce_normalization
    matcher_cfg = matcher.default_matcher_config()

    def f(outputs, targets):
        return losses.set_loss(outputs, targets, loss_cfg, matcher_cfg, mesh=mesh, batch_axes=batch_axes)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


@pytest.mark.parametrize("aux", [False, True])
def test_loss_and_gradients_equal_hf(aux):
    """ce_normalization='batch' (the default) is HF's loss."""
    assert losses.default_loss_config().ce_normalization == "batch"
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


# --------------------------------------------------------------------------------------------------
# config.loss.ce_normalization: 'batch' (HF's) | 'per_image' (the original's at one image per GPU)
# --------------------------------------------------------------------------------------------------


def reference_loss64(outputs, targets, aux, ce_normalization, valid=None):
    """The set loss in float64 torch, written here from DETR's SetCriterion (not from our code): HF's matcher
    on float64 copies; CE per image as the original computes it on a GPU holding that image alone
    ('per_image', then the mean over images, DDP's gradient mean) or over all queries at once ('batch');
    box terms over the global box count. Returns (total, {term: value}, [logits leaves], [box leaves])."""
    heads = [outputs] + (outputs["aux_outputs"] if aux else [])
    keep = np.ones(B, bool) if valid is None else np.asarray(valid)
    idx = np.flatnonzero(keep)
    tgt = [dict(class_labels=torch.tensor(targets["labels"][i][targets["box_mask"][i]], dtype=torch.int64),
                boxes=torch.tensor(targets["boxes"][i][targets["box_mask"][i]], dtype=torch.float64)) for i in idx]
    num_boxes = max(sum(len(t["class_labels"]) for t in tgt), 1)
    hf_matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    total, terms, leaves_l, leaves_b = 0.0, {}, [], []
    for k, h in enumerate(heads):
        logits = torch.tensor(h["logits"], dtype=torch.float64, requires_grad=True)
        boxes = torch.tensor(h["boxes"], dtype=torch.float64, requires_grad=True)
        leaves_l.append(logits)
        leaves_b.append(boxes)
        lg, bx = logits[idx], boxes[idx]
        with torch.no_grad():
            matching = hf_matcher(dict(logits=lg, pred_boxes=bx), tgt)
        nums, dens, per_image, l1, giou = [], [], [], 0.0, 0.0
        for j, (src, ti) in enumerate(matching):
            classes = torch.full((Q,), C, dtype=torch.int64)
            classes[src] = tgt[j]["class_labels"][ti]
            w = torch.where(classes == C, 0.1, 1.0).double()
            nll = -torch.log_softmax(lg[j], -1).gather(1, classes[:, None])[:, 0]
            nums.append((w * nll).sum())
            dens.append(w.sum())
            per_image.append(nums[-1] / dens[-1])
            a, t = bx[j][src], tgt[j]["boxes"][ti]
            l1 = l1 + (a - t).abs().sum()
            ax, tx = center_to_corners_format(a), center_to_corners_format(t)
            lt, rb = torch.min(ax[:, :2], tx[:, :2]), torch.max(ax[:, 2:], tx[:, 2:])
            ilt, irb = torch.max(ax[:, :2], tx[:, :2]), torch.min(ax[:, 2:], tx[:, 2:])
            inter = (irb - ilt).clamp(min=0).prod(-1)
            union = (ax[:, 2:] - ax[:, :2]).prod(-1) + (tx[:, 2:] - tx[:, :2]).prod(-1) - inter
            hull = (rb - lt).prod(-1)
            giou = giou + (1 - (inter / union - (hull - union) / hull)).sum()
        ce = torch.stack(per_image).mean() if ce_normalization == "per_image" else sum(nums) / sum(dens)
        suffix = "" if k == 0 else f"_{k - 1}"
        terms.update({"loss_ce" + suffix: ce, "loss_bbox" + suffix: l1 / num_boxes, "loss_giou" + suffix: giou / num_boxes})
        total = total + ce + 5 * l1 / num_boxes + 2 * giou / num_boxes
    total.backward()
    return total, terms, leaves_l, leaves_b


@pytest.mark.parametrize("ce_normalization,aux", [("per_image", False), ("per_image", True), ("batch", True)])
def test_ce_normalization_equals_float64_reference(ce_normalization, aux):
    outputs, targets = random_inputs(4)
    (total, metrics), grads = loss_and_grad(aux, ce_normalization=ce_normalization)(outputs, targets)
    ref_total, ref_terms, ref_l, ref_b = reference_loss64(outputs, targets, aux, ce_normalization)
    assert float(total) == pytest.approx(ref_total.item(), rel=1e-6, abs=1e-6)
    for key, value in ref_terms.items():
        assert float(metrics[key]) == pytest.approx(value.item(), rel=1e-6, abs=1e-6), key
    ours = [grads] + ([grads["aux_outputs"][k] for k in range(N_AUX)] if aux else [])
    for g, rl, rb in zip(ours, ref_l, ref_b):
        np.testing.assert_allclose(np.asarray(g["logits"]), rl.grad.numpy(), atol=1e-7, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g["boxes"]), rb.grad.numpy(), atol=1e-6, rtol=1e-5)


def test_per_image_differs_from_batch_and_keeps_box_terms():
    """Images with different numbers of matched queries have different weight sums: the two modes differ in
    loss_ce only (the box terms are the same global-count means)."""
    outputs, targets = random_inputs(5)
    (_, per_image), _ = loss_and_grad(True, ce_normalization="per_image")(outputs, targets)
    (_, batch), _ = loss_and_grad(True, ce_normalization="batch")(outputs, targets)
    for s in ("", "_0", "_1"):
        assert abs(float(per_image["loss_ce" + s]) - float(batch["loss_ce" + s])) > 1e-4
        for key in ("loss_bbox", "loss_giou", "cardinality_error", "matched_iou"):
            assert float(per_image[key + s]) == float(batch[key + s]), key + s


@pytest.mark.parametrize("ce_normalization", ["per_image", "batch"])
def test_filler_images_are_left_out(ce_normalization):
    """targets['valid'] = False (the batch schema's filler) contributes to no term: the loss is that of the
    batch without those images, in float64 too."""
    outputs, targets = random_inputs(6)
    del outputs["aux_outputs"]
    valid = np.array([True, False, True, True, False, True, True, False])  # fillers with and without boxes
    loss_cfg = dict(losses.default_loss_config(), ce_normalization=ce_normalization)
    f = jax.jit(jax.value_and_grad(lambda o, t: losses.set_loss(o, t, loss_cfg, matcher.default_matcher_config()),
                                   has_aux=True))
    (total, metrics), grads = f(outputs, dict(targets, valid=valid))
    ref_total, ref_terms, ref_l, ref_b = reference_loss64(outputs, targets, False, ce_normalization, valid=valid)
    assert float(total) == pytest.approx(ref_total.item(), rel=1e-6, abs=1e-6)
    for key, value in ref_terms.items():
        assert float(metrics[key]) == pytest.approx(value.item(), rel=1e-6, abs=1e-6), key
    assert float(metrics["num_boxes"]) == sum(c for c, v in zip(COUNTS, valid) if v)
    np.testing.assert_allclose(np.asarray(grads["logits"]), ref_l[0].grad.numpy(), atol=1e-7, rtol=1e-5)
    assert np.all(np.asarray(grads["logits"])[~valid] == 0) and np.all(np.asarray(grads["boxes"])[~valid] == 0)
    # A batch of fillers only: zero loss, finite gradients.
    (total0, _), grads0 = f(outputs, dict(targets, valid=np.zeros(B, bool)))
    assert float(total0) == 0.0 and np.all(np.isfinite(np.asarray(grads0["logits"])))


def test_bad_ce_normalization_and_too_many_target_slots_fail_clearly():
    outputs, targets = random_inputs(3)
    matcher_cfg = matcher.default_matcher_config()
    with pytest.raises(ValueError, match="config.loss.ce_normalization"):
        losses.set_loss(outputs, targets, dict(losses.default_loss_config(), ce_normalization="image"), matcher_cfg)
    wide = dict(labels=np.zeros((B, Q + 1), np.int32), boxes=np.full((B, Q + 1, 4), 0.5, np.float32),
                box_mask=np.zeros((B, Q + 1), bool))
    with pytest.raises(ValueError, match=r"config.input.max_boxes <= config.model.num_det_tokens"):
        losses.set_loss(outputs, wide, losses.default_loss_config(), matcher_cfg)


def _config_file(name, arg=None):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name,arg,expected", [
    ("yolos_s.py", None, "per_image"), ("yolos_s.py", "dWr", "per_image"), ("yolos_s.py", "dwr", "per_image"),
    ("yolos_b.py", None, "per_image"), ("yolos_s_windowed.py", None, "per_image"),
    ("yolos_b_windowed.py", None, "per_image"), ("yolos_s_fpdetr.py", None, "per_image"),
    ("yolos_s_mimdet.py", None, "per_image"), ("yolos_ti.py", None, "batch"), ("yolos_ti_windowed.py", None, "batch"),
    ("demo.py", "smoke", "batch")])
def test_paper_configs_ce_normalization(name, arg, expected):
    """S and B (and the configs that keep their recipe) train as the original at 1 image/GPU; Ti (2 images/GPU in
    the original, matched by neither mode exactly) and the rest keep HF's 'batch'."""
    assert _config_file(name, arg).loss.ce_normalization == expected
