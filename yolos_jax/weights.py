"""The weights format: converted-checkpoint directories, and the one loader of every checkpoint kind.

Converted-checkpoint directory (written by `convert_torch_weights.py` through `save_params_dir`):
  DIR/yolos_jax.json  {"format": "yolos_jax.params", "version": 1, "kind": "backbone"|"detector",
                       "model": {YOLOS keyword arguments}, "source": ..., "source_format": ...,
                       "variant": ..., "eval_size": ..., "label_names": [...] | null, "notes": [...]}
  DIR/params/         orbax StandardCheckpointer tree of float32 arrays (the Flax 'params' tree).
  kind 'detector' holds every parameter of `YOLOS` (position embeddings on the source's own grid);
  kind 'backbone' only the ViT (patch_embed, cls_token, pos_embed_cls, pos_embed_patches, block_*,
  encoder_norm), which training starts from via `config.init_from` (`init_from.init_params_from`).

A training checkpoint (`checkpointing`: WORKDIR/checkpoints/<step>/{params,train,data,config}) holds the same
'params' tree and the run config. `load_any(path) -> (params, model_cfg, meta)` reads either; `Detector`,
eval.py, the figures and `config.init_from` all load through it (or, for init_from, `load_params_dir`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from yolos_jax import atomic, checkpoint_reading, checkpointing, sharding
from yolos_jax import config as config_lib
from yolos_jax.data import workdir_paths
from yolos_jax.errors import ConfigError, MissingInputError, UnusableInputError
from yolos_jax.yolos import YOLOS

FORMAT = "yolos_jax.params"
VERSION = 1
META_FILE = "yolos_jax.json"  # its presence marks a converted-checkpoint directory
PARAMS_DIR = "params"

# YOLOS fields that change how the model computes, not its parameters: a loaded checkpoint's model may take
# them from the config (eval, resume).
RUNTIME_MODEL_FIELDS = ("dtype", "attention_impl", "remat")

# Parameter-tree leaves (flattened with '/') that belong to the ViT backbone; everything else
# (det_tokens, pos_embed_det, mid_pos_embed_*, class_head, box_head) is detector-only.
BACKBONE_RE = re.compile(
    r"^(patch_embed/|cls_token$|pos_embed_cls$|pos_embed_patches$|block_\d+/|encoder_norm/)"
)


# --------------------------------------------------------------------------------------------------
# Parameter trees and model configs
# --------------------------------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def is_backbone_leaf(path: str) -> bool:
    """True for parameters of the ViT backbone (see `BACKBONE_RE`); `path` is '/'-joined."""
    return bool(BACKBONE_RE.match(path))


def model_cfg_dict(model_cfg: Any) -> dict[str, Any]:
    """`YOLOS` keyword arguments (dict, ConfigDict or the JSON of a checkpoint) as a plain dict with tuple
    sizes (hashable, comparable with `config.model`)."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return config_lib.sequence_fields_as_tuples(d)


def model_cfg_json(model_cfg: Any) -> dict[str, Any]:
    """`YOLOS` keyword arguments as JSON-ready values (tuples -> lists), as yolos_jax.json stores them."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_cfg_dict(model_cfg).items()}


def abstract_params(model: Any, image_hw: tuple[int, int], mesh: Any) -> Any:
    """`model`'s parameters as a ShapeDtypeStruct tree (no compute; they do not depend on image_hw), traced under
    `mesh` as every model trace is: splash attention's no-mesh fallback would warn otherwise."""
    dummy = jnp.zeros((1, *image_hw, 3), jnp.float32)
    return sharding.mesh_jit(lambda: model.init(jax.random.PRNGKey(0), dummy), mesh).eval_shape()["params"]


def expected_param_shapes(model_cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{'path': shape} of every parameter of `YOLOS(**model_cfg)`, from `jax.eval_shape` (no compute)."""
    cfg = model_cfg_dict(model_cfg)
    p = int(cfg.get("patch_size", 16))
    model = YOLOS(**cfg)
    shapes = abstract_params(model, (2 * p, 2 * p), sharding.single_device_mesh())
    return {k: tuple(v.shape) for k, v in flatten_params(shapes).items()}


# --------------------------------------------------------------------------------------------------
# The converted-checkpoint directory
# --------------------------------------------------------------------------------------------------


def save_params_dir(
    path: str,
    params: Mapping[str, Any],
    model_cfg: Mapping[str, Any],
    meta: Optional[Mapping[str, Any]] = None,
    *,
    overwrite: bool = False,
) -> None:
    """Writes a converted-checkpoint directory (module docstring) atomically: built beside `path` and renamed
    into place at the end, so a crash never leaves a partial directory (`atomic.atomic_directory`).

    params: the Flax 'params' tree (nested dict of arrays; stored as float32 numpy).
    model_cfg: `YOLOS` keyword arguments (dict or ConfigDict). meta: extra JSON fields; 'kind' defaults to
    'detector' when the tree has heads, else 'backbone'.
    """
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    info = dict(meta or {})
    info.setdefault("kind", "detector" if any(k.startswith("class_head/") for k in flat) else "backbone")
    info.update(format=FORMAT, version=VERSION, model=model_cfg_json(model_cfg))

    def build(tmp: str) -> None:
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), unflatten_params(flat))
            ckptr.wait_until_finished()
        finally:
            ckptr.close()  # on a failed write too: its background writes end before the directory is removed
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)

    atomic.atomic_directory(path, build, overwrite=overwrite)


def is_converted_dir(path: str) -> bool:
    """True if `path` is a converted-checkpoint directory (it holds yolos_jax.json)."""
    return os.path.isfile(os.path.join(path, META_FILE))


def load_params_dir(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Reads a converted-checkpoint directory.

    Returns (params: nested dict of float32 numpy arrays, model_cfg: `YOLOS` keyword arguments with
    tuple sizes, meta: the whole JSON, including 'kind').
    """
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise MissingInputError(
            f"{path} is not a converted checkpoint: {META_FILE} is missing (create one with "
            "convert_torch_weights.py --source=... --output=DIR)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UnusableInputError(
            f"{meta_path}: expected format {FORMAT!r} version {VERSION}, got {meta.get('format')!r} "
            f"version {meta.get('version')!r}; re-run convert_torch_weights.py"
        )
    ckpt = os.path.join(os.path.abspath(path), PARAMS_DIR)
    ckptr = ocp.StandardCheckpointer()
    md = ckptr.metadata(ckpt)
    tree_md = getattr(md, "item_metadata", md)
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree_md)
    params = ckptr.restore(ckpt, target)
    params = jax.tree.map(np.asarray, params)
    return dict(params), model_cfg_dict(meta["model"]), meta


# --------------------------------------------------------------------------------------------------
# Any checkpoint: converted directory or training run
# --------------------------------------------------------------------------------------------------


def find_checkpoint(path: str) -> tuple[str, Optional[Union[int, str]]]:
    """Resolves `path` to (directory, None) for a converted directory or (checkpoints directory, step) for a
    training checkpoint: a workdir (its latest step), its `checkpoints/` directory or one `checkpoints/<step>`.
    Raises FileNotFoundError naming what was expected."""
    path = os.path.abspath(path)
    if is_converted_dir(path):
        return path, None
    found = checkpoint_reading.find_step(path)
    if found is not None:
        return found
    missing = "" if os.path.exists(path) else " (the path does not exist)"
    raise MissingInputError(
        f"no checkpoint found at {path}{missing}: expected a converted-weights directory (with {META_FILE}; "
        "create one with convert_torch_weights.py --source=... --output=DIR), "
        f"a training workdir (with {checkpointing.CHECKPOINT_SUBDIR}/<step>/), or a checkpoint step directory"
    )


def workdir_of(path: str) -> Optional[str]:
    """The training workdir a checkpoint path (workdir, its checkpoints/, or checkpoints/<step>) belongs to;
    None for converted checkpoints. Raises FileNotFoundError if `path` holds no checkpoint."""
    directory, step = find_checkpoint(path)
    if step is None or os.path.basename(directory) != checkpointing.CHECKPOINT_SUBDIR:
        return None
    return os.path.dirname(directory)


def input_config_for_checkpoint(input_cfg: Any, checkpoint: str, workdir: Optional[str] = None) -> Any:
    """`data.resolve_input_config` for eval/inference/figures: '{workdir}' in the data paths (configs/demo.py) is
    `workdir`, else the training workdir that holds `checkpoint` (e.g. WORKDIR/checkpoints/800). Raises,
    before any data is generated, if `checkpoint` holds no checkpoint or no workdir is known."""
    found = workdir_of(checkpoint)  # FileNotFoundError naming the path if there is none
    if not workdir_paths.uses_workdir(input_cfg):
        return input_cfg
    workdir = workdir or found
    if workdir is None:
        raise ConfigError(
            f"config.input.data_dir={input_cfg.data_dir!r} / source_dir={input_cfg.source_dir!r} refer to "
            f"'{{workdir}}', and {checkpoint} is not inside a training workdir: set --config.input.data_dir and "
            "--config.input.source_dir to the dataset's folders (eval.py also takes --workdir=<the training workdir> "
            "in place of --checkpoint)")
    return workdir_paths.resolve_input_config(input_cfg, workdir)


def load_any(path: str, *, require_detector: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(params, model_cfg, meta) of any checkpoint: a converted directory, a training workdir (its newest
    step that restores), its checkpoints/ directory or one checkpoints/<step> directory.

    params: the Flax 'params' tree (host arrays; a training checkpoint's on the default device).
    model_cfg: `YOLOS` keyword arguments with tuple sizes.
    meta: a converted directory's yolos_jax.json (kind, eval_size, label_names, variant, ...), or what a
      training run recorded (`checkpoint_reading.restore_params`: kind 'detector', step, eval_size, max_size,
      label_names, label_map, dataset).
    require_detector: raise ValueError for a 'backbone' checkpoint (no detection heads).
    """
    directory, step = find_checkpoint(path)
    if step is None:
        params, model_cfg, meta = load_params_dir(directory)
    else:
        params, model_cfg, meta = checkpoint_reading.restore_params_from(path)  # skips a workdir's unrestorable steps
    if require_detector and meta.get("kind") not in (None, "detector"):
        raise UnusableInputError(
            f"{path} holds a {meta.get('kind')!r} checkpoint (no detection heads); a 'detector' one is needed: a "
            "converted trained YOLOS, or a training checkpoint (train one from it first with config.init_from)"
        )
    return params, model_cfg_dict(model_cfg), dict(meta)


def load_model(path: str, **model_overrides: Any) -> tuple[Any, YOLOS, dict]:
    """(params, YOLOS module, meta) of a detector checkpoint (see `load_any`); `model_overrides` may change
    `RUNTIME_MODEL_FIELDS`, which leave the parameters alone."""
    params, cfg, meta = load_any(path, require_detector=True)
    cfg.update(model_overrides)
    return params, YOLOS(**cfg), meta
