"""Training checkpoints with orbax `CheckpointManager`, and parameter loading for evaluation/inference.

A training checkpoint is `WORKDIR/checkpoints/<step>/` with four items:
  params/     the Flax params tree (StandardSave; restorable alone, which eval and inference do)
  train/      {'step', 'opt_state', 'rng'} (StandardSave)
  data/       the input iterator's position (JSON), so a resumed run sees the same batches
  config/     the full run config (JSON), so a checkpoint says what model it holds
Orbax writes each step into a temporary directory and renames it when complete, so a crash or SIGKILL in
the middle of a (possibly asynchronous) save never damages the previous checkpoints: restore always reads
the latest *finalised* step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from yolos_jax import config as config_lib

CHECKPOINT_SUBDIR = "checkpoints"
CONVERTED_MARKER = "yolos_jax.json"


def default_checkpoint_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            every_steps=1000,  # periodic save interval (also saved at the end and on SIGTERM/SIGINT)
            keep=3,  # keep the last k checkpoints
            async_save=True,  # write in a background thread while training continues
        )
    )


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
            self.directory, options=options, item_names=("params", "train", "data", "config")
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict, config: Any) -> None:
        """Starts saving `state` at `step` (returns before the write ends when async)."""
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                train=ocp.args.StandardSave(
                    {"step": state["step"], "opt_state": state["opt_state"], "rng": state["rng"]}
                ),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(_config_to_json(config)),
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


def find_checkpoint(path: str) -> tuple[str, Optional[int]]:
    """Resolves `path` to ('converted', None) or ('training', step) with the checkpoint directory.

    Accepts a converted-weights directory, a training workdir (its latest step), the workdir's
    `checkpoints/` directory, or one `checkpoints/<step>` directory.
    """
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, CONVERTED_MARKER)):
        return path, None
    candidates = [os.path.join(path, CHECKPOINT_SUBDIR), path]
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
        return os.path.dirname(path), int(base)
    for directory in candidates:
        if os.path.isdir(directory):
            steps = [int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d, "params"))]
            if steps:
                return directory, max(steps)
    raise FileNotFoundError(
        f"no checkpoint found at {path}: expected a converted-weights directory (with {CONVERTED_MARKER}; "
        "create one with convert_torch_weights.py --source=... --output=DIR), "
        f"a training workdir (with {CHECKPOINT_SUBDIR}/<step>/), or a checkpoint step directory"
    )


def workdir_of(path: str) -> Optional[str]:
    """The training workdir a checkpoint path (workdir, its checkpoints/, or checkpoints/<step>) belongs to;
    None for converted checkpoints."""
    directory, step = find_checkpoint(path)
    if step is None or os.path.basename(directory) != CHECKPOINT_SUBDIR:
        return None
    return os.path.dirname(directory)


def load_params(path: str) -> tuple[Any, dict]:
    """Loads (params, model_config dict) from a converted directory or a training checkpoint.

    Only the parameters are read (not the optimiser state); arrays come back on the default device.
    """
    params, model_cfg, _ = load_params_and_meta(path)
    return params, model_cfg


def load_params_and_meta(path: str) -> tuple[Any, dict, dict]:
    """(params, model_config, meta) where meta has 'kind', 'eval_size', 'max_size', 'label_names', 'step'; for
    training checkpoints also 'label_map' (a `LabelMap.to_dict()`, None before it was recorded) and 'dataset'
    (the run's input.dataset_name, data_dir, label_mode, val_split)."""
    directory, step = find_checkpoint(path)
    if step is None:
        from yolos_jax import convert  # converted weights: format owned by the converter

        return convert.load_params_dir(directory)
    manager = ocp.CheckpointManager(directory, item_names=("params", "train", "data", "config"))
    restored = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(), config=ocp.args.JsonRestore())
    )
    manager.close()
    params = restored["params"]
    config = restored["config"]
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
        "label_names": config.get("label_names"),
        "label_map": config.get("label_map"),
        "dataset": {k: input_cfg.get(k) for k in ("dataset_name", "data_dir", "label_mode", "val_split")},
    }
    return params, model_cfg, meta


def restore_config(path: str) -> dict:
    """The run config (JSON) saved with a training checkpoint: workdir, checkpoints/ or checkpoints/<step>."""
    directory, step = find_checkpoint(path)
    if step is None:
        raise ValueError(f"{path} is a converted checkpoint, not a training one")
    manager = ocp.CheckpointManager(directory, item_names=("params", "train", "data", "config"))
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    manager.close()
    return restored["config"]


def restore_data_state(path: str) -> dict:
    directory, step = find_checkpoint(path)
    manager = ocp.CheckpointManager(directory, item_names=("params", "train", "data", "config"))
    restored = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    manager.close()
    return restored["data"]


def host_local(tree: Any) -> Any:
    """Fully addressable numpy copy of a (replicated or sharded) pytree, for logging and tests."""
    return jax.tree.map(lambda x: jax.device_get(x), tree)
