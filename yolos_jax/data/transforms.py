"""Train/eval transforms of YOLOS (= DETR's), split into a numpy "geometry" and a TF image executor.

Original YOLOS (hustvl/YOLOS datasets/coco.py, DETR datasets/transforms.py), train:
    RandomHorizontalFlip(0.5)
    RandomSelect(p=0.5:  RandomResize(scales, max_size),
                 else:   RandomResize([400, 500, 600]) -> RandomSizeCrop(384, 600) -> RandomResize(scales, max_size))
    (every resize's sizes floored to multiples of 16, as the original's get_size_with_aspect_ratio)
    scales: Ti 256..608 step 16, max_size 608*1333//800 = 1013;  S/B 480..800 step 16, max_size 1333.
eval: RandomResize([eval_size], max_size=eval_size*1333//800).

Here every random choice is drawn up front, in numpy, from a seeded generator (so batches are
reproducible and resumable, and output sizes are known before any image is read, which the static-shape
batching needs). A transform is then fully described by one int32 row, the *geometry*:

    GEOM = [flip, h1, w1, cy, cx, ch, cw, h2, w2]      (all pixels, ints)
    flip        1: mirror the original image left-right first
    (h1, w1)    resize the (flipped) original to this size (== original size: no resize)
    (cy, cx, ch, cw)   crop window in the resized image (top, left, height, width)
    (h2, w2)    resize the crop to this final size (== (ch, cw): no resize)

Boxes follow DETR exactly (float32): hflip x -> w - x; resize multiplies by the size ratios; crop
subtracts the offset, clips to the window, and drops boxes left with no area; crowd boxes are dropped
before (as DETR's ConvertCocoPolysToMask). Final boxes are (cx, cy, w, h) / (w2, h2).

Departures from the original, on purpose:
  * crop branch (crop_in_original=True, the default): the window drawn on the 400/500/600 image is
    mapped to the original's pixels (rounded) and cut there, then resized once to the final size: the
    same distribution of crops with one resampling instead of two, and JPEGs decode only the window
    (tf.io.decode_and_crop_jpeg). crop_in_original=False runs the original's resize -> crop -> resize;
  * every resize's size is floored to a multiple of `size_multiple` (16, as the original: whole patches;
    the aspect ratio changes by < 16 px, boxes are unaffected because they are normalised), but never
    to 0 (one multiple is kept, where the original would fail);
  * train resampling is TF bilinear (antialiased when shrinking below 0.75x) instead of PIL bilinear;
    the result is rounded to uint8 like PIL's. Measured against PIL (noise images, the worst case): within
    1 grey level when enlarging or shrinking below 0.75x, but up to ~100 levels at 0.76-0.97x, where
    TF's plain bilinear skips source pixels that PIL's widened triangle averages.
Evaluation is the original's (`eval_resize_hw`, `resize_image`: its sizes and PIL itself): the one eval
transform of eval.py, the Evaluator, the COCO-C runner, infer.py and `Detector`.
Large-scale jitter (ViTDet; detectron2 ResizeScale + FixedSizeCrop): flip, resize so the image fits
lsj_size x lsj_size times a scale ~ U(min_scale, max_scale), then a random lsj_size crop (one offset
fraction for both axes, as detectron2), then pad to lsj_size x lsj_size.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

# Shrinking by a factor below this is antialiased (TF's scale_and_translate, like PIL's resize); milder
# shrinking is plain bilinear, nearly identical and ~5x cheaper (the crop branch's 480 -> 400 step).
ANTIALIAS_BELOW = 0.75
JPEG_DCT = "INTEGER_ACCURATE"  # PIL's JPEG decoding, bit for bit (TF's default, INTEGER_FAST, is not)
GEOM_FIELDS = ("flip", "h1", "w1", "cy", "cx", "ch", "cw", "h2", "w2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (x/255 - mean) / std == x * NORM_SCALE + NORM_SHIFT
NORM_SCALE = np.asarray([1.0 / (255.0 * s) for s in IMAGENET_STD], np.float32)
NORM_SHIFT = np.asarray([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], np.float32)

SCALES_TI = tuple(range(256, 609, 16))
SCALES_S = tuple(range(480, 801, 16))


def scales_for(name: str) -> tuple[int, ...]:
    """The multi-scale training set of a model size: 'ti' or 's'/'b' (the original's two lists)."""
    name = name.lower()
    if name in ("ti", "tiny"):
        return SCALES_TI
    if name in ("s", "b", "small", "base"):
        return SCALES_S
    raise ValueError(f"unknown scale set {name!r}; use 'ti', 's' or 'b' (or give input.scales explicitly)")


@dataclasses.dataclass(frozen=True)
class TrainTransformConfig:
    """The train transform's parameters (built from `config.input` by `input_config.train_transform_config`)."""

    scales: tuple[int, ...]
    max_size: int
    size_multiple: int = 16
    hflip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_resize_sizes: tuple[int, ...] = (400, 500, 600)
    crop_min_size: int = 384
    crop_max_size: int = 600
    crop_in_original: bool = True
    large_scale_jitter: bool = False
    lsj_size: int = 1024
    lsj_min_scale: float = 0.1
    lsj_max_scale: float = 2.0

    def __post_init__(self):
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"input.scales must be positive ints, got {self.scales}")
        if self.max_size < max(self.scales):
            raise ValueError(f"input.max_size={self.max_size} is below the largest scale {max(self.scales)}")
        if self.size_multiple < 1:
            raise ValueError(f"input.size_multiple must be >= 1, got {self.size_multiple}")
        inter = min(self.crop_resize_sizes) // self.size_multiple * self.size_multiple  # floored, as resized
        if self.crop_min_size > inter:
            raise ValueError(f"input.crop_min_size={self.crop_min_size} exceeds the smallest crop_resize_sizes "
                             f"{min(self.crop_resize_sizes)} (floored to input.size_multiple: {inter}): "
                             "RandomSizeCrop could not fit")
        if self.crop_min_size > self.crop_max_size:
            raise ValueError(f"input.crop_min_size={self.crop_min_size} > crop_max_size={self.crop_max_size}")
        if not 0 < self.lsj_min_scale <= self.lsj_max_scale:
            raise ValueError(f"input.lsj_min_scale/lsj_max_scale must satisfy 0 < min <= max, got "
                             f"{self.lsj_min_scale}, {self.lsj_max_scale}")

    def max_output_hw(self) -> tuple[int, int]:
        """(max short side, max long side) of any output image."""
        if self.large_scale_jitter:
            return self.lsj_size, self.lsj_size
        m = self.size_multiple
        return max(self.scales) // m * m, self.max_size // m * m


# --------------------------------------------------------------------------------------------------
# DETR's resize size rule, exact (Python float semantics, vectorised).


def detr_resize_hw(h: Any, w: Any, size: Any, max_size: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """DETR `get_size_with_aspect_ratio`: shortest side -> size, longest <= max_size (None: no limit).

    h, w, size: broadcastable int arrays. Returns (oh, ow) int64 arrays. Reproduces the original's
    float64 arithmetic, Python round() (half to even) and int() truncation.
    """
    h = np.asarray(h, np.int64)
    w = np.asarray(w, np.int64)
    size = np.broadcast_to(np.asarray(size, np.int64), np.broadcast(h, w).shape).copy()
    mn = np.minimum(h, w).astype(np.float64)
    mx = np.maximum(h, w).astype(np.float64)
    if max_size is not None:
        over = mx / mn * size > max_size
        size = np.where(over, np.round(max_size * mn / mx).astype(np.int64), size)
    # (w <= h and w == size) or (h <= w and h == size): keep the size.
    keep = ((w <= h) & (w == size)) | ((h <= w) & (h == size))
    oh = np.where(w < h, (size * h.astype(np.float64) / w).astype(np.int64), size)
    ow = np.where(w < h, size, (size * w.astype(np.float64) / h).astype(np.int64))
    return np.where(keep, h, oh), np.where(keep, w, ow)


def _floor_to(x: np.ndarray, m: int) -> np.ndarray:
    """Floors to a multiple of m, keeping at least one multiple (a side is never 0)."""
    return np.maximum(m, x // m * m) if m > 1 else x


# --------------------------------------------------------------------------------------------------
# The eval transform: one size rule and one resampler, shared by every evaluation and inference path.

EVAL_SIZE_MULTIPLE = 16  # the original floors eval sizes to whole 16-px patches


def eval_resize_hw(h: Any, w: Any, eval_size: int, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The eval size rule, its one owner (eval.py, the Evaluator, COCO-C, infer.py and `Detector` all call it).

    h, w: broadcastable int arrays, original sizes in pixels; eval_size: target shortest side; max_size:
    longest-side cap (the original's eval_size * 1333 // 800). Returns (oh, ow) int64 arrays, pixels.

    The original's rule (hustvl/YOLOS: `T.RandomResize([eval_size], max_size)`): DETR's
    `get_size_with_aspect_ratio` (`detr_resize_hw`: shortest side -> eval_size unless the longest would
    exceed max_size; then short = round(max_size * short / long), long = int(short * long / short)), then
    both sides floored to multiples of 16. Two departures, both only for aspect ratios beyond ~1:8 (never
    for COCO-like images): a side the floor would make 0 keeps one 16-px patch (the original fails on such
    an image), and a long side above max_size -- DETR computes it from the *rounded* short side, which can
    overshoot the cap by up to long/short/2 px (1150x41 at 800/1333 -> 1344) -- is clamped to max_size
    floored to 16. So every eval image fits (eval_size, max_size) floored to 16, in either orientation.
    HF's `get_size_with_aspect_ratio_yolos` computes the long side from the unrounded short side: the same
    sizes for COCO-like images at 800/1333 and 512/853; it differs for extreme aspect ratios and when
    max_size is itself a multiple of 16 (e.g. 1024/1024: DETR's 683 x 1023.7 floors to 672 x 1008).
    """
    m = EVAL_SIZE_MULTIPLE
    oh, ow = detr_resize_hw(h, w, eval_size, max_size)
    cap = max(m, int(max_size) // m * m)
    return np.minimum(_floor_to(oh, m), cap), np.minimum(_floor_to(ow, m), cap)


def eval_canvas_bound(eval_size: int, max_size: int) -> tuple[int, int]:
    """(short, long) sides in pixels that bound every `eval_resize_hw` output: an eval canvas of
    (short, long) or (long, short) holds every landscape or portrait eval image."""
    m = EVAL_SIZE_MULTIPLE
    cap = max(m, int(max_size) // m * m)
    return min(max(m, int(eval_size) // m * m), cap), cap


def resize_image(image: np.ndarray, size_hw: Sequence[int]) -> np.ndarray:
    """The eval resampler, its one owner: the original's own, PIL bilinear on the uint8 image.

    image: uint8 [h, w, 3] RGB; size_hw: (oh, ow) pixels. Returns uint8 [oh, ow, 3] (the input itself when
    the size is unchanged, as PIL). PIL >= 13 runs the vertical pass first when the height shrinks much
    more than the width (Pillow PR 9549); the original's PIL always went horizontal first; each pass rounds
    to uint8, so the two orders differ by at most one grey level.
    """
    oh, ow = int(size_hw[0]), int(size_hw[1])
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"resize_image needs a uint8 [h, w, 3] image, got {image.dtype} {image.shape}")
    if image.shape[:2] == (oh, ow):
        return image
    return np.asarray(Image.fromarray(image).resize((ow, oh), Image.BILINEAR))


def _geom(n: int) -> np.ndarray:
    return np.zeros((n, len(GEOM_FIELDS)), np.int64)


def sample_train_geometry(rng: np.random.Generator, heights: Any, widths: Any, cfg: TrainTransformConfig) -> np.ndarray:
    """Draws the random train transform of each example. heights/widths: [N] original sizes.
    Returns GEOM [N, 9] int64 (see module docstring)."""
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    n = len(h)
    g = _geom(n)
    g[:, 0] = rng.random(n) < cfg.hflip_prob
    if cfg.large_scale_jitter:
        return _lsj_geometry(rng, h, w, cfg, g)
    final_size = rng.choice(np.asarray(cfg.scales, np.int64), n)
    crop = rng.random(n) < cfg.crop_prob
    # Crop branch: RandomResize(crop_resize_sizes) -> RandomSizeCrop(min, max) (random.randint is inclusive).
    inter = rng.choice(np.asarray(cfg.crop_resize_sizes, np.int64), n)
    # The original floors every resize to multiples of 16, this one too (500 -> 496, 600 -> 592 short side).
    h1, w1 = (_floor_to(v, cfg.size_multiple) for v in detr_resize_hw(h, w, inter, None))
    cw = rng.integers(cfg.crop_min_size, np.minimum(w1, cfg.crop_max_size) + 1)
    ch = rng.integers(cfg.crop_min_size, np.minimum(h1, cfg.crop_max_size) + 1)
    cy = rng.integers(0, h1 - ch + 1)
    cx = rng.integers(0, w1 - cw + 1)
    if cfg.crop_in_original:
        # The same window, mapped to the original's pixels (rounded): one resampling instead of two,
        # and JPEGs decode only the window. Boxes follow the window actually cut.
        y0 = np.clip(np.round(cy * h / h1), 0, h - 1).astype(np.int64)
        x0 = np.clip(np.round(cx * w / w1), 0, w - 1).astype(np.int64)
        y1 = np.clip(np.round((cy + ch) * h / h1), y0 + 1, h).astype(np.int64)
        x1 = np.clip(np.round((cx + cw) * w / w1), x0 + 1, w).astype(np.int64)
        cy, cx, ch, cw, h1, w1 = y0, x0, y1 - y0, x1 - x0, h, w
    h1, w1 = np.where(crop, h1, h), np.where(crop, w1, w)
    cy, cx = np.where(crop, cy, 0), np.where(crop, cx, 0)
    ch, cw = np.where(crop, ch, h), np.where(crop, cw, w)
    h2, w2 = detr_resize_hw(ch, cw, final_size, cfg.max_size)
    g[:, 1], g[:, 2], g[:, 3], g[:, 4], g[:, 5], g[:, 6] = h1, w1, cy, cx, ch, cw
    g[:, 7], g[:, 8] = _floor_to(h2, cfg.size_multiple), _floor_to(w2, cfg.size_multiple)
    return g


def _lsj_geometry(rng, h, w, cfg: TrainTransformConfig, g: np.ndarray) -> np.ndarray:
    s = cfg.lsj_size
    scale = rng.uniform(cfg.lsj_min_scale, cfg.lsj_max_scale, len(h)) * s
    out_scale = np.minimum(scale / h, scale / w)
    h1 = np.maximum(1, np.round(h * out_scale)).astype(np.int64)
    w1 = np.maximum(1, np.round(w * out_scale)).astype(np.int64)
    frac = rng.uniform(0.0, 1.0, len(h))  # detectron2 FixedSizeCrop: one fraction for both axes
    cy = np.round(np.maximum(h1 - s, 0) * frac).astype(np.int64)
    cx = np.round(np.maximum(w1 - s, 0) * frac).astype(np.int64)
    ch, cw = np.minimum(h1, s), np.minimum(w1, s)
    g[:, 1], g[:, 2], g[:, 3], g[:, 4], g[:, 5], g[:, 6], g[:, 7], g[:, 8] = h1, w1, cy, cx, ch, cw, ch, cw
    return g


def eval_geometry(heights: Any, widths: Any, eval_size: int, eval_max_size: int) -> np.ndarray:
    """The eval transform as GEOM [N, 9] (no flip, no crop; final size `eval_resize_hw`).
    heights, widths: [N] original sizes in pixels."""
    h = np.asarray(heights, np.int64)
    w = np.asarray(widths, np.int64)
    g = _geom(len(h))
    g[:, 1], g[:, 2], g[:, 5], g[:, 6] = h, w, h, w
    g[:, 7], g[:, 8] = eval_resize_hw(h, w, eval_size, eval_max_size)
    return g


def output_hw(geom: np.ndarray) -> np.ndarray:
    """[N, 2] (h, w) of the transformed, un-padded images."""
    return np.asarray(geom)[..., 7:9]


# --------------------------------------------------------------------------------------------------
# Boxes (numpy float32, DETR's arithmetic).


def transform_boxes(boxes_xyxy: np.ndarray, orig_hw: Sequence[int], geom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Applies one example's geometry to its boxes.

    boxes_xyxy: [N, 4] float (x0, y0, x1, y1) pixels of the original image (crowd boxes removed).
    Returns (boxes [K, 4] float32 (cx, cy, w, h) normalised by the final (w2, h2); keep [N] bool, which
    input boxes survived, in order).
    """
    b = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    h, w = int(orig_hw[0]), int(orig_hw[1])
    flip, h1, w1, cy, cx, ch, cw, h2, w2 = (int(v) for v in geom)
    if flip:
        b = b[:, [2, 1, 0, 3]] * np.float32([-1, 1, -1, 1]) + np.float32([w, 0, w, 0])
    if (h1, w1) != (h, w):
        b = b * np.float32([w1 / w, h1 / h, w1 / w, h1 / h])
    keep = np.ones(len(b), bool)
    if (cy, cx, ch, cw) != (0, 0, h1, w1):
        b = b - np.float32([cx, cy, cx, cy])
        b = np.minimum(b.reshape(-1, 2, 2), np.float32([cw, ch]))
        b = np.maximum(b, np.float32(0)).reshape(-1, 4)
        keep = np.all(b[:, 2:] > b[:, :2], axis=1)
        b = b[keep]
    if (h2, w2) != (ch, cw):
        b = b * np.float32([w2 / cw, h2 / ch, w2 / cw, h2 / ch])
    cxcywh = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=1)
    return (cxcywh / np.float32([w2, h2, w2, h2])).astype(np.float32), keep


def pad_targets(boxes: np.ndarray, labels: np.ndarray, max_boxes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pads/truncates to max_boxes. Returns (boxes [M, 4] f32, labels [M] i32, box_mask [M] bool,
    number of boxes dropped by truncation — the first max_boxes are kept)."""
    n = min(len(boxes), max_boxes)
    out_b = np.zeros((max_boxes, 4), np.float32)
    out_l = np.zeros((max_boxes,), np.int32)
    mask = np.zeros((max_boxes,), bool)
    out_b[:n], out_l[:n], mask[:n] = boxes[:n], labels[:n], True
    return out_b, out_l, mask, len(boxes) - n


# --------------------------------------------------------------------------------------------------
# Images (TF ops; traced inside tf.data.map).


def tf_apply_geometry(image_bytes: Any, geom: Any, image_format: str = "float32", image_fn: Any = None,
                      image_id: Any = None, final_resize: bool = True, eval_transform: bool = False) -> Any:
    """Decodes and resamples one image following GEOM. TF graph function.

    image_bytes: scalar tf.string (JPEG, PNG, GIF, BMP, WebP; any channel layout -> RGB).
    geom: [9] int tensor. Returns [h2, w2, 3] uint8 when image_format == 'uint8': the resampled image
    rounded to 0..255, as PIL's resize of the original returns; or that, ImageNet-normalised
    ((x/255 - mean) / std, float32), when 'float32'.
    image_fn: optional Python `fn(uint8 [h, w, 3], image_id) -> uint8 [h, w, 3]` run on the decoded
    original (tf.numpy_function), e.g. an eval-time corruption.
    final_resize=False stops before the resize to (h2, w2) (input.resize_on_device: `data.device_resize`
    does it on the accelerator) and returns the uint8 image of size geom[5:7].
    eval_transform=True: the final resize is the eval resampler, `resize_image` (PIL, tf.numpy_function;
    PIL releases the GIL while it resamples), instead of TF's; `eval_geometry` GEOMs only.
    """
    # Imported here: TensorFlow is heavy and only the tf.data pipeline needs it (Detector, the config files and
    # the eval-size rule import this module without it); tf_setup.get_tf() configures it before any pipeline.
    import tensorflow as tf

    geom = tf.cast(geom, tf.int32)
    if image_format not in ("uint8", "float32"):
        raise ValueError(f"input.image_format must be 'float32' or 'uint8', got {image_format!r}")
    flip = geom[0] > 0

    def full_decode():
        # JPEG with the accurate integer DCT, PIL's (the original's decoder): TF's default fast DCT differs
        # from it by up to ~5 grey levels on most pixels; the accurate one is bit-exact and ~6% slower.
        img = tf.cond(tf.io.is_jpeg(image_bytes),
                      lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method=JPEG_DCT),
                      lambda: tf.io.decode_image(image_bytes, channels=3, expand_animations=False))
        img = tf.ensure_shape(img, [None, None, 3])
        if image_fn is not None:
            def hook(im, iid):
                out = np.asarray(image_fn(im, int(iid)))
                if out.shape != im.shape or out.dtype != np.uint8:
                    raise ValueError(f"image_fn must return uint8 {im.shape}, got {out.dtype} {out.shape}")
                return out

            shape = tf.shape(img)
            img = tf.numpy_function(hook, [img, image_id], tf.uint8, stateful=False)
            img = tf.reshape(img, shape)
        img = tf.cond(flip, lambda: tf.reverse(img, axis=[1]), lambda: img)
        # +0.5 now (on the smaller input; resampling weights sum to 1, so it carries through) makes the
        # final truncating cast round to nearest. Bilinear and triangle weights are convex, so values
        # stay within [0.5, 255.5]: no clipping needed.
        img = tf.cast(img, tf.float32) + 0.5
        img = _tf_resize(tf, img, geom[1:3])
        return img[geom[3]:geom[3] + geom[5], geom[4]:geom[4] + geom[6], :]

    def window_decode():
        """JPEG, crop of the original: decode only the window (mirrored first when flipping)."""
        x0 = tf.where(flip, geom[2] - geom[4] - geom[6], geom[4])
        img = tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([geom[3], x0, geom[5], geom[6]]), channels=3,
                                         dct_method=JPEG_DCT)
        img = tf.cond(flip, lambda: tf.reverse(img, axis=[1]), lambda: img)
        return tf.cast(img, tf.float32) + 0.5

    def jpeg_decode():
        hw = tf.io.extract_jpeg_shape(image_bytes)[:2]
        crop_of_original = tf.reduce_all(tf.equal(hw, geom[1:3])) & tf.reduce_any(tf.not_equal(geom[5:7], geom[1:3]))
        return tf.cond(crop_of_original, window_decode, full_decode)

    if image_fn is None:
        img = tf.cond(tf.io.is_jpeg(image_bytes), jpeg_decode, full_decode)
    else:  # the hook sees the whole original
        img = full_decode()
    img = tf.ensure_shape(img, [None, None, 3])
    if eval_transform:
        if not final_resize:
            raise ValueError("the eval transform resizes on the host (eval_transform needs final_resize)")
        img = tf.cast(img, tf.uint8)  # integer + 0.5 truncates back to the integer
        size = geom[7:9]
        img = tf.numpy_function(resize_image, [img, size], tf.uint8, stateful=False)
        img = tf.reshape(img, tf.concat([size, [3]], axis=0))
    else:
        if final_resize:
            img = _tf_resize(tf, img, geom[7:9])
        img = tf.cast(img, tf.uint8)  # (without the resize: integer + 0.5 truncates back to the integer)
    if image_format == "uint8" or not final_resize:
        return img
    # Per-channel affine as a [.., 3] x [3, 3] matmul: TF's broadcast of a length-3 axis is ~5x slower.
    shape = tf.shape(img)
    flat = tf.matmul(tf.reshape(tf.cast(img, tf.float32), [-1, 3]), tf.linalg.diag(tf.constant(NORM_SCALE)))
    return tf.reshape(tf.nn.bias_add(flat, tf.constant(NORM_SHIFT)), shape)


def _tf_resize(tf: Any, img: Any, size: Any) -> Any:
    """float32 image -> bilinear (half-pixel centres) at `size`; antialiased when shrinking by more than
    ANTIALIAS_BELOW (PIL-like); unchanged when the size is equal."""
    hw = tf.shape(img)[:2]
    same = tf.reduce_all(tf.equal(hw, size))
    shrink = tf.reduce_any(tf.cast(size, tf.float32) < ANTIALIAS_BELOW * tf.cast(hw, tf.float32))
    return tf.cond(
        same,
        lambda: img,
        lambda: tf.cond(
            shrink,
            lambda: tf.image.resize(img, size, method="bilinear", antialias=True),
            lambda: tf.image.resize(img, size, method="bilinear", antialias=False),
        ),
    )


def normalize_np(image_uint8: np.ndarray) -> np.ndarray:
    """Host reference of the normalisation: uint8 [..., 3] -> float32 (x/255 - mean) / std."""
    x = np.asarray(image_uint8, np.float32) / np.float32(255.0)
    return (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def normalize_into(canvas: np.ndarray, image_uint8: np.ndarray) -> None:
    """Writes normalize_np(image_uint8 [h, w, 3]) into the top-left of canvas (float32 [H, W, 3], its
    rows contiguous) in two in-place passes. Rows are viewed as flat [w * 3] runs against tiled
    per-channel constants: numpy's broadcast of a length-3 last axis is ~15x slower."""
    h, w = image_uint8.shape[:2]
    H, W = canvas.shape[:2]
    out = canvas.reshape(H, W * 3)[:h, : w * 3]
    np.multiply(image_uint8.reshape(h, w * 3), np.tile(NORM_SCALE, w), out=out)
    out += np.tile(NORM_SHIFT, w)
