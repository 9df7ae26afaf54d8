"""A batch drawn as PNGs (one per example, the batch's canvas size)."""

import os

import numpy as np
from PIL import Image

from test_data_iterators import cfg, take  # noqa: F401 - cfg: the shared prepared synthetic dataset (fixture)
from yolos_jax import data


def test_show_batch_writes_one_png_per_example(cfg, tmp_path):
    b = take(data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1), 1)[0]
    paths = data.save_batch_pngs(b, str(tmp_path), data.dataset_info(cfg).label_map)
    assert len(paths) == 4 and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
    img = np.asarray(Image.open(paths[0]))
    assert img.shape == b["image"].shape[1:] and img.dtype == np.uint8

