"""A seeded synthetic detection dataset in COCO format: coloured shapes on textured backgrounds.

Layout written by `generate(out_dir, ...)` (the same layout `coco_source` reads):

  out_dir/
    train/000000000001.jpg ...           JPEG images (RGB)
    val/...
    annotations/instances_train.json     COCO instances JSON: images, annotations, categories
    annotations/instances_val.json

Each image holds 1..`max_objects` shapes of the classes in `SHAPES` (circle, square, triangle, ellipse,
rectangle, diamond, cross, hexagon; the first `num_classes`, or those named by `classes`), of varied size,
aspect, colour and rotation (triangles and diamonds), overlapping (each shape stays at least half
visible), on a textured background (smooth colour noise + stripes or checks + pixel noise; or
`background='plain'`: the colour noise only). Boxes are the exact pixel extent of
each shape's full mask ([x, y, w, h], COCO convention), `area` is the mask's pixel count, `segmentation`
a polygon. With `crowd_fraction > 0` some objects are marked `iscrowd=1` (the pipeline drops them for
training, as DETR does). Everything is a pure function of `seed`: the same call writes the same files.

CLI:  python -m yolos_jax.data.synthetic --out=/tmp/synth --num_train=512 --num_val=64 --height=480 --width=640
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from yolos_jax import atomic

SHAPES = ("circle", "square", "triangle", "ellipse", "rectangle", "diamond", "cross", "hexagon")
SPLITS = ("train", "val")


BACKGROUNDS = ("textured", "plain")


def _background(rng: np.random.Generator, h: int, w: int, noise: float = 6.0, kind: str = "textured") -> np.ndarray:
    """[h, w, 3] uint8: low-frequency colour noise, a stripe/check pattern ('textured' only), pixel noise
    (std `noise` grey levels; more noise = larger, slower-to-decode JPEGs)."""
    gh, gw = max(2, h // 24), max(2, w // 24)
    if kind == "plain":  # no pattern, a narrower colour range: objects are the only edges
        coarse = rng.uniform(60, 180, size=(gh, gw, 3)).astype(np.float32)
        base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32)
        return np.clip(base * 0.8 + rng.normal(0, noise, size=(h, w, 3)), 0, 255).astype(np.uint8)
    coarse = rng.uniform(40, 200, size=(gh, gw, 3)).astype(np.float32)
    base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 24)
    angle = rng.uniform(0, np.pi)
    if rng.random() < 0.5:  # stripes
        pattern = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    else:  # checks
        pattern = np.sign(np.sin(xx * 2 * np.pi / period)) * np.sign(np.sin(yy * 2 * np.pi / period))
    tint = rng.uniform(-1, 1, size=3).astype(np.float32)
    img = base * 0.8 + 25.0 * pattern[..., None] * tint + rng.normal(0, noise, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(kind: str, cx: float, cy: float, bw: float, bh: float, rot: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixel coordinates) of a shape centred at (cx, cy) with half-extents (bw, bh)."""
    if kind in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], -1)
    elif kind in ("square", "rectangle"):
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)
    elif kind == "triangle":
        t = rot + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2
        pts = np.stack([np.cos(t), np.sin(t)], -1)
    elif kind == "diamond":
        pts = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], np.float64)
    elif kind == "cross":
        a = 0.35
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                        [-1, a], [-1, -a], [-a, -a]], np.float64)
    elif kind == "hexagon":
        t = np.arange(6) * np.pi / 3
        pts = np.stack([np.cos(t), np.sin(t)], -1)
    else:
        raise ValueError(f"unknown shape {kind!r}; choose from {SHAPES}")
    return [(cx + x * bw, cy + y * bh) for x, y in pts]


def _shape_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour (one channel high, one low) that stands out from the duller background."""
    c = rng.permutation([rng.integers(200, 256), rng.integers(0, 60), rng.integers(0, 256)])
    return tuple(int(v) for v in c)


def render_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_classes: int,
    max_objects: int,
    min_size_frac: float = 0.08,
    max_size_frac: float = 0.6,
    texture_noise: float = 6.0,
    classes: Optional[Sequence[str]] = None,
    background: str = "textured",
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image and its objects.

    Object sizes are uniform in [min_size_frac, max_size_frac] of the image's short side; class k draws
    the shape `classes[k]` (default `SHAPES[k]`); background: one of `BACKGROUNDS`.
    Returns (image [H, W, 3] uint8, objects) with objects = [{'shape': int class index in
    [0, num_classes), 'bbox': [x, y, w, h] pixels (tight around the full mask), 'area': mask pixels,
    'polygon': flat [x0, y0, x1, y1, ...], 'color': (r, g, b)}].
    """
    classes = tuple(classes) if classes is not None else SHAPES[:num_classes]
    img = Image.fromarray(_background(rng, height, width, texture_noise, background))
    draw = ImageDraw.Draw(img)
    objects: list[dict[str, Any]] = []
    n = int(rng.integers(1, max_objects + 1))
    short = min(height, width)
    for _ in range(n):
        for _attempt in range(20):
            k = int(rng.integers(num_classes))
            kind = classes[k]
            size = rng.uniform(min_size_frac, max_size_frac) * short
            aspect = 1.0 if kind in ("circle", "square", "hexagon", "cross") else float(np.exp(rng.uniform(-0.7, 0.7)))
            bw, bh = size * math.sqrt(aspect) / 2, size / math.sqrt(aspect) / 2
            # Centres may sit near the border so that some shapes are cut by the image edge.
            cx, cy = rng.uniform(0.1 * width, 0.9 * width), rng.uniform(0.1 * height, 0.9 * height)
            poly = _polygon(kind, cx, cy, bw, bh, float(rng.uniform(0, 2 * np.pi)))
            mask_img = Image.new("L", (width, height), 0)
            ImageDraw.Draw(mask_img).polygon(poly, fill=255)
            mask = np.asarray(mask_img) > 0
            if mask.sum() < 16:
                continue
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            # Overlap is welcome, but keep every earlier object at least half visible.
            if any(_covered_fraction(o["_mask"], mask) > 0.5 for o in objects):
                continue
            color = _shape_colour(rng)
            draw.polygon(poly, fill=color)
            objects.append(dict(shape=k, bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                area=int(mask.sum()), polygon=[round(float(v), 2) for p in poly for v in p],
                                color=color, _mask=mask))
            break
    for o in objects:
        del o["_mask"]
    return np.asarray(img), objects


def _covered_fraction(old: np.ndarray, new: np.ndarray) -> float:
    return float(np.logical_and(old, new).sum()) / max(1, int(old.sum()))


def _image_sizes(image_size: Any) -> list[tuple[int, int]]:
    sizes = [image_size] if isinstance(image_size[0], (int, np.integer)) else list(image_size)
    out = []
    for s in sizes:
        h, w = int(s[0]), int(s[1])
        if h < 16 or w < 16:
            raise ValueError(f"synthetic image_size entries must be (h, w) >= 16, got {s}")
        out.append((h, w))
    return out


def generate(
    out_dir: str,
    num_train: int,
    num_val: int,
    seed: int = 0,
    image_size: Any = (96, 128),
    *,
    num_classes: int = 4,
    max_objects: int = 6,
    category_ids: Optional[Sequence[int]] = None,
    crowd_fraction: float = 0.0,
    jpeg_quality: int = 90,
    texture_noise: float = 6.0,
    classes: Optional[Sequence[str]] = None,
    min_size_frac: float = 0.08,
    max_size_frac: float = 0.6,
    background: str = "textured",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes the dataset (layout in the module docstring) atomically and returns a summary dict.

    Args:
      out_dir: target folder; must not exist unless `overwrite`.
      num_train, num_val: images per split (a split with 0 images is not written).
      seed: everything is a function of it (each image has its own stream: SeedSequence(seed, split, i)).
      image_size: (h, w), or a list of (h, w) to draw each image's size from (mixed aspect ratios).
      num_classes: how many of `SHAPES` to use (1..8).
      max_objects: objects per image are uniform in [1, max_objects].
      category_ids: the COCO category id of each class (default 1..num_classes); may have gaps.
      crowd_fraction: probability that an object is annotated iscrowd=1.
      jpeg_quality: PIL JPEG quality.
      texture_noise: std of the background's pixel noise (grey levels); sets JPEG size and decode cost.
      classes: the shape of each class, names from `SHAPES` (default: the first num_classes); when given,
        num_classes must equal its length.
      min_size_frac, max_size_frac: object sizes, as fractions of the image's short side.
      background: 'textured' (colour noise + stripes or checks) or 'plain' (colour noise only).
    Returns:
      {'out_dir', 'splits': {split: {'images', 'annotations', 'ann_file', 'image_dir'}}, 'categories'}.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [1, {len(SHAPES)}], got {num_classes}")
    classes = tuple(classes) if classes is not None else SHAPES[:num_classes]
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or len(set(classes)) != len(classes) or len(classes) != num_classes:
        raise ValueError(f"classes must be {num_classes} distinct names from {SHAPES}, got {classes}")
    if not 0 < min_size_frac <= max_size_frac <= 1:
        raise ValueError(f"need 0 < min_size_frac <= max_size_frac <= 1, got {min_size_frac}, {max_size_frac}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    cat_ids = list(range(1, num_classes + 1)) if category_ids is None else [int(c) for c in category_ids]
    if len(cat_ids) != num_classes or len(set(cat_ids)) != num_classes:
        raise ValueError(f"category_ids must be {num_classes} distinct ints, got {category_ids}")
    sizes = _image_sizes(image_size)
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    categories = [{"id": c, "name": classes[k], "supercategory": "shape"} for k, c in enumerate(cat_ids)]
    summary: dict[str, Any] = {"out_dir": out_dir, "splits": {}, "categories": categories}

    def build(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "annotations"))
        ann_id = 1
        for s_idx, (split, count) in enumerate(zip(SPLITS, (num_train, num_val))):
            if count <= 0:  # no empty splits: a dataset split needs examples
                continue
            os.makedirs(os.path.join(tmp, split))
            images, anns = [], []
            for i in range(count):
                rng = np.random.default_rng(np.random.SeedSequence([seed, s_idx, i]))
                h, w = sizes[int(rng.integers(len(sizes)))]
                img, objs = render_image(rng, h, w, num_classes, max_objects, min_size_frac, max_size_frac,
                                         texture_noise, classes, background)
                image_id = (s_idx + 1) * 1_000_000 + i + 1  # ids unique across splits
                fname = f"{image_id:012d}.jpg"
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=jpeg_quality)
                with open(os.path.join(tmp, split, fname), "wb") as f:
                    f.write(buf.getvalue())
                images.append({"id": image_id, "file_name": fname, "height": h, "width": w})
                for o in objs:
                    anns.append({
                        "id": ann_id, "image_id": image_id, "category_id": cat_ids[o["shape"]],
                        "bbox": [float(v) for v in o["bbox"]], "area": float(o["area"]),
                        "iscrowd": int(rng.random() < crowd_fraction), "segmentation": [o["polygon"]],
                    })
                    ann_id += 1
            doc = {"info": {"description": f"yolos_jax synthetic shapes, seed {seed}"}, "licenses": [],
                   "images": images, "annotations": anns, "categories": categories}
            with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(doc, f)
            summary["splits"][split] = {
                "images": len(images), "annotations": len(anns),
                "image_dir": os.path.join(out_dir, split),
                "ann_file": os.path.join(out_dir, "annotations", f"instances_{split}.json"),
            }

    atomic.atomic_directory(out_dir, build, overwrite=overwrite)  # the old tree goes only once the new one is whole
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (COCO layout)")
    p.add_argument("--num_train", type=int, default=256)
    p.add_argument("--num_val", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--mixed_aspect", action="store_true",
                   help="draw each image's size from (h, w), (w, h), (h, h*3/2 rounded) for mixed aspect ratios")
    p.add_argument("--num_classes", type=int, default=4)
    p.add_argument("--max_objects", type=int, default=6)
    p.add_argument("--crowd_fraction", type=float, default=0.0)
    p.add_argument("--classes", default=None, help=f"comma-separated shape names from {SHAPES} (sets num_classes)")
    p.add_argument("--min_size_frac", type=float, default=0.08, help="smallest object, fraction of the short side")
    p.add_argument("--max_size_frac", type=float, default=0.6, help="largest object, fraction of the short side")
    p.add_argument("--background", default="textured", choices=BACKGROUNDS)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    size: Any = (a.height, a.width)
    if a.mixed_aspect:
        size = [(a.height, a.width), (a.width, a.height), (a.height, a.height * 3 // 2)]
    classes = a.classes.split(",") if a.classes else None
    s = generate(a.out, a.num_train, a.num_val, a.seed, size,
                 num_classes=len(classes) if classes else a.num_classes, max_objects=a.max_objects,
                 crowd_fraction=a.crowd_fraction, classes=classes, min_size_frac=a.min_size_frac,
                 max_size_frac=a.max_size_frac, background=a.background, overwrite=a.overwrite)
    print(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
