"""The `Evaluator`: COCO evaluation of a YOLOS model on the val split (a big_vision-style evaluator object).

Post-processing and scoring are `coco_eval`'s (the original YOLOS/DETR protocol).

Multi-host: every process feeds its own shard of the val split through one jitted predict function whose
outputs are replicated, so process 0 holds every detection without a separate exchange; process 0 scores
and writes, and the metrics are broadcast so that every process returns the same dict.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from yolos_jax import atomic, data, sharding
from yolos_jax.coco_eval import DETECTIONS_FILE, METRICS_FILE, coco_evaluate, detections_to_coco, load_coco, postprocess
from yolos_jax.data.input_config import check_batch_size, eval_max_size
from yolos_jax.data.labels import LabelMap
from yolos_jax.errors import ConfigError

log = logging.getLogger("yolos_jax")


def default_eval_config() -> ml_collections.ConfigDict:
    """`config.eval`: how the val split is evaluated (the transforms themselves live in `config.input`).

    The eval size is `config.input.eval_size`'s (the eval transform's); `run_config.default_config` adds
    `eval.eval_size` as an alias of that field for older command lines and configs.
    """
    return ml_collections.ConfigDict(
        dict(
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


def validate_eval_config(eval_cfg: ml_collections.ConfigDict) -> None:
    """Checks `config.eval`; raises ValueError naming the field. An `eval.eval_size` that a config set on its
    own (not the alias of input.eval_size) must still be a size."""
    size = eval_cfg.get("eval_size")
    if size is not None and int(size) <= 0:
        raise ValueError(f"config.eval.eval_size: must be positive (shortest side of eval images, pixels), got {size}")


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

    `Evaluator(eval_cfg, input_cfg, model, mesh=None)`; `params = evaluator.place(host_params)`; then
    `run(params, out_dir) -> metrics` as often as needed (the jitted predict function is built once and cached;
    XLA compiles once per canvas shape). The speed protocol (`speed.run_speed`) and COCO-C
    (`robustness.run_robustness`) run on an evaluator too.

    Args:
      eval_cfg: `config.eval` (see `default_eval_config`).
      input_cfg: `config.input` (the eval transforms and the dataset; read by `yolos_jax.data`).
      model: the `YOLOS` module.
      mesh: the device mesh; the batch is split over its batch axes. None: one process uses its default
        device; several processes build a mesh over every device.
    """

    def __init__(self, eval_cfg: ml_collections.ConfigDict, input_cfg: ml_collections.ConfigDict, model: Any,
                 *, mesh: Any = None):
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
        check_batch_size(self.batch_size, jax.process_count(), "config.input.eval_batch_size")
        if eval_cfg.get("eval_size") is not None and int(eval_cfg.eval_size) != int(input_cfg.eval_size):
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

        # Traced and run with a mesh in context (`sharding.mesh_jit`), so that the splash attention kernel runs
        # per device rather than falling back to the xla path when several devices are visible.
        if self.mesh is None:  # one device: a mesh of it alone, over which the kernel runs directly
            return sharding.mesh_jit(predict, sharding.single_device_mesh())
        # Replicated outputs: the all-gather to every process happens on device, inside the step.
        return sharding.mesh_jit(predict, self.mesh, out_shardings=sharding.replicated(self.mesh))

    @property
    def info(self):
        """`yolos_jax.data.dataset_info(input_cfg)` (label map, split sizes, ground truth)."""
        if self._info is None:
            self._info = data.dataset_info(self.input_cfg)
        return self._info

    @property
    def label_map(self):
        return self.info.label_map

    @property
    def coco_gt(self):
        """The val split's ground truth (the prepared split's cleaned instances JSON) as a pycocotools COCO."""
        if self._coco_gt is None:
            self._coco_gt = load_coco(data.coco_ground_truth(self.input_cfg))
        return self._coco_gt

    def place(self, params: Any) -> Any:
        """Host params -> device: replicated over `self.mesh` (every process supplies its pieces), or on the
        default device when there is no mesh."""
        if self.mesh is None:
            return jax.device_put(params)
        return sharding.place_host(params, sharding.replicated(self.mesh))

    # -- prediction -----------------------------------------------------------------------------------

    def batches(self, *, batch_size: Optional[int] = None, image_fn: Optional[Callable] = None) -> Any:
        """This process's host batches of one pass over the val split (`yolos_jax.data` batch schema)."""
        return data.make_eval_iterator(self.input_cfg, batch_size=batch_size or self.batch_size, image_fn=image_fn)

    def _device_batch(self, host: Mapping[str, np.ndarray]) -> dict:
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
        """COCO metrics of `pred`; writes metrics.json (and detections.json) into `out_dir` if given, together: a
        failure while writing either leaves the files of the previous evaluation there as they were.

        Call on process 0 (it reads the ground truth). Returns {METRIC_NAMES..., 'num_images',
        'num_detections', 'eval_size', 'eval_max_size' (pixels: the resize the images were scored at)}.
        """
        dets = detections_to_coco(pred["image_id"], pred["scores"], pred["labels"], pred["boxes"], self.label_map)
        metrics, table = coco_evaluate(self.coco_gt, dets, image_ids=pred["image_id"])
        metrics.update(num_images=int(pred.num_images), num_detections=len(dets),
                       eval_size=int(self.input_cfg.eval_size), eval_max_size=eval_max_size(self.input_cfg))
        if verbose:
            print(table, end="", flush=True)
        if out_dir:  # the two files together: a failure writing either leaves the previous pair as it was
            outputs = [(METRICS_FILE, metrics, 2)]
            if bool(self.eval_cfg.write_detections):
                outputs.insert(0, (DETECTIONS_FILE, dets, None))
            with atomic.atomic_files([os.path.join(out_dir, name) for name, _, _ in outputs], suffix=".json") as tmps:
                for tmp, (_, obj, indent) in zip(tmps, outputs):
                    with open(tmp, "w") as f:
                        json.dump(obj, f, indent=indent)
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
    blob = json.dumps(metrics).encode() if jax.process_index() == 0 else b""
    if len(blob) >= max_bytes:
        raise ValueError(f"metrics JSON of {len(blob)} bytes is too large to broadcast (max {max_bytes})")
    buf = np.zeros((max_bytes,), np.uint8)
    buf[: len(blob)] = np.frombuffer(blob, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return json.loads(buf.tobytes().rstrip(b"\0").decode())


def check_label_map(label_map: Any, num_classes: int, meta: Optional[dict] = None) -> None:
    """The model must have a logit for every label of the dataset, and, when the checkpoint recorded the label
    map it was trained with (`meta['label_map']`), read each category as the same label."""
    if label_map.num_classes > int(num_classes):
        hint = ("config.input.label_mode='contiguous' numbers the categories 0..K-1" if label_map.mode == "identity"
                else "this model has fewer logits than the dataset has categories: it was trained on another dataset")
        raise ConfigError(
            f"the dataset's label map has {label_map.num_classes} labels ({label_map.mode} mode) but the model has "
            f"num_classes={num_classes}; {hint}"
        )
    trained = (meta or {}).get("label_map")
    if trained:
        why = label_map.incompatibility(LabelMap.from_dict(trained))
        if why:
            ds = (meta or {}).get("dataset") or {}
            raise ConfigError(
                f"this checkpoint cannot be evaluated on this dataset: {why}. The run trained on dataset "
                f"'{ds.get('dataset_name')}' in {ds.get('data_dir')} with input.label_mode={ds.get('label_mode')!r}: "
                "give eval the same --config.input.* data overrides as training (dataset_name, data_dir, "
                "source_dir, label_mode)")
