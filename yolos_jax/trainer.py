"""`train_and_evaluate(config, workdir)`: the training loop behind `train.py` (host orchestration).

Device work lives in `train_step.py`; this module does what only the host can: data iteration, checkpoint/resume
(and the check that a workdir's checkpoints hold the configured model), non-finite checks, logging, TensorBoard,
preemption and periodic evaluation. The run's defaults and validation are `run_config`'s, multi-process start-up
is `runtime.maybe_initialize_distributed` (train.py calls it first), '{workdir}' paths and the synthetic dataset
are `data.resolve_input_config`'s, `config.init_from` is `init_from.init_from_converted`, and the annotated val
images, contact sheet and learning curve of each evaluation are `run_plots`'.
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
import ml_collections
import numpy as np

from yolos_jax import (atomic, checkpoint_reading, checkpointing, data, evaluation, init_from, optim, run_config,
                       run_plots, sharding, train_step, weights, workdir_lock)
from yolos_jax import config as config_lib
from yolos_jax.errors import ConfigError, UserError
from yolos_jax.weights import RUNTIME_MODEL_FIELDS, expected_param_shapes
from yolos_jax.yolos import YOLOS

log = logging.getLogger("yolos_jax")


class NonFiniteLossError(UserError, FloatingPointError):
    """Raised when training meets a non-finite loss under `nonfinite_policy='stop'`."""


def check_resumable_model(checkpoint_dir: str, model_cfg: ml_collections.ConfigDict,
                           stored_config: Optional[dict] = None) -> None:
    """Raises, naming the fields, if the workdir's checkpoints hold another model than `model_cfg`: other
    parameter shapes (orbax would fail deep inside the restore) or the same shapes computed differently
    (e.g. FP-DETR's insert block), which would silently switch models mid-run. Only dtype, attention_impl and
    remat may change on resume. stored_config: the run config saved with the step to resume (default: the
    latest step's)."""
    if stored_config is None:
        stored_config = checkpoint_reading.restore_config(checkpoint_dir)
    stored = stored_config.get("model")
    if not stored:
        return
    stored = config_lib.sequence_fields_as_tuples(stored)
    current = config_lib.sequence_fields_as_tuples(model_cfg.to_dict())
    changed = [f"{k}: {stored[k]!r} in the checkpoints, {current.get(k)!r} now" for k in sorted(stored)
               if k not in RUNTIME_MODEL_FIELDS and stored[k] != current.get(k)]
    if not changed:
        return
    shapes = expected_param_shapes(stored) == expected_param_shapes(current)
    raise ConfigError(
        f"{checkpoint_dir} holds checkpoints of a different model "
        f"({'same parameter shapes, computed differently' if shapes else 'parameter shapes differ'}): "
        f"{'; '.join(changed)}. Resume with the run's original config, or start this model in another --workdir")


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
    """Trains (resuming from `workdir` if it holds checkpoints), evaluates, returns the final metrics.

    Holds WORKDIR/run.lock for the whole run (`workdir_lock`): a second run on the workdir refuses at once."""
    run_config.validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lock.exclusive_workdir(workdir):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
    config.input = data.resolve_input_config(config.input, workdir)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh)
    info = data.dataset_info(config.input)
    evaluates = bool(config.train.eval_every) or bool(config.train.eval_at_end)
    for key in ("train_split", "val_split") if evaluates else ("train_split",):  # a typo must not cost a run
        if config.input[key] not in info.num_examples:
            raise ConfigError(f"config.input.{key}: {config.input[key]!r} is not a split of dataset "
                             f"'{config.input.dataset_name}' in {config.input.data_dir}; it has {sorted(info.num_examples)} (the <split> of "
                             "each instances_<split>.json)")
    label_map = info.label_map
    if label_map.num_classes > config.model.num_classes:
        mode = config.input.get("label_mode", "?")
        other = ("; or input.label_mode='contiguous' for one label per category" if mode == "identity" else "")
        raise ConfigError(f"config.model.num_classes: {config.model.num_classes} < {label_map.num_classes} classes in "
                          f"the dataset's label map (input.label_mode={mode!r}): set "
                          f"--config.model.num_classes={label_map.num_classes}{other}")
    if label_map.num_classes < config.model.num_classes and is_main:
        log.info("model.num_classes=%d > the dataset's %d labels (input.label_mode=%r): the other %d logits are "
                 "never targets (expected when fine-tuning a 91-way COCO head; otherwise set model.num_classes=%d)",
                 config.model.num_classes, label_map.num_classes, config.input.label_mode,
                 config.model.num_classes - label_map.num_classes, label_map.num_classes)
    # Stored with every checkpoint (its meta/ item): names for inference, the label map for evaluation's check.
    run_meta = {"label_names": label_map.names_for(config.model.num_classes), "label_map": label_map.to_dict()}
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
    abstract_params = weights.abstract_params(model, image_hw, mesh)
    tx, schedule = optim.make_optimizer(config.optim, abstract_params, global_batch, total_steps)
    ema_decay = float(config.optim.get("ema_decay", 0.0))
    abstract, shardings = train_step.abstract_state_and_shardings(model, tx, config.seed, image_hw, mesh, config.mesh,
                                                                  ema=ema_decay > 0)

    checkpointer = checkpointing.Checkpointer(workdir, config.checkpoint)
    # The newest step that restores (bad ones are moved aside with a warning); another model raises first.
    resumed = checkpointer.resume(abstract, check_config=lambda stored: check_resumable_model(
        checkpointer.directory, config.model, stored))
    if resumed is not None:
        latest, state, data_state = resumed
        train_iter.set_state(data_state)
        if is_main:
            log.info("resumed from %s at step %d", checkpointer.directory, latest)
    else:
        # Under the mesh too: `model.init` runs the forward, whose splash attention would otherwise warn and
        # take the xla path on several devices.
        state = sharding.mesh_jit(
            lambda: train_step.init_state(model, tx, config.seed, image_hw, ema_decay > 0), mesh,
            out_shardings=shardings,
        )()
        if config.init_from:
            state["params"] = init_from.init_from_converted(
                config.init_from, model, config.model, config.seed, image_hw, shardings["params"]
            )
            if "ema_params" in state:  # the average starts from the weights training starts from
                state["ema_params"] = jax.tree.map(lambda p: p.copy(), state["params"])
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = train_step.make_train_step(
        model, tx, schedule, config.loss, config.matcher, mesh, shardings, config.train.nonfinite_policy,
        grad_accum_steps=int(config.train.get("grad_accum_steps", 1)), ema_decay=ema_decay,
    )
    profile = run_config.profile_range(config.train)

    writer = None
    if is_main:
        from flax.metrics import tensorboard  # imports TensorFlow's summary ops: process 0 only

        writer = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
        atomic.write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()), indent=2)
        log.info("training %d steps (%d per epoch) at global batch %d on %d devices", total_steps,
                 steps_per_epoch, global_batch, jax.device_count())
        batch_note = optim.recipe_batch_note(config.optim, global_batch)
        if batch_note:
            log.info("%s", batch_note)

    evaluator = None
    weights_name = "ema" if ema_decay > 0 else "params"
    keep_best_by = str(config.checkpoint.get("keep_best_by", "") or "")
    best_mode = str(config.checkpoint.get("best_mode", "max"))
    best = checkpointer.best_so_far(keep_best_by, best_mode) if keep_best_by else None

    def evaluate(step: int) -> dict:
        """Evaluates the run's weights (the EMA when on) at `step`; keeps checkpoints/best up to date."""
        nonlocal evaluator, best
        if evaluator is None:
            evaluator = evaluation.Evaluator(config.eval, config.input, model, mesh=mesh)
        out_dir = os.path.join(workdir, "eval", f"step_{step}")
        if is_main and ema_decay > 0:
            log.info("evaluating the EMA of the parameters (optim.ema_decay=%g) at step %d", ema_decay, step)
        metrics = evaluator.run(state["ema_params" if ema_decay > 0 else "params"], out_dir)
        if is_main and metrics:  # say which weights were scored, in the file a reader keeps
            metrics["weights"] = weights_name
            atomic.write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics, indent=2)
        if writer is not None and metrics:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    writer.scalar(f"eval/{k}", v, step)
            writer.flush()
        if keep_best_by and metrics:
            best = keep_if_best(step, metrics, best)
        if is_main and metrics:
            pictures(step, metrics, out_dir)
        return metrics

    def pictures(step: int, metrics: dict, out_dir: str) -> None:
        """The learning curve (refreshed), and the evaluated weights' annotated val images and contact sheet."""
        history = run_plots.append_history(curve_history, [{"step": step, **{k: metrics[k] for k in ("AP", "AP50")
                                                                              if k in metrics}}])
        run_plots.write_learning_curve(history, os.path.join(workdir, "learning_curve.png"))
        if jax.process_count() > 1:  # the weights would have to be gathered onto process 0 first
            log.warning("annotated val images and the contact sheet are drawn in single-process runs only; "
                        "draw them afterwards with infer.py --checkpoint=WORKDIR on the val images")
            return
        try:  # pictures must never end a long run
            written = run_plots.write_eval_pictures(
                jax.device_get(state["ema_params" if ema_decay > 0 else "params"]), config.model.to_dict(),
                config.input, out_dir, threshold=float(config.eval.get("draw_threshold", 0.5)))
        except Exception as e:  # noqa: BLE001
            log.warning("could not draw the val images of step %d: %s", step, e)
            return
        print(f"annotated val images: {os.path.join(out_dir, run_plots.IMAGES_DIR)} ({len(written['images'])} "
              f"images), contact sheet: {written['contact_sheet']}", flush=True)

    def keep_if_best(step: int, metrics: dict, best: Optional[dict]) -> Optional[dict]:
        value = metrics.get(keep_best_by)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            if is_main:
                log.warning("checkpoint.keep_best_by=%r: not a number in this evaluation's metrics (%s)", keep_best_by,
                            ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))))
            return best
        sign = 1.0 if best_mode == "max" else -1.0
        if best is not None and sign * value <= sign * float(best["value"]):
            return best
        path = checkpointer.save_best(step, state["ema_params" if ema_decay > 0 else "params"], config, run_meta,
                                      keep_best_by, value, best_mode, weights_name)
        if is_main:
            log.info("new best %s=%.4f at step %d -> %s", keep_best_by, value, step, path)
        return {"metric": keep_best_by, "value": float(value), "step": int(step)}

    step = int(jax.device_get(state["step"]))
    progress = _Progress(total_steps, global_batch, step)
    curve_history = os.path.join(workdir, "learning_curve.json")  # the points of learning_curve.png
    if is_main:  # a resumed run forgets the points logged after its checkpoint (they will be logged again)
        run_plots.append_history(curve_history, [], drop_after=step)
    history: list[dict] = []
    previous: Optional[tuple[int, dict]] = None
    last_scalars: dict[str, float] = {}
    eval_metrics: dict[str, Any] = {}
    policy = config.train.nonfinite_policy
    last_saved = step
    tracing = traced = False
    with _StopRequest() as stop, _finish_saves_on_error(checkpointer):
        while step < total_steps:
            if stop.requested:
                break
            if profile and not traced and profile[0] <= step + 1 <= profile[1]:  # steps A..B (from 1), once
                jax.profiler.start_trace(os.path.join(workdir, "profile", f"process_{jax.process_index()}"))
                tracing = traced = True
            host_batch = next(train_iter)
            if step == config.train.inject_nan_at_step:
                host_batch = data.with_host_image(host_batch)  # (a test hook: a NaN image)
                host_batch = dict(host_batch, image=np.full_like(host_batch["image"], np.nan, dtype=np.float32))
            batch = data.to_global_batch(train_step.select_train_batch(host_batch), batch_sharding)
            state, metrics = step_fn(state, batch)
            step += 1
            if tracing and step == profile[1]:
                jax.block_until_ready(metrics)  # the trace must hold the whole of step B
                jax.profiler.stop_trace()
                tracing = False
                if is_main:
                    log.info("profile of steps %d..%d: %s (TensorBoard's profile plugin or ui.perfetto.dev)",
                             profile[0], profile[1], os.path.join(workdir, "profile"))
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
                    run_plots.append_history(curve_history, [{"step": step, **{
                        k: last_scalars[k] for k in ("loss", "loss_ce", "loss_bbox", "loss_giou") if k in last_scalars}}])
                    for k, v in last_scalars.items():
                        writer.scalar(f"train/{k}", v, step)
                    writer.scalar("train/images_per_second", images_per_s, step)
                    writer.flush()
            if step % config.checkpoint.every_steps == 0 or step == total_steps:
                _check_finite(metrics, step, policy)
                checkpointer.save(step, state, train_iter.get_state(), config, run_meta, must_land=step == total_steps)
                last_saved = step
            if config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
                eval_metrics = evaluate(step)
        if tracing:  # a stop inside the profiled range (or B past the end): keep what was traced
            jax.profiler.stop_trace()
        if stop.requested and step < total_steps:
            if previous is not None:
                _check_finite(previous[1], previous[0], policy)
            if last_saved != step:
                checkpointer.save(step, state, train_iter.get_state(), config, run_meta, must_land=True)
            checkpointer.close()
            if is_main:
                print(f"{stop.signal_name}: saved a checkpoint at step {step}; re-run the same command to resume.",
                      flush=True)
            return {"step": step, "interrupted": True, **last_scalars}
    checkpointer.close()
    if config.train.eval_at_end:
        eval_metrics = evaluate(step)
    if writer is not None:
        writer.close()
    result = {"step": step, **last_scalars, **{f"eval_{k}": v for k, v in (eval_metrics or {}).items()
                                               if isinstance(v, (int, float))}}
    if is_main:
        atomic.write_json_atomic(os.path.join(workdir, "final_metrics.json"), result, indent=2)
    return result
