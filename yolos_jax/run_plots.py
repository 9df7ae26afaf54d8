"""Pictures of a training run, refreshed at each evaluation: annotated val images, a contact sheet and the
learning curve.

  rows = val_rows(params, model_cfg, input_cfg, num_images=8)       # predictions + ground truth, host numpy
  write_annotated_images(rows, f"{eval_dir}/images")                # one readable PNG per image
  write_contact_sheet(rows, f"{eval_dir}/contact_sheet.png")        # predictions | ground truth, all images
  (or both at once: write_eval_pictures(params, model_cfg, input_cfg, eval_dir))
  history = append_history(f"{workdir}/learning_curve.json", [{"step": 500, "AP": 0.31, "AP50": 0.52}])
  write_learning_curve(history, f"{workdir}/learning_curve.png")

A ROW is one val image: {'image_id': int, 'image': uint8 [H, W, 3] (the original image), 'boxes': [N, 4] float32
(x0, y0, x1, y1) px of the original image, 'scores': [N] float32 descending, 'names': N class names (every
[DET] token's prediction: the threshold is applied when drawing), 'gt_boxes': [M, 4] float32 xyxy px,
'gt_names': M names (the non-crowd ground truth)}. Drawing is `draw.draw_detections`: predictions above the
threshold solid, the next `top_k` faint, tags that never cover each other, at a readable size.

A HISTORY is a list of points {'step': int, and any of 'AP', 'AP50' (COCO, 0..1), 'loss', 'loss_ce',
'loss_bbox', 'loss_giou'}; train and eval points may come at different steps, and other keys are kept but
not plotted. Every file is written atomically. Host only; the trainer calls these on process 0.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from yolos_jax import atomic, draw
from yolos_jax.data import prepared_dataset
from yolos_jax.data.stream import record_targets
from yolos_jax.inference import Detector, read_image_rgb

AP_KEYS = ("AP", "AP50")
LOSS_KEYS = ("loss", "loss_ce", "loss_bbox", "loss_giou")
CONTACT_SHEET_FILE = "contact_sheet.png"
IMAGES_DIR = "images"

# --------------------------------------------------------------------------------------------------
# Val images: predictions and ground truth
# --------------------------------------------------------------------------------------------------


def val_rows(params: Any, model_cfg: Mapping[str, Any], input_cfg: Any, num_images: int = 8) -> list[dict]:
    """Predictions and ground truth (a ROW each, module docstring) for the first `num_images` val images.

    params: host params of `YOLOS(**model_cfg)`; input_cfg: a resolved `config.input` (its prepared dataset, val
    split and eval sizes). The images are predicted in one `Detector.predict` call (one compilation; each image's
    result is the one it gets alone).
    """
    label_map = prepared_dataset.dataset_info(input_cfg).label_map
    source = prepared_dataset.open_dataset(input_cfg).source_for(input_cfg.val_split)
    max_size = int(input_cfg.eval_max_size) if input_cfg.eval_max_size > 0 else None
    names = label_map.names_for(int(dict(model_cfg)["num_classes"]))
    detector = Detector(params, model_cfg, eval_size=int(input_cfg.eval_size), max_size=max_size, label_names=names)
    records = [source[i] for i in range(min(int(num_images), len(source)))]
    if not records:
        return []
    images = [read_image_rgb(r["image"]) for r in records]
    preds = detector.predict(images, threshold=-1.0)  # every token: scores are >= 0
    rows = []
    for rec, image, pred in zip(records, images, preds):
        gt_boxes, gt_labels = record_targets(rec, label_map)
        rows.append({
            "image_id": int(rec["image/id"]),
            "image": image,
            "boxes": np.asarray(pred["boxes"], np.float32).reshape(-1, 4),
            "scores": np.asarray(pred["scores"], np.float32).reshape(-1),
            "names": list(pred["names"]),
            "gt_boxes": np.asarray(gt_boxes, np.float32).reshape(-1, 4),
            "gt_names": [label_map.names[int(k)] for k in gt_labels],
        })
    return rows


def write_annotated_images(rows: Sequence[Mapping[str, Any]], out_dir: str, *, threshold: float = 0.5,
                           top_k: int = 5) -> list[str]:
    """out_dir/<image id>.png for each ROW: its predictions at a readable size (short side >= 480 px), above
    `threshold` solid and the next `top_k` faint. Written one by one, each atomically. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for row in rows:
        path = os.path.join(out_dir, f"{int(row['image_id'])}.png")
        draw.save_png(path, draw.draw_detections(row["image"], row["boxes"], row["names"], row["scores"],
                                                 threshold=threshold, top_k=top_k))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------------


def contact_sheet(rows: Sequence[Mapping[str, Any]], *, threshold: float = 0.5, top_k: int = 5,
                  tile_height: int = 320, columns: int = 2) -> tuple[np.ndarray, list[dict]]:
    """All ROWS on one sheet: each image twice side by side, predictions | ground truth, captioned.

    Every picture is drawn at `tile_height` px high (the width follows its aspect); `columns` image pairs per
    line of the sheet. Returns the sheet (uint8 [H, W, 3]) and, per row, {'image_id', 'predictions',
    'ground_truth'}: the rectangles (x0, y0, x1, y1), x1/y1 exclusive, of its two pictures (captions excluded).
    """
    if not rows:
        raise ValueError("contact_sheet: no rows")
    pairs, inner = [], []
    for row in rows:
        scale = tile_height / row["image"].shape[0]
        pred = draw.draw_detections(row["image"], row["boxes"], row["names"], row["scores"], threshold=threshold,
                                    top_k=top_k, scale=scale)
        truth = draw.draw_detections(row["image"], row["gt_boxes"], row["gt_names"], scale=scale)
        n_solid = int(np.sum(np.asarray(row["scores"]) > threshold))
        n_faint = min(int(top_k), len(row["scores"]) - n_solid)
        pred = draw.add_caption(pred, f"#{int(row['image_id'])} predictions: {n_solid} > {threshold:g}, "
                                      f"{n_faint} faint")
        truth = draw.add_caption(truth, f"ground truth: {len(row['gt_names'])}")
        caption_h = pred.shape[0] - tile_height
        pair, rects = draw.tile_grid([pred, truth], columns=2, gap=4)
        pairs.append(pair)
        inner.append([(x0, y0 + caption_h, x1, y1) for x0, y0, x1, y1 in rects])
    sheet, outer = draw.tile_grid(pairs, columns=columns, gap=16)
    cells = []
    for row, (ox, oy, _, _), (p, t) in zip(rows, outer, inner):
        shift = lambda r: (r[0] + ox, r[1] + oy, r[2] + ox, r[3] + oy)  # noqa: E731
        cells.append({"image_id": int(row["image_id"]), "predictions": shift(p), "ground_truth": shift(t)})
    return sheet, cells


def write_contact_sheet(rows: Sequence[Mapping[str, Any]], path: str, *, threshold: float = 0.5, top_k: int = 5,
                        tile_height: int = 320, columns: int = 2) -> str:
    """`contact_sheet` of the ROWS written (atomically) as one PNG at `path`; returns `path`."""
    sheet, _ = contact_sheet(rows, threshold=threshold, top_k=top_k, tile_height=tile_height, columns=columns)
    draw.save_png(path, sheet)
    return path


def write_eval_pictures(params: Any, model_cfg: Mapping[str, Any], input_cfg: Any, out_dir: str, *,
                        num_images: int = 8, threshold: float = 0.5, top_k: int = 5) -> dict[str, Any]:
    """One evaluation's pictures from one prediction pass: out_dir/images/<image id>.png (readable annotated val
    images) and out_dir/contact_sheet.png. Returns {'images': [paths], 'contact_sheet': path or None (no val
    images)}."""
    rows = val_rows(params, model_cfg, input_cfg, num_images)
    images = write_annotated_images(rows, os.path.join(out_dir, IMAGES_DIR), threshold=threshold, top_k=top_k)
    sheet = (write_contact_sheet(rows, os.path.join(out_dir, CONTACT_SHEET_FILE), threshold=threshold, top_k=top_k)
             if rows else None)
    return {"images": images, "contact_sheet": sheet}


# --------------------------------------------------------------------------------------------------
# Learning curve
# --------------------------------------------------------------------------------------------------


def _number(v: Any) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`, sorted by step; non-finite values and (for AP keys) pycocotools' -1 ('no ground
    truth in this range') left out."""
    pts = []
    for p in history:
        x, y = _number(p.get("step")), _number(p.get(key))
        if x is not None and y is not None and not (key in AP_KEYS and y < 0):
            pts.append((x, y))
    pts.sort(key=lambda t: t[0])
    return np.asarray([t[0] for t in pts]), np.asarray([t[1] for t in pts])


def write_learning_curve(history: Sequence[Mapping[str, Any]], path: str) -> str:
    """Two panels written (atomically) as one PNG at `path`: COCO AP and AP50 against the step (left) and the
    loss terms against the step (right). A key no point has is left out; a panel with no data says so; a single
    point shows as a marker. Returns `path`."""
    plt = draw.pyplot()
    fig, (ax_ap, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, title, ylabel in ((ax_ap, AP_KEYS, "val COCO box AP", "AP (0..1)"),
                                    (ax_loss, LOSS_KEYS, "train loss", "loss")):
        drawn = 0
        for key in keys:
            steps, values = _series(history, key)
            if len(steps):
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=4, label=key)
                drawn += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no points yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    steps = [s for s in (_number(p.get("step")) for p in history) if s is not None]
    fig.suptitle(f"learning curve (step {int(max(steps))})" if steps else "learning curve", fontsize=10)
    # A fixed layout (not tight_layout): each panel keeps its place whatever the other one holds.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.86, wspace=0.22)
    draw.save_figure(fig, path)
    return path


def append_history(path: str, points: Sequence[Mapping[str, Any]], *, drop_after: Optional[int] = None) -> list[dict]:
    """Adds `points` to the HISTORY kept as a JSON list at `path` (missing: empty) and returns the whole history.

    drop_after: first forget the points past this step. A resumed run passes the step it resumed from, so that
    points of a run that went further and was rolled back (or crashed after logging) are not drawn twice.
    Only the step and numeric values are kept (non-finite ones as null). Written atomically.
    """
    history: list[dict] = []
    if os.path.exists(path):
        with open(path) as f:  # whole or absent: it is only ever replaced atomically
            history = list(json.load(f))
    if drop_after is not None:
        history = [p for p in history if int(p.get("step", 0)) <= int(drop_after)]
    for p in points:
        if "step" not in p:
            raise ValueError(f"append_history: a point without 'step': {dict(p)}")
        point: dict[str, Any] = {"step": int(p["step"])}
        for k, v in p.items():
            if k != "step" and isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                point[k] = _number(v)
        history.append(point)
    atomic.write_json_atomic(path, history)
    return history

