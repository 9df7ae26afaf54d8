"""COCO scoring: the original YOLOS/DETR post-processing and pycocotools box AP.

The protocol is the original YOLOS/DETR one (yolos_paper.md Sec. 3; DETR's `PostProcess` and
`CocoEvaluator`):
  * post-processing: softmax over the C + 1 logits; score and label = max / argmax over the C real
    classes (the last logit is "no object"); *all* Q detections of every image are kept (no threshold, no
    NMS); boxes (cx, cy, w, h) relative to the un-padded image are scaled to the original image size;
  * label indices are mapped back to the dataset's category ids through its `LabelMap` (detections whose
    label has no category, e.g. identity-mode COCO's unused ids, are dropped: COCOeval would ignore them);
  * pycocotools `COCOeval(iouType='bbox')` on the images that were evaluated; the standard 12 numbers
    (`METRIC_NAMES`) go to `metrics.json`, the detections to `detections.json` (COCO results format:
    `bbox` = [x, y, w, h] in original-image pixels).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yolos_jax import box_ops

# The 12 numbers of COCOeval.summarize(), in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRICS_FILE = "metrics.json"
DETECTIONS_FILE = "detections.json"


def postprocess(logits: jax.Array, boxes: jax.Array, orig_size: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The original YOLOS/DETR `PostProcess`. Jittable; works on numpy inputs too.

    Args:
      logits: [B, Q, C + 1] class logits, the last one "no object".
      boxes: [B, Q, 4] (cx, cy, w, h) in [0, 1], relative to the un-padded image.
      orig_size: [B, 2] (height, width) in pixels of the original images.
    Returns:
      scores [B, Q] float32: the max softmax probability over the C real classes;
      labels [B, Q] int32: its label index in [0, C);
      boxes [B, Q, 4] float32: (x0, y0, x1, y1) in original-image pixels (not clipped, as the original).
    """
    prob = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)[..., :-1]
    scores = jnp.max(prob, axis=-1)
    labels = jnp.argmax(prob, axis=-1).astype(jnp.int32)
    xyxy = box_ops.cxcywh_to_xyxy_pixels(jnp.asarray(boxes, jnp.float32), jnp.asarray(orig_size))
    return scores, labels, xyxy


def load_coco(gt: Any):
    """A pycocotools COCO from a COCO object, an instances-JSON path or an already-parsed dataset dict."""
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    if isinstance(gt, (str, os.PathLike)):
        path = os.fspath(gt)
        try:
            with open(path) as f:
                dataset = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"COCO annotation file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"COCO annotation file {path} is not valid JSON: {e}") from None
    elif isinstance(gt, Mapping):
        dataset = dict(gt)
    else:
        raise TypeError(f"ground truth must be a COCO object, a path or a dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"COCO ground truth has no '{key}' list (keys: {sorted(dataset)})")
    dataset.setdefault("info", {})
    dataset.setdefault("licenses", [])
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco(
    image_ids: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    boxes_xyxy: np.ndarray,
    label_map: Any,
) -> list[dict]:
    """Post-processed predictions -> COCO results list.

    Args:
      image_ids: [N] the dataset's image ids.
      scores: [N, Q]; labels: [N, Q] label indices; boxes_xyxy: [N, Q, 4] original-image pixels.
      label_map: `yolos_jax.data.labels.LabelMap` of the dataset.
    Returns:
      [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}, ...] in image then token order;
      detections whose label maps to no category of the dataset are left out.
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    boxes = np.asarray(boxes_xyxy, np.float32)
    n, q = scores.shape
    if labels.shape != (n, q) or boxes.shape != (n, q, 4) or image_ids.shape != (n,):
        raise ValueError(
            f"detections_to_coco: shapes disagree: image_ids {image_ids.shape}, scores {scores.shape}, "
            f"labels {labels.shape}, boxes {boxes.shape}"
        )
    # label -> category id table (-1: no category), built once.
    num_labels = int(max(labels.max(initial=0) + 1, label_map.num_classes))
    table = np.full((num_labels,), -1, np.int64)
    for lab in range(label_map.num_classes):
        if label_map.is_used(lab):
            table[lab] = label_map.to_category(lab)
    cats = table[labels]
    xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
    out = []
    for i in range(n):
        iid = int(image_ids[i])
        for j in range(q):
            if cats[i, j] < 0:
                continue
            out.append(
                {
                    "image_id": iid,
                    "category_id": int(cats[i, j]),
                    # float(float32) is exact: the JSON holds exactly the numbers that were scored.
                    "bbox": [float(v) for v in xywh[i, j]],
                    "score": float(scores[i, j]),
                }
            )
    return out


def coco_evaluate(
    gt: Any, detections: Sequence[Mapping], image_ids: Optional[Iterable[int]] = None
) -> tuple[dict[str, float], str]:
    """COCO bbox AP/AR of `detections` with pycocotools.

    Args:
      gt: ground truth (COCO object, instances-JSON path or dataset dict).
      detections: COCO results list (bbox [x, y, w, h] in pixels); not modified.
      image_ids: evaluate only these images (default: every image of `gt`).
    Returns:
      ({name: value for METRIC_NAMES}, the printed 12-line summary). Values are pycocotools' (-1 where
      undefined, e.g. no small objects in the ground truth).
    """
    coco_gt = load_coco(gt)
    ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    unknown = sorted(set(ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"image ids {unknown[:5]} are not in the ground truth's 'images'")
    dets = [dict(d) for d in detections]  # loadRes adds keys; keep the caller's list intact
    bad = sorted({d["image_id"] for d in dets} - set(coco_gt.getImgIds()))
    if bad:
        raise ValueError(f"detections name image ids {bad[:5]} that the ground truth does not have")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    return dict(zip(METRIC_NAMES, stats)), summary.getvalue()


def _empty_results(coco_gt):
    """An empty results COCO (pycocotools' loadRes cannot take an empty list)."""
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                   "annotations": []}
    res.createIndex()
    return res
