"""Helpers shared by the evaluation tests (a COCO-format ground truth, random model params, a float64
post-processing) and by the dense-scene tests of the prepare command and the trainer (a COCO-format folder with more
boxes per image than input.max_boxes; its fixture is `dense_dataset` in conftest.py)."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


# Non-contiguous category ids on purpose (the mapping must round-trip through them).
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disk"}, {"id": 42, "name": "triangle"}]


def make_coco_gt(num_images=6, seed=0):
    """A COCO-format ground truth with small, medium and large boxes of 3 non-contiguous categories."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    aid = 1
    for k in range(num_images):
        iid = 100 + 7 * k  # non-contiguous image ids too
        h, w = (480, 640) if k % 2 == 0 else (427, 320)
        images.append({"id": iid, "height": h, "width": w, "file_name": f"{iid}.jpg"})
        for side in (20, 60, 150, 250)[: 2 + k % 3]:  # < 32^2, 32^2..96^2, > 96^2 areas
            bw, bh = side * rng.uniform(0.8, 1.2), side * rng.uniform(0.8, 1.2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"]
            anns.append({"id": aid, "image_id": iid, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
            aid += 1
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def perturbed_params(model, image, seed=0):
    """The model's initial parameters plus N(0, 0.05) noise: every parameter random and O(1)-effective
    (zero-initialised relative position tables included). The initialisers run as one program: eagerly they
    compile hundreds of small ones (~20 s a model); the noise is drawn on the host."""
    params = jax.jit(lambda key: model.init(key, jnp.asarray(image[None]))["params"])(jax.random.PRNGKey(seed))
    noise = np.random.default_rng(seed + 1)
    return jax.tree.map(lambda a: (np.asarray(a) + 0.05 * noise.standard_normal(a.shape)).astype(np.float32), params)


def random_params(model, image_hw, seed=0, scale=0.05):
    """Random params of `model` without running its initialisers (eval_shape only: no compilation)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *image_hw, 3)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=scale, size=s.shape).astype(np.float32)), shapes)


def numpy_postprocess(logits, boxes, orig_size):
    """float64 reference of DETR's PostProcess."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p = p[..., :-1]
    cx, cy, w, h = np.moveaxis(boxes.astype(np.float64), -1, 0)
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    hh, ww = orig_size[:, 0].astype(np.float64), orig_size[:, 1].astype(np.float64)
    return p.max(-1), p.argmax(-1), xyxy * np.stack([ww, hh, ww, hh], -1)[:, None]


# Non-crowd boxes per image of the dense folder's train split (plus 2 crowd boxes on the first image, which
# never become targets and so are not counted).
DENSE_TRAIN_COUNTS = (305, 101, 5, 100)


def write_dense_coco_folder(root):
    """A COCO-format folder (train and val splits, 40x48 PNGs, 2 categories) under `root` whose train images hold
    DENSE_TRAIN_COUNTS non-crowd boxes."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)).save(buf, "PNG")
    os.makedirs(root / "annotations")
    for split, counts in (("train", DENSE_TRAIN_COUNTS), ("val", (2, 3))):
        os.makedirs(root / split)
        images, anns = [], []
        for i, n in enumerate(counts):
            (root / split / f"{i}.png").write_bytes(buf.getvalue())
            images.append({"id": i + 1, "file_name": f"{i}.png", "height": 40, "width": 48})
            for k in range(n + (2 if i == 0 else 0)):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + k % 2,
                             "bbox": [k % 30, k % 20, 8, 6], "iscrowd": int(i == 0 and k >= n)})
        doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
