"""Evaluation: post-processing, COCO AP with pycocotools, the `Evaluator`, speed/FLOPs and COCO-C runs.

The protocol is the original YOLOS/DETR one (yolos_paper.md Sec. 3; DETR's `PostProcess` and
`CocoEvaluator`):
  * post-processing: softmax over the C + 1 logits; score and label = max / argmax over the C real
    classes (the last logit is "no object"); *all* Q detections of every image are kept (no threshold, no
    NMS); boxes (cx, cy, w, h) relative to the un-padded image are scaled to the original image size;
  * label indices are mapped back to the dataset's category ids through its `LabelMap` (detections whose
    label has no category, e.g. identity-mode COCO's unused ids, are dropped: COCOeval would ignore them);
  * pycocotools `COCOeval(iouType='bbox')` on the images that were evaluated; the standard 12 numbers
    are printed and written to `metrics.json`, the detections to `detections.json` (COCO results format:
    `bbox` = [x, y, w, h] in original-image pixels).

Multi-host: every process feeds its own shard of the val split through one jitted predict function whose
outputs are replicated, so process 0 holds every detection without a separate exchange; process 0 scores
and writes, and the metrics are broadcast so that every process returns the same dict.

Speed/cost protocol (paper Tables 4-6, following DETR): batch 1 over the first 100 val images at their
own (un-padded) eval sizes; FPS = images / forward seconds after compilation; FLOPs from XLA's cost
analysis of the compiled forward (with explicit-matmul attention, which the analysis counts fully).
XLA counts a multiply-add as 2 FLOPs; the papers' FLOPs (fvcore, as DETR) count it as 1, so tables
report `xla_flops / 2` as "FLOPs (G)" and keep the raw XLA count too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from yolos_jax import atomic, box_ops
from yolos_jax import config as config_lib

log = logging.getLogger("yolos_jax")

# The 12 numbers of COCOeval.summarize(), in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
METRICS_FILE = "metrics.json"
DETECTIONS_FILE = "detections.json"


def default_eval_config() -> ml_collections.ConfigDict:
    """`config.eval`: how the val split is evaluated (the transforms themselves live in `config.input`)."""
    return ml_collections.ConfigDict(
        dict(
            # Shortest side of the eval images in pixels (the papers' "Size", e.g. 800 -> "800 x *").
            # Informational: the pipeline resizes by `config.input.eval_size`, which configs set to the
            # same value; the evaluator warns when they differ and reports input.eval_size.
            eval_size=800,
            # Evaluate only the first N images the eval iterator yields (0: all), for quick checks; the
            # iterator groups images by canvas, so this is not the split's first N. COCOeval then scores
            # those images only, as DETR's evaluator does with the images it saw.
            max_images=0,
            # Write detections.json (COCO results format) next to metrics.json.
            write_detections=True,
            # Speed/cost protocol (papers' Tables 4-6): batch 1 over the first `speed_images` val images.
            speed_images=100,
            # Untimed passes over those images before timing (compiles every distinct image shape).
            speed_warmup=1,
            # Timed passes; FPS is images / seconds over all of them.
            speed_repeats=1,
            # COCO-C robustness (fp_detr_paper.md Table 4): corruptions ('all' = the 15 benchmark ones,
            # 'extra' = held-out extras, a group 'noise', 'blur', 'weather', 'digital', or comma-separated
            # names, e.g. 'all,gaussian_blur'), severities, and an optional image cap. mPC averages only the
            # benchmark corruptions; robustness.json's `complete` says whether it is the full 15 x 5 mPC.
            corruptions="all",
            severities="1,2,3,4,5",
            robustness_max_images=0,
        )
    )


# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------


def postprocess(logits: jax.Array, boxes: jax.Array, orig_size: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The original YOLOS/DETR `PostProcess`. Jittable; works on numpy inputs too.

    Args:
      logits: [B, Q, C + 1] class logits, the last one "no object".
      boxes: [B, Q, 4] (cx, cy, w, h) in [0, 1], relative to the un-padded image.
      orig_size: [B, 2] (height, width) in pixels of the original images.
    Returns:
      scores [B, Q] float32: the max softmax probability over the C real classes;
      labels [B, Q] int32: its label index in [0, C);
      boxes [B, Q, 4] float32: (x0, y0, x1, y1) in original-image pixels (not clipped, as the original).
    """
    prob = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)[..., :-1]
    scores = jnp.max(prob, axis=-1)
    labels = jnp.argmax(prob, axis=-1).astype(jnp.int32)
    xyxy = box_ops.cxcywh_to_xyxy_pixels(jnp.asarray(boxes, jnp.float32), jnp.asarray(orig_size))
    return scores, labels, xyxy


# --------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------


def load_coco(gt: Any):
    """A pycocotools COCO from a COCO object, an instances-JSON path or an already-parsed dataset dict."""
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    if isinstance(gt, (str, os.PathLike)):
        path = os.fspath(gt)
        try:
            with open(path) as f:
                dataset = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"COCO annotation file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"COCO annotation file {path} is not valid JSON: {e}") from None
    elif isinstance(gt, Mapping):
        dataset = dict(gt)
    else:
        raise TypeError(f"ground truth must be a COCO object, a path or a dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise ValueError(f"COCO ground truth has no '{key}' list (keys: {sorted(dataset)})")
    dataset.setdefault("info", {})
    dataset.setdefault("licenses", [])
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco(
    image_ids: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    boxes_xyxy: np.ndarray,
    label_map: Any,
) -> list[dict]:
    """Post-processed predictions -> COCO results list.

    Args:
      image_ids: [N] the dataset's image ids.
      scores: [N, Q]; labels: [N, Q] label indices; boxes_xyxy: [N, Q, 4] original-image pixels.
      label_map: `yolos_jax.data.labels.LabelMap` of the dataset.
    Returns:
      [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}, ...] in image then token order;
      detections whose label maps to no category of the dataset are left out.
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    boxes = np.asarray(boxes_xyxy, np.float32)
    n, q = scores.shape
    if labels.shape != (n, q) or boxes.shape != (n, q, 4) or image_ids.shape != (n,):
        raise ValueError(
            f"detections_to_coco: shapes disagree: image_ids {image_ids.shape}, scores {scores.shape}, "
            f"labels {labels.shape}, boxes {boxes.shape}"
        )
    # label -> category id table (-1: no category), built once.
    num_labels = int(max(labels.max(initial=0) + 1, label_map.num_classes))
    table = np.full((num_labels,), -1, np.int64)
    for lab in range(label_map.num_classes):
        if label_map.is_used(lab):
            table[lab] = label_map.to_category(lab)
    cats = table[labels]
    xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
    out = []
    for i in range(n):
        iid = int(image_ids[i])
        for j in range(q):
            if cats[i, j] < 0:
                continue
            out.append(
                {
                    "image_id": iid,
                    "category_id": int(cats[i, j]),
                    # float(float32) is exact: the JSON holds exactly the numbers that were scored.
                    "bbox": [float(v) for v in xywh[i, j]],
                    "score": float(scores[i, j]),
                }
            )
    return out


def coco_evaluate(
    gt: Any, detections: Sequence[Mapping], image_ids: Optional[Iterable[int]] = None
) -> tuple[dict[str, float], str]:
    """COCO bbox AP/AR of `detections` with pycocotools.

    Args:
      gt: ground truth (COCO object, instances-JSON path or dataset dict).
      detections: COCO results list (bbox [x, y, w, h] in pixels); not modified.
      image_ids: evaluate only these images (default: every image of `gt`).
    Returns:
      ({name: value for METRIC_NAMES}, the printed 12-line summary). Values are pycocotools' (-1 where
      undefined, e.g. no small objects in the ground truth).
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = load_coco(gt)
    ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    unknown = sorted(set(ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"image ids {unknown[:5]} are not in the ground truth's 'images'")
    dets = [dict(d) for d in detections]  # loadRes adds keys; keep the caller's list intact
    bad = sorted({d["image_id"] for d in dets} - set(coco_gt.getImgIds()))
    if bad:
        raise ValueError(f"detections name image ids {bad[:5]} that the ground truth does not have")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    stats = [float(s) for s in ev.stats]
    return dict(zip(METRIC_NAMES, stats)), summary.getvalue()


def _empty_results(coco_gt):
    """An empty results COCO (pycocotools' loadRes cannot take an empty list)."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                   "annotations": []}
    res.createIndex()
    return res


# --------------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------------


class Predictions(dict):
    """Post-processed predictions of the evaluated images (numpy, process 0 holds all of them).

    Keys: image_id [N] int64; orig_size [N, 2] (h, w) int32; scores [N, Q]; labels [N, Q] int32;
    boxes [N, Q, 4] xyxy original-image pixels; rel_boxes [N, Q, 4] the raw (cx, cy, w, h) in [0, 1].
    Rows are in the order the images were read; the Q axis is the [DET] token index.
    """

    @property
    def num_images(self) -> int:
        return int(self["image_id"].shape[0])


def _split_id(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids -> two int32 halves, so ids survive jax's 32-bit default through the device gather."""
    ids = np.asarray(ids, np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"image ids must be >= 0, got {ids.min()}")
    return (ids >> 31).astype(np.int32), (ids & 0x7FFFFFFF).astype(np.int32)


def _join_id(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return (np.asarray(hi, np.int64) << 31) | np.asarray(lo, np.int64)


class Evaluator:
    """COCO evaluation of a YOLOS model on the val split (big_vision-style evaluator object).

    `Evaluator(eval_cfg, input_cfg, model, mesh=None)`; then `run(params, out_dir) -> metrics` as often as
    needed (the jitted predict function is built once and cached; XLA compiles once per canvas shape).

    Args:
      eval_cfg: `config.eval` (see `default_eval_config`).
      input_cfg: `config.input` (the eval transforms and the dataset; read by `yolos_jax.data`).
      model: the `YOLOS` module.
      mesh: the device mesh; the batch is split over its batch axes. None: one process uses its default
        device; several processes build a mesh over every device.
    """

    def __init__(self, eval_cfg: ml_collections.ConfigDict, input_cfg: ml_collections.ConfigDict, model: Any,
                 *, mesh: Any = None):
        from yolos_jax import sharding

        self.eval_cfg = eval_cfg
        self.input_cfg = input_cfg
        self.model = model
        if mesh is None and jax.process_count() > 1:
            mesh = sharding.make_mesh(sharding.default_mesh_config())
        self.mesh = mesh
        self.batch_size = int(input_cfg.eval_batch_size)  # global, all processes together
        # Host batches are padded with filler rows (valid=False) up to a multiple of this process's share
        # of the devices the batch is split over, so any eval batch size works on any mesh.
        self._local_multiple = 1
        if mesh is not None:
            n = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape]))
            self._local_multiple = max(1, n // jax.process_count())
        if self.batch_size <= 0 or self.batch_size % jax.process_count():
            raise ValueError(f"config.input.eval_batch_size={self.batch_size} must be a positive multiple of the "
                             f"process count {jax.process_count()}")
        if int(eval_cfg.eval_size) != int(input_cfg.eval_size):
            log.warning("config.eval.eval_size=%s differs from config.input.eval_size=%s; images are resized "
                        "by input.eval_size", eval_cfg.eval_size, input_cfg.eval_size)
        self._info = None
        self._coco_gt = None
        self._predict = self._build_predict()

    # -- construction ---------------------------------------------------------------------------------

    def _build_predict(self) -> Callable:
        model = self.model

        def predict(params, batch):
            out = model.apply({"params": params}, batch["image"], batch["pixel_mask"])
            scores, labels, boxes = postprocess(out["logits"], out["boxes"], batch["orig_size"])
            return {
                "scores": scores,
                "labels": labels,
                "boxes": boxes,
                "rel_boxes": out["boxes"],
                "orig_size": batch["orig_size"],
                "id_hi": batch["id_hi"],
                "id_lo": batch["id_lo"],
                "valid": batch["valid"],
            }

        if self.mesh is None:
            return jax.jit(predict)
        from yolos_jax import sharding

        # Replicated outputs: the all-gather to every process happens on device, inside the step.
        return jax.jit(predict, out_shardings=sharding.replicated(self.mesh))

    @property
    def info(self):
        """`yolos_jax.data.dataset_info(input_cfg)` (label map, split sizes, ground truth)."""
        if self._info is None:
            from yolos_jax import data

            self._info = data.dataset_info(self.input_cfg)
        return self._info

    @property
    def label_map(self):
        return self.info.label_map

    @property
    def coco_gt(self):
        """The val split's ground truth (the prepared split's cleaned instances JSON) as a pycocotools COCO."""
        if self._coco_gt is None:
            from yolos_jax import data

            self._coco_gt = load_coco(data.coco_ground_truth(self.input_cfg))
        return self._coco_gt

    # -- prediction -----------------------------------------------------------------------------------

    def batches(self, *, batch_size: Optional[int] = None, image_fn: Optional[Callable] = None) -> Any:
        """This process's host batches of one pass over the val split (`yolos_jax.data` batch schema)."""
        from yolos_jax import data

        return data.make_eval_iterator(self.input_cfg, batch_size=batch_size or self.batch_size, image_fn=image_fn)

    def _device_batch(self, host: Mapping[str, np.ndarray]) -> dict:
        from yolos_jax import data

        valid = np.asarray(host["valid"], bool)
        hi, lo = _split_id(np.where(valid, host["image_id"], 0))  # fillers carry id -1
        batch = {
            "pixel_mask": np.asarray(host["pixel_mask"]),
            "orig_size": np.asarray(host["orig_size"]),
            "id_hi": hi,
            "id_lo": lo,
            "valid": valid,
        }
        if "source_image" in host:  # input.resize_on_device: resized on device by to_global_batch
            batch.update(source_image=host["source_image"], source_size=host["source_size"])
        else:  # float32 or uint8 (input.image_format): normalised on device
            batch["image"] = np.asarray(host["image"])
        pad = -len(valid) % self._local_multiple
        if pad:
            batch = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in batch.items()}
            batch["valid"][-pad:] = False
        if self.mesh is None:
            spec = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        else:
            from yolos_jax import sharding

            spec = sharding.batch_sharding(self.mesh)
        return data.to_global_batch(batch, spec)

    def predict(self, params: Any, *, image_fn: Optional[Callable] = None, max_images: Optional[int] = None) -> Predictions:
        """Runs the model over the val split; returns every valid image's post-processed predictions.

        Args:
          params: the model's params (replicated or sharded on the mesh).
          image_fn: optional `fn(image_uint8 [H, W, 3], image_id) -> uint8 [H, W, 3]` applied to each
            decoded original image before the eval transforms (COCO-C corruptions).
          max_images: keep only the first this many images read (default eval_cfg.max_images, 0 = all).
        """
        max_images = int(self.eval_cfg.max_images if max_images is None else max_images)
        max_batches = -(-max_images // self.batch_size) if max_images > 0 else None
        chunks: dict[str, list] = {}

        def collect(out):
            for key, val in jax.device_get(out).items():
                chunks.setdefault(key, []).append(np.asarray(val))

        pending = None
        for k, host in enumerate(self.batches(image_fn=image_fn)):
            if max_batches is not None and k >= max_batches:
                break
            out = self._predict(params, self._device_batch(host))  # dispatched asynchronously
            if pending is not None:
                collect(pending)  # the previous batch's results, while this one runs
            pending = out
        if pending is not None:
            collect(pending)
        if not chunks:
            raise ValueError(f"the eval split '{self.input_cfg.val_split}' produced no batches (is it empty?)")
        cat = {k: np.concatenate(v, axis=0) for k, v in chunks.items()}
        keep = cat.pop("valid")
        ids = _join_id(cat.pop("id_hi"), cat.pop("id_lo"))
        pred = Predictions({k: v[keep] for k, v in cat.items()})
        pred["image_id"] = ids[keep]
        if max_images > 0:
            pred = Predictions({k: v[:max_images] for k, v in pred.items()})
        return pred

    # -- scoring --------------------------------------------------------------------------------------

    def score(self, pred: Predictions, out_dir: Optional[str] = None, *, verbose: bool = True) -> dict:
        """COCO metrics of `pred`; writes metrics.json (and detections.json) into `out_dir` if given.

        Call on process 0 (it reads the ground truth). Returns {METRIC_NAMES..., 'num_images',
        'num_detections'}.
        """
        dets = detections_to_coco(pred["image_id"], pred["scores"], pred["labels"], pred["boxes"], self.label_map)
        if out_dir and bool(self.eval_cfg.write_detections):
            atomic.write_json_atomic(os.path.join(out_dir, DETECTIONS_FILE), dets)
        metrics, table = coco_evaluate(self.coco_gt, dets, image_ids=pred["image_id"])
        metrics.update(num_images=int(pred.num_images), num_detections=len(dets))
        if verbose:
            print(table, end="", flush=True)
        if out_dir:
            atomic.write_json_atomic(os.path.join(out_dir, METRICS_FILE), metrics, indent=2)
        return metrics

    def run(self, params: Any, out_dir: Optional[str] = None, *, image_fn: Optional[Callable] = None,
            max_images: Optional[int] = None, verbose: bool = True) -> dict:
        """Predicts on every process, scores on process 0, returns the same metrics dict everywhere.

        Writes `out_dir/metrics.json` and `out_dir/detections.json` (process 0, atomically).
        """
        pred = self.predict(params, image_fn=image_fn, max_images=max_images)
        metrics = self.score(pred, out_dir, verbose=verbose) if jax.process_index() == 0 else {}
        return _broadcast_metrics(metrics)


def _broadcast_metrics(metrics: dict, max_bytes: int = 1 << 16) -> dict:
    """Process 0's metrics dict on every process, exactly (as JSON bytes; identity with one process)."""
    if jax.process_count() == 1:
        return metrics
    from jax.experimental import multihost_utils

    blob = json.dumps(metrics).encode() if jax.process_index() == 0 else b""
    if len(blob) >= max_bytes:
        raise ValueError(f"metrics JSON of {len(blob)} bytes is too large to broadcast (max {max_bytes})")
    buf = np.zeros((max_bytes,), np.uint8)
    buf[: len(blob)] = np.frombuffer(blob, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return json.loads(buf.tobytes().rstrip(b"\0").decode())


# --------------------------------------------------------------------------------------------------
# Speed and cost (papers' Tables 4-6)
# --------------------------------------------------------------------------------------------------


def count_params(params: Any) -> int:
    """Number of parameters (scalars) in a pytree."""
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)))


def _cost_flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    if flops is None or flops < 0:
        raise RuntimeError("XLA's cost analysis reported no 'flops' for the forward on this backend")
    return float(flops)


def measure_speed(model: Any, params: Any, images: Iterable[np.ndarray], *, warmup: int = 1,
                  repeats: int = 1) -> dict:
    """FPS and FLOPs of the forward at batch 1 (DETR/YOLOS protocol).

    Args:
      model: the `YOLOS` module.
      params: its params.
      images: [1, H, W, 3] float32 normalised images, each at its own un-padded eval size.
      warmup: untimed passes over `images` before timing (caches, allocator, clocks warm up).
      repeats: timed passes.
    Returns:
      {'num_images', 'fps', 'seconds_per_image', 'xla_gflops' (mean per image, XLA's count: 2 per
       multiply-add), 'gflops' (= xla_gflops / 2, the papers' convention), 'params', 'num_shapes'}.
    """
    imgs = [np.asarray(x, np.float32) for x in images]
    if not imgs:
        raise ValueError("measure_speed: no images")
    for x in imgs:
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[-1] != 3:
            raise ValueError(f"measure_speed: need [1, H, W, 3] images, got {x.shape}")
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    # FLOPs are counted on the same model with explicit-matmul attention: XLA's cost analysis counts a
    # loop body once and a fused-attention custom call not at all, so the fused/chunked attention paths
    # would under-report the attention FLOPs (which dominate at detection resolutions).
    count_model = model.clone(attention_impl="einsum") if hasattr(model, "attention_impl") else model
    count_fwd = jax.jit(lambda p, x: count_model.apply({"params": p}, x))
    compiled: dict[tuple, Any] = {}
    flops_by_shape: dict[tuple, float] = {}
    for x in imgs:
        if x.shape not in compiled:
            spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
            compiled[x.shape] = fwd.lower(params, spec).compile()  # the timed executable (no compile in the loop)
            flops_by_shape[x.shape] = _cost_flops(count_fwd.lower(params, spec).compile())
    device_imgs = [jax.device_put(x) for x in imgs]
    for _ in range(int(warmup)):
        for x in device_imgs:
            jax.block_until_ready(compiled[x.shape](params, x))
    start = time.perf_counter()
    for _ in range(max(int(repeats), 1)):
        for x in device_imgs:
            jax.block_until_ready(compiled[x.shape](params, x))
    seconds = time.perf_counter() - start
    n = len(imgs) * max(int(repeats), 1)
    xla = float(np.mean([flops_by_shape[x.shape] for x in imgs])) / 1e9
    return {
        "num_images": len(imgs),
        "fps": n / seconds,
        "seconds_per_image": seconds / n,
        "xla_gflops": xla,
        "gflops": xla / 2.0,
        "params": count_params(params),
        "num_shapes": len(flops_by_shape),
    }


def normalized(image: np.ndarray) -> np.ndarray:
    """A batch image as the model reads it: float32 ImageNet-normalised (uint8 host images, from
    input.image_format='uint8', are normalised as the pipeline does on device)."""
    x = np.asarray(image)
    if x.dtype == np.uint8:
        from yolos_jax.data import transforms

        mean = np.asarray(transforms.IMAGENET_MEAN, np.float32)
        std = np.asarray(transforms.IMAGENET_STD, np.float32)
        return (x.astype(np.float32) / 255.0 - mean) / std
    return x.astype(np.float32)


def unpadded_images(batches: Iterable[Mapping[str, np.ndarray]], num_images: int,
                    image_ids: Optional[Sequence[int]] = None) -> list[np.ndarray]:
    """Valid images of host batches, each cropped to its un-padded `size`: [1, h, w, 3] (at batch 1 the
    padding would otherwise count as work; uint8 images are normalised as the pipeline does).

    image_ids: take exactly these images, in this order (the iterator groups images by canvas, so the
      split's first images are not the first ones it yields); None: the first `num_images` yielded.
    """
    wanted = None if image_ids is None else [int(i) for i in image_ids][:num_images]
    found: dict[int, np.ndarray] = {}
    order: list[int] = []
    for batch in batches:
        from yolos_jax import data

        batch = data.with_host_image(batch)
        for i in range(len(batch["valid"])):
            iid = int(batch["image_id"][i])
            if not batch["valid"][i] or (wanted is not None and (iid not in wanted or iid in found)):
                continue
            h, w = (int(v) for v in batch["size"][i])
            found[iid] = normalized(batch["image"][i : i + 1, :h, :w])
            order.append(iid)
            if len(found) >= (num_images if wanted is None else len(wanted)):
                return [found[k] for k in (order if wanted is None else wanted)]
    return [found[k] for k in (order if wanted is None else wanted) if k in found]


def speed_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows like the papers' Tables 4-6: Method, Size, AP, Params. (M), FLOPs (G), FPS (+ XLA GFLOPs).

    Each row: {'model', 'size' (shortest side), 'AP' (0-1 or None), 'params', 'gflops', 'xla_gflops', 'fps'}.
    """
    head = f"{'Method':<16}{'Size':>10}{'AP':>7}{'Params. (M)':>13}{'FLOPs (G)':>11}{'FPS':>8}{'XLA GFLOPs':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ap = r.get("AP")
        ap_s = "-" if ap is None else f"{100.0 * ap:.1f}"
        def g(v):  # the papers' one decimal; tiny test models need more
            return f"{v:.1f}" if v >= 1 else f"{v:.4f}"

        lines.append(
            f"{r['model']:<16}{str(r['size']) + ' x *':>10}{ap_s:>7}{r['params'] / 1e6:>13.1f}"
            f"{g(r['gflops']):>11}{r['fps']:>8.1f}{g(r['xla_gflops']):>12}"
        )
    lines.append("FLOPs (G): multiply-adds / 1e9 (the papers' fvcore convention = XLA flops / 2); "
                 "FPS at batch 1 on " + jax.devices()[0].device_kind)
    return "\n".join(lines)


def run_speed(evaluator: Evaluator, params: Any, *, model_name: str, ap: Optional[float] = None) -> dict:
    """The speed/cost protocol on the evaluator's val split; returns the table row (also printed)."""
    cfg = evaluator.eval_cfg
    n = int(cfg.speed_images)
    it = evaluator.batches(batch_size=1)
    index = getattr(it, "index", None)  # the split's examples in dataset order
    first = None if index is None else index.image_id[:n]
    imgs = unpadded_images(it, n, first)
    result = measure_speed(evaluator.model, params, imgs, warmup=int(cfg.speed_warmup), repeats=int(cfg.speed_repeats))
    row = {"model": model_name, "size": int(evaluator.input_cfg.eval_size), "AP": ap, **result}
    if jax.process_index() == 0:
        print(speed_table([row]), flush=True)
    return row


# --------------------------------------------------------------------------------------------------
# COCO-C robustness (fp_detr_paper.md Table 4)
# --------------------------------------------------------------------------------------------------


def run_robustness(evaluator: Evaluator, params: Any, out_dir: str, *, clean: Optional[Mapping] = None) -> dict:
    """Evaluates on corrupted val images for every (corruption, severity) of `config.eval`.

    Writes out_dir/<corruption>/s<severity>/metrics.json (and detections.json) and out_dir/robustness.json
    with the per-corruption means, mPC and rPC over the benchmark corruptions evaluated (`complete` when all
    15 x 5 were), and the extras' mean apart (process 0). Returns the summary dict (`robustness.summarize`).
    """
    from yolos_jax import robustness

    cfg = evaluator.eval_cfg
    names = robustness.parse_corruptions(cfg.corruptions)
    sevs = robustness.parse_severities(cfg.severities)
    max_images = int(cfg.robustness_max_images) or int(cfg.max_images)
    results: dict[str, dict[int, dict]] = {}
    for name in names:
        for sev in sevs:
            sub = os.path.join(out_dir, name, f"s{sev}")
            m = evaluator.run(params, sub, image_fn=robustness.make_image_fn(name, sev), max_images=max_images,
                              verbose=False)
            results.setdefault(name, {})[sev] = m
            if jax.process_index() == 0:
                print(f"{name} severity {sev}: AP {m['AP']:.4f} AP50 {m['AP50']:.4f}", flush=True)
    summary = robustness.summarize(clean, results)
    if jax.process_index() == 0:
        print(robustness.format_table(summary), flush=True)
        atomic.write_json_atomic(os.path.join(out_dir, "robustness.json"), summary, indent=2)
    return summary


# --------------------------------------------------------------------------------------------------
# Checkpoints and the eval.py entry point
# --------------------------------------------------------------------------------------------------

CONVERTED_MARKER = "yolos_jax.json"  # convert.save_params_dir's metadata file


def load_checkpoint(path: str) -> tuple[Any, dict, dict]:
    """(params, model config dict, meta) from a converted directory or a training checkpoint.

    path: a converted-checkpoint directory (convert_torch_weights.py --output), a training workdir (its
    latest step), its checkpoints/ directory or one checkpoints/<step> directory. `meta` is the converted
    directory's metadata (eval_size, label_names, ...) or, for training checkpoints, what the run recorded
    (its input.eval_size / eval_max_size and the dataset's label names; see `checkpointing.load_params_and_meta`).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if os.path.isfile(os.path.join(path, CONVERTED_MARKER)):
        from yolos_jax import convert

        params, model_cfg, meta = convert.load_params_dir(path)
        if meta.get("kind") not in (None, "detector"):
            raise ValueError(
                f"{path} holds a {meta.get('kind')!r} checkpoint (no detection heads); evaluate a detector: "
                "a converted trained YOLOS or a training checkpoint"
            )
    else:
        try:
            from yolos_jax.checkpointing import load_params_and_meta
        except ImportError as e:  # the training stage is not installed/available
            raise ImportError(f"cannot read training checkpoint {path}: yolos_jax.checkpointing is "
                              f"unavailable ({e})") from e
        params, model_cfg, meta = load_params_and_meta(path)
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return params, config_lib.sequence_fields_as_tuples(cfg), dict(meta)  # lists -> hashable tuples


# YOLOS fields that change how the model computes, not its parameters: eval takes them from config.model.
RUNTIME_MODEL_FIELDS = ("dtype", "attention_impl", "remat")


def runtime_overrides(model_cfg: Optional[Mapping[str, Any]], checkpoint_cfg: Mapping[str, Any]) -> tuple[dict, list]:
    """(overrides, ignored): config.model's runtime fields to apply to a checkpoint's model, and the names of
    the other config.model fields whose values differ from the checkpoint's (the checkpoint's are used)."""
    if not model_cfg:
        return {}, []
    model_cfg = config_lib.sequence_fields_as_tuples(model_cfg.to_dict() if hasattr(model_cfg, "to_dict")
                                                     else dict(model_cfg))
    overrides = {k: model_cfg[k] for k in RUNTIME_MODEL_FIELDS if k in model_cfg}
    ignored = sorted(k for k, v in model_cfg.items()
                     if k not in RUNTIME_MODEL_FIELDS and k in checkpoint_cfg and checkpoint_cfg[k] != v)
    return overrides, ignored


def load_model(path: str, **model_overrides: Any) -> tuple[Any, Any, dict]:
    """(params, YOLOS module, meta) of a checkpoint (see `load_checkpoint`); `model_overrides` may change
    fields that leave the parameters alone (dtype, attention_impl, remat)."""
    from yolos_jax.yolos import YOLOS

    params, cfg, meta = load_checkpoint(path)
    cfg.update(model_overrides)
    return params, YOLOS(**cfg), meta


def check_label_map(label_map: Any, num_classes: int, meta: Optional[dict] = None) -> None:
    """The model must have a logit for every label of the dataset, and, when the checkpoint recorded the label
    map it was trained with (`meta['label_map']`), read each category as the same label."""
    if label_map.num_classes > int(num_classes):
        hint = ("config.input.label_mode='contiguous' numbers the categories 0..K-1" if label_map.mode == "identity"
                else "this model has fewer logits than the dataset has categories: it was trained on another dataset")
        raise ValueError(
            f"the dataset's label map has {label_map.num_classes} labels ({label_map.mode} mode) but the model has "
            f"num_classes={num_classes}; {hint}"
        )
    trained = (meta or {}).get("label_map")
    if trained:
        from yolos_jax.data.labels import LabelMap

        why = label_map.incompatibility(LabelMap.from_dict(trained))
        if why:
            ds = (meta or {}).get("dataset") or {}
            raise ValueError(
                f"this checkpoint cannot be evaluated on this dataset: {why}. The run trained on dataset "
                f"'{ds.get('dataset_name')}' in {ds.get('data_dir')} with input.label_mode={ds.get('label_mode')!r}: "
                "give eval the same --config.input.* data overrides as training (dataset_name, data_dir, "
                "source_dir, label_mode)")


def place_params(params: Any, mesh: Any) -> Any:
    """Host params -> device: replicated over `mesh` (every process supplies its pieces), or the default
    device when mesh is None (the Evaluator's `mesh` attribute says which)."""
    if mesh is None:
        return jax.device_put(params)
    from yolos_jax import sharding

    rep = sharding.replicated(mesh)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, rep, lambda idx: x[idx])

    return jax.tree.map(one, params)


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, out_dir: str, *, speed: bool = False,
                        robustness: bool = False, model_name: Optional[str] = None,
                        skip_clean: bool = False) -> dict:
    """What `eval.py` does: COCO evaluation of `checkpoint` on the val split of `config.input`.

    Writes out_dir/metrics.json and out_dir/detections.json; with `speed` also out_dir/speed.json and the
    Tables 4-6 row; with `robustness` out_dir/robustness/... (COCO-C). Returns
    {'metrics': ..., 'speed': ... | None, 'robustness': ... | None}.
    """
    params, ckpt_cfg, meta = load_checkpoint(checkpoint)
    overrides, ignored = runtime_overrides(config.get("model"), ckpt_cfg)
    from yolos_jax.yolos import YOLOS

    model = YOLOS(**{**ckpt_cfg, **overrides})
    if ignored and jax.process_index() == 0:
        print(f"note: the checkpoint defines the model; config.model's {', '.join(ignored)} differ(s) from it and "
              f"is not used (only {', '.join(RUNTIME_MODEL_FIELDS)} are taken from config.model)", flush=True)
    evaluator = Evaluator(config.eval, config.input, model)
    check_label_map(evaluator.label_map, model.num_classes, meta)
    trained_on = (meta.get("dataset") or {}).get("dataset_name")
    if trained_on and trained_on != config.input.dataset_name and jax.process_index() == 0:
        print(f"note: the checkpoint was trained on dataset '{trained_on}', this evaluates "
              f"'{config.input.dataset_name}' (same categories)", flush=True)
    params = place_params(params, evaluator.mesh)
    is_main = jax.process_index() == 0
    if is_main:
        print(f"evaluating {checkpoint} ({count_params(params) / 1e6:.1f}M params) -> {out_dir}", flush=True)
    result: dict[str, Any] = {"metrics": None, "speed": None, "robustness": None}
    if not skip_clean:
        result["metrics"] = evaluator.run(params, out_dir)
    if speed:
        name = model_name or meta.get("variant") or os.path.basename(os.path.normpath(checkpoint))
        ap = result["metrics"]["AP"] if result["metrics"] else None
        row = run_speed(evaluator, params, model_name=str(name), ap=ap)
        if is_main:
            atomic.write_json_atomic(os.path.join(out_dir, "speed.json"), row, indent=2)
        result["speed"] = row
    if robustness:
        result["robustness"] = run_robustness(evaluator, params, os.path.join(out_dir, "robustness"),
                                              clean=result["metrics"])
    return result
