"""Reading a COCO instances JSON, and the bad-data policy every stage of preparation follows.

Bad-data policy (applied while preparing: the JSON here, the images in `coco_source`; every skip/clip is
counted in the split's `Report`, logged with the first examples, and stored in yolos_source.json):
  instances JSON missing, unreadable, not JSON         error naming the file (and line/column)
  'images' / 'annotations' / 'categories' missing      error naming the file and field
  image entry without int 'id' / str 'file_name',
    duplicate image id, malformed or duplicate category  error naming the file, entry and field
  annotation naming an unknown image_id                 skipped: ann_unknown_image
  annotation naming an unknown category_id              skipped: ann_unknown_category
  bbox missing or not 4 finite numbers                  skipped: ann_bad_bbox
  bbox with w <= 0 or h <= 0                            skipped: ann_degenerate_box
  bbox partly outside the image                         clipped to the image: ann_clipped_box
  bbox wholly outside the image                         skipped: ann_outside_box
  image file missing                                    image skipped: image_missing
  image corrupt / truncated / not an image              image skipped: image_undecodable
  grayscale, CMYK, palette, alpha, 16-bit images        kept, decoded as 3-channel RGB (alpha dropped,
                                                          as PIL's convert('RGB') in the original):
                                                          image_mode_<MODE>
  JSON width/height differ from the file                the file's size is used: image_size_mismatch
  image without annotations                             kept (a "no object" example, as in DETR):
                                                          image_no_annotations
  iscrowd missing -> 0; area missing -> box area.
Crowd annotations are kept in the dataset and in the ground truth (pycocotools needs them); the
transforms drop them from the training targets, as DETR does.

Dense scenes: each split's report also says how many images have more non-crowd boxes than each of
`BOX_LIMITS` and how many boxes lie beyond it (`box_limit_stats`); training keeps at most
`input.max_boxes` boxes per image (the model's `num_det_tokens` at most) and warns at start when the train
split exceeds it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from yolos_jax.data.labels import LabelMap
from yolos_jax.errors import UserError

log = logging.getLogger(__name__)

MAX_LOGGED = 10  # examples logged/stored per report counter


# Boxes per image that matter downstream: 100 is input.max_boxes' default, YOLOS's num_det_tokens (one
# detection per [DET] token) and COCO evaluation's maxDets; 300 a common setting for dense scenes.
BOX_LIMITS = (100, 300)


def box_limit_stats(num_objects: Sequence[int], limits: Sequence[int] = BOX_LIMITS) -> dict[str, Any]:
    """How many images of a split exceed each box limit, from the index's per-image non-crowd box counts
    (crowd boxes never become training targets). Returns {'max': most boxes in one image, 'over': {str(limit):
    {'images': images with more than `limit` boxes, 'boxes_beyond': sum over them of (boxes - limit), the
    boxes a `limit`-slot target set (input.max_boxes = limit) drops}}}."""
    n = np.asarray(num_objects, np.int64).reshape(-1)
    over = {str(int(lim)): {"images": int(np.sum(n > lim)), "boxes_beyond": int(np.sum(np.maximum(n - lim, 0)))}
            for lim in limits}
    return {"max": int(n.max()) if n.size else 0, "over": over}


class DataError(UserError, ValueError):
    """Bad input data that cannot be skipped safely, or a dataset that is not where the config says; the message
    names the file and field. The entry scripts report it in one line (`errors.UserError`)."""


@dataclasses.dataclass
class Report:
    """Counts of every bad-data case met while preparing one split (see the module docstring)."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def add(self, key: str, message: str) -> None:
        self.counts[key] += 1
        if len(self.examples[key]) < MAX_LOGGED:
            self.examples[key].append(message)
            log.warning("%s: %s", key, message)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": {k: v for k, v in sorted(self.examples.items())}}


# --------------------------------------------------------------------------------------------------
# Reading and validating a COCO instances JSON (pure Python; no image access).


def read_instances_json(path: str) -> dict[str, Any]:
    """Parses a COCO instances JSON, raising DataError naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: instances JSON not found (expected annotations/instances_<split>.json)")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for field in ("images", "annotations", "categories"):
        if field not in doc:
            raise DataError(f"{path}: missing field '{field}' (a COCO instances JSON needs images, annotations, categories)")
        if not isinstance(doc[field], list):
            raise DataError(f"{path}: field '{field}' must be a list, got {type(doc[field]).__name__}")
    return doc


@dataclasses.dataclass
class ImageEntry:
    image_id: int
    file_name: str
    json_hw: Optional[tuple[int, int]]
    anns: list = dataclasses.field(default_factory=list)  # (ann_id, category_id, [x, y, w, h], iscrowd, area)


def parse_instances(doc: Mapping[str, Any], path: str, report: Report) -> tuple[list[ImageEntry], list[dict]]:
    """Validates the JSON structure; returns (images sorted by id with their usable annotations,
    categories). Structural problems raise DataError; bad annotations are skipped and counted."""
    try:
        LabelMap.from_categories(doc["categories"])
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: field 'categories': {e}") from None
    categories = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in doc["categories"]]
    cat_ids = {c["id"] for c in categories}
    images: dict[int, ImageEntry] = {}
    for k, im in enumerate(doc["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{path}: images[{k}] must be an object, got {im!r:.80}")
        iid, fname = im.get("id"), im.get("file_name")
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise DataError(f"{path}: images[{k}] field 'id' must be an integer, got {iid!r}")
        if not isinstance(fname, str) or not fname:
            raise DataError(f"{path}: images[{k}] (id {iid}) field 'file_name' must be a non-empty string")
        if iid in images:
            raise DataError(f"{path}: images[{k}] repeats image id {iid}; image ids must be unique")
        h, w = im.get("height"), im.get("width")
        hw = (int(h), int(w)) if isinstance(h, (int, float)) and isinstance(w, (int, float)) else None
        images[iid] = ImageEntry(iid, fname, hw)
    for k, a in enumerate(doc["annotations"]):
        where = f"{os.path.basename(path)} annotations[{k}] (id {a.get('id') if isinstance(a, dict) else '?'})"
        if not isinstance(a, dict):
            report.add("ann_bad_bbox", f"{where}: not an object")
            continue
        if a.get("image_id") not in images:
            report.add("ann_unknown_image", f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
            continue
        if a.get("category_id") not in cat_ids:
            report.add("ann_unknown_category", f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
            continue
        box = a.get("bbox")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            report.add("ann_bad_bbox", f"{where}: bbox {box!r:.60} is not 4 finite numbers [x, y, w, h]")
            continue
        if box[2] <= 0 or box[3] <= 0:
            report.add("ann_degenerate_box", f"{where}: bbox {box} has zero or negative size")
            continue
        iscrowd = int(bool(a.get("iscrowd", 0)))
        area = a.get("area")
        area = float(area) if isinstance(area, (int, float)) and math.isfinite(area) else float(box[2] * box[3])
        ann_id = a.get("id")
        ann_id = int(ann_id) if isinstance(ann_id, int) else -1
        images[a["image_id"]].anns.append((ann_id, int(a["category_id"]), [float(v) for v in box], iscrowd, area))
    return [images[i] for i in sorted(images)], categories


def clip_boxes(entry_anns: list, height: int, width: int, where: str, report: Report) -> list:
    """COCO [x, y, w, h] -> (x0, y0, x1, y1) clipped to the image; drops boxes left empty (counted)."""
    out = []
    for ann_id, cat, (x, y, w, h), crowd, area in entry_anns:
        x0, y0, x1, y1 = x, y, x + w, y + h
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        if cx1 <= cx0 or cy1 <= cy0:
            report.add("ann_outside_box", f"{where}: annotation {ann_id} box {[x, y, w, h]} lies outside the {width}x{height} image")
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            report.add("ann_clipped_box", f"{where}: annotation {ann_id} box {[x, y, w, h]} clipped to the {width}x{height} image")
        out.append((ann_id, cat, (cx0, cy0, cx1, cy1), crowd, area))
    return out

