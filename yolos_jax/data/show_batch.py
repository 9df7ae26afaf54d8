"""Look at a batch: each image with its boxes and class names, as PNG (item 8 of the input issue).

    python -m yolos_jax.data.show_batch --config=configs/yolos_s.py --out=/tmp/batch [--split=val] [--num_batches=2]
    python -m yolos_jax.data.show_batch --synthetic_root=/tmp/yolos_synth --out=/tmp/batch

The config file's `input` sub-config is used (or the whole config if it has no `input`). Padding is
shown as it is fed to the model (black); the un-padded region is outlined in white.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from absl import flags

from yolos_jax import data, draw
from yolos_jax.data import transforms as T
from yolos_jax.data.labels import LabelMap


def batch_images_uint8(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """[B, H, W, 3] uint8 of a host batch (undoing the normalisation of float32 images)."""
    img = np.asarray(data.with_host_image(batch)["image"])
    if img.dtype == np.uint8:
        return img
    out = draw.to_uint8(img, T.IMAGENET_MEAN, T.IMAGENET_STD)
    return np.where(np.asarray(batch["pixel_mask"])[..., None], out, 0).astype(np.uint8)


def save_batch_pngs(batch: Mapping[str, np.ndarray], out_dir: str, label_map: Optional[LabelMap] = None,
                    prefix: str = "batch") -> list[str]:
    """Draws every example of a host batch (schema in assembly.py) and writes OUT_DIR/PREFIX_<j>.png.

    Boxes are drawn from (cx, cy, w, h) normalised by `size`, labelled with the class name (label map)
    or the label index; fillers (valid=False) are tagged in the file name. Returns the paths written.
    """
    images = batch_images_uint8(batch)
    paths = []
    for j in range(images.shape[0]):
        h, w = (int(v) for v in batch["size"][j])
        m = np.asarray(batch["box_mask"][j], bool)
        b = np.asarray(batch["boxes"][j], np.float64)[m]
        xyxy = np.stack([(b[:, 0] - b[:, 2] / 2) * w, (b[:, 1] - b[:, 3] / 2) * h,
                         (b[:, 0] + b[:, 2] / 2) * w, (b[:, 1] + b[:, 3] / 2) * h], axis=-1)
        labels = np.asarray(batch["labels"][j])[m]
        texts = [label_map.names[int(l)] if label_map is not None else str(int(l)) for l in labels]
        img = draw.draw_boxes(images[j], xyxy, texts)
        if (h, w) != images.shape[1:3]:  # outline the un-padded region
            img = draw.draw_boxes(img, np.asarray([[0, 0, w - 1, h - 1]]), None, [(255, 255, 255)], width=1)
        tag = "" if bool(batch["valid"][j]) else "_filler"
        path = os.path.join(out_dir, f"{prefix}_{j:03d}_id{int(batch['image_id'][j])}{tag}.png")
        draw.save_png(path, img)
        paths.append(path)
    return paths


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    if f.synthetic_root:
        cfg = data.synthetic_input_config(f.synthetic_root)
    elif f.config is not None:
        cfg = f.config.input if "input" in f.config else f.config
    else:
        raise SystemExit("give --config=CONFIG_FILE or --synthetic_root=DIR")
    info = data.dataset_info(cfg)
    if f.split:
        it: Any = data.make_eval_iterator(cfg, f.split, process_index=0, process_count=1)
    else:
        it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    for k in range(f.num_batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        for p in save_batch_pngs(batch, f.out, info.label_map, prefix=f"b{k:03d}"):
            print(p)
    it.close()


if __name__ == "__main__":
    from absl import app
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "config file (its .input is used)", lock_config=False)
    flags.DEFINE_string("out", None, "output folder for the PNGs", required=True)
    flags.DEFINE_string("split", "", "eval split to show (default: train batches, with augmentation)")
    flags.DEFINE_integer("num_batches", 1, "batches to draw")
    flags.DEFINE_string("synthetic_root", "", "use the small synthetic dataset under this folder instead")
    app.run(main)
