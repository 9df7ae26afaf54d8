"""Box formats and overlaps: the one place where box coordinates are converted.

Formats (all float, last axis of size 4):
  cxcywh  (center x, center y, width, height). Model outputs and batch targets use this format,
          normalised by the *un-padded* image width/height, so values lie in [0, 1].
  xyxy    (x0, y0, x1, y1): top-left and bottom-right corners, same units as the input.

Every function is pure `jax.numpy`, works on any leading batch shape and accepts numpy arrays. The
formulas follow DETR's `util/box_ops.py` (as copied into HF transformers), so the set loss and the matcher
reproduce the reference numbers: corners are *not* clipped, a box with x1 < x0 has a negative area.
"""

from __future__ import annotations

import jax.numpy as jnp

Array = jnp.ndarray


def cxcywh_to_xyxy(boxes: Array) -> Array:
    """(cx, cy, w, h) -> (x0, y0, x1, y1). boxes: [..., 4]; returns [..., 4] in the same units."""
    boxes = jnp.asarray(boxes)
    center, half = boxes[..., :2], 0.5 * boxes[..., 2:]
    return jnp.concatenate([center - half, center + half], axis=-1)


def xyxy_to_cxcywh(boxes: Array) -> Array:
    """(x0, y0, x1, y1) -> (cx, cy, w, h). boxes: [..., 4]; returns [..., 4] in the same units."""
    boxes = jnp.asarray(boxes)
    lo, hi = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([(lo + hi) / 2, hi - lo], axis=-1)


def scale_to_pixels(boxes_xyxy: Array, size_hw: Array) -> Array:
    """Relative corners -> pixel corners.

    boxes_xyxy: [..., N, 4] xyxy normalised to [0, 1] by the image's (w, h);
    size_hw:    [..., 2] (height, width) in pixels of the image the boxes refer to (e.g. the batch's
                `orig_size` to report boxes on the original image);
    returns     [..., N, 4] xyxy in pixels (x scaled by width, y by height).
    """
    size_hw = jnp.asarray(size_hw)
    h = size_hw[..., 0].astype(jnp.float32)
    w = size_hw[..., 1].astype(jnp.float32)
    scale = jnp.stack([w, h, w, h], axis=-1)[..., None, :]
    return jnp.asarray(boxes_xyxy) * scale


def cxcywh_to_xyxy_pixels(boxes: Array, size_hw: Array) -> Array:
    """Relative cxcywh [..., N, 4] -> pixel xyxy [..., N, 4] for images of size_hw [..., 2] (h, w)."""
    return scale_to_pixels(cxcywh_to_xyxy(boxes), size_hw)


def box_area(boxes_xyxy: Array) -> Array:
    """Area of xyxy boxes [..., 4] -> [...] (squared input units; negative for inverted boxes)."""
    wh = jnp.asarray(boxes_xyxy)
    wh = wh[..., 2:] - wh[..., :2]
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(boxes1: Array, boxes2: Array) -> tuple[Array, Array]:
    """IoU of every pair.

    boxes1: [..., N, 4] xyxy; boxes2: [..., M, 4] xyxy (same units, same leading shape);
    returns (iou [..., N, M], union [..., N, M]). Zero-area unions give NaN, as in the reference.
    """
    b1 = jnp.asarray(boxes1)[..., :, None, :]
    b2 = jnp.asarray(boxes2)[..., None, :, :]
    return _iou_union(b1, b2)


def pairwise_giou(boxes1: Array, boxes2: Array) -> Array:
    """Generalized IoU (Rezatofighi et al. 2019) of every pair, in [-1, 1].

    boxes1: [..., N, 4] xyxy; boxes2: [..., M, 4] xyxy; returns [..., N, M].
    """
    b1 = jnp.asarray(boxes1)[..., :, None, :]
    b2 = jnp.asarray(boxes2)[..., None, :, :]
    return _giou(b1, b2)


def elementwise_iou(boxes1: Array, boxes2: Array) -> Array:
    """IoU of corresponding boxes: boxes1, boxes2 [..., 4] xyxy -> [...]."""
    return _iou_union(jnp.asarray(boxes1), jnp.asarray(boxes2))[0]


def elementwise_giou(boxes1: Array, boxes2: Array) -> Array:
    """Generalized IoU of corresponding boxes: boxes1, boxes2 [..., 4] xyxy -> [...] in [-1, 1]."""
    return _giou(jnp.asarray(boxes1), jnp.asarray(boxes2))


def _iou_union(b1: Array, b2: Array) -> tuple[Array, Array]:
    # Broadcasting core of the pairwise and elementwise forms.
    lt = jnp.maximum(b1[..., :2], b2[..., :2])
    rb = jnp.minimum(b1[..., 2:], b2[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(b1) + box_area(b2) - inter
    return inter / union, union


def _giou(b1: Array, b2: Array) -> Array:
    iou, union = _iou_union(b1, b2)
    lt = jnp.minimum(b1[..., :2], b2[..., :2])
    rb = jnp.maximum(b1[..., 2:], b2[..., 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing
