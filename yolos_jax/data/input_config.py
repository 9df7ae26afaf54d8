"""`config.input`: its defaults, its validation, and the values derived from it alone.

Every field the input pipeline reads is set (and commented) in `default_input_config`. `validate_input_config`
checks them all before any data is read (the batch sizes with `check_batch_size`, the one check of a batch size
against the process count); the longest-side limits and the train transform's parameters are derived here
once. The stages that read the config follow in the package docstring's order.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections

from yolos_jax.data import synthetic
from yolos_jax.data import transforms as T


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



def train_max_size(cfg: ml_collections.ConfigDict) -> int:
    """Longest side limit of train images (pixels): input.max_size, or max(scales) * 1333 // 800."""
    return int(cfg.max_size) if cfg.max_size > 0 else max(cfg.scales) * 1333 // 800


def eval_max_size(cfg: ml_collections.ConfigDict) -> int:
    """Longest side limit of eval images (pixels): input.eval_max_size, or eval_size * 1333 // 800."""
    return int(cfg.eval_max_size) if cfg.eval_max_size > 0 else int(cfg.eval_size) * 1333 // 800


def train_transform_config(cfg: ml_collections.ConfigDict) -> T.TrainTransformConfig:
    """The train transform's parameters from `config.input` (sizes in pixels)."""
    return T.TrainTransformConfig(
        scales=tuple(int(s) for s in cfg.scales), max_size=train_max_size(cfg), size_multiple=int(cfg.size_multiple),
        hflip_prob=float(cfg.hflip_prob), crop_prob=float(cfg.crop_prob),
        crop_resize_sizes=tuple(int(s) for s in cfg.crop_resize_sizes), crop_min_size=int(cfg.crop_min_size),
        crop_max_size=int(cfg.crop_max_size), crop_in_original=bool(cfg.crop_in_original),
        large_scale_jitter=bool(cfg.large_scale_jitter),
        lsj_size=int(cfg.lsj_size), lsj_min_scale=float(cfg.lsj_min_scale), lsj_max_scale=float(cfg.lsj_max_scale),
    )


def check_batch_size(batch_size: int, process_count: int, name: str) -> None:
    """The one check of a global batch size against the process count: every process reads an equal share.
    Raises ValueError '`name`=B must be a positive multiple of the process count N'."""
    b = int(batch_size)
    if b <= 0 or b % int(process_count):
        raise ValueError(f"{name}={b} must be a positive multiple of the process count {process_count}")


def validate_input_config(cfg: ml_collections.ConfigDict, process_count: int) -> None:
    """Checks every field of `config.input` (ValueError naming the field) before any data is read;
    the batch sizes against `process_count` processes."""
    for field in ("batch_size", "eval_batch_size"):
        check_batch_size(cfg[field], process_count, f"input.{field}")
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


def resize_on_device(cfg: ml_collections.ConfigDict) -> bool:
    """input.resize_on_device resolved ('auto': an accelerator backend and a transform that allows it)."""
    value = cfg.get("resize_on_device", "off")
    if value == "auto":
        return jax.default_backend() != "cpu" and not cfg.large_scale_jitter and bool(cfg.crop_in_original)
    return value == "on"


def synthetic_input_config(root: str, num_train: int = 32, num_val: int = 8, image_size: Any = (96, 128),
                           seed: int = 0, num_classes: int = 4, **overrides: Any) -> ml_collections.ConfigDict:
    """An input config over a synthetic dataset under `root` (generated and prepared on first use),
    with transforms scaled down to small images: scales (64, 80, 96), crops 64..112, eval 96.
    `overrides` set any other input field."""
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
