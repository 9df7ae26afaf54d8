"""box_ops against a float64 numpy reference (written per box, with loops) and HF's DETR box utilities."""

import numpy as np
import pytest
import torch
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import box_iou as hf_box_iou
from transformers.loss.loss_for_object_detection import generalized_box_iou as hf_giou

from yolos_jax import box_ops


def _random_cxcywh(rng, shape):
    c = rng.uniform(0.1, 0.9, shape + (2,))
    wh = rng.uniform(0.02, 0.6, shape + (2,))
    return np.concatenate([c, wh], -1)


def _ref_xyxy(b):
    cx, cy, w, h = b
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _ref_iou_giou(a, b):
    """float64, one pair at a time, straight from the definitions."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def test_conversions_match_float64_reference_and_round_trip():
    rng = np.random.default_rng(0)
    boxes = _random_cxcywh(rng, (3, 5))
    xyxy = np.asarray(box_ops.cxcywh_to_xyxy(boxes.astype(np.float32)))
    ref = np.stack([[_ref_xyxy(b) for b in row] for row in boxes])
    np.testing.assert_allclose(xyxy, ref, atol=1e-6)
    back = np.asarray(box_ops.xyxy_to_cxcywh(ref.astype(np.float32)))
    np.testing.assert_allclose(back, boxes, atol=1e-6)
    # HF's own conversion agrees too.
    hf = center_to_corners_format(torch.tensor(boxes, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(xyxy, hf, atol=1e-7)


def test_scale_to_pixels_uses_width_for_x_and_height_for_y():
    rng = np.random.default_rng(1)
    boxes = _random_cxcywh(rng, (2, 4))
    size_hw = np.array([[480, 640], [333, 500]], np.int32)  # (h, w)
    got = np.asarray(box_ops.cxcywh_to_xyxy_pixels(boxes.astype(np.float32), size_hw))
    for i in range(2):
        h, w = size_hw[i]
        ref = np.stack([_ref_xyxy(b) * np.array([w, h, w, h]) for b in boxes[i]])
        np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-4)


def test_pairwise_iou_giou_match_float64_reference():
    rng = np.random.default_rng(2)
    b1 = np.stack([_ref_xyxy(b) for b in _random_cxcywh(rng, (7,))])
    b2 = np.stack([_ref_xyxy(b) for b in _random_cxcywh(rng, (5,))])
    b2[0] = b1[3]  # identical boxes: IoU = GIoU = 1
    b2[1] = [2.0, 2.0, 2.5, 2.5]  # disjoint and far: negative GIoU
    iou, union = box_ops.pairwise_iou(b1.astype(np.float32), b2.astype(np.float32))
    giou = np.asarray(box_ops.pairwise_giou(b1.astype(np.float32), b2.astype(np.float32)))
    ref = np.array([[_ref_iou_giou(a, b) for b in b2] for a in b1])  # [7, 5, 2]
    np.testing.assert_allclose(np.asarray(iou), ref[..., 0], atol=1e-6)
    np.testing.assert_allclose(giou, ref[..., 1], atol=1e-6)
    assert giou[3, 0] == pytest.approx(1.0, abs=1e-6) and np.all(giou[:, 1] < 0)
    # Leading batch axes broadcast.
    stacked = [np.stack([b, b]).astype(np.float32) for b in (b1, b2)]
    giou_b = np.asarray(box_ops.pairwise_giou(*stacked))
    np.testing.assert_allclose(giou_b[1], giou, atol=0)


def test_giou_equals_hf_generalized_box_iou():
    rng = np.random.default_rng(3)
    b1 = center_to_corners_format(torch.tensor(_random_cxcywh(rng, (9,)), dtype=torch.float64))
    b2 = center_to_corners_format(torch.tensor(_random_cxcywh(rng, (6,)), dtype=torch.float64))
    f1, f2 = b1.numpy().astype(np.float32), b2.numpy().astype(np.float32)
    np.testing.assert_allclose(np.asarray(box_ops.pairwise_giou(f1, f2)), hf_giou(b1, b2).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(box_ops.pairwise_iou(f1, f2)[0]), hf_box_iou(b1, b2)[0].numpy(), atol=1e-6)
    # Elementwise = the diagonal of the pairwise matrix.
    n = len(b2)
    np.testing.assert_allclose(np.asarray(box_ops.elementwise_giou(f1[:n], f2)),
                               hf_giou(b1[:n], b2).numpy().diagonal(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(box_ops.elementwise_iou(f1[:n], f2)),
                               hf_box_iou(b1[:n], b2)[0].numpy().diagonal(), atol=1e-6)
