"""Planned examples -> transformed images, in plan order: the stage between the epoch plans (`batching`) and
batch assembly (`assembly`).

`element_stream` reads this process's examples of each planned batch (random access into the prepared
split) and transforms their boxes (numpy); `decode_dataset` decodes and resamples their images in parallel
with tf.data (TF ops, deterministic order). `iterators.BatchIterator` joins the two and assembles batches.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import numpy as np

from yolos_jax.data import transforms as T
from yolos_jax.data.labels import LabelMap
from yolos_jax.data.prepared_dataset import SplitIndex
from yolos_jax.data.tf_setup import get_tf


def record_targets(rec: Mapping[str, Any], label_map: LabelMap) -> tuple[np.ndarray, np.ndarray]:
    """Non-crowd boxes [N, 4] xyxy pixels and their labels [N] from a prepared record."""
    o = rec["objects"]
    boxes = np.asarray(o["bbox"], np.float32).reshape(-1, 4)
    cats = np.asarray(o["category_id"], np.int64).reshape(-1)
    crowd = np.asarray(o["is_crowd"], bool).reshape(-1)
    keep = ~crowd
    return boxes[keep], label_map.to_labels(cats[keep])


class StreamStats:
    """Counters the element stream updates (approximate under prefetch; for logging)."""

    def __init__(self):
        self.truncated_boxes = 0
        self.examples = 0


def element_stream(plan_for_epoch, first: tuple[int, int], epochs: Optional[int], slot_slice: slice,
                   source, index: SplitIndex, label_map: LabelMap, max_boxes: int,
                   stats: StreamStats) -> Iterator[dict]:
    """Yields this process's examples of each planned batch from position `first` = (epoch, batch).

    plan_for_epoch: epoch -> `batching.Plan`; epochs: stop before this epoch (None: endless);
    slot_slice: this process's slots of each batch; source: the split's random-access records
    (`PreparedDataset.source_for`); index: its `SplitIndex`. Each element holds the encoded image and its
    GEOM, the example's padded targets (`transforms.pad_targets`: boxes [M, 4] cxcywh normalised, labels,
    box_mask), image_id (-1 for fillers), orig_size, size, source_size, valid, its batch's canvas (H, W) and
    position (epoch, batch).
    """
    epoch, start = first
    while epochs is None or epoch < epochs:
        plan = plan_for_epoch(epoch)
        if len(plan) == 0:
            raise ValueError(f"epoch {epoch} has no batch: with input.leftover='drop' the split has too few examples "
                             "of one canvas for input.batch_size (lower the batch size, or use input.leftover='merge', "
                             "which trains on every example)")
        for k in range(start, len(plan)):
            for j in range(*slot_slice.indices(plan.example.shape[1])):
                i = int(plan.example[k, j])
                rec = source[i]
                geom = plan.geom[k, j]
                hw = (int(index.height[i]), int(index.width[i]))
                boxes, labels = record_targets(rec, label_map)
                boxes, keep = T.transform_boxes(boxes, hw, geom)
                b, l, m, cut = T.pad_targets(boxes, labels[keep], max_boxes)
                stats.truncated_boxes += cut
                stats.examples += 1
                valid = bool(plan.valid[k, j])
                yield {
                    "encoded": rec["image"],
                    "geom": geom.astype(np.int32),
                    "boxes": b, "labels": l, "box_mask": m,
                    "image_id": np.int64(index.image_id[i] if valid else -1),
                    "orig_size": np.asarray(hw, np.int32),
                    "size": geom[7:9].astype(np.int32),
                    "source_size": geom[5:7].astype(np.int32),  # before the final resize
                    "valid": valid,
                    "canvas": plan.canvas[k].astype(np.int32),
                    "position": np.asarray([epoch, k], np.int64),
                }
        epoch, start = epoch + 1, 0


def decode_dataset(gen_fn, num_parallel_calls: int, prefetch: int, image_fn=None, final_resize: bool = True,
                   eval_transform: bool = False):
    """tf.data over `gen_fn()` -> (encoded image, meta int64 [11] = GEOM, image_id, seq): decodes and
    resamples in parallel, in order, and yields (image uint8 [h, w, 3], seq). Only what the image ops
    need goes through TF (each extra field costs ~0.1 ms per element); the rest waits in Python."""
    tf = get_tf()
    sig = (tf.TensorSpec([], tf.string), tf.TensorSpec([11], tf.int64))

    def decode(encoded, meta):
        # Always uint8 out of TF (4x less to move); `assemble` normalises float32 batches into the canvas.
        return T.tf_apply_geometry(encoded, meta[:9], "uint8", image_fn, meta[9], final_resize,
                                   eval_transform), meta[10]

    ds = tf.data.Dataset.from_generator(gen_fn, output_signature=sig)
    npc = tf.data.AUTOTUNE if num_parallel_calls < 0 else max(1, int(num_parallel_calls))
    # The map function is plain TF ops with explicit tf.cond: no AutoGraph conversion needed.
    ds = ds.map(tf.autograph.experimental.do_not_convert(decode), num_parallel_calls=npc, deterministic=True)
    ds = ds.prefetch(max(1, prefetch))
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.max_intra_op_parallelism = 1
    if npc != tf.data.AUTOTUNE:
        opts.threading.private_threadpool_size = npc + 1
        # Nothing left to tune: without this, tf.data's autotuning thread sleeps up to a minute between
        # rounds, and destroying the iterator (the end of every training run) waits for it to wake up.
        opts.autotune.enabled = False
    return ds.with_options(opts)

