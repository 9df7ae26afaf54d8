"""Detector formats: HF `YolosForObjectDetection` and hustvl/YOLOS checkpoints -> a full `YOLOS` tree.

Position embeddings stay on the grid the source stores them on (the model resizes by grid shape at run time, as
HF does); the grid comes from HF's config.json, the original's training args or `--source_pe_size`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from yolos_jax import config as config_lib
from yolos_jax.convert.keymaps import (
    DEFAULT_EVAL_SIZE, FALLBACK_EVAL_SIZE, Converted, KeyReader, base_config, check_dims, count_blocks,
    grid_for_tokens, heads, hf_blocks, infer_variant, layernorm, mlp_dim, patch_embedding, patch_grid,
    split_pos_embed, timm_blocks,
)
from yolos_jax.convert.readers import ConversionError, Source
from yolos_jax.weights import model_cfg_dict

# hustvl/YOLOS `--backbone_name` -> our variant.
_ORIGINAL_BACKBONES = {"tiny": "ti", "small": "s", "base": "b", "small_dWr": "s_dWr", "small_dwr": "s_dwr"}


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
    blocks: Callable[[KeyReader, int, int, int], dict[str, Any]]


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
    blocks=hf_blocks,
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
    blocks=lambda r, depth, d, mlp: timm_blocks(r, "backbone.", depth, d, mlp),
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
    grid = grid_for_tokens(n, candidates, p, key, path)
    return next(tuple(int(v) for v in s) for s in candidates if s is not None and patch_grid(s, p) == grid)


def _detector_tree(r: KeyReader, names: _DetectorNames, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The full YOLOS tree of a detector checkpoint, position embeddings on the stored grids
    (cfg['init_pe_size'] / cfg['mid_pe_size'])."""
    d, p, q, depth = cfg["hidden_size"], cfg["patch_size"], cfg["num_det_tokens"], cfg["depth"]
    grid = patch_grid(cfg["init_pe_size"], p)
    params: dict[str, Any] = {
        "patch_embed": patch_embedding(r, names.patch, d, p),
        "cls_token": r.get(names.cls, (1, 1, d)),
        "det_tokens": r.get(names.det, (1, q, d)),
    }
    pe = split_pos_embed(r.get(names.pos, (1, 1 + grid[0] * grid[1] + q, d)), grid, q)
    params.update(pos_embed_cls=pe["cls"], pos_embed_patches=pe["patches"], pos_embed_det=pe["det"])
    if cfg["mid_pe_size"] is not None:
        mgrid = patch_grid(cfg["mid_pe_size"], p)
        key = _mid_key(r.state, names) or names.mids[0]
        mid = split_pos_embed(r.get(key, (depth - 1, 1, 1 + mgrid[0] * mgrid[1] + q, d))[:, 0], mgrid, q)
        params.update(
            mid_pos_embed_cls=mid["cls"], mid_pos_embed_patches=mid["patches"], mid_pos_embed_det=mid["det"]
        )
    params.update(names.blocks(r, depth, d, mlp_dim(cfg)))
    params["encoder_norm"] = layernorm(r, names.norm, d)
    params.update(heads(r, names.class_head, names.box_head, d, cfg["num_classes"]))
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


def convert_hf_yolos(
    src: Source, variant: Optional[str], overrides: Mapping[str, Any], source_pe_size: Optional[tuple]
) -> Converted:
    """A HF `YolosForObjectDetection` state dict (+ config.json / preprocessor_config.json when present) -> a
    'detector' tree; eval_size from the preprocessor config, label_names from id2label."""
    st = src.state
    if "embeddings.detection_tokens" in st:  # a YolosModel saved alone: no 'vit.' prefix
        top = ("embeddings.", "encoder.", "layernorm.", "pooler.")
        st = {("vit." + k if k.startswith(top) else k): v for k, v in st.items()}
    r = KeyReader(st, src.path)
    names = _HF_NAMES
    hidden = st[names.cls].shape[-1] if names.cls in st else 0
    depth = count_blocks(st, r"vit\.encoder\.layer\.(\d+)\.")
    notes, label_names = [], None
    if src.hf_config is not None:
        fields = _hf_config_fields(src.hf_config, src.path)
        if variant is None:
            try:
                variant = infer_variant(fields["hidden_size"], fields["depth"])
            except ConversionError:
                variant = None  # a custom size: config.json says everything anyway
        cfg = model_cfg_dict({**config_lib.model_config(variant or "s").to_dict(), **fields, **overrides})
        if cfg["mlp_dim"] == 4 * cfg["hidden_size"]:
            cfg["mlp_dim"] = None
        id2label = src.hf_config.get("id2label") or {}
        if id2label:
            label_names = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(len(id2label))]
    else:
        # No config.json: the weights give the sizes; --variant (or the inferred one) and the overrides
        # the head count and the stored grid.
        cfg, variant = base_config(variant, hidden, depth, overrides)
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
    check_dims(cfg, hidden, depth, src.path)
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


def _hf_eval_size(src: Source, variant: Optional[str]) -> int:
    """preprocessor_config.json's shortest edge when present, else the original's eval size."""
    size = (src.hf_preprocessor or {}).get("size")
    if isinstance(size, Mapping) and size.get("shortest_edge"):
        return int(size["shortest_edge"])
    if isinstance(size, int):
        return size
    return DEFAULT_EVAL_SIZE.get(variant or "", FALLBACK_EVAL_SIZE)


def convert_original(
    src: Source, variant: Optional[str], overrides: Mapping[str, Any], source_pe_size: Optional[tuple]
) -> Converted:
    """A hustvl/YOLOS detector checkpoint -> a 'detector' tree; its training args give the variant, the stored PE
    grids (--init_pe_size / --mid_pe_size) and the eval size."""
    st = src.state
    r = KeyReader(st, src.path)
    names = _ORIGINAL_NAMES
    args = src.args or {}
    hidden = st[names.cls].shape[-1] if names.cls in st else 0
    depth = count_blocks(st, r"backbone\.blocks\.(\d+)\.")
    if variant is None and args.get("backbone_name") in _ORIGINAL_BACKBONES:
        variant = _ORIGINAL_BACKBONES[args["backbone_name"]]
    cfg, variant = base_config(variant, hidden, depth, overrides)
    check_dims(cfg, hidden, depth, src.path)
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
    eval_size = int(args.get("eval_size") or DEFAULT_EVAL_SIZE.get(variant or "", FALLBACK_EVAL_SIZE))
    meta = dict(source_format="yolos_original", variant=variant, eval_size=eval_size, notes=[])
    return Converted(params, cfg, "detector", meta)
