"""Reading a training checkpoint outside its run: eval.py, `Detector`, the figures and `init_from` (through
`weights.load_any`), and the trainer's check of the stored model.

Paths: a workdir (its newest step that restores), its checkpoints/ directory, one checkpoints/<step> directory,
or checkpoints/best (`checkpointing.Checkpointer.save_best`). A run with an EMA of its parameters stored it
beside them (the 'ema' item); readers return the EMA as the run's weights (meta 'weights': 'ema').
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import orbax.checkpoint as ocp

from yolos_jax import config as config_lib
from yolos_jax.checkpointing import (BEST_DIR, CHECKPOINT_SUBDIR, META_KEYS, CheckpointError, check_committed,
                                     step_dirs)
from yolos_jax.errors import MissingInputError, UnusableInputError, describe_error

log = logging.getLogger("yolos_jax")

Step = Union[int, str]  # a step number, or BEST_DIR


def find_step(path: str) -> Optional[tuple[str, Step]]:
    """(checkpoints directory, step) of a training checkpoint path: a workdir (its latest finalised step), its
    `checkpoints/` directory, one `checkpoints/<step>` directory or `checkpoints/best` (step 'best'); None if
    `path` holds none (converted directories are `weights`' to resolve)."""
    path = os.path.abspath(path)
    base = os.path.basename(path.rstrip("/"))
    parent = os.path.dirname(path)
    if base == BEST_DIR and os.path.isdir(os.path.join(path, "params")):
        return parent, BEST_DIR
    if base.isdigit() and os.path.isdir(path) and (os.path.isdir(os.path.join(path, "params"))
                                                   or os.path.basename(parent) == CHECKPOINT_SUBDIR):
        return parent, int(base)  # a step directory (one that lost its params/ is a bad step, not no step)
    for directory in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        if os.path.isdir(directory):
            steps = [int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d, "params"))]
            if steps:
                return directory, max(steps)
    return None


def _resolve(path: str) -> tuple[str, Step]:
    found = find_step(path)
    if found is None:
        raise MissingInputError(f"no training checkpoint at {path}: expected a workdir (with {CHECKPOINT_SUBDIR}/<step>/), "
                                "its checkpoints/ directory or one checkpoint step directory")
    return found


def read_items(step_dir: str, **items: Any) -> dict:
    """Restores the named items (orbax restore args, e.g. params=ocp.args.StandardRestore()) of one checkpoint
    step directory, whichever writer made it (the run's CheckpointManager or `save_best`)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(step_dir, args=ocp.args.Composite(**items))


def restore_params(directory: str, step: Step) -> tuple[Any, dict, dict]:
    """(params, model_config, meta) of the training checkpoint `directory`/`step` (see `find_step`); only the
    parameters and the run config are read (not the optimiser state), the arrays land on the default device.
    A run with an EMA of its parameters gives the EMA (its evaluated weights).

    meta: 'kind' ('detector'), 'step', 'weights' ('ema' or 'params'), 'eval_size', 'max_size' (None when
    uncapped), 'label_names', 'label_map' (a `LabelMap.to_dict()`, None before it was recorded; from the meta/
    item, or config/ in older checkpoints), 'dataset' (the run's input.dataset_name, data_dir, label_mode,
    val_split) and, for checkpoints/best, 'best' ({'metric', 'value', 'step'}). `weights.load_any` is the loader
    of every checkpoint kind.
    """
    step_dir = os.path.join(directory, str(step))
    ema = os.path.isdir(os.path.join(step_dir, "ema"))
    items = dict(config=ocp.args.JsonRestore())
    items["ema" if ema else "params"] = ocp.args.StandardRestore()
    if os.path.isdir(os.path.join(step_dir, "meta")):
        items["meta"] = ocp.args.JsonRestore()
    restored = read_items(step_dir, **items)
    params = restored["ema" if ema else "params"]
    config = restored["config"]
    run_meta = restored["meta"] if "meta" in items else {k: config.get(k) for k in META_KEYS}
    if "model" not in config:
        raise UnusableInputError(f"checkpoint {step_dir} holds no model config (config/model missing)")
    model_cfg = config_lib.sequence_fields_as_tuples(config["model"])  # JSON turned tuples into lists
    input_cfg = config.get("input", {})
    eval_max = input_cfg.get("eval_max_size", -1)
    best = run_meta.get("best")
    meta = {
        "kind": "detector",
        "step": best["step"] if best else step,
        "weights": (best or {}).get("weights") or ("ema" if ema else "params"),
        "eval_size": input_cfg.get("eval_size"),
        "max_size": eval_max if eval_max and eval_max > 0 else None,
        "label_names": run_meta.get("label_names"),
        "label_map": run_meta.get("label_map"),
        "dataset": {k: input_cfg.get(k) for k in ("dataset_name", "data_dir", "label_mode", "val_split")},
    }
    if best:
        meta["best"] = best
    return params, model_cfg, meta


def restore_params_from(path: str) -> tuple[Any, dict, dict]:
    """`restore_params` of a training checkpoint path (see `find_step`). For a workdir or its checkpoints/
    directory: the newest step that restores, with one warning line per newer step that does not (nothing is
    moved: a live run may own the workdir). For one step directory: that step, or a CheckpointError naming it.
    """
    directory, step = _resolve(path)
    base = os.path.basename(os.path.abspath(path).rstrip("/"))
    if base.isdigit() or base == BEST_DIR:
        try:
            check_committed(os.path.join(directory, str(step)))
            return restore_params(directory, step)
        except Exception as e:  # noqa: BLE001 - any failure to read is reported in one line
            raise CheckpointError(f"checkpoint {os.path.join(directory, str(step))} does not restore "
                                  f"({describe_error(e)}); give its workdir to read the newest step that does, or "
                                  "another step directory") from None
    failures = []
    for candidate in step_dirs(directory):
        try:
            check_committed(os.path.join(directory, str(candidate)))
            restored = restore_params(directory, candidate)
        except Exception as e:  # noqa: BLE001
            failures.append((candidate, describe_error(e)))
            log.warning("checkpoint step %d of %s does not restore (%s); trying the step before it", candidate,
                        directory, failures[-1][1])
            continue
        return restored
    raise CheckpointError(f"no checkpoint in {directory} restores ("
                          + "; ".join(f"step {s}: {w}" for s, w in failures) + ")")


def restore_config(path: str) -> dict:
    """The run config (JSON) saved with a training checkpoint: workdir, checkpoints/ or checkpoints/<step>."""
    directory, step = _resolve(path)
    return read_items(os.path.join(directory, str(step)), config=ocp.args.JsonRestore())["config"]
