"""`train_and_evaluate(config, workdir)`: the training loop behind `train.py` (host orchestration).

Device work lives in `train_step.py`; this module does what only the host can: multi-host start-up, data
iteration, checkpoint/resume, non-finite checks, logging, TensorBoard, preemption and periodic evaluation.
It is the top of the import chain (config -> input -> model -> matcher -> loss -> step -> checkpoint -> eval).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from yolos_jax import atomic, checkpointing, optim, sharding, train_step
from yolos_jax.yolos import YOLOS

log = logging.getLogger("yolos_jax")


class NonFiniteLossError(FloatingPointError):
    """Raised when training meets a non-finite loss under `nonfinite_policy='stop'`."""


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def default_train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_epochs=150,  # used when num_steps <= 0
            num_steps=0,  # total optimiser steps; > 0 overrides num_epochs
            log_every=50,  # steps between logged (host-synced) metrics
            nonfinite_policy="stop",  # 'stop': raise naming the step and terms; 'skip': drop the update
            eval_every=0,  # steps between evaluations on the val split (0: only at the end if eval_at_end)
            eval_at_end=True,
            inject_nan_at_step=-1,  # fault injection for tests: poison this step's images with NaN
        )
    )


def default_distributed_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            # Leave empty on TPU pods / SLURM / Open MPI: jax.distributed.initialize() detects them.
            coordinator_address="",
            num_processes=0,
            process_id=-1,
        )
    )


def default_config(variant: str = "s") -> ml_collections.ConfigDict:
    """The full run config: one sub-config per stage. `configs/*.py` start from this."""
    from yolos_jax import config as config_lib
    from yolos_jax import data, evaluation, losses, matcher

    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.init_from = ""  # converted checkpoint directory (convert_torch_weights.py --output)
    cfg.model = config_lib.model_config(variant)
    cfg.input = data.default_input_config(scales="ti" if variant == "ti" else "s")
    # uint8 host batches, normalised on device: ~1.4x faster host pipeline and 4x fewer bytes to move.
    cfg.input.image_format = "uint8"
    cfg.input.resize_on_device = "auto"  # on GPU/TPU the host only decodes (data.device_resize)
    cfg.matcher = matcher.default_matcher_config()
    cfg.loss = losses.default_loss_config()
    cfg.optim = optim.default_optim_config()
    if variant == "ti":
        cfg.optim.base_lr, cfg.optim.base_batch_size = 5e-5, 16
    cfg.train = default_train_config()
    cfg.checkpoint = checkpointing.default_checkpoint_config()
    cfg.mesh = sharding.default_mesh_config()
    cfg.eval = evaluation.default_eval_config()
    cfg.distributed = default_distributed_config()
    return cfg


def prepare_input_config(input_cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Resolves '{workdir}' in the input paths and generates the synthetic dataset when asked to.

    A config with `input.synthetic` (num_train, num_val, image_size, num_classes, seed; optional
    max_objects, classes, min_size_frac, max_size_frac, background: see `synthetic.generate`) and a
    `source_dir` that does not exist yet gets the seeded synthetic COCO-format dataset written there —
    the embedded default that needs no download. Returns a resolved copy; `input_cfg` is not modified.
    """
    cfg = ml_collections.ConfigDict(input_cfg.to_dict())
    for key in ("data_dir", "source_dir"):
        if isinstance(cfg.get(key), str):
            cfg[key] = cfg[key].replace("{workdir}", workdir)
    synth = cfg.get("synthetic")
    if synth and cfg.source_dir and not os.path.isdir(cfg.source_dir):
        from yolos_jax.data import synthetic

        if jax.process_index() == 0:
            log.info("generating the synthetic dataset into %s", cfg.source_dir)
            try:
                options = {k: synth[k] for k in ("classes", "min_size_frac", "max_size_frac", "background")
                           if synth.get(k) is not None}
                synthetic.generate(cfg.source_dir, int(synth.num_train), int(synth.num_val), int(synth.seed),
                                   tuple(synth.image_size), num_classes=int(synth.num_classes),
                                   max_objects=int(synth.get("max_objects", 6)), **options)
            except FileExistsError:  # another process finished it meanwhile
                pass
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("synthetic dataset generated")
    return cfg


def input_config_for_checkpoint(input_cfg: ml_collections.ConfigDict, checkpoint: str,
                                workdir: Optional[str] = None) -> ml_collections.ConfigDict:
    """`prepare_input_config` for eval/inference/figures: '{workdir}' in the data paths (configs/demo.py) is
    `workdir`, else the training workdir that holds `checkpoint` (e.g. WORKDIR/checkpoints/800). Raises,
    before any data is generated, if `checkpoint` holds no checkpoint or no workdir is known."""
    from yolos_jax import weights

    found = weights.workdir_of(checkpoint)  # FileNotFoundError naming the path if there is none
    uses_workdir = any("{workdir}" in str(input_cfg.get(k) or "") for k in ("data_dir", "source_dir"))
    if not uses_workdir:
        return input_cfg
    workdir = workdir or found
    if workdir is None:
        raise ValueError(
            f"config.input.data_dir={input_cfg.data_dir!r} / source_dir={input_cfg.source_dir!r} refer to "
            f"'{{workdir}}', and {checkpoint} is not inside a training workdir: pass --workdir=<the training "
            "workdir>, or set --config.input.data_dir and --config.input.source_dir")
    return prepare_input_config(input_cfg, workdir)


def check_resumable_model(checkpoint_dir: str, model_cfg: ml_collections.ConfigDict) -> None:
    """Raises, naming the fields, if the workdir's checkpoints hold another model than `model_cfg`: other
    parameter shapes (orbax would fail deep inside the restore) or the same shapes computed differently
    (e.g. FP-DETR's insert block), which would silently switch models mid-run. Only dtype, attention_impl and
    remat may change on resume."""
    from yolos_jax import config as config_lib
    from yolos_jax import weights
    from yolos_jax.weights import RUNTIME_MODEL_FIELDS

    stored = checkpointing.restore_config(checkpoint_dir).get("model")
    if not stored:
        return
    stored = config_lib.sequence_fields_as_tuples(stored)
    current = config_lib.sequence_fields_as_tuples(model_cfg.to_dict())
    changed = [f"{k}: {stored[k]!r} in the checkpoints, {current.get(k)!r} now" for k in sorted(stored)
               if k not in RUNTIME_MODEL_FIELDS and stored[k] != current.get(k)]
    if not changed:
        return
    shapes = weights.expected_param_shapes(stored) == weights.expected_param_shapes(current)
    raise ValueError(
        f"{checkpoint_dir} holds checkpoints of a different model "
        f"({'same parameter shapes, computed differently' if shapes else 'parameter shapes differ'}): "
        f"{'; '.join(changed)}. Resume with the run's original config, or start this model in another --workdir")


def _fail(field: str, message: str) -> None:
    raise ValueError(f"config.{field}: {message}")


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
    """Checks values that would otherwise fail deep inside tracing; raises naming the field."""
    m = config.model
    for name in ("hidden_size", "depth", "num_heads", "patch_size", "num_det_tokens", "num_classes"):
        if not isinstance(m[name], int) or m[name] <= 0:
            _fail(f"model.{name}", f"must be a positive integer, got {m[name]!r}")
    from yolos_jax import det_prior, variants

    variants.validate_options(m)
    det_prior.validate_options(m)
    if m.hidden_size % m.num_heads:
        _fail("model.num_heads", f"{m.num_heads} does not divide model.hidden_size={m.hidden_size}")
    for name in ("init_pe_size", "mid_pe_size"):
        size = m[name]
        if size is None and name == "mid_pe_size":
            continue
        if len(size) != 2 or any(int(s) < m.patch_size for s in size):
            _fail(f"model.{name}", f"must be (height, width) in pixels, each >= patch_size, got {size!r}")
    if str(m.dtype) not in ("float32", "bfloat16", "float16"):
        _fail("model.dtype", f"must be 'float32', 'bfloat16' or 'float16', got {m.dtype!r}")
    if int(config.input.max_boxes) > m.num_det_tokens:  # a target slot beyond the queries is never matched
        _fail("input.max_boxes", f"{config.input.max_boxes} > model.num_det_tokens={m.num_det_tokens}: each target "
                                 "box needs its own [DET] token. Lower input.max_boxes, or raise model.num_det_tokens "
                                 "(with init_from, a converted checkpoint's [DET] tokens are grown to it)")
    from yolos_jax.data import input_config

    try:  # the input sub-config's own checks, before any step (an eval size of 0 would fail after training)
        input_config.validate_input_config(config.input, 1)
    except ValueError as e:
        raise ValueError(f"config.{e}") from None
    if int(config.eval.eval_size) <= 0:
        _fail("eval.eval_size", f"must be positive (shortest side of eval images, pixels), got {config.eval.eval_size}")
    batch = config.input.batch_size
    if not isinstance(batch, int) or batch <= 0:
        _fail("input.batch_size", f"must be a positive integer (global batch), got {batch!r}")
    num_devices = num_devices or jax.device_count()
    if batch % num_devices:
        _fail("input.batch_size", f"global batch {batch} must be a multiple of the device count {num_devices}")
    if batch % jax.process_count():
        _fail("input.batch_size", f"global batch {batch} must be a multiple of the process count")
    if config.optim.base_lr <= 0:
        _fail("optim.base_lr", f"must be > 0, got {config.optim.base_lr}")
    if config.optim.lr_scaling not in ("linear", "sqrt", "none"):
        _fail("optim.lr_scaling", f"must be 'linear', 'sqrt' or 'none', got {config.optim.lr_scaling!r}")
    if config.optim.schedule not in ("cosine", "constant"):
        _fail("optim.schedule", f"must be 'cosine' or 'constant', got {config.optim.schedule!r}")
    if config.train.nonfinite_policy not in ("stop", "skip"):
        _fail("train.nonfinite_policy", f"must be 'stop' or 'skip', got {config.train.nonfinite_policy!r}")
    if config.train.num_steps <= 0 and config.train.num_epochs <= 0:
        _fail("train.num_steps", "set num_steps > 0 or num_epochs > 0")
    if config.train.log_every <= 0:
        _fail("train.log_every", f"must be > 0, got {config.train.log_every}")
    if config.checkpoint.every_steps <= 0 or config.checkpoint.keep <= 0:
        _fail("checkpoint.every_steps", "every_steps and keep must be > 0")
    if config.init_from and not os.path.isdir(config.init_from):
        _fail("init_from", f"{config.init_from!r} is not a directory (expected convert_torch_weights.py output)")


# --------------------------------------------------------------------------------------------------
# Multi-host
# --------------------------------------------------------------------------------------------------

_MULTIPROCESS_ENV = ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed(dist_cfg: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` when launched as several processes; a no-op for one process.

    Explicit settings (coordinator address, process count and id) win; otherwise the cluster is detected
    from the environment (TPU pod slices, SLURM, Open MPI). Must run before any other jax call.
    """
    if dist_cfg.coordinator_address:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # noqa: BLE001 - older/newer jax without the option: CPU collectives unavailable
            pass
        jax.distributed.initialize(
            coordinator_address=dist_cfg.coordinator_address,
            num_processes=int(dist_cfg.num_processes),
            process_id=int(dist_cfg.process_id),
        )
        return
    env_multi = False
    for var in _MULTIPROCESS_ENV:
        value = os.environ.get(var, "")
        if var == "TPU_WORKER_HOSTNAMES":
            env_multi |= len([h for h in value.split(",") if h]) > 1
        elif var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            env_multi |= value.isdigit() and int(value) > 1
        else:
            env_multi |= bool(value)
    if env_multi:
        jax.distributed.initialize()


# --------------------------------------------------------------------------------------------------
# Logging helpers
# --------------------------------------------------------------------------------------------------


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class _Progress:
    """One line per log step: step, loss terms, lr, images/s, ETA."""

    def __init__(self, total_steps: int, global_batch: int, start_step: int):
        self.total = total_steps
        self.batch = global_batch
        self.last_time = time.time()
        self.last_step = start_step

    def line(self, step: int, scalars: dict[str, float]) -> tuple[str, float]:
        now = time.time()
        steps = max(step - self.last_step, 1)
        sec_per_step = (now - self.last_time) / steps
        self.last_time, self.last_step = now, step
        images_per_s = self.batch / sec_per_step if sec_per_step > 0 else float("nan")
        eta = _format_eta(sec_per_step * (self.total - step))
        width = len(str(self.total))
        terms = " ".join(
            f"{k}={scalars[k]:.4f}"
            for k in ("loss", "loss_ce", "loss_bbox", "loss_giou", "matched_iou", "grad_norm")
            if k in scalars
        )
        pct = 100.0 * step / self.total
        text = (
            f"[{step:>{width}d}/{self.total} {pct:5.1f}%] {terms} lr={scalars.get('learning_rate', 0):.2e} "
            f"{images_per_s:.1f} img/s ETA {eta}"
        )
        return text, images_per_s


def _mean_metrics(history: list[dict]) -> dict[str, float]:
    host = jax.device_get(history)
    keys = host[0].keys()
    return {k: float(np.mean([np.asarray(h[k], np.float64) for h in host])) for k in keys}


def _check_finite(metrics: dict, step: int, policy: str) -> bool:
    """Host check of one step's metrics (already computed; this only waits for that step)."""
    host = jax.device_get(metrics)
    if float(host["finite"]) > 0.5:
        return True
    terms = ", ".join(f"{k}={float(v):.6g}" for k, v in host.items() if k != "finite")
    message = (
        f"non-finite loss or gradient at step {step} (the update was not applied): {terms}. "
        "The last checkpoint is intact. Lower optim.base_lr, check the data, or set "
        "train.nonfinite_policy='skip' to drop such updates and continue."
    )
    if policy == "stop":
        raise NonFiniteLossError(message)
    log.warning("skipping update: %s", message)
    return False


def dense_scene_warning(num_objects: np.ndarray, max_boxes: int, num_det_tokens: int, split: str) -> Optional[str]:
    """The start-of-training warning for a train split with images over input.max_boxes, or None.

    num_objects: int [N], each image's non-crowd boxes (the prepared index's exact count; crowd boxes are never
    targets). An image with n > max_boxes keeps its first max_boxes boxes as targets (fewer when a random crop
    removes some first): the rest are never trained on.
    """
    n = np.asarray(num_objects, np.int64)
    over = n > max_boxes
    if not over.any():
        return None
    dropped = int(np.sum(n[over] - max_boxes))
    need = int(n.max())
    return (f"dense scenes: {int(over.sum())} of {len(n)} images of train split '{split}' have more than "
            f"input.max_boxes={max_boxes} boxes (up to {need}); their {dropped} boxes beyond the first {max_boxes} "
            f"({100.0 * dropped / max(int(n.sum()), 1):.2f}% of the split's boxes) are never trained on. To train on "
            f"them set input.max_boxes={need} and model.num_det_tokens >= {need} (now {num_det_tokens}; with "
            "init_from a converted checkpoint's [DET] tokens are grown, see the README's 'Dense scenes')")


# --------------------------------------------------------------------------------------------------
# Parameters from a converted checkpoint (config.init_from)
# --------------------------------------------------------------------------------------------------


def _init_from_converted(
    path: str, model: YOLOS, model_cfg: ml_collections.ConfigDict, seed: int, image_hw, shardings
) -> Any:
    from yolos_jax import init_from, weights

    fresh = jax.device_get(jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_hw, 3))))())
    converted, _, _ = weights.load_params_dir(path)
    params, report = init_from.init_params_from(fresh["params"], converted, model_cfg.to_dict(), seed=seed)
    if jax.process_index() == 0:
        log.info("init_from %s: %s", path, report)
    return sharding.place_host(params, shardings)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def write_annotated_val_images(params: Any, model_cfg: dict, input_cfg: ml_collections.ConfigDict, out_dir: str,
                               num_images: int = 8, threshold: float = 0.5) -> list[str]:
    """Draws the detector's predictions (score > threshold) on the first val images -> PNG paths."""
    from yolos_jax import draw
    from yolos_jax.data import prepared_dataset
    from yolos_jax.inference import Detector, read_image_rgb

    dataset = prepared_dataset.open_dataset(input_cfg)
    label_map = prepared_dataset.dataset_info(input_cfg).label_map
    source = dataset.source_for(input_cfg.val_split)
    max_size = int(input_cfg.eval_max_size) if input_cfg.eval_max_size > 0 else None
    names = label_map.names_for(int(dict(model_cfg)["num_classes"]))
    detector = Detector(params, model_cfg, eval_size=int(input_cfg.eval_size), max_size=max_size, label_names=names)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(min(num_images, len(source))):
        record = source[i]
        image = read_image_rgb(record["image"])
        (pred,) = detector.predict([image], threshold=threshold)
        texts = [f"{names[int(l)]} {float(s):.2f}" for l, s in zip(pred["labels"], pred["scores"])]
        path = os.path.join(out_dir, f"{int(record['image/id'])}.png")
        draw.save_png(path, draw.draw_boxes(image, np.asarray(pred["boxes"]), texts))
        paths.append(path)
    return paths


class _StopRequest:
    """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a request to save and exit cleanly."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class _finish_saves_on_error:
    """On an exception, let checkpoints already being written finish (they are complete and valid)."""

    def __init__(self, checkpointer: checkpointing.Checkpointer):
        self.checkpointer = checkpointer

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            try:
                self.checkpointer.wait()
            except Exception:  # noqa: BLE001 - never mask the original error
                log.exception("while finishing checkpoint writes after an error")
        return False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints), evaluates, returns the final metrics."""
    from yolos_jax import data

    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
    config.input = prepare_input_config(config.input, workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    info = data.dataset_info(config.input)
    evaluates = bool(config.train.eval_every) or bool(config.train.eval_at_end)
    for key in ("train_split", "val_split") if evaluates else ("train_split",):  # a typo must not cost a run
        if config.input[key] not in info.num_examples:
            _fail(f"input.{key}", f"{config.input[key]!r} is not a split of dataset '{config.input.dataset_name}' in "
                                  f"{config.input.data_dir}; it has {sorted(info.num_examples)} (the <split> of "
                                  "each instances_<split>.json)")
    label_map = info.label_map
    if label_map.num_classes > config.model.num_classes:
        _fail(
            "model.num_classes",
            f"{config.model.num_classes} < {label_map.num_classes} classes in the dataset's label map "
            f"(input.label_mode={config.input.get('label_mode', '?')!r})",
        )
    if label_map.num_classes < config.model.num_classes and is_main:
        log.info("model.num_classes=%d > the dataset's %d labels (input.label_mode=%r): the other %d logits are "
                 "never targets (expected when fine-tuning a 91-way COCO head; otherwise set model.num_classes=%d)",
                 config.model.num_classes, label_map.num_classes, config.input.label_mode,
                 config.model.num_classes - label_map.num_classes, label_map.num_classes)
    # Stored with every checkpoint: names for inference, the label map for evaluation's compatibility check.
    config.label_names = label_map.names_for(config.model.num_classes)
    config.label_map = label_map.to_dict()
    global_batch = int(config.input.batch_size)
    train_iter = data.make_train_iterator(config.input, seed=config.seed)
    dense = dense_scene_warning(train_iter.index.num_objects, int(config.input.max_boxes),
                                int(config.model.num_det_tokens), config.input.train_split)
    if dense and is_main:
        log.warning(dense)
    # An epoch is a pass of the epoch plan: every example once, plus the repeats that complete partial batches.
    steps_per_epoch = max(len(train_iter.plan(0)), 1)
    total_steps = int(config.train.num_steps) if config.train.num_steps > 0 else int(config.train.num_epochs) * steps_per_epoch

    model = YOLOS(**config.model.to_dict())
    image_hw = (2 * config.model.patch_size, 2 * config.model.patch_size)  # param shapes do not depend on it
    abstract_params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_hw, 3))))["params"]
    tx, schedule = optim.make_optimizer(config.optim, abstract_params, global_batch, total_steps)
    abstract, shardings = train_step.abstract_state_and_shardings(model, tx, config.seed, image_hw, mesh, config.mesh)

    checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint)
    latest = checkpointer.latest_step()
    if latest is not None:
        check_resumable_model(checkpointer.directory, config.model)
        state, data_state = checkpointer.restore(latest, abstract)
        train_iter.set_state(data_state)
        if is_main:
            log.info("resumed from %s at step %d", checkpointer.directory, latest)
    else:
        state = jax.jit(
            lambda: train_step.init_state(model, tx, config.seed, image_hw), out_shardings=shardings
        )()
        if config.init_from:
            state["params"] = _init_from_converted(
                config.init_from, model, config.model, config.seed, image_hw, shardings["params"]
            )
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = train_step.make_train_step(
        model, tx, schedule, config.loss, config.matcher, mesh, shardings, config.train.nonfinite_policy
    )

    writer = None
    if is_main:
        from flax.metrics import tensorboard

        writer = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
        atomic.write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()), indent=2)
        log.info("training %d steps (%d per epoch) at global batch %d on %d devices", total_steps,
                 steps_per_epoch, global_batch, jax.device_count())

    evaluator = None

    def evaluate(step: int) -> dict:
        nonlocal evaluator
        from yolos_jax import evaluation

        if evaluator is None:
            evaluator = evaluation.Evaluator(config.eval, config.input, model, mesh=mesh)
        out_dir = os.path.join(workdir, "eval", f"step_{step}")
        metrics = evaluator.run(state["params"], out_dir)
        if writer is not None and metrics:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.scalar(f"eval/{k}", v, step)
            writer.flush()
        return metrics

    step = int(jax.device_get(state["step"]))
    progress = _Progress(total_steps, global_batch, step)
    history: list[dict] = []
    previous: Optional[tuple[int, dict]] = None
    last_scalars: dict[str, float] = {}
    eval_metrics: dict[str, Any] = {}
    policy = config.train.nonfinite_policy
    last_saved = step
    with _StopRequest() as stop, _finish_saves_on_error(checkpointer):
        while step < total_steps:
            if stop.requested:
                break
            host_batch = next(train_iter)
            if step == config.train.inject_nan_at_step:
                host_batch = data.with_host_image(host_batch)  # (a test hook: a NaN image)
                host_batch = dict(host_batch, image=np.full_like(host_batch["image"], np.nan, dtype=np.float32))
            batch = data.to_global_batch(train_step.select_train_batch(host_batch), batch_sharding)
            state, metrics = step_fn(state, batch)
            step += 1
            # Check the previous step while this one runs: no stall, and a bad update was never applied.
            if previous is not None:
                _check_finite(previous[1], previous[0], policy)
            previous = (step, metrics)
            history.append(metrics)
            if step % config.train.log_every == 0 or step == total_steps:
                _check_finite(metrics, step, policy)
                last_scalars = _mean_metrics(history)
                history = []
                text, images_per_s = progress.line(step, last_scalars)
                if is_main:
                    print(text, flush=True)
                    for k, v in last_scalars.items():
                        writer.scalar(f"train/{k}", v, step)
                    writer.scalar("train/images_per_second", images_per_s, step)
                    writer.flush()
            if step % config.checkpoint.every_steps == 0 or step == total_steps:
                _check_finite(metrics, step, policy)
                checkpointer.save(step, state, train_iter.get_state(), config)
                last_saved = step
            if config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
                eval_metrics = evaluate(step)
        if stop.requested and step < total_steps:
            if previous is not None:
                _check_finite(previous[1], previous[0], policy)
            if last_saved != step:
                checkpointer.save(step, state, train_iter.get_state(), config)
            checkpointer.close()
            if is_main:
                print(f"{stop.signal_name}: saved a checkpoint at step {step}; re-run the same command to resume.",
                      flush=True)
            return {"step": step, "interrupted": True, **last_scalars}
    checkpointer.close()
    if config.train.eval_at_end:
        eval_metrics = evaluate(step)
        if is_main:
            images_dir = os.path.join(workdir, "eval", f"step_{step}", "images")
            paths = write_annotated_val_images(jax.device_get(state["params"]), config.model.to_dict(), config.input,
                                               images_dir, threshold=config.eval.get("draw_threshold", 0.5))
            print(f"annotated val images: {images_dir} ({len(paths)} images)", flush=True)
    if writer is not None:
        writer.close()
    result = {"step": step, **last_scalars, **{f"eval_{k}": v for k, v in (eval_metrics or {}).items()
                                               if isinstance(v, (int, float))}}
    if is_main:
        atomic.write_json_atomic(os.path.join(workdir, "final_metrics.json"), result, indent=2)
    return result
