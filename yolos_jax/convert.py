"""PyTorch / HF checkpoints -> yolos_jax parameter trees, and the converted-checkpoint directory format.

Sources read by `convert(source, output, ...)` (the format is detected from the parameter names):

  'hf_yolos'        HF transformers `YolosForObjectDetection`: a `save_pretrained` folder, a
                    `model.safetensors` or a `pytorch_model.bin` (sharded folders too). `config.json` beside
                    the weights gives the model config; without it the shapes and `variant` do.
  'yolos_original'  hustvl/YOLOS detector checkpoints (`{'model': sd, 'args': Namespace, ...}` with
                    `backbone.*`, `class_embed.*`, `bbox_embed.*`); `args` gives init/mid PE sizes.
  'timm_vit'        timm-style ViT backbones: DeiT as Facebook released it (`{'model': sd}`, distilled ones
                    included), DINO (plain state dicts, or full checkpoints via their 'teacher'), MoCo v3
                    (`{'state_dict': ...}` with the `module.base_encoder.` prefix), MAE (`{'model': sd}`).

Two kinds of output, both in the converted-checkpoint directory format:

  kind 'detector'  every parameter of `YOLOS`, position embeddings kept on the source's own grid (the model
                   resizes by grid shape at run time, as HF does), for inference or fine-tuning;
  kind 'backbone'  only the ViT: patch_embed, cls_token, pos_embed_cls, pos_embed_patches (resized to the
                   variant's `init_pe_size` grid, as the original's `finetune_det`), block_*, encoder_norm.
                   Training starts from it via `config.init_from` -> `init_params_from`, which keeps fresh
                   [DET] tokens, det position embeddings, mid position embeddings and heads.

Converted-checkpoint directory:
  DIR/yolos_jax.json  {"format": "yolos_jax.params", "version": 1, "kind": "backbone"|"detector",
                       "model": {YOLOS keyword arguments}, "source": ..., "source_format": ...,
                       "variant": ..., "eval_size": ..., "label_names": [...] | null, "notes": [...]}
  DIR/params/         orbax StandardCheckpointer tree of float32 arrays (the Flax 'params' tree).

The weight surgery is numpy; torch is imported only to read .pth/.bin files (safetensors need no torch).
The number of attention heads is not visible in any weights: it comes from config.json (HF), the variant
or `model_overrides` (e.g. MoCo v3's ViT-S has 12 heads where DeiT-S has 6). Writes are atomic: the directory
is built beside DIR and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from yolos_jax import atomic
from yolos_jax import config as config_lib
from yolos_jax import vit

FORMAT = "yolos_jax.params"
VERSION = 1
META_FILE = "yolos_jax.json"
PARAMS_DIR = "params"

# The original's eval sizes (README): YOLOS-Ti is evaluated at shortest side 512, the others at 800.
DEFAULT_EVAL_SIZE = {"ti": 512}
_FALLBACK_EVAL_SIZE = 800

# hustvl/YOLOS `--backbone_name` -> our variant.
_ORIGINAL_BACKBONES = {"tiny": "ti", "small": "s", "base": "b", "small_dWr": "s_dWr", "small_dwr": "s_dwr"}

# Parameter-tree leaves (flattened with '/') that belong to the ViT backbone; everything else
# (det_tokens, pos_embed_det, mid_pos_embed_*, class_head, box_head) is detector-only.
_BACKBONE_RE = re.compile(
    r"^(patch_embed/|cls_token$|pos_embed_cls$|pos_embed_patches$|block_\d+/|encoder_norm/)"
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what is wrong and what to do."""


# --------------------------------------------------------------------------------------------------
# Tree helpers
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


def _is_rel_pos_leaf(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ("rel_pos_h", "rel_pos_w")


def _is_option_leaf(path: str) -> bool:
    """Parameters that only the ViT-detection options add (issue 7): absent from a plain ViT checkpoint,
    so they start fresh (rel-pos tables are zero-initialised; ConvStem and adapter are random)."""
    return _is_rel_pos_leaf(path) or path.startswith(("conv_stem/", "adapter/"))


def is_backbone_leaf(path: str) -> bool:
    """True for parameters of the ViT backbone (see `_BACKBONE_RE`)."""
    return bool(_BACKBONE_RE.match(path))


def _grid(size_hw: Sequence[int], patch: int) -> tuple[int, int]:
    return int(size_hw[0]) // patch, int(size_hw[1]) // patch


def _cfg_dict(model_cfg: Any) -> dict[str, Any]:
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    return config_lib.sequence_fields_as_tuples(d)


def expected_param_shapes(model_cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{'path': shape} of every parameter of `YOLOS(**model_cfg)`, from `jax.eval_shape` (no compute)."""
    import jax
    import jax.numpy as jnp

    from yolos_jax.yolos import YOLOS

    cfg = _cfg_dict(model_cfg)
    p = int(cfg.get("patch_size", 16))
    model = YOLOS(**cfg)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2 * p, 2 * p, 3), jnp.float32))
    )
    return {k: tuple(v.shape) for k, v in flatten_params(shapes["params"]).items()}


# --------------------------------------------------------------------------------------------------
# The converted-checkpoint directory
# --------------------------------------------------------------------------------------------------


def _json_model_cfg(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    d = _cfg_dict(model_cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def save_params_dir(
    path: str,
    params: Mapping[str, Any],
    model_cfg: Mapping[str, Any],
    meta: Optional[Mapping[str, Any]] = None,
    *,
    overwrite: bool = False,
) -> None:
    """Writes a converted-checkpoint directory (module docstring) atomically.

    params: the Flax 'params' tree (nested dict of arrays; stored as float32 numpy).
    model_cfg: `YOLOS` keyword arguments (dict or ConfigDict). meta: extra JSON fields; 'kind' defaults to
    'detector' when the tree has heads, else 'backbone'.
    """
    import orbax.checkpoint as ocp

    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    info = dict(meta or {})
    info.setdefault("kind", "detector" if any(k.startswith("class_head/") for k in flat) else "backbone")
    info.update(format=FORMAT, version=VERSION, model=_json_model_cfg(model_cfg))

    def build(tmp: str) -> None:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), unflatten_params(flat))
        ckptr.wait_until_finished()
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)

    atomic.atomic_directory(path, build, overwrite=overwrite)


def load_params_dir(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Reads a converted-checkpoint directory.

    Returns (params: nested dict of float32 numpy arrays, model_cfg: `YOLOS` keyword arguments with
    tuple sizes, meta: the whole JSON, including 'kind').
    """
    import jax
    import orbax.checkpoint as ocp

    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{path} is not a converted checkpoint: {META_FILE} is missing (create one with "
            "convert_torch_weights.py --source=... --output=DIR)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
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
    return dict(params), _cfg_dict(meta["model"]), meta


# --------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """A flat state dict and what came with it."""

    path: str
    state: dict[str, np.ndarray]
    hf_config: Optional[dict[str, Any]] = None  # config.json beside HF weights
    hf_preprocessor: Optional[dict[str, Any]] = None  # preprocessor_config.json beside HF weights
    args: Optional[dict[str, Any]] = None  # hustvl/YOLOS training args
    wrapper: str = ""  # which top-level entry held the state dict ('model', 'state_dict', 'teacher', '')


def _to_numpy(name: str, value: Any, path: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ConversionError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")


def _torch_load(path: str) -> Any:
    try:
        import torch
    except ImportError as e:  # torch is only needed for .pth/.bin sources
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch, or `pip install -e .[torch]`); "
            "safetensors files convert without it"
        ) from e
    import argparse
    import pickle

    # weights_only=True: no arbitrary code runs while unpickling. hustvl/YOLOS checkpoints also carry
    # their argparse.Namespace of training args, which we allow explicitly.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            text = str(e) or type(e).__name__
            # torch wraps every unpickling failure as "Weights only load failed"; an object it refuses is named
            # on an "Unsupported global" line, anything else (HTML page, git-lfs pointer, truncation) is corrupt.
            refused = [line.strip() for line in text.splitlines() if "Unsupported global" in line]
            if isinstance(e, pickle.UnpicklingError) and refused:
                raise ConversionError(
                    f"{path}: torch.load(weights_only=True) refused an object in it ({refused[0][:300]}). "
                    "Only checkpoints made of tensors, plain containers and argparse.Namespace are read."
                ) from e
            detail = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line
                           or "Unsupported operand" in line), text.splitlines()[0])
            raise ConversionError(f"{path}: cannot be read by torch.load ({type(e).__name__}: {detail[:200]}); the "
                                  "file is corrupt, truncated or not a PyTorch checkpoint (an HTML page or a git-lfs "
                                  "pointer?)") from e


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out
    except SafetensorError as e:  # a bad header or data that does not cover it
        raise ConversionError(f"{path}: not a readable safetensors file ({e}); it is corrupt or truncated "
                              "(download or copy it again)") from e
    except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy lacks
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConversionError(f"{path}: cannot read with numpy ({e}); install torch to read it") from e
        with safe_open(path, framework="pt") as f:
            return {k: _to_numpy(k, f.get_tensor(k), path) for k in f.keys()}


def _unwrap(obj: Any, path: str) -> tuple[dict[str, Any], str, Optional[dict[str, Any]]]:
    """A loaded .pth object -> (state dict, wrapper key, training args)."""
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"{path}: expected a dict (a state dict or a checkpoint), got {type(obj).__name__}"
        )
    args = obj.get("args")
    if args is not None and not isinstance(args, Mapping):
        args = vars(args) if hasattr(args, "__dict__") else None
    for key in ("model", "state_dict", "teacher", "model_state", "module"):
        if isinstance(obj.get(key), Mapping):
            return dict(obj[key]), key, args
    if all(hasattr(v, "shape") for v in obj.values()):
        return dict(obj), "", None
    raise ConversionError(
        f"{path}: cannot find the state dict; top-level keys are {sorted(obj)[:20]}. Expected a state dict "
        "or a checkpoint with 'model', 'state_dict' (MoCo v3) or 'teacher' (DINO)."
    )


def _read_json(path: str) -> Optional[dict[str, Any]]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_checkpoint(path: str) -> _Source:
    """Reads a checkpoint file or HF folder into a flat {name: float32 numpy array} state dict."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    files: list[str] = []
    if os.path.isdir(path):
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index = _read_json(os.path.join(path, index_name))
            if index is not None:
                files = sorted({os.path.join(path, f) for f in index["weight_map"].values()})
                break
            if os.path.isfile(os.path.join(path, single)):
                files = [os.path.join(path, single)]
                break
        if not files:
            raise ConversionError(
                f"{path}: folder without model.safetensors or pytorch_model.bin (expected a HF save_pretrained "
                "folder); pass the checkpoint file itself for other formats"
            )
    else:
        files = [path]

    state: dict[str, np.ndarray] = {}
    wrapper, args = "", None
    for f in files:
        if f.endswith(".safetensors"):
            part = _load_safetensors(f)
        else:
            raw, wrapper, args = _unwrap(_torch_load(f), f)
            part = {k: _to_numpy(k, v, f) for k, v in raw.items()}
        state.update(part)
    state = {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v) for k, v in state.items()}
    return _Source(
        path=path,
        state=state,
        hf_config=_read_json(os.path.join(folder, "config.json")),
        hf_preprocessor=_read_json(os.path.join(folder, "preprocessor_config.json")),
        args=args,
        wrapper=wrapper,
    )


def detect_format(keys: Iterable[str]) -> str:
    """'hf_yolos' | 'yolos_original' | 'timm_vit' from the parameter names."""
    keys = set(keys)
    if any(re.fullmatch(r"(vit\.)?embeddings\.detection_tokens", k) for k in keys):
        return "hf_yolos"
    if "backbone.det_token" in keys or any(k.startswith("class_embed.") for k in keys):
        return "yolos_original"
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "timm_vit"
    if any(re.fullmatch(r"((vit|deit)\.)?embeddings\.patch_embeddings\.projection\.weight", k) for k in keys):
        return "hf_vit"
    sample = sorted(keys)[:12]
    raise ConversionError(
        "unrecognised checkpoint: no HF YOLOS, hustvl/YOLOS, timm ViT (.pth) or HF ViT/DeiT (save_pretrained) "
        f"parameter names (first keys: {sample})"
    )


# --------------------------------------------------------------------------------------------------
# Key bookkeeping: collect every missing / mis-shaped / unknown key before failing
# --------------------------------------------------------------------------------------------------


class _Reader:
    """Hands out state-dict entries by name, recording what is missing, mis-shaped or left over."""

    def __init__(self, state: Mapping[str, np.ndarray], path: str):
        self.state = state
        self.path = path
        self.used: set[str] = set()
        self.ignored: set[str] = set()
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.state

    def get(self, key: str, shape: Sequence[Optional[int]], what: str = "") -> np.ndarray:
        """The entry `key`, checked against `shape` (None = any size). Missing/mis-shaped -> zeros."""
        if key not in self.state:
            self.missing.append(key)
            return np.zeros([s or 1 for s in shape], np.float32)
        self.used.add(key)
        value = self.state[key]
        ok = value.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, value.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            self.misshaped.append(f"{key}: {list(value.shape)}, expected {want}{' ' + what if what else ''}")
            return np.zeros([s or 1 for s in shape], np.float32)
        return value

    def ignore(self, predicate: Callable[[str], bool]) -> None:
        self.ignored.update(k for k in self.state if predicate(k) and k not in self.used)

    def unknown(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and k not in self.ignored)

    def check(self, context: str) -> None:
        problems = []
        if self.missing:
            problems.append(f"missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.misshaped:
            problems.append(f"mis-shaped keys ({len(self.misshaped)}): " + "; ".join(self.misshaped))
        unknown = self.unknown()
        if unknown:
            problems.append(f"unknown keys ({len(unknown)}): " + ", ".join(unknown))
        if problems:
            raise ConversionError(f"{self.path} ({context}):\n  " + "\n  ".join(problems))


def _linear(r: _Reader, prefix: str, d_in: int, d_out: int) -> dict[str, np.ndarray]:
    """PyTorch Linear [out, in] -> Flax Dense kernel [in, out]."""
    return {
        "kernel": r.get(prefix + ".weight", (d_out, d_in)).T,
        "bias": r.get(prefix + ".bias", (d_out,)),
    }


def _layernorm(r: _Reader, prefix: str, d: int) -> dict[str, np.ndarray]:
    return {"scale": r.get(prefix + ".weight", (d,)), "bias": r.get(prefix + ".bias", (d,))}


def _patch_embed(r: _Reader, key: str, d: int, p: int) -> dict[str, np.ndarray]:
    """Conv2d weight [D, 3, p, p] -> Flax Conv kernel [p, p, 3, D]."""
    w = r.get(key + ".weight", (d, 3, p, p))
    return {"proj": {"kernel": w.transpose(2, 3, 1, 0), "bias": r.get(key + ".bias", (d,))}}


def _heads(r: _Reader, cls_prefix: str, box_prefix: str, d: int, num_classes: int) -> dict[str, Any]:
    out = {}
    for name, prefix, d_out in (("class_head", cls_prefix, num_classes + 1), ("box_head", box_prefix, 4)):
        out[name] = {
            f"layers_{j}": _linear(r, f"{prefix}.layers.{j}", d, d if j < 2 else d_out) for j in range(3)
        }
    return out


def _timm_blocks(r: _Reader, prefix: str, depth: int, d: int, mlp: int) -> dict[str, Any]:
    """timm `blocks.{i}.*` (fused qkv, [3D, D] rows ordered q|k|v) -> our block_{i} trees."""
    out = {}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        out[f"block_{i}"] = {
            "norm1": _layernorm(r, b + "norm1", d),
            "attn": {"qkv": _linear(r, b + "attn.qkv", d, 3 * d), "proj": _linear(r, b + "attn.proj", d, d)},
            "norm2": _layernorm(r, b + "norm2", d),
            "mlp": {"fc1": _linear(r, b + "mlp.fc1", d, mlp), "fc2": _linear(r, b + "mlp.fc2", mlp, d)},
        }
    return out


def _hf_blocks(r: _Reader, depth: int, d: int, mlp: int) -> dict[str, Any]:
    """HF `vit.encoder.layer.{i}.*` (separate q, k, v) -> our block_{i} trees (fused qkv kernel [D, 3D])."""
    out = {}
    for i in range(depth):
        b = f"vit.encoder.layer.{i}."
        q, k, v = (_linear(r, f"{b}attention.attention.{n}", d, d) for n in ("query", "key", "value"))
        out[f"block_{i}"] = {
            "norm1": _layernorm(r, b + "layernorm_before", d),
            "attn": {
                "qkv": {
                    "kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                    "bias": np.concatenate([q["bias"], k["bias"], v["bias"]]),
                },
                "proj": _linear(r, b + "attention.output.dense", d, d),
            },
            "norm2": _layernorm(r, b + "layernorm_after", d),
            "mlp": {
                "fc1": _linear(r, b + "intermediate.dense", d, mlp),
                "fc2": _linear(r, b + "output.dense", mlp, d),
            },
        }
    return out


def _count_blocks(keys: Iterable[str], pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    return max(idx) + 1 if idx else 0


def _split_pos_embed(pe: np.ndarray, grid: tuple[int, int], q: int) -> dict[str, np.ndarray]:
    """[..., 1 + gh*gw + q, D] (cls | patches row-major | det) -> our split position embeddings."""
    gh, gw = grid
    n = gh * gw
    lead = pe.shape[:-2]
    return {
        "cls": pe[..., :1, :],
        "patches": pe[..., 1 : 1 + n, :].reshape(*lead, gh, gw, pe.shape[-1]),
        "det": pe[..., 1 + n :, :],
    }


# --------------------------------------------------------------------------------------------------
# Model configuration
# --------------------------------------------------------------------------------------------------


def infer_variant(hidden_size: int, depth: int) -> str:
    """The `MODEL_VARIANTS` entry with this embed dim and depth; a clear error if none or several."""
    matches = [
        name
        for name, v in config_lib.MODEL_VARIANTS.items()
        if v["hidden_size"] == hidden_size and v["depth"] == depth
    ]
    if len(matches) == 1:
        return matches[0]
    table = ", ".join(f"{n}: {v['hidden_size']}/{v['depth']}" for n, v in config_lib.MODEL_VARIANTS.items())
    if not matches:
        raise ConversionError(
            f"no model variant has embed dim {hidden_size} and depth {depth} (known: {table}); pass "
            "--variant=NAME and the overrides that describe this model"
        )
    raise ConversionError(
        f"embed dim {hidden_size} and depth {depth} match several variants {matches}; pass --variant=NAME"
    )


def _base_config(
    variant: Optional[str], hidden: int, depth: int, overrides: Mapping[str, Any]
) -> tuple[dict, Optional[str]]:
    """Model config from --variant (or the one inferred from the shapes) plus overrides."""
    if variant is None and not {"hidden_size", "depth", "num_heads"} <= set(overrides):
        variant = infer_variant(hidden, depth)
    base = config_lib.model_config(variant or "s").to_dict()
    base.update(overrides)
    return _cfg_dict(base), variant


def _check_dims(cfg: Mapping[str, Any], hidden: int, depth: int, path: str) -> None:
    if cfg["hidden_size"] != hidden or cfg["depth"] != depth:
        raise ConversionError(
            f"{path}: the checkpoint has embed dim {hidden} and depth {depth}, but the model config says "
            f"{cfg['hidden_size']} and {cfg['depth']}; fix --variant (or the overrides)"
        )


def _grid_for_tokens(
    n: int, candidates: Sequence[Optional[Sequence[int]]], patch: int, what: str, path: str
) -> tuple[int, int]:
    """The (gh, gw) among candidate pixel sizes whose grid holds n patches."""
    tried = []
    for size in candidates:
        if size is None:
            continue
        g = _grid(size, patch)
        if g[0] * g[1] == n:
            return g
        tried.append(f"{tuple(size)} -> {g[0]}x{g[1]}")
    raise ConversionError(
        f"{path}: {what} holds {n} patch positions, which fits none of the grids tried "
        f"({'; '.join(tried) or 'none'}). "
        "The grid cannot be told from a token count alone; pass --source_pe_size=H,W (pixels) or --variant"
    )


def _mlp_dim(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("mlp_dim") or 4 * cfg["hidden_size"])


# --------------------------------------------------------------------------------------------------
# The three source formats
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Converted:
    """A converted parameter tree with its config and metadata."""

    params: dict[str, Any]
    model_cfg: dict[str, Any]
    kind: str
    meta: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _DetectorNames:
    """Where a detector format keeps each piece (prefixes of PyTorch names)."""

    patch: str
    cls: str
    det: str
    pos: str  # [1, 1 + N + Q, D]: cls | patches (row-major) | det
    mids: tuple[str, ...]  # [L - 1, 1, 1 + N + Q, D], first present name wins
    norm: str
    class_head: str
    box_head: str
    blocks: Callable[[_Reader, int, int, int], dict[str, Any]]


_HF_NAMES = _DetectorNames(
    patch="vit.embeddings.patch_embeddings.projection",
    cls="vit.embeddings.cls_token",
    det="vit.embeddings.detection_tokens",
    pos="vit.embeddings.position_embeddings",
    # Files use encoder.mid_position_embeddings; transformers >= 5 names it
    # encoder.interpolation.mid_position_embeddings in memory (and in its own state_dict()).
    mids=("vit.encoder.mid_position_embeddings", "vit.encoder.interpolation.mid_position_embeddings"),
    norm="vit.layernorm",
    class_head="class_labels_classifier",
    box_head="bbox_predictor",
    blocks=_hf_blocks,
)
_ORIGINAL_NAMES = _DetectorNames(
    patch="backbone.patch_embed.proj",
    cls="backbone.cls_token",
    det="backbone.det_token",
    pos="backbone.pos_embed",
    mids=("backbone.mid_pos_embed",),
    norm="backbone.norm",
    class_head="class_embed",
    box_head="bbox_embed",
    blocks=lambda r, depth, d, mlp: _timm_blocks(r, "backbone.", depth, d, mlp),
)


def _mid_key(st: Mapping[str, np.ndarray], names: _DetectorNames) -> Optional[str]:
    return next((k for k in names.mids if k in st), None)


def _stored_size(
    st: Mapping[str, np.ndarray], key: Optional[str], q: int, candidates: Sequence[Any], p: int, path: str
) -> Optional[tuple[int, int]]:
    """The (H, W) pixel size among `candidates` whose patch grid holds the position embeddings of `key`
    ([..., 1 + N + Q, D]); None when the entry is absent or malformed (the reader reports it)."""
    if key is None or key not in st or st[key].ndim < 3:
        return None
    n = st[key].shape[-2] - 1 - q
    grid = _grid_for_tokens(n, candidates, p, key, path)
    return next(tuple(int(v) for v in s) for s in candidates if s is not None and _grid(s, p) == grid)


def _detector_tree(r: _Reader, names: _DetectorNames, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The full YOLOS tree of a detector checkpoint, position embeddings on the stored grids
    (cfg['init_pe_size'] / cfg['mid_pe_size'])."""
    d, p, q, depth = cfg["hidden_size"], cfg["patch_size"], cfg["num_det_tokens"], cfg["depth"]
    grid = _grid(cfg["init_pe_size"], p)
    params: dict[str, Any] = {
        "patch_embed": _patch_embed(r, names.patch, d, p),
        "cls_token": r.get(names.cls, (1, 1, d)),
        "det_tokens": r.get(names.det, (1, q, d)),
    }
    pe = _split_pos_embed(r.get(names.pos, (1, 1 + grid[0] * grid[1] + q, d)), grid, q)
    params.update(pos_embed_cls=pe["cls"], pos_embed_patches=pe["patches"], pos_embed_det=pe["det"])
    if cfg["mid_pe_size"] is not None:
        mgrid = _grid(cfg["mid_pe_size"], p)
        key = _mid_key(r.state, names) or names.mids[0]
        mid = _split_pos_embed(r.get(key, (depth - 1, 1, 1 + mgrid[0] * mgrid[1] + q, d))[:, 0], mgrid, q)
        params.update(
            mid_pos_embed_cls=mid["cls"], mid_pos_embed_patches=mid["patches"], mid_pos_embed_det=mid["det"]
        )
    params.update(names.blocks(r, depth, d, _mlp_dim(cfg)))
    params["encoder_norm"] = _layernorm(r, names.norm, d)
    params.update(_heads(r, names.class_head, names.box_head, d, cfg["num_classes"]))
    return params


def _hf_config_fields(hc: Mapping[str, Any], path: str) -> dict[str, Any]:
    """HF YolosConfig (config.json) -> YOLOS fields. HF keeps the mid PEs on `image_size` too."""
    if hc.get("model_type") not in (None, "yolos"):
        raise ConversionError(f"{path}: config.json has model_type {hc.get('model_type')!r}, expected 'yolos'")
    if hc.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"{path}: hidden_act {hc['hidden_act']!r} is unsupported (exact GELU only)")
    size = hc.get("image_size", [512, 864])
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    fields = dict(
        hidden_size=hc.get("hidden_size", 768),
        depth=hc.get("num_hidden_layers", 12),
        num_heads=hc.get("num_attention_heads", 12),
        mlp_dim=hc.get("intermediate_size", 3072),
        patch_size=hc.get("patch_size", 16),
        num_det_tokens=hc.get("num_detection_tokens", 100),
        init_pe_size=size,
        mid_pe_size=size if hc.get("use_mid_position_embeddings", True) else None,
        layer_norm_eps=hc.get("layer_norm_eps", 1e-12),
        qkv_bias=hc.get("qkv_bias", True),
    )
    id2label = hc.get("id2label")
    if id2label or hc.get("num_labels") is not None:
        fields["num_classes"] = len(id2label) if id2label else int(hc["num_labels"])
    return fields


def _convert_hf(
    src: _Source, variant: Optional[str], overrides: Mapping[str, Any], source_pe_size: Optional[tuple]
) -> Converted:
    st = src.state
    if "embeddings.detection_tokens" in st:  # a YolosModel saved alone: no 'vit.' prefix
        top = ("embeddings.", "encoder.", "layernorm.", "pooler.")
        st = {("vit." + k if k.startswith(top) else k): v for k, v in st.items()}
    r = _Reader(st, src.path)
    names = _HF_NAMES
    hidden = st[names.cls].shape[-1] if names.cls in st else 0
    depth = _count_blocks(st, r"vit\.encoder\.layer\.(\d+)\.")
    notes, label_names = [], None
    if src.hf_config is not None:
        fields = _hf_config_fields(src.hf_config, src.path)
        if variant is None:
            try:
                variant = infer_variant(fields["hidden_size"], fields["depth"])
            except ConversionError:
                variant = None  # a custom size: config.json says everything anyway
        cfg = _cfg_dict({**config_lib.model_config(variant or "s").to_dict(), **fields, **overrides})
        if cfg["mlp_dim"] == 4 * cfg["hidden_size"]:
            cfg["mlp_dim"] = None
        id2label = src.hf_config.get("id2label") or {}
        if id2label:
            label_names = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))]
    else:
        # No config.json: the weights give the sizes; --variant (or the inferred one) and the overrides
        # the head count and the stored grid.
        cfg, variant = _base_config(variant, hidden, depth, overrides)
        cfg["layer_norm_eps"] = overrides.get("layer_norm_eps", 1e-12)  # HF's YolosConfig default
        if names.det in st:
            cfg["num_det_tokens"] = overrides.get("num_det_tokens", st[names.det].shape[1])
        if "class_labels_classifier.layers.2.weight" in st:
            n_cls = st["class_labels_classifier.layers.2.weight"].shape[0] - 1
            cfg["num_classes"] = overrides.get("num_classes", n_cls)
        if _mid_key(st, names) is None:
            cfg["mid_pe_size"] = None
        elif cfg["mid_pe_size"] is None:
            cfg["mid_pe_size"] = cfg["init_pe_size"]
        notes.append(
            f"no config.json: sizes from the weights, heads and grids from variant {variant!r} and the "
            "overrides, layer_norm_eps 1e-12 (HF's default)"
        )
    if source_pe_size is not None:
        cfg["init_pe_size"] = tuple(source_pe_size)
        if cfg["mid_pe_size"] is not None:
            cfg["mid_pe_size"] = tuple(source_pe_size)
    _check_dims(cfg, hidden, depth, src.path)
    # Validate that the stored token counts fit the grids (a clear error instead of a reshape failure).
    q, p = cfg["num_det_tokens"], cfg["patch_size"]
    _stored_size(st, names.pos, q, [cfg["init_pe_size"]], p, src.path)
    if cfg["mid_pe_size"] is not None:
        _stored_size(st, _mid_key(st, names), q, [cfg["mid_pe_size"]], p, src.path)
    params = _detector_tree(r, names, cfg)
    r.ignore(lambda k: k.startswith("vit.pooler."))  # YolosModel's pooler: unused by detection
    r.check("HF YOLOS")
    meta = dict(
        source_format="hf_yolos", variant=variant, label_names=label_names, notes=notes,
        eval_size=_hf_eval_size(src, variant),
    )
    return Converted(params, cfg, "detector", meta)


def _hf_eval_size(src: _Source, variant: Optional[str]) -> int:
    """preprocessor_config.json's shortest edge when present, else the original's eval size."""
    size = (src.hf_preprocessor or {}).get("size")
    if isinstance(size, Mapping) and size.get("shortest_edge"):
        return int(size["shortest_edge"])
    if isinstance(size, int):
        return size
    return DEFAULT_EVAL_SIZE.get(variant or "", _FALLBACK_EVAL_SIZE)


def _convert_original(
    src: _Source, variant: Optional[str], overrides: Mapping[str, Any], source_pe_size: Optional[tuple]
) -> Converted:
    st = src.state
    r = _Reader(st, src.path)
    names = _ORIGINAL_NAMES
    args = src.args or {}
    hidden = st[names.cls].shape[-1] if names.cls in st else 0
    depth = _count_blocks(st, r"backbone\.blocks\.(\d+)\.")
    if variant is None and args.get("backbone_name") in _ORIGINAL_BACKBONES:
        variant = _ORIGINAL_BACKBONES[args["backbone_name"]]
    cfg, variant = _base_config(variant, hidden, depth, overrides)
    _check_dims(cfg, hidden, depth, src.path)
    if names.det in st and "num_det_tokens" not in overrides:
        cfg["num_det_tokens"] = st[names.det].shape[1]
    if "class_embed.layers.2.weight" in st and "num_classes" not in overrides:
        cfg["num_classes"] = st["class_embed.layers.2.weight"].shape[0] - 1
    q, p = cfg["num_det_tokens"], cfg["patch_size"]
    # The stored grids: --source_pe_size, else the checkpoint's own args (its --init_pe_size /
    # --mid_pe_size), else the variant's sizes.
    init_size = _stored_size(
        st, names.pos, q, [source_pe_size, args.get("init_pe_size"), cfg["init_pe_size"]], p, src.path
    )
    if init_size is not None:
        cfg["init_pe_size"] = init_size
    mid_key = _mid_key(st, names)
    mid_candidates = [source_pe_size, args.get("mid_pe_size"), cfg["mid_pe_size"], cfg["init_pe_size"]]
    cfg["mid_pe_size"] = _stored_size(st, mid_key, q, mid_candidates, p, src.path) if mid_key else None
    params = _detector_tree(r, names, cfg)
    r.check("hustvl/YOLOS detector")
    eval_size = int(args.get("eval_size") or DEFAULT_EVAL_SIZE.get(variant or "", _FALLBACK_EVAL_SIZE))
    meta = dict(source_format="yolos_original", variant=variant, eval_size=eval_size, notes=[])
    return Converted(params, cfg, "detector", meta)


# Prefixes under which timm-style ViT backbones are stored, most specific first, and what else such
# checkpoints hold that is not part of the backbone.
_TIMM_PREFIXES = (
    "module.base_encoder.",  # MoCo v3 (main_moco.py checkpoints)
    "base_encoder.",
    "module.backbone.",  # DINO student
    "backbone.",  # DINO teacher
    "module.encoder.",
    "encoder.",
    "module.",  # DistributedDataParallel wrappers
    "",  # DeiT, DINO (released backbones), MAE, timm
)


def _timm_prefix(keys: Iterable[str]) -> str:
    keys = set(keys)
    for prefix in _TIMM_PREFIXES:
        if prefix + "patch_embed.proj.weight" in keys:
            return prefix
    found = sorted(k[: -len("patch_embed.proj.weight")] for k in keys if k.endswith("patch_embed.proj.weight"))
    if len(found) == 1:
        return found[0]
    raise ConversionError(f"cannot tell which ViT to convert: patch embeddings under prefixes {found}")


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _convert_timm(
    src: _Source, variant: Optional[str], overrides: Mapping[str, Any], source_pe_size: Optional[tuple]
) -> Converted:
    st = src.state
    prefix = _timm_prefix(st)
    r = _Reader(st, src.path)
    notes = []
    if prefix:
        notes.append(f"weights under prefix {prefix!r}")
    hidden = st[prefix + "cls_token"].shape[-1] if prefix + "cls_token" in st else 0
    depth = _count_blocks(st, re.escape(prefix) + r"blocks\.(\d+)\.")
    cfg, variant = _base_config(variant, hidden, depth, overrides)
    _check_dims(cfg, hidden, depth, src.path)
    d, p, L = cfg["hidden_size"], cfg["patch_size"], cfg["depth"]

    # Position embeddings [1, T, D]: T = 1 + N (cls | patches) or, for distilled DeiT, 2 + N
    # (cls | dist | patches). The original (hustvl/YOLOS models/backbone.py, VisionTransformer.finetune_det)
    # tests whether T - 1 is a perfect square and otherwise drops pos_embed[:, 0]; it then takes
    # pos_embed[:, 0] as the [CLS] position embedding. For deit_base_distilled_patch16_384 (T = 2 + 24*24)
    # that drops the [CLS] position embedding and gives the [CLS] token the distillation token's position
    # embedding, while the [DIST] token itself (and head / head_dist) never load (load_state_dict(strict=False)
    # into a model without them). We reproduce exactly that.
    pe_key = prefix + "pos_embed"
    pe = r.get(pe_key, (1, None, d))
    t = pe.shape[1]
    if pe_key not in st or st[pe_key].shape != (1, t, d) or t < 2:  # carry on to list the other problems
        if pe_key in st and t < 2:
            r.misshaped.append(f"{pe_key}: {list(pe.shape)} holds no patch positions")
        src_grid, distilled, pe = (1, 1), False, np.zeros((1, 2, d), np.float32)
    elif source_pe_size is not None:
        src_grid = _grid(source_pe_size, p)
        n = src_grid[0] * src_grid[1]
        if t not in (1 + n, 2 + n):
            r.misshaped.append(
                f"{pe_key}: {list(pe.shape)}, expected [1, 1 + {n} (or 2 + {n}), {d}] for --source_pe_size"
            )
        distilled = t == 2 + n
    else:
        distilled = not _is_square(t - 1)
        n = t - 2 if distilled else t - 1
        if not _is_square(n) and pe_key in st:
            r.misshaped.append(
                f"{pe_key}: {list(pe.shape)} holds {n} patch positions, not a square grid; "
                "pass --source_pe_size=H,W"
            )
            n = 1
        src_grid = (math.isqrt(n), math.isqrt(n))
    if distilled:
        pe = pe[:, 1:]  # as the original: drop the [CLS] entry; the [DIST] entry becomes the [CLS] one
        notes.append(
            "distilled DeiT: as hustvl/YOLOS, pos_embed[:, 0] is dropped and the [DIST] position embedding "
            "becomes the [CLS] one; dist_token and head_dist are not used"
        )
    patches = pe[:, 1 : 1 + src_grid[0] * src_grid[1]].reshape(1, *src_grid, d)
    target_grid = _grid(cfg["init_pe_size"], p)
    # As finetune_det: bicubic (PyTorch's, align_corners=False) from the pre-training grid to init_pe_size.
    resized = vit.resize_posemb_grid_np(patches, target_grid) if patches.shape[1:3] != target_grid else patches
    if patches.shape[1:3] != target_grid:
        notes.append(
            f"patch position embeddings resized {src_grid[0]}x{src_grid[1]} -> {target_grid[0]}x{target_grid[1]}"
        )

    params: dict[str, Any] = {
        "patch_embed": _patch_embed(r, prefix + "patch_embed.proj", d, p),
        "cls_token": r.get(prefix + "cls_token", (1, 1, d)),
        "pos_embed_cls": pe[:, :1],
        "pos_embed_patches": resized.astype(np.float32),
    }
    params.update(_timm_blocks(r, prefix, L, d, _mlp_dim(cfg)))
    if r.has(prefix + "norm.weight") or not r.has(prefix + "fc_norm.weight"):
        params["encoder_norm"] = _layernorm(r, prefix + "norm", d)
        r.ignore(lambda k: k.startswith(prefix + "fc_norm."))
    else:
        # MAE fine-tuned with global pooling keeps its final LayerNorm as fc_norm (there is no `norm`).
        params["encoder_norm"] = _layernorm(r, prefix + "fc_norm", d)
        notes.append("no `norm`: using `fc_norm` (MAE global-pool checkpoint) as the encoder's final LayerNorm")

    # Not part of the backbone: classifier heads, the distillation token, DINO/MoCo projection heads,
    # MoCo's momentum encoder and predictor, MAE's decoder and mask token.
    not_backbone = ("head.", "head_dist.", "pre_logits.", "dist_token", "decoder_", "mask_token", "decoder.")
    drop = tuple(prefix + s for s in not_backbone)
    drop += ("module.momentum_encoder.", "momentum_encoder.", "module.predictor.", "predictor.")
    r.ignore(lambda k: k.startswith(drop))
    if prefix == "backbone.":
        r.ignore(lambda k: k.startswith("head."))  # DINO full checkpoint: the DINO head
    if prefix in ("module.base_encoder.", "base_encoder."):
        notes.append("MoCo v3: base encoder taken; projection head, momentum encoder and predictor dropped")
        if d == 384 and cfg["num_heads"] != 12:
            # Head count is invisible in the weights; MoCo v3's vit_small (moco-v3 vits.py) uses 12 heads.
            notes.append(
                f"MoCo v3's ViT-S was pre-trained with 12 heads; this conversion uses {cfg['num_heads']}. "
                "Pass --model num_heads=12 (and the same in config.model) to match its pre-training"
            )
    r.check("timm ViT backbone")
    meta = dict(
        source_format="timm_vit",
        variant=variant,
        distilled=distilled,
        source_grid=list(src_grid),
        eval_size=DEFAULT_EVAL_SIZE.get(variant or "", _FALLBACK_EVAL_SIZE),
        notes=notes,
    )
    return Converted(params, cfg, "backbone", meta)


def hf_vit_to_timm_names(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """A HF `ViTModel` / `DeiTModel` state dict (also under `vit.` / `deit.`, as in the image classifiers) with
    timm's names: separate q, k, v Linears fused into `attn.qkv` ([3D, D], rows q | k | v), the embeddings as
    `cls_token` / `dist_token` / `pos_embed` / `patch_embed.proj`. Classifier heads and the pooler are left out.
    Returns (renamed state, keys left out)."""
    prefix = next((p for p in ("vit.", "deit.", "") if p + "embeddings.patch_embeddings.projection.weight" in state), "")
    renames = {
        "embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    }
    block = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    out, left_out, qkv = {}, [], {}
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", name or "")
        if name in renames:
            out[renames[name]] = value
        elif m and m.group(2) in block:
            out[f"blocks.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2).startswith("attention.attention."):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2).rsplit(".", 1)[1]] = value
        else:
            left_out.append(key)  # classifier heads, pooler, mask token; unknown names surface below
            out[key] = value
    for (i, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], 0)
        else:  # incomplete: keep the pieces so that the timm reader reports the missing qkv
            out.update({f"{prefix}encoder.layer.{i}.attention.attention.{n}.{kind}": v for n, v in parts.items()})
    return out, left_out


_HF_VIT_NOT_BACKBONE = re.compile(r"((vit|deit)\.)?(pooler\.|embeddings\.mask_token)|classifier\.|cls_classifier\.|"
                                  r"distillation_classifier\.")


def _convert_hf_vit(
    src: _Source, variant: Optional[str], overrides: Mapping[str, Any], source_pe_size: Optional[tuple]
) -> Converted:
    """A HF ViT/DeiT backbone (save_pretrained folder or its weights file): renamed to timm's names, then
    converted as a timm ViT (same position-embedding handling, distilled DeiT included)."""
    renamed, left_out = hf_vit_to_timm_names(src.state)
    dropped = [k for k in left_out if _HF_VIT_NOT_BACKBONE.match(k)]
    renamed = {k: v for k, v in renamed.items() if k not in dropped}
    overrides = dict(overrides)
    hc = src.hf_config or {}
    if "num_heads" not in overrides and hc.get("num_attention_heads"):
        overrides["num_heads"] = int(hc["num_attention_heads"])  # invisible in the weights
    if "qkv_bias" not in overrides and hc.get("qkv_bias") is False:
        overrides["qkv_bias"] = False
    if "layer_norm_eps" not in overrides and hc.get("layer_norm_eps"):
        overrides["layer_norm_eps"] = float(hc["layer_norm_eps"])
    if variant is None and hc.get("hidden_size") and hc.get("num_hidden_layers"):
        try:
            variant = infer_variant(int(hc["hidden_size"]), int(hc["num_hidden_layers"]))
        except ConversionError:  # a custom size: config.json says it all
            overrides.setdefault("hidden_size", int(hc["hidden_size"]))
            overrides.setdefault("depth", int(hc["num_hidden_layers"]))
            if hc.get("intermediate_size") and int(hc["intermediate_size"]) != 4 * int(hc["hidden_size"]):
                overrides.setdefault("mlp_dim", int(hc["intermediate_size"]))
    out = _convert_timm(dataclasses.replace(src, state=renamed), variant, overrides, source_pe_size)
    out.meta["source_format"] = "hf_vit"
    out.meta["notes"] = ["HF ViT/DeiT weights, renamed to timm's (q, k, v fused)"] + (
        [f"not part of the backbone, not used: {sorted(dropped)[:8]}"] if dropped else []) + out.meta["notes"]
    return out


_CONVERTERS = {"hf_yolos": _convert_hf, "yolos_original": _convert_original, "timm_vit": _convert_timm,
               "hf_vit": _convert_hf_vit}


def convert_state(
    source: str,
    *,
    variant: Optional[str] = None,
    model_overrides: Optional[Mapping[str, Any]] = None,
    source_pe_size: Optional[Sequence[int]] = None,
) -> Converted:
    """Reads and converts a checkpoint in memory (see `convert` for the arguments)."""
    if variant is not None and variant not in config_lib.MODEL_VARIANTS:
        raise ConversionError(f"unknown variant {variant!r}; choose one of {sorted(config_lib.MODEL_VARIANTS)}")
    overrides = dict(model_overrides or {})
    unknown = set(overrides) - set(config_lib.model_config("s").keys())
    if unknown:
        raise ConversionError(f"unknown model config fields {sorted(unknown)}")
    overrides = config_lib.sequence_fields_as_tuples(overrides)
    src = read_checkpoint(source)
    fmt = detect_format(src.state)
    out = _CONVERTERS[fmt](src, variant, overrides, None if source_pe_size is None else tuple(source_pe_size))
    # Last guard: the tree must be exactly what YOLOS(**cfg) declares (or its backbone part).
    expected = expected_param_shapes(out.model_cfg)
    if out.kind == "backbone":
        expected = {k: v for k, v in expected.items() if is_backbone_leaf(k)}
    got = {k: tuple(np.shape(v)) for k, v in flatten_params(out.params).items()}
    bad = [
        f"{k}: {got.get(k)} vs model {expected.get(k)}"
        for k in sorted(set(got) | set(expected))
        if got.get(k) != expected.get(k)
    ]
    if bad:  # a converter bug or an inconsistent config, never a user's checkpoint problem
        raise ConversionError(
            f"{source}: converted tree does not fit YOLOS({out.model_cfg}):\n  " + "\n  ".join(bad)
        )
    out.params = unflatten_params({k: np.asarray(v, np.float32) for k, v in flatten_params(out.params).items()})
    out.meta.update(kind=out.kind, source=os.path.abspath(source), wrapper=src.wrapper)
    out.meta.setdefault("label_names", None)
    return out


def convert(
    source: str,
    output: str,
    *,
    variant: Optional[str] = None,
    model_overrides: Optional[Mapping[str, Any]] = None,
    source_pe_size: Optional[Sequence[int]] = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Converts a PyTorch/HF checkpoint into a converted-checkpoint directory `output`.

    Args:
      source: a checkpoint file (.pth/.pt/.bin/.safetensors) or a HF `save_pretrained` folder.
      output: the directory to write (atomically; refused if it exists unless `overwrite`).
      variant: a `MODEL_VARIANTS` name; inferred from embed dim and depth when None (HF folders take
        the config from config.json instead).
      model_overrides: `YOLOS` fields to set on top of the variant (e.g. num_heads for custom sizes).
      source_pe_size: (H, W) pixels of the grid the source's position embeddings are stored on, for
        sources whose grid a token count cannot tell (non-square backbones, HF weights without config).
      overwrite: replace an existing `output`.
    Returns:
      The metadata written to output/yolos_jax.json.
    Raises:
      ConversionError listing every unknown, missing and mis-shaped key; nothing is written then.
    """
    _check_output(source, output, overwrite)
    out = convert_state(source, variant=variant, model_overrides=model_overrides, source_pe_size=source_pe_size)
    save_params_dir(output, out.params, out.model_cfg, out.meta, overwrite=overwrite)
    return {**out.meta, "model": _json_model_cfg(out.model_cfg), "format": FORMAT, "version": VERSION}


def _check_output(source: str, output: str, overwrite: bool) -> None:
    """--overwrite replaces only an earlier conversion, never the source or an unrelated file or folder."""
    src, out = os.path.realpath(source), os.path.realpath(output)
    if out == src or src.startswith(out + os.sep) or out.startswith(src + os.sep):
        raise ConversionError(f"--output {output} would replace or sit inside the source {source}; choose another "
                              "output directory")
    if not os.path.lexists(output):
        return
    if not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")
    if not os.path.isfile(os.path.join(output, META_FILE)):
        raise FileExistsError(f"{output} exists and is not a converted checkpoint (no {META_FILE} in it): "
                              "--overwrite only replaces an earlier conversion; choose another --output")


# --------------------------------------------------------------------------------------------------
# Starting training from a converted checkpoint (config.init_from)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InitReport:
    """What `init_params_from` did with each parameter (paths are '/'-joined)."""

    kind: str
    taken: list[str] = dataclasses.field(default_factory=list)  # copied as they are
    resized: list[str] = dataclasses.field(default_factory=list)  # PE grids resized to the model's
    fresh: list[str] = dataclasses.field(default_factory=list)  # kept from the fresh initialisation (with why)
    dropped: list[str] = dataclasses.field(default_factory=list)  # in the checkpoint, not in the model
    grown: list[str] = dataclasses.field(default_factory=list)  # per-[DET]-token leaves grown to more tokens

    def __str__(self) -> str:
        def short(items: list[str]) -> str:
            groups: dict[str, int] = {}
            for s in items:
                top = re.sub(r"^block_\d+", "block_*", s.split(" ")[0].split("/")[0])
                groups[top] = groups.get(top, 0) + 1
            return ", ".join(f"{k}" + (f" x{v}" if v > 1 else "") for k, v in groups.items()) or "-"

        return (
            f"converted kind {self.kind!r}: taken {len(self.taken)} ({short(self.taken)}); "
            f"resized {len(self.resized)} ({'; '.join(self.resized) or '-'}); "
            f"fresh {len(self.fresh)} ({short(self.fresh)}); "
            f"dropped {len(self.dropped)} ({short(self.dropped)})"
            + (f"; grown {len(self.grown)} ({'; '.join(self.grown)})" if self.grown else "")
        )


# Leaves with one entry per [DET] token on axis 1 ([n, Q, D]): what grows when model.num_det_tokens exceeds a
# detector checkpoint's. Only det_tokens is perturbed (see `grow_det_leaf`).
DET_TOKEN_LEAVES = ("det_tokens", "pos_embed_det", "mid_pos_embed_det", "adapter/query_pos")
# Std of the perturbation of each copied [DET] token, relative to the std of the checkpoint's det_tokens.
DET_COPY_NOISE = 0.01


def grow_det_leaf(path: str, value: np.ndarray, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """A per-[DET]-token leaf [n, Q_old, D] grown to [n, num_tokens, D] (num_tokens > Q_old).

    Tokens 0..Q_old-1 are the checkpoint's, exactly; new token j copies token j mod Q_old (cycling), with its
    position embeddings (`pos_embed_det`, `mid_pos_embed_det`) and FP-DETR query prompt (`adapter/query_pos`)
    copied exactly, so each copy starts with the learned prior (where it looks, what it predicts) of the token
    it copies (DETR practice for adding queries). A copy identical to its source would give identical
    predictions, and the matcher would settle which of the two gets an object by its tie-break (index order)
    rather than by the data; so each copy's `det_tokens` row gets independent Gaussian noise of std
    DET_COPY_NOISE x (std of the checkpoint's det_tokens), drawn from `rng` (seeded by config.seed): small enough
    to keep the prior, enough for the two to differ from the first step and specialise.
    """
    q_old = value.shape[1]
    out = value[:, np.arange(num_tokens) % q_old].copy()
    if path == "det_tokens":
        scale = DET_COPY_NOISE * float(np.std(value))
        out[:, q_old:] += (scale * rng.standard_normal(out[:, q_old:].shape)).astype(out.dtype)
    return out


def _resize_like(value: np.ndarray, target_shape: Sequence[int]) -> Optional[np.ndarray]:
    """Grid position embeddings [..., gh, gw, D] resized to target [..., gh', gw', D] if the rest matches."""
    if value.ndim != len(target_shape) or value.ndim < 3:
        return None
    if tuple(value.shape[:-3]) != tuple(target_shape[:-3]) or value.shape[-1] != target_shape[-1]:
        return None
    return vit.resize_posemb_grid_np(np.asarray(value, np.float32), target_shape[-3:-1])


def init_params_from(
    fresh_params: Mapping[str, Any],
    converted_params: Mapping[str, Any],
    model_cfg: Optional[Mapping[str, Any]] = None,
    *,
    kind: Optional[str] = None,
    seed: int = 0,
) -> tuple[dict[str, Any], InitReport]:
    """Initial parameters for training from a converted checkpoint.

    Backbone parameters (patch_embed, cls_token, pos_embed_cls, pos_embed_patches, block_*, encoder_norm)
    are always taken from `converted_params`; position-embedding grids are resized (PyTorch-exact
    bicubic) to the model's grid when they differ. [DET] tokens, det position embeddings, mid position
    embeddings and heads stay as in `fresh_params`, unless the checkpoint is a detector (`kind`
    'detector', inferred from the presence of heads when None) and a leaf fits the model (same shape, or
    a position-embedding grid that resizes to it): fine-tuning a detector on a dataset with other classes
    keeps the fresh class head's last layer, for example.

    More [DET] tokens than the checkpoint's (model.num_det_tokens > its Q, e.g. a 100-token COCO detector
    fine-tuned for 300 objects per image): the per-token leaves (`DET_TOKEN_LEAVES`) keep the checkpoint's Q
    tokens exactly and the new ones copy them cyclically, the copies' det_tokens slightly perturbed
    (`grow_det_leaf`); reported as `grown`. With det_reference_grid the copies follow the token index, not
    the new grid's reference points. Fewer tokens than the checkpoint's start fresh (reported).

    Args:
      fresh_params: the model's freshly initialised 'params' tree (numpy or jax arrays).
      converted_params: the tree from `load_params_dir`.
      model_cfg: the model's config (for the error messages; may be None).
      kind: 'backbone' | 'detector' | None (infer).
      seed: seeds the perturbation of grown [DET] tokens (the trainer passes config.seed).
    Returns:
      (params, report): a host numpy tree shaped exactly like `fresh_params`, and an `InitReport`.
    Raises:
      ValueError listing every backbone parameter that is missing from the checkpoint or does not fit.
    """
    fresh = {k: np.asarray(v) for k, v in flatten_params(fresh_params).items()}
    conv = flatten_params(converted_params)
    if kind is None:
        kind = "detector" if any(not is_backbone_leaf(k) for k in conv) else "backbone"
    if kind not in ("backbone", "detector"):
        raise ValueError(f"kind must be 'backbone' or 'detector', got {kind!r}")
    report = InitReport(kind=kind)
    out: dict[str, np.ndarray] = {}
    errors = []
    grow_rng = np.random.default_rng(seed)
    for path, init in fresh.items():
        backbone = is_backbone_leaf(path)
        value = conv.get(path)
        if value is None:
            if backbone and not _is_option_leaf(path):
                errors.append(f"{path}: missing from the checkpoint")
            else:
                report.fresh.append(f"{path} (not in checkpoint)")
            out[path] = init
            continue
        value = np.asarray(value)
        if not backbone and kind != "detector":
            report.fresh.append(path)
            out[path] = init
            continue
        if value.shape == init.shape:
            out[path] = value.astype(init.dtype)
            report.taken.append(path)
            continue
        if (path in DET_TOKEN_LEAVES and value.ndim == init.ndim == 3 and value.shape[::2] == init.shape[::2]
                and init.shape[1] > value.shape[1]):
            out[path] = grow_det_leaf(path, value, int(init.shape[1]), grow_rng).astype(init.dtype)
            report.grown.append(f"{path} {value.shape[1]} -> {init.shape[1]} tokens")
            continue
        resized = _resize_like(value, init.shape) if "pos_embed_patches" in path else None
        if _is_rel_pos_leaf(path) and value.ndim == 2 and value.shape[1] == init.shape[1]:
            from yolos_jax import windowed  # tables trained with another window/grid: resize along length

            resized = windowed.resize_rel_pos_np(value, int(init.shape[0]))
        if resized is not None:
            out[path] = resized.astype(init.dtype)
            report.resized.append(f"{path} {list(value.shape[-3:-1])} -> {list(init.shape[-3:-1])}")
        elif backbone:
            errors.append(f"{path}: checkpoint {list(value.shape)} vs model {list(init.shape)}")
            out[path] = init
        else:
            report.fresh.append(f"{path} (checkpoint {list(value.shape)} vs model {list(init.shape)})")
            out[path] = init
    uses_conv_stem = any(p.startswith("conv_stem/") for p in fresh)
    for path in conv:
        if path not in fresh:
            if uses_conv_stem and path.startswith("patch_embed/"):
                report.dropped.append(f"{path} (the model uses a ConvStem; MIMDet discards the patchify stem)")
            elif is_backbone_leaf(path):
                errors.append(f"{path}: in the checkpoint but not in the model")
            else:
                report.dropped.append(path)
    if errors:
        what = f" for model {dict(model_cfg)}" if model_cfg is not None else ""
        raise ValueError(
            f"converted checkpoint does not fit the model{what} ({len(errors)} problems):\n  "
            + "\n  ".join(errors)
            + "\nCheck that config.model matches the converted variant (hidden_size, depth, qkv_bias, patch_size)."
        )
    return unflatten_params(out), report
