"""Training checkpoints with orbax `CheckpointManager`: save, resume, and reading a step's params and config.

A training checkpoint is `WORKDIR/checkpoints/<step>/` with five items:
  params/     the Flax params tree (StandardSave; restorable alone, which eval and inference do)
  train/      {'step', 'opt_state', 'rng'} (StandardSave)
  data/       the input iterator's position (JSON), so a resumed run sees the same batches
  config/     the full run config (JSON), so a checkpoint says what model it holds
  meta/       the run's metadata (JSON): 'label_names' (class names by label) and 'label_map' (a
              `LabelMap.to_dict()` of the dataset). Checkpoints written before it existed have no meta/ item and
              hold both in config/ instead; `restore_params` reads either.
Orbax writes each step into a temporary directory and renames it when complete, so a crash or SIGKILL in
the middle of a (possibly asynchronous) save never damages the previous checkpoints: restore always reads
the latest *finalised* step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import ml_collections
import orbax.checkpoint as ocp

from yolos_jax import config as config_lib

CHECKPOINT_SUBDIR = "checkpoints"
ITEM_NAMES = ("params", "train", "data", "config", "meta")
META_KEYS = ("label_names", "label_map")  # the run metadata; older checkpoints hold them in config/


def default_checkpoint_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            every_steps=1000,  # periodic save interval (also saved at the end and on SIGTERM/SIGINT)
            keep=3,  # keep the last k checkpoints
            async_save=True,  # write in a background thread while training continues
        )
    )


def validate_checkpoint_config(ckpt_cfg: ml_collections.ConfigDict) -> None:
    """Checks `config.checkpoint`; raises ValueError naming the field."""
    if ckpt_cfg.every_steps <= 0 or ckpt_cfg.keep <= 0:
        raise ValueError("config.checkpoint.every_steps: every_steps and keep must be > 0")


def _config_to_json(config: Any) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return config


class Checkpointer:
    """Periodic, asynchronous, keep-last-k checkpoints of one training run."""

    def __init__(self, workdir: str, ckpt_cfg: ml_collections.ConfigDict):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(ckpt_cfg.keep),
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=ITEM_NAMES
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict, config: Any, meta: Optional[dict] = None) -> None:
        """Starts saving `state` at `step` (returns before the write ends when async).

        data_state: the input iterator's `get_state()`; config: the run config (ConfigDict or JSON dict);
        meta: the run metadata (`META_KEYS`, JSON-serialisable), {} when None."""
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                train=ocp.args.StandardSave(
                    {"step": state["step"], "opt_state": state["opt_state"], "rng": state["rng"]}
                ),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(_config_to_json(config)),
                meta=ocp.args.JsonSave(dict(meta or {})),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """Restores (state, data_state) at `step` onto the shardings carried by `abstract_state`."""
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state["params"]),
                train=ocp.args.StandardRestore(
                    {
                        "step": abstract_state["step"],
                        "opt_state": abstract_state["opt_state"],
                        "rng": abstract_state["rng"],
                    }
                ),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = {"params": restored["params"], **restored["train"]}
        return state, restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def find_step(path: str) -> Optional[tuple[str, int]]:
    """(checkpoints directory, step) of a training checkpoint path: a workdir (its latest finalised step), its
    `checkpoints/` directory or one `checkpoints/<step>` directory; None if `path` holds none (converted
    directories are `weights`' to resolve)."""
    path = os.path.abspath(path)
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
        return os.path.dirname(path), int(base)
    for directory in (os.path.join(path, CHECKPOINT_SUBDIR), path):
        if os.path.isdir(directory):
            steps = [int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d, "params"))]
            if steps:
                return directory, max(steps)
    return None


def _resolve(path: str) -> tuple[str, int]:
    found = find_step(path)
    if found is None:
        raise FileNotFoundError(f"no training checkpoint at {path}: expected a workdir (with {CHECKPOINT_SUBDIR}/<step>/), "
                                "its checkpoints/ directory or one checkpoint step directory")
    return found


def restore_params(directory: str, step: int) -> tuple[Any, dict, dict]:
    """(params, model_config, meta) of the training checkpoint `directory`/`step` (see `find_step`); only the
    parameters and the run config are read (not the optimiser state), the arrays land on the default device.

    meta: 'kind' ('detector'), 'step', 'eval_size', 'max_size' (None when uncapped), 'label_names', 'label_map'
    (a `LabelMap.to_dict()`, None before it was recorded; from the meta/ item, or config/ in older checkpoints) and 'dataset' (the run's input.dataset_name,
    data_dir, label_mode, val_split). `weights.load_any` is the loader of every checkpoint kind.
    """
    manager = ocp.CheckpointManager(directory, item_names=ITEM_NAMES)
    items = dict(params=ocp.args.StandardRestore(), config=ocp.args.JsonRestore())
    if os.path.isdir(os.path.join(directory, str(step), "meta")):
        items["meta"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    manager.close()
    params = restored["params"]
    config = restored["config"]
    run_meta = restored["meta"] if "meta" in items else {k: config.get(k) for k in META_KEYS}
    if "model" not in config:
        raise ValueError(f"checkpoint {directory}/{step} holds no model config (config/model missing)")
    model_cfg = config_lib.sequence_fields_as_tuples(config["model"])  # JSON turned tuples into lists
    input_cfg = config.get("input", {})
    eval_max = input_cfg.get("eval_max_size", -1)
    meta = {
        "kind": "detector",
        "step": step,
        "eval_size": input_cfg.get("eval_size"),
        "max_size": eval_max if eval_max and eval_max > 0 else None,
        "label_names": run_meta.get("label_names"),
        "label_map": run_meta.get("label_map"),
        "dataset": {k: input_cfg.get(k) for k in ("dataset_name", "data_dir", "label_mode", "val_split")},
    }
    return params, model_cfg, meta


def restore_config(path: str) -> dict:
    """The run config (JSON) saved with a training checkpoint: workdir, checkpoints/ or checkpoints/<step>."""
    directory, step = _resolve(path)
    manager = ocp.CheckpointManager(directory, item_names=ITEM_NAMES)
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    manager.close()
    return restored["config"]
