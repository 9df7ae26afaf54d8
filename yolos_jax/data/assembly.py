"""The BATCH SCHEMA, and padding a batch's transformed examples into it (`assemble`).

BATCH SCHEMA (the one definition; train and eval read exactly this). Per step, a dict of numpy arrays
for this process's share of the global batch (B = input.batch_size // process_count):
    image:      [B, H, W, 3] float32  RGB, ImageNet mean/std normalised, zeros in the padding.
                (input.image_format='uint8': uint8 0..255 instead, zeros in the padding; then
                `host_to_device.to_global_batch` normalises on device, so the device batch is the float32 above.)
    pixel_mask: [B, H, W] bool        True = real pixel; padding is at the bottom/right
    boxes:      [B, M, 4] float32     (cx, cy, w, h) normalised by the un-padded image (w, h)
    labels:     [B, M] int32          label index in [0, num_classes) (`LabelMap`; crowd boxes dropped)
    box_mask:   [B, M] bool           True = real box (padded slots: boxes 0, labels 0)
    image_id:   [B] int64             the dataset's image id (-1 for filler examples)
    orig_size:  [B, 2] int32          (h, w) of the original image
    size:       [B, 2] int32          (h, w) of the un-padded transformed image
    valid:      [B] bool              False for filler examples that pad the final eval batches
(H, W) is the batch's canvas, one of a small fixed set (`batching`); M = input.max_boxes.

With input.resize_on_device='on' the host batch carries, instead of `image`, the images before the
transforms' final resize (`data.device_resize`), and `to_global_batch` resamples them on device into the
float32 `image` above:
    source_image: [B, Hs, Ws, 3] uint8  zeros in the padding; (Hs, Ws) fixed per split (its largest image)
    source_size:  [B, 2] int32          (h, w) of each image in source_image
(Hs, Ws) is `canvases.source_canvas`. `host_to_device.to_global_batch` turns either form into device arrays.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from yolos_jax.data import transforms as T

# The schema's keys, in the order `assemble` returns them (without input.resize_on_device).
BATCH_KEYS = ("image", "pixel_mask", "boxes", "labels", "box_mask", "image_id", "orig_size", "size", "valid")


def assemble(elements: Sequence[Mapping[str, np.ndarray]], image_format: str,
             source_hw: Optional[tuple[int, int]] = None) -> dict[str, np.ndarray]:
    """Pads a batch's transformed examples into one canvas: the batch schema (module docstring).
    source_hw: with input.resize_on_device, the source canvas; the images are then pre-resize."""
    H, W = (int(v) for v in elements[0]["canvas"])
    n = len(elements)
    if source_hw is not None:
        return assemble_sources(elements, (H, W), source_hw)
    dtype = np.uint8 if image_format == "uint8" else np.float32
    # np.empty + explicit zeroing of the padding: np.zeros' lazily zeroed pages cost ~5x the copy.
    image = np.empty((n, H, W, 3), dtype)
    mask = np.empty((n, H, W), bool)
    for j, e in enumerate(elements):
        im = e["image"]
        h, w = im.shape[:2]
        if tuple(int(v) for v in e["canvas"]) != (H, W) or h > H or w > W:
            raise AssertionError(f"example {j} of size {(h, w)} does not fit the batch canvas {(H, W)}")
        if tuple(int(v) for v in e["size"]) != (h, w):
            raise AssertionError(f"example {j}: image {(h, w)} but planned size {tuple(e['size'])}")
        if dtype == np.uint8:
            image[j, :h, :w] = im
        else:
            T.normalize_into(image[j], im)
        image[j, h:] = 0
        image[j, :h, w:] = 0
        mask[j] = False
        mask[j, :h, :w] = True
    return {"image": image, "pixel_mask": mask, **stack_targets(elements)}


def stack_targets(elements: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The schema's per-example entries other than the image and its mask, stacked over the batch."""
    return {
        "boxes": np.stack([e["boxes"] for e in elements]).astype(np.float32),
        "labels": np.stack([e["labels"] for e in elements]).astype(np.int32),
        "box_mask": np.stack([e["box_mask"] for e in elements]).astype(bool),
        "image_id": np.asarray([e["image_id"] for e in elements], np.int64),
        "orig_size": np.stack([e["orig_size"] for e in elements]).astype(np.int32),
        "size": np.stack([e["size"] for e in elements]).astype(np.int32),
        "valid": np.asarray([e["valid"] for e in elements], bool),
    }


def assemble_sources(elements, canvas: tuple[int, int], source_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """`assemble` for input.resize_on_device: pre-resize images into the fixed source canvas, the
    pixel mask of the (post-resize) batch canvas, the rest as `assemble`."""
    (H, W), (Hs, Ws), n = canvas, source_hw, len(elements)
    source = np.empty((n, Hs, Ws, 3), np.uint8)
    mask = np.zeros((n, H, W), bool)
    for j, e in enumerate(elements):
        im = e["image"]
        h, w = im.shape[:2]
        if tuple(int(v) for v in e["source_size"]) != (h, w) or h > Hs or w > Ws:
            raise AssertionError(f"example {j}: pre-resize image {(h, w)} vs planned {tuple(e['source_size'])}, "
                                 f"source canvas {(Hs, Ws)}")
        sh, sw = (int(v) for v in e["size"])
        if tuple(int(v) for v in e["canvas"]) != (H, W) or sh > H or sw > W:
            raise AssertionError(f"example {j} of size {(sh, sw)} does not fit the batch canvas {(H, W)}")
        source[j, :h, :w] = im
        source[j, h:] = 0
        source[j, :h, w:] = 0
        mask[j, :sh, :sw] = True
    return {
        "source_image": source,
        "source_size": np.stack([e["source_size"] for e in elements]).astype(np.int32),
        "pixel_mask": mask,
        **stack_targets(elements),
    }

