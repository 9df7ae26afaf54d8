"""DETR's set criterion, as YOLOS trains with it (HF transformers' `ForObjectDetectionLoss` / `ImageLoss`).

For each image the matcher pairs target boxes with queries; then
  loss_ce    cross-entropy of every query against its matched label, or "no object" (index C) for the
             unmatched ones, with class weight `eos_coef` on "no object" and 1 elsewhere, normalised as
             `loss_cfg.ce_normalization` says:
               'batch'     the weighted mean over all queries of the global batch (torch's
                           `F.cross_entropy(..., weight)`: sum w*nll / sum w), HF's loss;
               'per_image' each image's weighted mean (sum_q w*nll / sum_q w), then the mean over the images:
                           the original's (hustvl/YOLOS, DETR's SetCriterion) at one image per GPU, where
                           each GPU's `F.cross_entropy` sees one image and DDP averages the gradients over
                           GPUs. The two differ because an image's weight sum grows with its number of
                           matched queries (sum_q w = eos_coef * Q + (1 - eos_coef) * matched): 'batch'
                           gives a query of a crowded image less weight than 'per_image' does;
  loss_bbox  L1 between matched predicted and target boxes (cxcywh, relative), summed over coordinates;
  loss_giou  1 - GIoU of the matched pairs;
both box terms summed over the batch and divided by the number of target boxes in the *global* batch
(at least 1). Under `jax.jit` over a mesh the batch arrays are global, so `jnp.sum` over them already is
the all-reduce that DETR does with `torch.distributed` (DETR's per-process mean then the DDP gradient mean
equals this global normalisation).
  total = ce_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou  (1, 5, 2)
plus the same terms for each entry of `outputs['aux_outputs']` (each matched on its own) when
`loss_cfg.aux_loss` is set (each with the same `ce_normalization`). A target dict may carry `valid`
(bool [B], the batch schema's): an image with valid=False (a filler that pads an eval batch; train batches
have none, see `data.batching`) contributes to no term and no count. `cardinality_error` (HF's: mean |#non-"no object" argmax predictions -
#targets| per image) and `matched_iou` (mean IoU of matched pairs) are logged, not optimised.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from yolos_jax import box_ops
from yolos_jax import matcher as matcher_lib

# Stand-in for the boxes of unmatched / padded slots: a valid box, so that their (masked-out) GIoU and
# its gradient stay finite instead of 0 * NaN.
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)


def default_loss_config() -> ml_collections.ConfigDict:
    """`config.loss`: DETR/YOLOS weights (HF YolosConfig: eos_coefficient 0.1, bbox 5, giou 2)."""
    return ml_collections.ConfigDict(
        dict(eos_coef=0.1, ce_weight=1.0, bbox_weight=5.0, giou_weight=2.0, aux_loss=False,
             # 'batch' (HF's) | 'per_image' (the original's at one image per GPU); see the module docstring.
             ce_normalization="batch")
    )


CE_NORMALIZATIONS = ("batch", "per_image")


def validate_loss_config(cfg: Mapping[str, Any]) -> None:
    """Raises ValueError naming the `config.loss` field that is wrong."""
    for name in ("eos_coef", "ce_weight", "bbox_weight", "giou_weight", "aux_loss", "ce_normalization"):
        if name not in cfg:
            raise ValueError(f"config.loss.{name} is missing; start from losses.default_loss_config()")
    for name in ("eos_coef", "ce_weight", "bbox_weight", "giou_weight"):
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"config.loss.{name} must be a finite number >= 0, got {value!r}")
    if cfg["eos_coef"] == 0:
        raise ValueError("config.loss.eos_coef must be > 0 (DETR/YOLOS use 0.1)")
    if not isinstance(cfg["aux_loss"], bool):
        raise ValueError(f"config.loss.aux_loss must be True or False, got {cfg['aux_loss']!r}")
    if cfg["ce_normalization"] not in CE_NORMALIZATIONS:
        raise ValueError(
            f"config.loss.ce_normalization must be 'batch' (one weighted mean over the global batch, HF's) or "
            f"'per_image' (each image's weighted mean, then their mean: the original's at one image per GPU), "
            f"got {cfg['ce_normalization']!r}")


def global_normalizers(targets: Mapping[str, jax.Array], num_queries: int, eos_coef: float) -> dict[str, jax.Array]:
    """The denominators of `set_loss` for a whole (global) batch, computed from its targets alone, so that a batch
    cut into micro-batches (gradient accumulation) gives the same loss and gradient as the whole one: the sum of
    the micro-batches' losses, each normalised by these, is the whole batch's loss.

    targets: as in `set_loss` ('box_mask' bool [B, M], optional 'valid' bool [B]).
    Returns float32 scalars: 'num_boxes' (target boxes, clamped at 1: DETR's all-reduced num_boxes),
    'ce_weight_sum' (the sum of the class term's weights over every query: each of an image's n boxes is matched
    to one query of weight 1, its Q - n other queries weigh eos_coef) and 'num_images' (real images).
    """
    box_mask = jnp.asarray(targets["box_mask"], bool)
    valid = targets.get("valid")
    image_weight = jnp.ones(box_mask.shape[:1], jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    n = jnp.sum(box_mask.astype(jnp.float32), axis=1) * image_weight  # [B]
    ce_weight_sum = jnp.sum(image_weight * (num_queries - n) * eos_coef + n)
    return {"num_boxes": jnp.maximum(jnp.sum(n), 1.0), "ce_weight_sum": ce_weight_sum,
            "num_images": jnp.sum(image_weight)}


def set_loss(outputs: Mapping[str, Any], targets: Mapping[str, jax.Array], loss_cfg: Mapping[str, Any],
             matcher_cfg: Mapping[str, Any], *, mesh: Optional[jax.sharding.Mesh] = None,
             batch_axes: Optional[Sequence[str]] = None,
             normalizers: Optional[Mapping[str, jax.Array]] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The YOLOS training loss of a (global) batch. Jittable.

    outputs: the model's {'logits': [B, Q, C+1], 'boxes': [B, Q, 4] cxcywh relative, optional
      'aux_outputs': list of the same}; any float dtype, computed here in float32.
    targets: {'labels': int [B, M], 'boxes': [B, M, 4] cxcywh relative, 'box_mask': bool [B, M], optional
      'valid': bool [B] (False: a filler image, left out of every term)} (the batch schema's fields; other
      keys are ignored). M <= Q: a target slot beyond the queries could never be matched.
    loss_cfg: `config.loss` (see `default_loss_config`); matcher_cfg: `config.matcher`.
    mesh, batch_axes: passed to the matcher so that matching runs per device shard (see `matcher.match`).
    normalizers: `global_normalizers` of the global batch this batch is a micro-batch of; None: this batch's own
      (the loss of the batch alone). With them, the micro-batches' losses (and gradients) sum to the global one.
    Returns (total scalar float32, metrics): loss_ce, loss_bbox, loss_giou (unweighted, as HF reports
      them), cardinality_error, matched_iou, num_boxes, and for aux output k: loss_ce_k, loss_bbox_k,
      loss_giou_k, cardinality_error_k, matched_iou_k.
    """
    validate_loss_config(loss_cfg)
    aux = outputs.get("aux_outputs") or []
    if loss_cfg["aux_loss"] and not aux:
        raise ValueError(
            "config.loss.aux_loss is True but the model returned no 'aux_outputs': set "
            "config.model.aux_layers > 0, or config.loss.aux_loss = False"
        )
    labels = jnp.asarray(targets["labels"], jnp.int32)
    box_mask = jnp.asarray(targets["box_mask"], bool)
    target_boxes = jnp.asarray(targets["boxes"], jnp.float32)
    q, m = outputs["logits"].shape[1], labels.shape[1]
    if m > q:  # the matcher would leave targets unmatched, silently (as HF's does)
        raise ValueError(
            f"set_loss: {m} target slots per image but only {q} queries: every box beyond {q} would be dropped "
            f"without a word. Set config.input.max_boxes <= config.model.num_det_tokens (raise num_det_tokens "
            "for dense scenes: a converted checkpoint's [DET] tokens grow, see init_from.init_params_from)")
    valid = targets.get("valid")
    image_weight = None  # [B] float32 1/0 per image, or None: every image counts
    if valid is not None:
        valid = jnp.asarray(valid, bool)
        if valid.shape != labels.shape[:1]:
            raise ValueError(f"set_loss: targets['valid'] must be bool [B] = {labels.shape[:1]}, got {valid.shape}")
        box_mask = box_mask & valid[:, None]  # a filler's boxes are neither matched nor counted
        image_weight = valid.astype(jnp.float32)
    # Global count of target boxes, as DETR's all-reduced num_boxes, clamped at 1.
    num_boxes = jnp.maximum(jnp.sum(box_mask.astype(jnp.float32)), 1.0)
    if normalizers is not None:
        num_boxes = jnp.asarray(normalizers["num_boxes"], jnp.float32)
    match_targets = dict(labels=labels, boxes=target_boxes, box_mask=box_mask)

    heads = [("", outputs)]
    if loss_cfg["aux_loss"]:
        heads += [(f"_{k}", a) for k, a in enumerate(aux)]
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {"num_boxes": num_boxes}
    for suffix, head in heads:
        pred_index = matcher_lib.match(head["logits"], head["boxes"], match_targets, matcher_cfg,
                                       mesh=mesh, batch_axes=batch_axes)
        terms = _terms(head["logits"], head["boxes"], labels, target_boxes, box_mask, pred_index,
                       num_boxes, float(loss_cfg["eos_coef"]), str(loss_cfg["ce_normalization"]), image_weight,
                       normalizers)
        total = total + (loss_cfg["ce_weight"] * terms["loss_ce"]
                         + loss_cfg["bbox_weight"] * terms["loss_bbox"]
                         + loss_cfg["giou_weight"] * terms["loss_giou"])
        metrics.update({k + suffix: v for k, v in terms.items()})
    return total, metrics


def _terms(logits, boxes, labels, target_boxes, box_mask, pred_index, num_boxes, eos_coef, ce_normalization,
           image_weight, normalizers=None):
    """Loss terms of one head given the matching. Shapes as in `set_loss`; pred_index int32 [B, M];
    image_weight: float32 [B] (1 real image, 0 filler) or None (all real); normalizers: see `set_loss`."""
    logits = jnp.asarray(logits, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    q, c1 = logits.shape[1:]
    no_object = c1 - 1
    matched = box_mask & (pred_index >= 0)  # [B, M]
    # [B, Q, M] one-hot of the matching: a scatter-free way to give each query its target (if any).
    pairs = (pred_index[:, None, :] == jnp.arange(q)[None, :, None]) & matched[:, None, :]
    query_matched = jnp.any(pairs, axis=-1)  # [B, Q]
    query_label = jnp.sum(jnp.where(pairs, labels[:, None, :], 0), axis=-1)
    target_classes = jnp.where(query_matched, query_label, no_object)

    # Weighted cross-entropy, torch's `F.cross_entropy(logits, target, weight=empty_weight)`.
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target_classes[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_classes == no_object, eos_coef, 1.0)  # [B, Q]
    if image_weight is not None:
        weight = weight * image_weight[:, None]
    if ce_normalization == "batch":
        denominator = jnp.sum(weight) if normalizers is None else normalizers["ce_weight_sum"]
        loss_ce = _safe_div(jnp.sum(weight * nll), denominator)
    else:  # 'per_image': each image's own weighted mean (its sum_q w >= eos_coef * Q > 0 when real)
        per_image = _safe_div(jnp.sum(weight * nll, axis=1), jnp.sum(weight, axis=1))  # [B]
        if normalizers is not None:  # a micro-batch's share of the global mean over images
            iw = jnp.ones_like(per_image) if image_weight is None else image_weight
            loss_ce = _safe_div(jnp.sum(iw * per_image), normalizers["num_images"])
        elif image_weight is None:
            loss_ce = jnp.mean(per_image)
        else:
            loss_ce = _safe_div(jnp.sum(image_weight * per_image), jnp.sum(image_weight))

    # Matched pairs, gathered per target slot; unmatched slots get a harmless box and zero weight.
    src = jnp.take_along_axis(boxes, jnp.maximum(pred_index, 0)[..., None], axis=1)  # [B, M, 4]
    dummy = jnp.asarray(_DUMMY_BOX, jnp.float32)
    src = jnp.where(matched[..., None], src, dummy)
    tgt = jnp.where(matched[..., None], target_boxes, dummy)
    w = matched.astype(jnp.float32)
    loss_bbox = jnp.sum(w * jnp.sum(jnp.abs(src - tgt), axis=-1)) / num_boxes
    src_xyxy, tgt_xyxy = box_ops.cxcywh_to_xyxy(src), box_ops.cxcywh_to_xyxy(tgt)
    loss_giou = jnp.sum(w * (1.0 - box_ops.elementwise_giou(src_xyxy, tgt_xyxy))) / num_boxes

    # Logged only: no gradient.
    iou = jax.lax.stop_gradient(box_ops.elementwise_iou(src_xyxy, tgt_xyxy))
    matched_iou = jnp.sum(w * iou) / jnp.maximum(jnp.sum(w), 1.0)
    card_pred = jnp.sum(jnp.argmax(logits, axis=-1) != no_object, axis=1)
    card_abs = jnp.abs(card_pred - jnp.sum(box_mask, axis=1)).astype(jnp.float32)  # [B]
    if image_weight is None:
        card_err = jnp.mean(card_abs)
    else:
        card_err = _safe_div(jnp.sum(image_weight * card_abs), jnp.sum(image_weight))
    return dict(loss_ce=loss_ce, loss_bbox=loss_bbox, loss_giou=loss_giou, cardinality_error=card_err,
                matched_iou=matched_iou)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (a batch or image with nothing to count), with a finite gradient."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)
