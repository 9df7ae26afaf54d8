"""What eval.py does: `evaluate_checkpoint(config, checkpoint, out_dir)` (COCO AP, optionally speed and COCO-C).

The checkpoint defines the model (`weights.load_any`); `config.model` contributes only the fields that change how
it computes (`weights.RUNTIME_MODEL_FIELDS`), `config.eval` / `config.input` the protocol and the data.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import ml_collections

from yolos_jax import atomic, run_config, weights
from yolos_jax import config as config_lib
from yolos_jax.data import input_config
from yolos_jax.evaluation import Evaluator, check_label_map
from yolos_jax.robustness import run_robustness
from yolos_jax.speed import count_params, run_speed
from yolos_jax.yolos import YOLOS


def runtime_overrides(model_cfg: Optional[Mapping[str, Any]], checkpoint_cfg: Mapping[str, Any]) -> tuple[dict, list]:
    """(overrides, ignored): config.model's runtime fields to apply to a checkpoint's model, and the names of
    the other config.model fields whose values differ from the checkpoint's (the checkpoint's are used)."""
    if not model_cfg:
        return {}, []
    model_cfg = config_lib.sequence_fields_as_tuples(model_cfg.to_dict() if hasattr(model_cfg, "to_dict")
                                                     else dict(model_cfg))
    overrides = {k: model_cfg[k] for k in weights.RUNTIME_MODEL_FIELDS if k in model_cfg}
    ignored = sorted(k for k, v in model_cfg.items()
                     if k not in weights.RUNTIME_MODEL_FIELDS and k in checkpoint_cfg and checkpoint_cfg[k] != v)
    return overrides, ignored


def eval_size_note(input_cfg: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> Optional[str]:
    """One line when the checkpoint was made for another eval size than config.input's (the original's args or
    HF's preprocessor at conversion, the run's config in training; `meta['eval_size']`, `meta['max_size']`), naming
    the overrides that score it as made (a converted YOLOS-Ti: 512, max 853, not yolos_s.py's 800); else None.
    config.input decides, as for every other eval setting: a size given on purpose is kept."""
    if not meta.get("eval_size"):
        return None
    made = (int(meta["eval_size"]), int(meta.get("max_size") or int(meta["eval_size"]) * 1333 // 800))
    used = (int(input_cfg.eval_size), input_config.eval_max_size(input_cfg))
    if made == used:
        return None
    return (f"note: evaluating at config.input's eval size {used[0]} (max {used[1]}); the checkpoint was made for "
            f"{made[0]} (max {made[1]}): --config.input.eval_size={made[0]} --config.input.eval_max_size={made[1]} "
            "scores it as made")


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str, out_dir: str, *, speed: bool = False,
                        robustness: bool = False, model_name: Optional[str] = None,
                        skip_clean: bool = False) -> dict:
    """What `eval.py` does: COCO evaluation of `checkpoint` on the val split of `config.input`.

    Writes out_dir/metrics.json (with the eval size and max size scored at) and out_dir/detections.json; with
    `speed` also out_dir/speed.json and the Tables 4-6 row; with `robustness` out_dir/robustness/... (COCO-C).
    The eval size is config.input's; a checkpoint made for another one is noted (`eval_size_note`). Returns
    {'metrics': ..., 'speed': ... | None, 'robustness': ... | None}.
    Raises ConfigError for a config.input / config.eval value that cannot work, before the checkpoint is read.
    """
    run_config.validate_data_configs(config)
    params, ckpt_cfg, meta = weights.load_any(checkpoint, require_detector=True)
    size_note = eval_size_note(config.input, meta)
    if size_note and jax.process_index() == 0:
        print(size_note, flush=True)
    overrides, ignored = runtime_overrides(config.get("model"), ckpt_cfg)
    model = YOLOS(**{**ckpt_cfg, **overrides})
    if ignored and jax.process_index() == 0:
        print(f"note: the checkpoint defines the model; config.model's {', '.join(ignored)} differ(s) from it and "
              f"is not used (only {', '.join(weights.RUNTIME_MODEL_FIELDS)} are taken from config.model)", flush=True)
    evaluator = Evaluator(config.eval, config.input, model)
    check_label_map(evaluator.label_map, model.num_classes, meta)
    trained_on = (meta.get("dataset") or {}).get("dataset_name")
    if trained_on and trained_on != config.input.dataset_name and jax.process_index() == 0:
        print(f"note: the checkpoint was trained on dataset '{trained_on}', this evaluates "
              f"'{config.input.dataset_name}' (same categories)", flush=True)
    params = evaluator.place(params)
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
