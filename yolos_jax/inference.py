"""Inference API: `Detector`, a YOLOS model with the original's eval pre- and post-processing.

    from yolos_jax import Detector
    detector = Detector.from_checkpoint("/ckpt/yolos_s")            # convert_torch_weights.py output
    results = detector.predict([image_uint8_hwc, ...], threshold=0.5)
    results[0]["boxes"], results[0]["scores"], results[0]["labels"]  # pixel xyxy in the original image

Pre-processing: the one eval transform of this package (`data.transforms`; eval.py, the Evaluator and
the COCO-C runner use the same two functions), which is the original YOLOS eval transform:
  1. resize to `transforms.eval_resize_hw` (the original's sizes: shortest side to `eval_size` unless the
     longest would exceed `max_size`, default eval_size * 1333 // 800, both sides floored to multiples of
     16) with `transforms.resize_image` (PIL bilinear on the uint8 image, the original's resampler). For
     COCO-like aspect ratios the sizes equal HF's `YolosImageProcessorPil` too (its long side differs only
     for aspect ratios beyond ~1:8, see `eval_resize_hw`);
  2. scale to [0, 1] and normalise with the ImageNet mean/std;
  3. pad a batch bottom/right to its largest image with zeros and a pixel mask (the model ignores padded
     patches as attention keys, so the padded pixel values do not matter; each image's position
     embeddings are resized to its own patch grid, so a batch gives each image its result alone).
Post-processing (as the original `PostProcess` / HF `post_process_object_detection`): softmax over the
C + 1 logits; score and label = max / argmax over the C real classes ("no object" excluded); boxes
(cx, cy, w, h) relative to the un-padded image -> (x0, y0, x1, y1) pixels of the original image.

Also here: the logic of `infer.py`, `run_inference` (any checkpoint -> `Detector` -> `infer_images`: annotated
PNGs and detections.json for image files, directories or glob patterns).
"""

from __future__ import annotations

import functools
import glob
import io
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from yolos_jax import atomic, sharding, weights
from yolos_jax.data import transforms as T
from yolos_jax.data.labels import UNUSED_NAME, LabelMap
from yolos_jax.errors import MissingInputError, UnusableInputError, UserError
from yolos_jax.yolos import YOLOS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # list_images


def _cfg_key(model_cfg: Mapping[str, Any]) -> str:
    return json.dumps(weights.model_cfg_json(model_cfg), sort_keys=True)


def detector_outputs(model: YOLOS, params: Any, pixel_values: jax.Array,
                     pixel_mask: Optional[jax.Array]) -> dict[str, jax.Array]:
    """The detector's outputs with the original's post-processing (traceable; `Detector.forward` and every
    exported artifact compute exactly this).

    pixel_values: [B, H, W, 3] float32 ImageNet-normalised; pixel_mask: [B, H, W] bool or None.
    Returns 'logits' [B, Q, C + 1], 'boxes' [B, Q, 4] (cx, cy, w, h) in [0, 1] of the un-padded image,
    'scores' [B, Q] float32 and 'labels' [B, Q] int32: softmax over the C + 1 logits, then max / argmax over
    the C real classes ("no object" excluded).
    """
    out = model.apply({"params": params}, pixel_values, pixel_mask)
    probs = jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)[..., :-1]
    return {
        "logits": out["logits"],
        "boxes": out["boxes"],
        "scores": jnp.max(probs, axis=-1),
        "labels": jnp.argmax(probs, axis=-1).astype(jnp.int32),
    }


@functools.lru_cache(maxsize=16)
def _forward_fn(cfg_key: str):
    """One jitted forward per model config, shared by every Detector with that config (jit caches per shape).
    It runs on the first device under a mesh of it (`sharding.mesh_jit`), so that splash attention runs its
    kernel there rather than its no-mesh fallback when several devices are visible."""
    model = YOLOS(**weights.model_cfg_dict(json.loads(cfg_key)))
    return sharding.mesh_jit(functools.partial(detector_outputs, model), sharding.single_device_mesh())


ImageBatch = Union[np.ndarray, Sequence[np.ndarray]]


def check_top_left_mask(pixel_mask: np.ndarray, patch_size: int) -> None:
    """Raises ValueError unless each [H, W] mask of pixel_mask [B, H, W] is a top-left rectangle of at least
    one patch: the model reads only each image's height and width of real pixels (`yolos.valid_patch_grid`),
    so padding must sit at the bottom/right, as `preprocess` and every pipeline here put it."""
    rows = pixel_mask.any(axis=2).sum(axis=1)
    cols = pixel_mask.any(axis=1).sum(axis=1)
    for i, (h, w) in enumerate(zip(rows, cols)):
        expected = np.zeros(pixel_mask.shape[1:], bool)
        expected[:h, :w] = True
        if not np.array_equal(pixel_mask[i], expected):
            raise ValueError(f"pixel_mask[{i}] is not a top-left rectangle: pad images at the bottom/right only "
                             "(as Detector.preprocess does)")
        if h < patch_size or w < patch_size:
            raise ValueError(f"pixel_mask[{i}] marks {h}x{w} real pixels, less than one {patch_size}x{patch_size} "
                             "patch")


class Detector:
    """A YOLOS detector ready for inference.

    Build from a converted checkpoint (`convert_torch_weights.py --output=DIR`, kind 'detector'):
        detector = Detector.from_checkpoint(DIR)
    or from parameters in memory:
        detector = Detector(params, model_cfg, eval_size=800)

    Args (constructor):
      params: the Flax 'params' tree of `YOLOS(**model_cfg)`.
      model_cfg: `YOLOS` keyword arguments (dict or ConfigDict); e.g. dtype='bfloat16' for bf16 compute.
      eval_size: shortest side of the resized image in pixels (the original: 512 for YOLOS-Ti, else 800).
      max_size: longest-side cap in pixels; default eval_size * 1333 // 800 as the original eval.
      label_names: optional names indexed by label; adds 'names' to `predict` results.

    Methods:
      forward(pixel_values, pixel_mask=None) -> raw outputs for pre-processed batches.
      preprocess(images) -> (pixel_values, pixel_mask, sizes) as `predict` feeds the model.
      predict(images, threshold=0.5, top_k=None) -> per-image detections on plain uint8 RGB images.
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        model_cfg: Mapping[str, Any],
        *,
        eval_size: int = 800,
        max_size: Optional[int] = None,
        label_names: Optional[Sequence[str]] = None,
    ):
        cfg = weights.model_cfg_dict(model_cfg)
        missing = [k for k in ("class_head", "box_head", "det_tokens") if k not in params]
        if missing:
            raise UnusableInputError(
                f"parameters lack {missing}: a 'backbone' checkpoint has no detection heads; train a detector "
                "from it first (config.init_from) or convert a detector checkpoint"
            )
        self.model_cfg = cfg
        self.params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params)))
        self.eval_size = int(eval_size)
        self.max_size = int(max_size) if max_size is not None else self.eval_size * 1333 // 800
        self.label_names = list(label_names) if label_names is not None else None
        if self.label_names is not None and len(self.label_names) > cfg["num_classes"]:
            raise ValueError(f"label_names has {len(self.label_names)} names for {cfg['num_classes']} classes")
        if self.label_names is not None:  # logits no category uses (a 91-way head on fewer classes): 'N/A'
            self.label_names += [UNUSED_NAME] * (cfg["num_classes"] - len(self.label_names))
        self._forward = _forward_fn(_cfg_key(cfg))

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        eval_size: Optional[int] = None,
        max_size: Optional[int] = None,
        label_names: Optional[Sequence[str]] = None,
        **model_overrides: Any,
    ) -> "Detector":
        """Loads a converted-checkpoint directory of kind 'detector', or a training checkpoint (a workdir,
        its latest step, or one step directory).

        eval_size defaults to the one recorded at conversion (the original's args, HF's preprocessor
        config, or the variant's: 512 for Ti, else 800); label_names to the checkpoint's (HF id2label).
        model_overrides replace `YOLOS` fields that do not change parameters (dtype, attention_impl).
        """
        params, cfg, meta = weights.load_any(path, require_detector=True)
        cfg.update(model_overrides)
        return cls(
            params,
            cfg,
            eval_size=eval_size if eval_size is not None else int(meta.get("eval_size") or 800),
            # the recorded max size goes with the recorded eval size; another eval size gets its own (x 1333/800)
            max_size=max_size if max_size is not None else (meta.get("max_size") if eval_size is None else None),
            label_names=label_names if label_names is not None else meta.get("label_names"),
        )

    # ---------------------------------------------------------------------------------------------

    def forward(self, pixel_values: Any, pixel_mask: Optional[Any] = None) -> dict[str, np.ndarray]:
        """Raw model outputs for a pre-processed batch.

        Args:
          pixel_values: [B, H, W, 3] float, ImageNet-normalised RGB (NHWC), zeros in any padding.
          pixel_mask: optional [B, H, W] bool, True on real pixels (padding bottom/right).
        Returns:
          numpy dict: 'logits' [B, Q, C + 1] (last = no object), 'boxes' [B, Q, 4] (cx, cy, w, h) in [0, 1]
          relative to the un-padded image, 'scores' [B, Q] and 'labels' [B, Q] (softmax max / argmax over
          the C real classes). Compiled once per input shape.
        """
        x = np.asarray(pixel_values, np.float32)
        p = self.model_cfg["patch_size"]
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] < p or x.shape[2] < p:
            raise ValueError(f"pixel_values must be [B, H, W, 3] with H, W >= {p}; got shape {x.shape}")
        if pixel_mask is not None:
            pixel_mask = np.asarray(pixel_mask, bool)
            if pixel_mask.shape != x.shape[:3]:
                raise ValueError(f"pixel_mask shape {pixel_mask.shape} does not match pixel_values {x.shape[:3]}")
            check_top_left_mask(pixel_mask, p)
        return jax.device_get(self._forward(self.params, x, pixel_mask))

    def preprocess(self, images: ImageBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 RGB images -> (pixel_values [B, H, W, 3] float32, pixel_mask [B, H, W] bool,
        sizes [B, 2] int32 (h, w) of each resized, un-padded image)."""
        images = _as_image_list(images)
        resized = []
        for im in images:
            hw = T.eval_resize_hw(im.shape[0], im.shape[1], self.eval_size, self.max_size)
            im = T.resize_image(im, hw)
            resized.append(T.normalize_np(im))
        sizes = np.array([r.shape[:2] for r in resized], np.int32)
        canvas = sizes.max(axis=0)
        pixel_values = np.zeros((len(resized), canvas[0], canvas[1], 3), np.float32)
        pixel_mask = np.zeros((len(resized), canvas[0], canvas[1]), bool)
        for i, r in enumerate(resized):
            pixel_values[i, : r.shape[0], : r.shape[1]] = r
            pixel_mask[i, : r.shape[0], : r.shape[1]] = True
        return pixel_values, pixel_mask, sizes

    def predict(
        self, images: ImageBatch, threshold: float = 0.5, top_k: Optional[int] = None
    ) -> list[dict[str, Any]]:
        """Detections for plain RGB images.

        Args:
          images: a list of uint8 [H, W, 3] RGB arrays (sizes may differ), a [B, H, W, 3] array or one
            [H, W, 3] image.
          threshold: keep detections with score > threshold (score = the best real-class probability).
          top_k: keep at most this many per image (after the threshold); None keeps all.
        Returns:
          One dict per image: 'boxes' [N, 4] float32 (x0, y0, x1, y1) in pixels of the original image,
          'scores' [N] float32, 'labels' [N] int32 (and 'names' when label names are known), sorted by
          descending score.
        """
        if not float(threshold) <= 1.0:  # (NaN too) a negative one keeps every token (run_plots draws them all)
            raise ValueError(f"threshold={threshold}: scores are at most 1, so it would keep nothing; use a value "
                             "in [0, 1]")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"top_k={top_k} keeps no detection: give a count >= 1, or None to keep all")
        images = _as_image_list(images)
        pixel_values, pixel_mask, _ = self.preprocess(images)
        out = self.forward(pixel_values, pixel_mask)
        results = []
        for i, im in enumerate(images):
            h, w = im.shape[:2]
            cx, cy, bw, bh = np.moveaxis(out["boxes"][i].astype(np.float32), -1, 0)
            boxes = np.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], axis=-1)
            boxes = boxes * np.array([w, h, w, h], np.float32)
            scores, labels = out["scores"][i], out["labels"][i]
            keep = np.flatnonzero(scores > threshold)
            keep = keep[np.argsort(-scores[keep], kind="stable")]
            if top_k is not None:
                keep = keep[: int(top_k)]
            res = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
            if self.label_names is not None:
                res["names"] = [self.label_names[int(k)] for k in res["labels"]]
            results.append(res)
        return results


def read_image_rgb(source: Union[str, bytes]) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file path or its bytes, as the training pipeline decodes it (TF): grey,
    palette and alpha images are converted to RGB, and 16-bit images keep their high byte (PIL's own
    convert('RGB') would clip them to 255)."""
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grey (PIL reads 16-bit PNGs as these)
            grey = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)
        return np.asarray(im.convert("RGB"), np.uint8).copy()


def _as_image_list(images: ImageBatch) -> list[np.ndarray]:
    if isinstance(images, (str, bytes, os.PathLike)):
        raise ValueError(f"images: pixels are expected, got the path {images!r}; read a file with "
                         "yolos_jax.inference.read_rgb(path)")
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = [images]
        elif images.ndim == 4:
            images = list(images)
        else:
            raise ValueError(f"images must be [H, W, 3] or [B, H, W, 3] uint8; got shape {images.shape}")
    images = list(images)
    if not images:
        raise ValueError("no images given")
    out = []
    for i, im in enumerate(images):
        if isinstance(im, (str, bytes, os.PathLike)):
            raise ValueError(f"image {i}: pixels are expected, got the path {im!r}; read a file with "
                             "yolos_jax.inference.read_rgb(path)")
        im = np.asarray(im.convert("RGB")) if isinstance(im, Image.Image) else np.asarray(im)
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
            how = ("scale floats in [0, 1] with (x * 255).round().astype(np.uint8)" if im.dtype.kind == "f"
                   else "convert grayscale/RGBA with PIL's .convert('RGB'), or pass the PIL image")
            raise ValueError(f"image {i}: expected a uint8 RGB array [H, W, 3], got {im.dtype} {im.shape} ({how})")
        out.append(im)
    return out


# --------------------------------------------------------------------------------------------------
# Image files in, annotated PNGs and detections JSON out (infer.py)
# --------------------------------------------------------------------------------------------------


def list_images(inputs: Sequence[str]) -> list[str]:
    """Files, directories (their images, sorted) and glob patterns -> image paths."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise MissingInputError(f"directory {item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            found = sorted(glob.glob(item))
            if not found:
                raise MissingInputError(f"{item}: no such file, directory or matching pattern")
            paths.extend(found)
    return list(dict.fromkeys(paths))


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an image file (grayscale, palette, CMYK and alpha are converted)."""
    try:
        return read_image_rgb(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # PIL: SyntaxError for a broken PNG
        raise UnusableInputError(f"cannot read image {path}: {e}") from None


def infer_images(detector: Any, paths: Sequence[str], out_dir: str, *, threshold: float = 0.5,
                 top_k: Optional[int] = None, names: Optional[Sequence[str]] = None,
                 label_map: Any = None, on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Runs `detector.predict` on image files; writes out_dir/<stem>.png (boxes, class names, scores)
    and out_dir/detections.json. Returns the JSON's list.

    An image that cannot be read (corrupt, truncated, not an image) does not stop the others: it is left out,
    detections.json is written for the rest, and then UnusableInputError names the files left out and why.
    on_result: called with each image's record as soon as it is written (infer.py prints a line).

    detector: anything with `predict(list of uint8 [H, W, 3], threshold, top_k) -> [{'boxes' [N, 4] xyxy
      pixels, 'scores' [N], 'labels' [N], optional 'names'}]` (e.g. `yolos_jax.Detector`).
    names: class names indexed by label (overrides the detector's).
    label_map: the dataset's `LabelMap`, if known: each detection then also carries its dataset
      'category_id' (None for a label no category uses).
    """
    from yolos_jax import draw  # drawing only here (`import yolos_jax` -> Detector stays light)

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out={out_dir}: cannot write the results there ({e.strerror or e})") from None
    records, unreadable = [], []
    stems: dict[str, int] = {}
    for path in paths:
        try:
            image = read_rgb(path)
        except UnusableInputError as e:
            unreadable.append(str(e))
            continue
        res = detector.predict([image], threshold=threshold, top_k=top_k)[0]
        labels = [int(v) for v in np.asarray(res["labels"]).reshape(-1)]
        if names is not None:
            label_names = [names[k] if 0 <= k < len(names) else str(k) for k in labels]
        else:
            label_names = list(res.get("names") or [str(k) for k in labels])
        boxes = np.asarray(res["boxes"], np.float32).reshape(-1, 4)
        scores = np.asarray(res["scores"], np.float32).reshape(-1)
        texts = [f"{n} {s:.2f}" for n, s in zip(label_names, scores)]
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in stems:  # same file name from two folders: keep both
            stems[stem] += 1
            stem = f"{stem}_{stems[stem]}"
        else:
            stems[stem] = 0
        out_png = os.path.join(out_dir, f"{stem}.png")
        draw.save_png(out_png, draw.draw_boxes(image, boxes, texts))
        records.append({
            "file": os.path.abspath(path),
            "output": os.path.abspath(out_png),
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "detections": [
                {"box_xyxy": [float(v) for v in b], "score": float(s), "label": k, "name": n}
                | ({"category_id": _category_of(label_map, k)} if label_map is not None else {})
                for b, s, k, n in zip(boxes, scores, labels, label_names)
            ],
        })
        if on_result is not None:
            on_result(records[-1])
    atomic.write_json_atomic(os.path.join(out_dir, "detections.json"), records, indent=1)
    if unreadable:
        raise UnusableInputError(
            f"{len(unreadable)} of {len(paths)} images could not be read and were left out (the other "
            f"{len(records)} are in {os.path.join(out_dir, 'detections.json')}): {'; '.join(unreadable[:10])}"
            + (f"; and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""))
    return records


def _category_of(label_map: Any, label: int) -> Optional[int]:
    if 0 <= label < label_map.num_classes and label_map.is_used(label):
        return int(label_map.to_category(label))
    return None


def run_inference(checkpoint: str, inputs: Sequence[str], out_dir: str, *, threshold: float = 0.5,
                  top_k: Optional[int] = None, eval_size: Optional[int] = None, config: Any = None,
                  on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """`infer.py`: loads any converted or trained checkpoint into a `Detector` and runs `infer_images`.

    Class names: the dataset's (config.input) when `config` is given, else the checkpoint's (recorded at
    conversion or by the training run), else the label numbers. eval_size: the argument, else the
    checkpoint's (with its max size), else config.input.eval_size, else 800.
    """
    paths = list_images(inputs)
    params, model_cfg, meta = weights.load_any(checkpoint, require_detector=True)
    names = meta.get("label_names")
    label_map = LabelMap.from_dict(meta["label_map"]) if meta.get("label_map") else None
    if config is not None:
        # The dataset (TensorFlow) and its label-map check only when a config names one: evaluation imports the
        # input pipeline, which `import yolos_jax` (Detector) must not.
        from yolos_jax import data, evaluation, run_config

        run_config.validate_data_configs(config)
        label_map = data.dataset_info(weights.input_config_for_checkpoint(config.input, checkpoint)).label_map
        evaluation.check_label_map(label_map, model_cfg["num_classes"], meta)
        names = label_map.names_for(model_cfg["num_classes"])
    max_size = None
    if eval_size:
        size = eval_size
    elif meta.get("eval_size"):
        size, max_size = meta["eval_size"], meta.get("max_size")
    else:
        size = config.input.eval_size if config is not None else 800
    detector = Detector(params, model_cfg, eval_size=int(size), max_size=max_size)
    return infer_images(detector, paths, out_dir, threshold=threshold, top_k=top_k, names=names, label_map=label_map,
                        on_result=on_result)
