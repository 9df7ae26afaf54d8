"""PyTorch -> Flax name and layout maps shared by the source formats, and the model config they imply.

`KeyReader` hands out state-dict entries by name and collects every missing, mis-shaped and unknown key before
failing; the layer maps turn PyTorch layouts into ours (Linear [out, in] -> Dense kernel [in, out], Conv2d
[D, 3, p, p] -> [p, p, 3, D], HF's separate q/k/v -> one fused qkv kernel [D, 3D]); the model-config helpers
infer the variant from the embed dim and depth. All numpy.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from yolos_jax import config as config_lib
from yolos_jax.convert.readers import ConversionError
from yolos_jax.weights import model_cfg_dict

# The original's eval sizes (README): YOLOS-Ti is evaluated at shortest side 512, the others at 800.
DEFAULT_EVAL_SIZE = {"ti": 512}
FALLBACK_EVAL_SIZE = 800


def patch_grid(size_hw: Sequence[int], patch: int) -> tuple[int, int]:
    """(gh, gw) patches of an (H, W) pixel size."""
    return int(size_hw[0]) // patch, int(size_hw[1]) // patch


# --------------------------------------------------------------------------------------------------
# Key bookkeeping: collect every missing / mis-shaped / unknown key before failing
# --------------------------------------------------------------------------------------------------


class KeyReader:
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


def linear(r: KeyReader, prefix: str, d_in: int, d_out: int) -> dict[str, np.ndarray]:
    """PyTorch Linear [out, in] -> Flax Dense kernel [in, out]."""
    return {
        "kernel": r.get(prefix + ".weight", (d_out, d_in)).T,
        "bias": r.get(prefix + ".bias", (d_out,)),
    }


def layernorm(r: KeyReader, prefix: str, d: int) -> dict[str, np.ndarray]:
    """PyTorch LayerNorm weight/bias [d] -> Flax scale/bias."""
    return {"scale": r.get(prefix + ".weight", (d,)), "bias": r.get(prefix + ".bias", (d,))}


def patch_embedding(r: KeyReader, key: str, d: int, p: int) -> dict[str, np.ndarray]:
    """Conv2d weight [D, 3, p, p] -> Flax Conv kernel [p, p, 3, D]."""
    w = r.get(key + ".weight", (d, 3, p, p))
    return {"proj": {"kernel": w.transpose(2, 3, 1, 0), "bias": r.get(key + ".bias", (d,))}}


def heads(r: KeyReader, cls_prefix: str, box_prefix: str, d: int, num_classes: int) -> dict[str, Any]:
    """The 3-layer class (C + 1 outputs) and box (4 outputs) MLP heads -> class_head / box_head layers_0..2."""
    out = {}
    for name, prefix, d_out in (("class_head", cls_prefix, num_classes + 1), ("box_head", box_prefix, 4)):
        out[name] = {
            f"layers_{j}": linear(r, f"{prefix}.layers.{j}", d, d if j < 2 else d_out) for j in range(3)
        }
    return out


def timm_blocks(r: KeyReader, prefix: str, depth: int, d: int, mlp: int) -> dict[str, Any]:
    """timm `blocks.{i}.*` (fused qkv, [3D, D] rows ordered q|k|v) -> our block_{i} trees."""
    out = {}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        out[f"block_{i}"] = {
            "norm1": layernorm(r, b + "norm1", d),
            "attn": {"qkv": linear(r, b + "attn.qkv", d, 3 * d), "proj": linear(r, b + "attn.proj", d, d)},
            "norm2": layernorm(r, b + "norm2", d),
            "mlp": {"fc1": linear(r, b + "mlp.fc1", d, mlp), "fc2": linear(r, b + "mlp.fc2", mlp, d)},
        }
    return out


def hf_blocks(r: KeyReader, depth: int, d: int, mlp: int) -> dict[str, Any]:
    """HF `vit.encoder.layer.{i}.*` (separate q, k, v) -> our block_{i} trees (fused qkv kernel [D, 3D])."""
    out = {}
    for i in range(depth):
        b = f"vit.encoder.layer.{i}."
        q, k, v = (linear(r, f"{b}attention.attention.{n}", d, d) for n in ("query", "key", "value"))
        out[f"block_{i}"] = {
            "norm1": layernorm(r, b + "layernorm_before", d),
            "attn": {
                "qkv": {
                    "kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                    "bias": np.concatenate([q["bias"], k["bias"], v["bias"]]),
                },
                "proj": linear(r, b + "attention.output.dense", d, d),
            },
            "norm2": layernorm(r, b + "layernorm_after", d),
            "mlp": {
                "fc1": linear(r, b + "intermediate.dense", d, mlp),
                "fc2": linear(r, b + "output.dense", mlp, d),
            },
        }
    return out


def count_blocks(keys: Iterable[str], pattern: str) -> int:
    """Number of transformer blocks: 1 + the largest index captured by `pattern`'s group 1 (0 if none)."""
    idx = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    return max(idx) + 1 if idx else 0


def split_pos_embed(pe: np.ndarray, grid: tuple[int, int], q: int) -> dict[str, np.ndarray]:
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


def base_config(
    variant: Optional[str], hidden: int, depth: int, overrides: Mapping[str, Any]
) -> tuple[dict, Optional[str]]:
    """Model config from --variant (or the one inferred from the shapes) plus overrides."""
    if variant is None and not {"hidden_size", "depth", "num_heads"} <= set(overrides):
        variant = infer_variant(hidden, depth)
    base = config_lib.model_config(variant or "s").to_dict()
    base.update(overrides)
    return model_cfg_dict(base), variant


def check_dims(cfg: Mapping[str, Any], hidden: int, depth: int, path: str) -> None:
    """Raises ConversionError if the checkpoint's embed dim / depth differ from the model config's."""
    if cfg["hidden_size"] != hidden or cfg["depth"] != depth:
        raise ConversionError(
            f"{path}: the checkpoint has embed dim {hidden} and depth {depth}, but the model config says "
            f"{cfg['hidden_size']} and {cfg['depth']}; fix --variant (or the overrides)"
        )


def grid_for_tokens(
    n: int, candidates: Sequence[Optional[Sequence[int]]], patch: int, what: str, path: str
) -> tuple[int, int]:
    """The (gh, gw) among candidate pixel sizes whose grid holds n patches."""
    tried = []
    for size in candidates:
        if size is None:
            continue
        g = patch_grid(size, patch)
        if g[0] * g[1] == n:
            return g
        tried.append(f"{tuple(size)} -> {g[0]}x{g[1]}")
    raise ConversionError(
        f"{path}: {what} holds {n} patch positions, which fits none of the grids tried "
        f"({'; '.join(tried) or 'none'}). "
        "The grid cannot be told from a token count alone; pass --source_pe_size=H,W (pixels) or --variant"
    )


def mlp_dim(cfg: Mapping[str, Any]) -> int:
    """The MLP hidden width of a model config (`mlp_dim`, default 4 x hidden_size)."""
    return int(cfg.get("mlp_dim") or 4 * cfg["hidden_size"])


@dataclasses.dataclass
class Converted:
    """A converted parameter tree with its config and metadata."""

    params: dict[str, Any]
    model_cfg: dict[str, Any]
    kind: str
    meta: dict[str, Any]


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
