"""The canvas sets of a prepared split under an input config: the few padded (H, W) batch shapes (designed by
`batching` from the split's image sizes), and the fixed source canvas of input.resize_on_device."""

from __future__ import annotations

from typing import Optional

import ml_collections
import numpy as np

from yolos_jax.data import batching
from yolos_jax.data import transforms as T
from yolos_jax.data.input_config import eval_max_size, resize_on_device, train_transform_config
from yolos_jax.data.prepared_dataset import SplitIndex


def train_canvases(cfg: ml_collections.ConfigDict, index: SplitIndex) -> list[tuple[int, int]]:
    """The train canvas set: input.canvases, or designed from the split's image sizes (deterministic);
    with large-scale jitter, the single lsj_size x lsj_size canvas."""
    if len(cfg.canvases):
        return sorted(tuple(int(v) for v in c) for c in cfg.canvases)
    tcfg = train_transform_config(cfg)
    if tcfg.large_scale_jitter:  # ViTDet: every image padded to the one lsj_size x lsj_size canvas
        s = int(batching.ceil_to(tcfg.lsj_size, int(cfg.canvas_multiple)))
        return [(s, s)]
    sample = batching.simulate_train_sizes(index.height, index.width, tcfg)
    short, long = tcfg.max_output_hw()
    m = int(cfg.canvas_multiple)
    return batching.design_canvases(sample, batching.catch_all_canvases(short, long, m), int(cfg.num_canvases), m)


def eval_geometry(cfg: ml_collections.ConfigDict, index: SplitIndex) -> np.ndarray:
    """The eval transform of each example of the split as GEOM [N, 9] (`transforms.eval_geometry`)."""
    return T.eval_geometry(index.height, index.width, int(cfg.eval_size), eval_max_size(cfg))


def eval_canvases(cfg: ml_collections.ConfigDict, index: SplitIndex) -> list[tuple[int, int]]:
    """The eval canvas set: input.eval_canvases (checked to hold any eval image), or designed from the split's
    exact eval sizes."""
    if len(cfg.eval_canvases):
        canvases = sorted(tuple(int(v) for v in c) for c in cfg.eval_canvases)
        # Fixed canvases must hold any image: the eval rule bounds (short, long) sides, both orientations.
        short, long = T.eval_canvas_bound(int(cfg.eval_size), eval_max_size(cfg))
        for need in {(short, long), (long, short)}:
            if not any(ch >= need[0] and cw >= need[1] for ch, cw in canvases):
                raise ValueError(
                    f"input.eval_canvases={canvases} has no canvas of at least {need[0]}x{need[1]} (h x w): eval images "
                    f"(input.eval_size={cfg.eval_size}, longest side <= {eval_max_size(cfg)}, floored to 16) reach "
                    f"{short}x{long} and {long}x{short}; add such canvases or leave input.eval_canvases=()")
        return canvases
    # Eval sizes are known exactly: the base canvas is their bounding box, not the worst case.
    sizes = T.output_hw(eval_geometry(cfg, index))
    if not len(sizes):
        return []
    m = int(cfg.canvas_multiple)
    base = [tuple(int(v) for v in batching.ceil_to(sizes.max(axis=0), m))] if len(sizes) else []
    return batching.design_canvases(sizes, base, int(cfg.eval_num_canvases), m)


def source_canvas(cfg: ml_collections.ConfigDict, index: SplitIndex) -> Optional[tuple[int, int]]:
    """The fixed (Hs, Ws) of `source_image` with input.resize_on_device (None without): the split's
    largest original height and width, rounded up to multiples of 32. Every pre-resize image fits: it
    is the original or a window of it (crop_in_original)."""
    if not resize_on_device(cfg) or len(index) == 0:
        return None
    return (int(batching.ceil_to(int(np.max(index.height)), 32)), int(batching.ceil_to(int(np.max(index.width)), 32)))
