"""The input pipeline: prepared tfds data -> planned, transformed, padded host batches -> global arrays.

BATCH SCHEMA (the one definition; train and eval read exactly this). Per step, a dict of numpy arrays
for this process's share of the global batch (B = input.batch_size // process_count):

    image:      [B, H, W, 3] float32  RGB, ImageNet mean/std normalised, zeros in the padding.
                (input.image_format='uint8': uint8 0..255 instead, zeros in the padding; then
                `to_global_batch` normalises on device, so the device batch is the float32 above.)
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

Data flow: `coco_builder` (prepared ArrayRecord dataset + index) -> `batching` plans each epoch (which
examples form which batch, each example's random transform, the canvas) from the seed alone -> a
Python generator reads this process's examples of each planned batch and transforms their boxes
(numpy) -> tf.data decodes and resamples the images in parallel (TF ops, deterministic order) -> a
background thread pads them into canvas batches. The iterator position is (epoch, batch): saving it
with a checkpoint and `set_state` on resume reproduces the uninterrupted run's batches exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import queue
import threading
from typing import Any, Iterator, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from yolos_jax.data import batching
from yolos_jax.data import coco_builder
from yolos_jax.data import transforms as T
from yolos_jax.data.labels import LabelMap
from yolos_jax.data.tf_setup import get_tf

log = logging.getLogger(__name__)

BATCH_KEYS = ("image", "pixel_mask", "boxes", "labels", "box_mask", "image_id", "orig_size", "size", "valid")


# --------------------------------------------------------------------------------------------------
# Config.


def default_input_config(scales: str = "s") -> ml_collections.ConfigDict:
    """`config.input`: every field the pipeline reads, with the original YOLOS recipe as defaults.

    scales: 'ti' (YOLOS-Ti: 256..608, eval 512) or 's' / 'b' (480..800, eval 800).
    """
    sc = T.scales_for(scales)
    c = ml_collections.ConfigDict()
    # --- where the data is --------------------------------------------------------------------------
    # tfds data dir holding prepared datasets: DATA_DIR/coco_folder/<dataset_name>/1.0.0
    c.data_dir = os.environ.get("YOLOS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    c.dataset_name = "coco2017"  # name of the prepared dataset in data_dir (one per source)
    c.source_dir = ""  # COCO-format folder to prepare from (annotations/instances_<split>.json + <split>/)
    c.from_tfds = ""  # or prepare from tfds's own prepared dataset, e.g. 'coco/2017'
    c.tfds_data_dir = ""  # the tfds data dir holding `from_tfds` ('' = tfds default)
    c.auto_prepare = False  # prepare on first use when missing (single-process runs only)
    c.verify_images = True  # prepare: fully decode every image (skip corrupt ones) vs header only
    c.prepare_threads = 2  # prepare: images decoded in parallel
    c.train_split = "train2017"
    c.val_split = "val2017"
    c.label_mode = "identity"  # 'identity': label == category id (COCO: 91, original heads line up);
    #                            'contiguous': sorted category ids -> 0..K-1 (new datasets)
    # --- batches --------------------------------------------------------------------------------------
    c.batch_size = 8  # global train batch (divided among processes)
    c.eval_batch_size = 8  # global eval batch
    c.max_boxes = 100  # box slots per image (<= the model's num_det_tokens); extra boxes are dropped
    c.image_format = "float32"  # host images: 'float32' normalised (the schema) or 'uint8' (4x less host
    #                             work and transfer; `to_global_batch` normalises on device)
    # --- train transforms (transforms.py) -------------------------------------------------------------
    c.scale_set = scales  # informational: which preset `scales` came from
    c.scales = sc  # shortest-side choices of the multi-scale resize (pixels)
    c.max_size = -1  # longest side limit; -1 = max(scales) * 1333 // 800 (the original's rule)
    c.size_multiple = 16  # final train sizes floored to a multiple (whole patches)
    c.hflip_prob = 0.5
    c.crop_prob = 0.5  # probability of the resize -> random crop -> multi-scale resize branch
    c.crop_resize_sizes = (400, 500, 600)
    c.crop_min_size = 384
    c.crop_max_size = 600
    # The transforms' final resize on the accelerator (data.device_resize; the host then only decodes,
    # crops, flips and pads: ~1.8x decode instead of ~3x): 'on', 'off', or 'auto' = on when jax's
    # backend is not the CPU (there the same cores would pay a matmul resize) and the transform allows.
    # Train batches only: evaluation always resamples on the host with the original's PIL (T.resize_image).
    c.resize_on_device = "off"
    c.crop_in_original = True  # cut the crop window from the original (one resampling, window-only JPEG
    #                            decode); False: the original's resize -> crop -> resize, two resamplings
    c.large_scale_jitter = False  # ViTDet LSJ instead of the above: fixed lsj_size^2 canvas
    c.lsj_size = 1024
    c.lsj_min_scale = 0.1
    c.lsj_max_scale = 2.0
    # --- eval transform ---------------------------------------------------------------------------------
    c.eval_size = 512 if sc == T.SCALES_TI else 800  # shortest side (original: --eval_size)
    c.eval_max_size = -1  # -1 = eval_size * 1333 // 800
    # (sizes: T.eval_resize_hw, the original's rule, floored to 16; resampling: T.resize_image, PIL bilinear)
    # --- static shapes (batching.py) ----------------------------------------------------------------
    c.canvases = ()  # explicit train canvases ((H, W), ...); () = designed from the data
    c.num_canvases = 12  # train canvases when designed (>= 2: the portrait/landscape catch-alls)
    c.eval_canvases = ()
    c.eval_num_canvases = 4
    c.canvas_multiple = 16  # canvas sides are multiples of this (the patch size)
    c.leftover = "merge"  # per-epoch leftovers: 'merge' into batches on larger canvases, or 'drop'
    c.shuffle = True  # per-epoch permutation of the whole split (exact; no shuffle buffer needed)
    # --- determinism and speed --------------------------------------------------------------------------
    c.seed = 0  # data seed (make_train_iterator(seed=...) overrides)
    c.num_parallel_calls = 2  # images decoded/resampled in parallel (tf.data map); -1 = autotune
    c.prefetch_batches = 2  # assembled batches kept ready per process
    return c


def _max_size(cfg) -> int:
    return int(cfg.max_size) if cfg.max_size > 0 else max(cfg.scales) * 1333 // 800


def _eval_max_size(cfg) -> int:
    return int(cfg.eval_max_size) if cfg.eval_max_size > 0 else int(cfg.eval_size) * 1333 // 800


def train_transform_config(cfg: ml_collections.ConfigDict) -> T.TrainTransformConfig:
    return T.TrainTransformConfig(
        scales=tuple(int(s) for s in cfg.scales), max_size=_max_size(cfg), size_multiple=int(cfg.size_multiple),
        hflip_prob=float(cfg.hflip_prob), crop_prob=float(cfg.crop_prob),
        crop_resize_sizes=tuple(int(s) for s in cfg.crop_resize_sizes), crop_min_size=int(cfg.crop_min_size),
        crop_max_size=int(cfg.crop_max_size), crop_in_original=bool(cfg.crop_in_original),
        large_scale_jitter=bool(cfg.large_scale_jitter),
        lsj_size=int(cfg.lsj_size), lsj_min_scale=float(cfg.lsj_min_scale), lsj_max_scale=float(cfg.lsj_max_scale),
    )


def _check_config(cfg, process_count: int) -> None:
    for field in ("batch_size", "eval_batch_size"):
        b = int(cfg[field])
        if b <= 0 or b % process_count:
            raise ValueError(f"input.{field}={b} must be a positive multiple of the process count {process_count}")
    if cfg.max_boxes <= 0:
        raise ValueError(f"input.max_boxes must be positive, got {cfg.max_boxes}")
    if int(cfg.get("eval_size_multiple", T.EVAL_SIZE_MULTIPLE)) != T.EVAL_SIZE_MULTIPLE:
        raise ValueError(f"input.eval_size_multiple={cfg.eval_size_multiple} is no longer a setting: evaluation "
                         f"always uses the original's sizes, floored to multiples of {T.EVAL_SIZE_MULTIPLE}")
    if int(cfg.eval_size) <= 0:
        raise ValueError(f"input.eval_size (shortest side of eval images, pixels) must be positive, got {cfg.eval_size}")
    if not cfg.scales or min(int(s) for s in cfg.scales) <= 0:
        raise ValueError(f"input.scales (shortest sides of train images, pixels) must be positive, got {cfg.scales}")
    if cfg.large_scale_jitter and int(cfg.lsj_size) <= 0:
        raise ValueError(f"input.lsj_size must be positive, got {cfg.lsj_size}")
    if cfg.image_format not in ("float32", "uint8"):
        raise ValueError(f"input.image_format must be 'float32' or 'uint8', got {cfg.image_format!r}")
    if cfg.label_mode not in ("identity", "contiguous"):
        raise ValueError(f"input.label_mode must be 'identity' or 'contiguous', got {cfg.label_mode!r}")
    if cfg.canvas_multiple < 1:
        raise ValueError(f"input.canvas_multiple must be >= 1, got {cfg.canvas_multiple}")
    if cfg.get("resize_on_device", "off") not in ("on", "off", "auto"):
        raise ValueError(f"input.resize_on_device must be 'on', 'off' or 'auto', got {cfg.resize_on_device!r}")
    if cfg.get("resize_on_device", "off") == "on" and (cfg.large_scale_jitter or not cfg.crop_in_original):
        # There the resample that matters is not the last one (LSJ resizes, then crops; the original's
        # crop branch resizes, crops, resizes): the host would still resample.
        raise ValueError("input.resize_on_device='on' needs input.large_scale_jitter=False and "
                         "input.crop_in_original=True")


def resize_on_device(cfg) -> bool:
    """input.resize_on_device resolved ('auto': an accelerator backend and a transform that allows it)."""
    value = cfg.get("resize_on_device", "off")
    if value == "auto":
        import jax

        return jax.default_backend() != "cpu" and not cfg.large_scale_jitter and bool(cfg.crop_in_original)
    return value == "on"


def source_canvas(cfg, index: coco_builder.SplitIndex) -> Optional[tuple[int, int]]:
    """The fixed (Hs, Ws) of `source_image` with input.resize_on_device (None without): the split's
    largest original height and width, rounded up to multiples of 32. Every pre-resize image fits: it
    is the original or a window of it (crop_in_original)."""
    if not resize_on_device(cfg) or len(index) == 0:
        return None
    return (int(batching.ceil_to(int(np.max(index.height)), 32)), int(batching.ceil_to(int(np.max(index.width)), 32)))


# --------------------------------------------------------------------------------------------------
# The prepared dataset and its metadata.


def open_dataset(cfg: ml_collections.ConfigDict, process_count: int = 1) -> coco_builder.PreparedDataset:
    """The prepared dataset of `cfg` (preparing it first if input.auto_prepare and single-process)."""
    try:
        ds = coco_builder.load(cfg.data_dir, cfg.dataset_name)
    except coco_builder.DataError:
        if not cfg.auto_prepare or not (cfg.source_dir or cfg.from_tfds):
            raise
        if process_count > 1:
            raise coco_builder.DataError(
                f"dataset '{cfg.dataset_name}' is not prepared in {cfg.data_dir}; with several processes prepare it "
                "once beforehand: python -m yolos_jax.data.prepare ...") from None
        ds = coco_builder.prepare(
            cfg.data_dir, cfg.dataset_name, source_dir=cfg.source_dir or None, tfds_source=cfg.from_tfds or None,
            tfds_data_dir=cfg.tfds_data_dir or None, verify_images=cfg.verify_images, num_threads=cfg.prepare_threads)
    if cfg.source_dir or cfg.from_tfds:
        ds.check_source(cfg.source_dir or None, cfg.from_tfds or None)
    changes = ds.source_changes(cfg.source_dir or None)
    if changes:
        log.warning("using %s as prepared, but its source changed since (%s); to use the source as it is now: "
                    "python -m yolos_jax.data.prepare --data_dir=%s --name=%s --coco_dir=%s --force",
                    ds.path, "; ".join(changes), cfg.data_dir, cfg.dataset_name, cfg.source_dir or ds.source_dir())
    return ds


@dataclasses.dataclass
class DatasetInfo:
    """What train/eval need to know about the data.

    label_map: category ids <-> labels (its num_classes is the model's num_classes).
    num_examples: {split: examples in the prepared split}.
    instances_json: {split: path of the cleaned COCO ground-truth JSON for pycocotools}; it holds
      exactly the examples the eval iterator yields (image ids, original sizes).
    reports: {split: bad-data counts from preparing}.
    """

    label_map: LabelMap
    num_examples: dict
    instances_json: dict
    train_split: str
    val_split: str
    path: str
    reports: dict

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes


def dataset_info(cfg: ml_collections.ConfigDict) -> DatasetInfo:
    ds = open_dataset(cfg)
    return DatasetInfo(
        label_map=LabelMap.from_categories(ds.categories, cfg.label_mode),
        num_examples={s: int(ds.builder.info.splits[s].num_examples) for s in ds.splits},
        instances_json={s: ds.gt_json(s) for s in ds.splits},
        train_split=cfg.train_split, val_split=cfg.val_split, path=ds.path,
        reports={s: ds.report(s) for s in ds.splits},
    )


# --------------------------------------------------------------------------------------------------
# Canvases.


def train_canvases(cfg, index: coco_builder.SplitIndex) -> list[tuple[int, int]]:
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


def eval_geometry(cfg, index: coco_builder.SplitIndex) -> np.ndarray:
    return T.eval_geometry(index.height, index.width, int(cfg.eval_size), _eval_max_size(cfg))


def eval_canvases(cfg, index: coco_builder.SplitIndex) -> list[tuple[int, int]]:
    if len(cfg.eval_canvases):
        canvases = sorted(tuple(int(v) for v in c) for c in cfg.eval_canvases)
        # Fixed canvases must hold any image: the eval rule bounds (short, long) sides, both orientations.
        short, long = T.eval_canvas_bound(int(cfg.eval_size), _eval_max_size(cfg))
        for need in {(short, long), (long, short)}:
            if not any(ch >= need[0] and cw >= need[1] for ch, cw in canvases):
                raise ValueError(
                    f"input.eval_canvases={canvases} has no canvas of at least {need[0]}x{need[1]} (h x w): eval images "
                    f"(input.eval_size={cfg.eval_size}, longest side <= {_eval_max_size(cfg)}, floored to 16) reach "
                    f"{short}x{long} and {long}x{short}; add such canvases or leave input.eval_canvases=()")
        return canvases
    # Eval sizes are known exactly: the base canvas is their bounding box, not the worst case.
    sizes = T.output_hw(eval_geometry(cfg, index))
    if not len(sizes):
        return []
    m = int(cfg.canvas_multiple)
    base = [tuple(int(v) for v in batching.ceil_to(sizes.max(axis=0), m))] if len(sizes) else []
    return batching.design_canvases(sizes, base, int(cfg.eval_num_canvases), m)


# --------------------------------------------------------------------------------------------------
# Reading and transforming examples.


def _record_targets(rec: Mapping[str, Any], label_map: LabelMap) -> tuple[np.ndarray, np.ndarray]:
    """Non-crowd boxes [N, 4] xyxy pixels and their labels [N] from a prepared record."""
    o = rec["objects"]
    boxes = np.asarray(o["bbox"], np.float32).reshape(-1, 4)
    cats = np.asarray(o["category_id"], np.int64).reshape(-1)
    crowd = np.asarray(o["is_crowd"], bool).reshape(-1)
    keep = ~crowd
    return boxes[keep], label_map.to_labels(cats[keep])


class _Stats:
    """Counters the element stream updates (approximate under prefetch; for logging)."""

    def __init__(self):
        self.truncated_boxes = 0
        self.examples = 0


def _element_stream(plan_for_epoch, first: tuple[int, int], epochs: Optional[int], slot_slice: slice,
                    source, index: coco_builder.SplitIndex, label_map: LabelMap, max_boxes: int,
                    stats: _Stats) -> Iterator[dict]:
    """Yields this process's examples of each planned batch from position `first` = (epoch, batch)."""
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
                boxes, labels = _record_targets(rec, label_map)
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


def _tf_dataset(gen_fn, num_parallel_calls: int, prefetch: int, image_fn=None, final_resize: bool = True,
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
    if num_parallel_calls > 0:
        opts.threading.private_threadpool_size = int(num_parallel_calls) + 1
    return ds.with_options(opts)


def assemble(elements: Sequence[Mapping[str, np.ndarray]], image_format: str,
             source_hw: Optional[tuple[int, int]] = None) -> dict[str, np.ndarray]:
    """Pads a batch's transformed examples into one canvas: the batch schema (module docstring).
    source_hw: with input.resize_on_device, the source canvas; the images are then pre-resize."""
    H, W = (int(v) for v in elements[0]["canvas"])
    n = len(elements)
    if source_hw is not None:
        return _assemble_sources(elements, (H, W), source_hw)
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
    return {"image": image, "pixel_mask": mask, **_stack_targets(elements)}


def _stack_targets(elements: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
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


def _assemble_sources(elements, canvas: tuple[int, int], source_hw: tuple[int, int]) -> dict[str, np.ndarray]:
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
        **_stack_targets(elements),
    }


_DONE = object()


class _BatchIterator:
    """Runs element stream -> tf.data -> batch assembly in a background thread from a start position."""

    def __init__(self, make_stream, local_batch: int, cfg, start: tuple[int, int], image_fn=None,
                 source_hw: Optional[tuple[int, int]] = None, eval_transform: bool = False):
        self._source_hw = source_hw
        self._eval_transform = eval_transform
        self._make_stream = make_stream
        self._image_fn = image_fn
        self._b = local_batch
        self._cfg = cfg
        self.position = start  # (epoch, batch) of the next batch to hand out
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()

    def _start(self) -> None:
        start = self.position
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=max(1, int(self._cfg.prefetch_batches)))
        q, stop, b = self._queue, self._stop, self._b
        make_stream = self._make_stream  # the thread must not reference `self`: dropping the iterator stops it
        # Examples wait here, in order, while their images go through tf.data (which keeps the order).
        pending: collections.deque = collections.deque()
        stream_error: list = []

        def gen():
            try:
                for seq, el in enumerate(make_stream(start)):
                    pending.append((seq, el))
                    meta = np.concatenate([el["geom"], [el["image_id"], seq]]).astype(np.int64)
                    yield el["encoded"], meta
            except Exception as e:  # noqa: BLE001 - re-raised as itself by `run`, not wrapped by tf.data
                stream_error.append(e)

        source_hw = self._source_hw
        ds = _tf_dataset(gen, int(self._cfg.num_parallel_calls), b * max(1, int(self._cfg.prefetch_batches)),
                         self._image_fn, final_resize=source_hw is None, eval_transform=self._eval_transform)
        fmt = self._cfg.image_format

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def run():
            try:
                buf = []
                tf_errors = get_tf().errors.OpError
                it = ds.as_numpy_iterator()
                while True:
                    try:
                        image, seq = next(it)
                    except StopIteration:
                        break
                    except tf_errors as e:  # say which image failed
                        where = f"image id {int(pending[0][1]['image_id'])}" if pending else "an image"
                        raise coco_builder.DataError(f"decoding {where} failed: {e.message.strip()[:300]}") from None
                    if stop.is_set():
                        return
                    want, el = pending.popleft()
                    if want != seq:
                        raise AssertionError(f"tf.data returned example {seq}, expected {want}; this is a bug")
                    el["image"] = image
                    buf.append(el)
                    if len(buf) == b:
                        pos = tuple(int(v) for v in buf[0]["position"])
                        if any(tuple(int(v) for v in e["position"]) != pos for e in buf):
                            raise AssertionError("examples of different batches were mixed; this is a bug")
                        if not put((pos, assemble(buf, fmt, source_hw))):
                            return
                        buf = []
                if stream_error:
                    raise stream_error[0]
                put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
                put(e)

        self._thread = threading.Thread(target=run, name="yolos_input", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=30)
            self._thread = None
            self._queue = None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        (epoch, k), batch = item
        self.position = (epoch, k + 1)
        return batch

    def restart_at(self, position: tuple[int, int]) -> None:
        self.close()
        self.position = position


class _PlanCache:
    """Epoch plans by epoch number (the two most recently used kept), shared by the iterator and its reader
    thread. Any epoch can be asked for at any time: an evicted plan is rebuilt (plans are pure functions of the
    seed and the epoch)."""

    def __init__(self, make_plan, keep: int = 2):
        self._make = make_plan
        self._keep = int(keep)
        self._plans: dict[int, batching.Plan] = {}  # in order of last use
        self._lock = threading.Lock()

    def __call__(self, epoch: int) -> batching.Plan:
        with self._lock:
            plan = self._plans.pop(epoch, None)
            if plan is None:
                plan = self._make(epoch=epoch)
            self._plans[epoch] = plan  # now the most recently used
            while len(self._plans) > self._keep:
                self._plans.pop(next(iter(self._plans)))
            return plan


class TrainIterator:
    """Endless train batches (host numpy, this process's share). See `make_train_iterator`."""

    def __init__(self, cfg: ml_collections.ConfigDict, seed: int, process_index: int, process_count: int):
        _check_config(cfg, process_count)
        self.cfg = cfg
        self.seed = int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.dataset = open_dataset(cfg, process_count)
        split = cfg.train_split
        self.index = self.dataset.index(split)
        if len(self.index) == 0:
            raise coco_builder.DataError(f"split '{split}' of {self.dataset.path} has no examples")
        self.label_map = LabelMap.from_categories(self.dataset.categories, cfg.label_mode)
        self.tcfg = train_transform_config(cfg)
        self.canvases = train_canvases(cfg, self.index)
        self.global_batch = int(cfg.batch_size)
        self.local_batch = self.global_batch // self.process_count
        self.stats = _Stats()
        self._plans = _PlanCache(functools.partial(
            batching.train_epoch_plan, self.seed, heights=self.index.height, widths=self.index.width,
            tcfg=self.tcfg, canvases=self.canvases, batch_size=self.global_batch, leftover=cfg.leftover,
            shuffle=cfg.shuffle))
        source = self.dataset.source_for(split)
        sl = slice(self.process_index * self.local_batch, (self.process_index + 1) * self.local_batch)
        plans, index, label_map, stats, max_boxes = self._plans, self.index, self.label_map, self.stats, int(cfg.max_boxes)

        def make_stream(start):
            return _element_stream(plans, start, None, sl, source, index, label_map, max_boxes, stats)

        self._it = _BatchIterator(make_stream, self.local_batch, cfg, (0, 0), source_hw=source_canvas(cfg, self.index))

    def plan(self, epoch: int) -> batching.Plan:
        """The global plan of train epoch `epoch` (identical on every process)."""
        return self._plans(epoch)

    def fingerprint(self) -> str:
        """Identifies everything the batch sequence depends on (a resumed run must match it)."""
        keys = {k: self.cfg[k] for k in sorted(self.cfg.keys()) if k not in (
            "num_parallel_calls", "prefetch_batches", "auto_prepare", "prepare_threads", "data_dir", "source_dir",
            "tfds_data_dir", "verify_images", "image_format", "eval_batch_size", "eval_size", "eval_max_size",
            "eval_size_multiple", "eval_canvases", "eval_num_canvases", "val_split")}
        blob = json.dumps({"cfg": keys, "seed": self.seed, "n": len(self.index), "canvases": self.canvases,
                           "plan_version": batching.PLAN_VERSION,
                           "ids": hashlib.sha1(self.index.image_id.tobytes()).hexdigest()}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """JSON-able position: the next batch handed out will be batch `batch` of epoch `epoch`."""
        e, k = self._it.position
        return {"epoch": int(e), "batch": int(k), "seed": self.seed, "fingerprint": self.fingerprint()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a `get_state()` (of this or an earlier, identically configured run)."""
        for key in ("epoch", "batch"):
            if key not in state:
                raise ValueError(f"input iterator state lacks '{key}': {dict(state)}")
        fp = state.get("fingerprint")
        if fp is not None and fp != self.fingerprint():
            raise ValueError(
                f"input iterator state was saved with a different data configuration (fingerprint {fp} vs "
                f"{self.fingerprint()}): the dataset, seed, batch size, transforms or canvases changed, so the "
                "resumed batches would not match. Restore with the original config, or drop the state.")
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"input iterator state has seed {state['seed']}, this iterator {self.seed}")
        self._it.restart_at((int(state["epoch"]), int(state["batch"])))

    def epoch_stats(self, epoch: int = 0) -> dict[str, float]:
        """Padding waste and number of distinct shapes of an epoch's plan (global)."""
        return self.plan(epoch).stats()

    def close(self) -> None:
        self._it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class EvalIterator:
    """One pass over a split (host numpy, this process's share); see `make_eval_iterator`."""

    def __init__(self, cfg: ml_collections.ConfigDict, split: Optional[str], process_index: int, process_count: int,
                 batch_size: Optional[int] = None, image_fn=None):
        _check_config(cfg, process_count)
        self.cfg = cfg
        self.split = split or cfg.val_split
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.dataset = open_dataset(cfg, process_count)
        self.index = self.dataset.index(self.split)
        self.label_map = LabelMap.from_categories(self.dataset.categories, cfg.label_mode)
        self.canvases = eval_canvases(cfg, self.index)
        self.global_batch = int(cfg.eval_batch_size if batch_size is None else batch_size)
        if self.global_batch <= 0 or self.global_batch % self.process_count:
            raise ValueError(f"eval batch size {self.global_batch} must be a positive multiple of the process count "
                             f"{self.process_count}")
        self.local_batch = self.global_batch // self.process_count
        self._plan = plan = batching.eval_plan(eval_geometry(cfg, self.index), self.canvases, self.global_batch)
        self.stats = _Stats()
        source = self.dataset.source_for(self.split) if len(self.index) else None
        sl = slice(self.process_index * self.local_batch, (self.process_index + 1) * self.local_batch)
        index, label_map, stats, max_boxes = self.index, self.label_map, self.stats, int(cfg.max_boxes)

        def make_stream(start):
            return _element_stream(lambda e: plan, start, 1, sl, source, index, label_map, max_boxes, stats)

        # The eval transform resamples on the host with the one eval resampler (T.resize_image, the
        # original's PIL), also under input.resize_on_device: evaluation is the original's.
        self._it = _BatchIterator(make_stream, self.local_batch, cfg, (0, 0), image_fn, eval_transform=True)

    @property
    def plan(self) -> batching.Plan:
        return self._plan

    def __len__(self) -> int:
        return len(self._plan)

    def __iter__(self) -> "EvalIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if len(self._plan) == 0:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def _jax_process() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def make_train_iterator(input_cfg: ml_collections.ConfigDict, *, seed: Optional[int] = None,
                        process_index: Optional[int] = None, process_count: Optional[int] = None) -> TrainIterator:
    """Endless iterator of host batches (schema above) of this process: local batch = batch_size /
    process_count; epochs follow one another with a fresh seeded shuffle. `get_state()`/`set_state()`
    save and restore the position exactly. seed=None uses input.seed."""
    if process_index is None or process_count is None:
        pi, pc = _jax_process()
        process_index = pi if process_index is None else process_index
        process_count = pc if process_count is None else process_count
    return TrainIterator(input_cfg, input_cfg.seed if seed is None else seed, process_index, process_count)


def make_eval_iterator(input_cfg: ml_collections.ConfigDict, split: Optional[str] = None, *,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       batch_size: Optional[int] = None, image_fn=None) -> EvalIterator:
    """One pass over `split` (default input.val_split): every example exactly once over all processes,
    grouped by canvas; batches padded with valid=False fillers. Every process gets the same number of
    batches with the same shapes (len(iterator)).

    batch_size: global batch (default input.eval_batch_size).
    image_fn: optional `fn(image_uint8 [h, w, 3], image_id) -> uint8 [h, w, 3]` (same size) applied to
      each decoded original image before the eval transform (e.g. COCO-C corruptions); runs in Python.
    """
    if process_index is None or process_count is None:
        pi, pc = _jax_process()
        process_index = pi if process_index is None else process_index
        process_count = pc if process_count is None else process_count
    return EvalIterator(input_cfg, split, process_index, process_count, batch_size, image_fn)


def coco_ground_truth(input_cfg: ml_collections.ConfigDict, split: Optional[str] = None) -> str:
    """Path of the cleaned COCO instances JSON of `split` (default input.val_split): exactly the images
    and annotations of the prepared split, for pycocotools."""
    return open_dataset(input_cfg).gt_json(split or input_cfg.val_split)


# --------------------------------------------------------------------------------------------------
# Host -> device.


@functools.lru_cache(maxsize=16)
def _device_normalizer(sharding):
    import jax
    import jax.numpy as jnp

    mean = np.asarray(T.IMAGENET_MEAN, np.float32)
    std = np.asarray(T.IMAGENET_STD, np.float32)

    def norm(image, mask):
        x = (image.astype(jnp.float32) / 255.0 - mean) / std
        return jnp.where(mask[..., None], x, 0.0)

    return jax.jit(norm, out_shardings=sharding)


def to_global_batch(host_batch: Mapping[str, np.ndarray], sharding: Any) -> dict[str, Any]:
    """This process's host batch -> global jax.Arrays (jax.make_array_from_process_local_data).

    sharding: one jax.sharding.Sharding for every entry (e.g. NamedSharding(mesh, P('data')): batch
    axis split over the data axis) or a {key: Sharding} mapping. A uint8 image (input.image_format=
    'uint8') is normalised on device into the schema's float32 (zeros in the padding); an
    input.resize_on_device batch (`source_image`, `source_size`) is resized and normalised on device into
    that same `image` (`data.device_resize`; the source entries are consumed). int64 entries
    become int32 unless jax_enable_x64 (image ids must then fit in int32).
    """
    import jax

    def shard(k):
        if not isinstance(sharding, Mapping):
            return sharding
        return sharding[k] if k in sharding else sharding["image"]  # source_* / size: laid out as the image

    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        if v.dtype == np.int64 and not jax.config.jax_enable_x64:
            if v.size and (v.max() > np.iinfo(np.int32).max or v.min() < np.iinfo(np.int32).min):
                raise ValueError(f"batch['{k}'] has values beyond int32; enable jax_enable_x64 to keep them")
            v = v.astype(np.int32)
        out[k] = jax.make_array_from_process_local_data(shard(k), v)
    if "image" in out and out["image"].dtype == np.uint8:
        out["image"] = _device_normalizer(shard("image"))(out["image"], out["pixel_mask"])
    if "source_image" in out:  # input.resize_on_device: the transforms' final resize happens here
        from yolos_jax.data import device_resize

        resize = device_resize.device_resize_normalize(shard("image"))
        out["image"] = resize(out.pop("source_image"), out.pop("source_size"), out["pixel_mask"])
    return out


def with_host_image(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A host batch with an `image` entry (uint8 when it is resized here), for host-side consumers
    (figures, show_batch): input.resize_on_device batches are resampled on the default device (the
    same function `to_global_batch` runs) and lose their `source_*` entries; other batches pass as they are."""
    if "source_image" not in batch:
        return dict(batch)
    import jax.numpy as jnp

    from yolos_jax.data import device_resize

    out = {k: v for k, v in batch.items() if k not in ("source_image", "source_size")}
    mask = np.asarray(batch["pixel_mask"])
    img = device_resize.resize_batch(jnp.asarray(batch["source_image"]), jnp.asarray(batch["source_size"]),
                                     jnp.asarray(batch["size"]), mask.shape[1:3])
    out["image"] = np.asarray(img).astype(np.uint8)
    return out


# --------------------------------------------------------------------------------------------------
# A small synthetic setup (tests, examples, the main job's default).


def synthetic_input_config(root: str, num_train: int = 32, num_val: int = 8, image_size: Any = (96, 128),
                           seed: int = 0, num_classes: int = 4, **overrides: Any) -> ml_collections.ConfigDict:
    """An input config over a synthetic dataset under `root` (generated and prepared on first use),
    with transforms scaled down to small images: scales (64, 80, 96), crops 64..112, eval 96.
    `overrides` set any other input field."""
    from yolos_jax.data import synthetic

    key = hashlib.sha1(json.dumps([num_train, num_val, image_size, seed, num_classes]).encode()).hexdigest()[:8]
    src = os.path.join(root, f"synthetic_{key}")
    if not os.path.isdir(src):
        try:
            synthetic.generate(src, num_train, num_val, seed, image_size, num_classes=num_classes, crowd_fraction=0.1)
        except FileExistsError:  # another process generated it meanwhile
            pass
    c = default_input_config("s")
    c.data_dir = os.path.join(root, "tfds")
    c.dataset_name = f"synthetic_{key}"
    c.source_dir = src
    c.auto_prepare = True
    c.train_split, c.val_split = "train", "val"
    c.label_mode = "contiguous"
    c.batch_size = 4
    c.eval_batch_size = 4
    c.max_boxes = 8
    c.scales = (64, 80, 96)
    c.max_size = 160
    c.crop_resize_sizes = (80, 96, 112)
    c.crop_min_size = 64
    c.crop_max_size = 112
    c.eval_size = 96
    c.eval_max_size = 160
    c.num_canvases = 4
    c.eval_num_canvases = 3
    c.lsj_size = 128
    for k, v in overrides.items():
        c[k] = v
    return c
