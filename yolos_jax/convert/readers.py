"""Reading PyTorch / HF checkpoint files into flat numpy state dicts, and telling their format apart.

`read_checkpoint(path)` reads a .pth/.pt/.bin/.safetensors file or a HF `save_pretrained` folder (sharded ones
too) into a `Source`; `detect_format(keys)` names its format from the parameter names. torch is imported only
to read .pth/.bin files (safetensors need no torch), and `torch.load` runs with weights_only=True.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from safetensors import SafetensorError, safe_open


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what is wrong and what to do."""




# --------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
    """A flat state dict ({PyTorch name: float32 numpy array}) and what came with it."""

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
        import torch  # here: heavy, and optional (the `torch` extra); only .pth/.bin sources need it
    except ImportError as e:  # torch is only needed for .pth/.bin sources
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch, or `pip install -e .[torch]`); "
            "safetensors files convert without it"
        ) from e
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
            import torch  # noqa: F401  (heavy and optional: safe_open(framework="pt") needs it, only here)
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


def read_checkpoint(path: str) -> Source:
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
    return Source(
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
