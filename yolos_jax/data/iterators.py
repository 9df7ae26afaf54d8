"""Train and eval iterators: host batches (the schema in `assembly`) of this process, from a background thread.

Data flow: `prepared_dataset` (ArrayRecord records + index) -> `batching` plans each epoch (which
examples form which batch, each example's random transform, the canvas) from the seed alone ->
`stream.element_stream` reads this process's examples of each planned batch and transforms their boxes
(numpy) -> `stream.decode_dataset` decodes and resamples the images in parallel (tf.data, deterministic
order) -> a background thread (`BatchIterator`) pads them into canvas batches (`assembly.assemble`). The
iterator position is (epoch, batch): saving it with a checkpoint and `set_state` on resume reproduces the
uninterrupted run's batches exactly.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import queue
import threading
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from yolos_jax.data import batching
from yolos_jax.data.assembly import assemble
from yolos_jax.data.canvases import eval_canvases, eval_geometry, source_canvas, train_canvases
from yolos_jax.data.coco_json import DataError
from yolos_jax.data.input_config import check_batch_size, train_transform_config, validate_input_config
from yolos_jax.data.labels import LabelMap
from yolos_jax.data.prepared_dataset import open_dataset
from yolos_jax.data.stream import StreamStats, decode_dataset, element_stream
from yolos_jax.data.tf_setup import get_tf

_DONE = object()


class BatchIterator:
    """Runs element stream -> tf.data -> batch assembly in a background thread from a start position.

    make_stream: (epoch, batch) -> this process's elements from there (`stream.element_stream`);
    local_batch: examples per host batch; cfg: the input config (num_parallel_calls, prefetch_batches,
    image_format); image_fn: optional per-image hook on the decoded original (`make_eval_iterator`);
    source_hw: input.resize_on_device's source canvas (None: the host resamples); eval_transform: resample
    with the eval transform's resampler. `position` is the (epoch, batch) of the next batch handed out.
    """

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
        ds = decode_dataset(gen, int(self._cfg.num_parallel_calls), b * max(1, int(self._cfg.prefetch_batches)),
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
                        raise DataError(f"decoding {where} failed: {e.message.strip()[:300]}") from None
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


class PlanCache:
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


class _ClosingIterator:
    """Stops the background `BatchIterator` (`self._it`) on `close()` and when garbage-collected."""

    def close(self) -> None:
        self._it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class TrainIterator(_ClosingIterator):
    """Endless train batches (host numpy, this process's share). See `make_train_iterator`."""

    def __init__(self, cfg: ml_collections.ConfigDict, seed: int, process_index: int, process_count: int):
        validate_input_config(cfg, process_count)
        self.cfg = cfg
        self.seed = int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.dataset = open_dataset(cfg, process_count)
        split = cfg.train_split
        self.index = self.dataset.index(split)
        if len(self.index) == 0:
            raise DataError(f"split '{split}' of {self.dataset.path} has no examples")
        self.label_map = LabelMap.from_categories(self.dataset.categories, cfg.label_mode)
        self.tcfg = train_transform_config(cfg)
        self.canvases = train_canvases(cfg, self.index)
        self.global_batch = int(cfg.batch_size)
        self.local_batch = self.global_batch // self.process_count
        self.stats = StreamStats()
        self._plans = PlanCache(functools.partial(
            batching.train_epoch_plan, self.seed, heights=self.index.height, widths=self.index.width,
            tcfg=self.tcfg, canvases=self.canvases, batch_size=self.global_batch, leftover=cfg.leftover,
            shuffle=cfg.shuffle))
        source = self.dataset.source_for(split)
        sl = slice(self.process_index * self.local_batch, (self.process_index + 1) * self.local_batch)
        plans, index, label_map, stats, max_boxes = self._plans, self.index, self.label_map, self.stats, int(cfg.max_boxes)

        def make_stream(start):
            return element_stream(plans, start, None, sl, source, index, label_map, max_boxes, stats)

        self._it = BatchIterator(make_stream, self.local_batch, cfg, (0, 0), source_hw=source_canvas(cfg, self.index))

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



class EvalIterator(_ClosingIterator):
    """One pass over a split (host numpy, this process's share); see `make_eval_iterator`."""

    def __init__(self, cfg: ml_collections.ConfigDict, split: Optional[str], process_index: int, process_count: int,
                 batch_size: Optional[int] = None, image_fn=None):
        validate_input_config(cfg, process_count)
        self.cfg = cfg
        self.split = split or cfg.val_split
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.global_batch = int(cfg.eval_batch_size if batch_size is None else batch_size)
        check_batch_size(self.global_batch, self.process_count, "eval batch_size")
        self.dataset = open_dataset(cfg, process_count)
        self.index = self.dataset.index(self.split)
        self.label_map = LabelMap.from_categories(self.dataset.categories, cfg.label_mode)
        self.canvases = eval_canvases(cfg, self.index)
        self.local_batch = self.global_batch // self.process_count
        self._plan = plan = batching.eval_plan(eval_geometry(cfg, self.index), self.canvases, self.global_batch)
        self.stats = StreamStats()
        source = self.dataset.source_for(self.split) if len(self.index) else None
        sl = slice(self.process_index * self.local_batch, (self.process_index + 1) * self.local_batch)
        index, label_map, stats, max_boxes = self.index, self.label_map, self.stats, int(cfg.max_boxes)

        def make_stream(start):
            return element_stream(lambda e: plan, start, 1, sl, source, index, label_map, max_boxes, stats)

        # The eval transform resamples on the host with the one eval resampler (transforms.resize_image, the
        # original's PIL), also under input.resize_on_device: evaluation is the original's.
        self._it = BatchIterator(make_stream, self.local_batch, cfg, (0, 0), image_fn, eval_transform=True)

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



def _jax_process() -> tuple[int, int]:
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

