"""The synthetic train batches of the benchmarks (numpy only: the GPU machines' python lacks TensorFlow)."""

from __future__ import annotations

import numpy as np


def random_train_batch(seed: int, batch: int, hw: tuple[int, int], num_classes: int, max_boxes: int,
                       boxes_per_image: tuple[int, int] = (5, 20)) -> dict:
    """A train batch in the input schema (yolos_jax/data): images [B, H, W, 3] float32 standard normal (as after
    normalisation), every pixel valid, and per image a random number of boxes in `boxes_per_image` (capped at
    `max_boxes`, the slots per image): cxcywh normalised, each inside the image, random labels."""
    rng = np.random.default_rng(seed)
    h, w = hw
    low, high = (min(n, max_boxes) for n in boxes_per_image)
    counts = rng.integers(low, high + 1, size=batch)
    box_mask = np.arange(max_boxes)[None] < counts[:, None]
    wh = rng.uniform(0.05, 0.5, size=(batch, max_boxes, 2))
    cxcy = wh / 2 + rng.uniform(0, 1, size=(batch, max_boxes, 2)) * (1 - wh)  # boxes inside the image
    return dict(
        image=rng.standard_normal((batch, h, w, 3)).astype(np.float32),
        pixel_mask=np.ones((batch, h, w), bool),
        boxes=(np.concatenate([cxcy, wh], -1) * box_mask[..., None]).astype(np.float32),
        labels=(rng.integers(0, num_classes, size=(batch, max_boxes)) * box_mask).astype(np.int32),
        box_mask=box_mask,
    )
