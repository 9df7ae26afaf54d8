"""Backbone formats: timm-style ViTs (DeiT, DINO, MoCo v3, MAE) and HF ViT/DeiT -> the `YOLOS` backbone tree.

Only the ViT is kept (patch_embed, cls_token, pos_embed_cls, pos_embed_patches resized to the variant's
`init_pe_size` grid as the original's `finetune_det`, block_*, encoder_norm); training adds fresh [DET]
tokens, det and mid position embeddings and heads (`init_from`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from yolos_jax import vit
from yolos_jax.convert.keymaps import (
    DEFAULT_EVAL_SIZE, FALLBACK_EVAL_SIZE, Converted, KeyReader, base_config, check_dims, count_blocks,
    hf_vit_to_timm_names, infer_variant, layernorm, mlp_dim, patch_embedding, patch_grid, timm_blocks,
)
from yolos_jax.convert.readers import ConversionError, Source


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


def _source_position_embeddings(
    r: KeyReader, st: Mapping[str, Any], pe_key: str, d: int, p: int, source_pe_size: Optional[tuple],
    notes: list[str],
) -> tuple[np.ndarray, tuple[int, int], bool]:
    """The checkpoint's position embeddings with the [CLS] entry first, its patch grid, and whether it is a
    distilled DeiT's. A problem is recorded in `r` (and placeholders returned) so that the other problems
    are listed too.

    Position embeddings are [1, T, D]: T = 1 + N (cls | patches) or, for distilled DeiT, 2 + N
    (cls | dist | patches). The original (hustvl/YOLOS models/backbone.py, VisionTransformer.finetune_det)
    tests whether T - 1 is a perfect square and otherwise drops pos_embed[:, 0]; it then takes
    pos_embed[:, 0] as the [CLS] position embedding. For deit_base_distilled_patch16_384 (T = 2 + 24*24)
    that drops the [CLS] position embedding and gives the [CLS] token the distillation token's position
    embedding, while the [DIST] token itself (and head / head_dist) never load (load_state_dict(strict=False)
    into a model without them). We reproduce exactly that.
    """
    pe = r.get(pe_key, (1, None, d))
    t = pe.shape[1]
    if pe_key not in st or st[pe_key].shape != (1, t, d) or t < 2:  # carry on to list the other problems
        if pe_key in st and t < 2:
            r.misshaped.append(f"{pe_key}: {list(pe.shape)} holds no patch positions")
        src_grid, distilled, pe = (1, 1), False, np.zeros((1, 2, d), np.float32)
    elif source_pe_size is not None:
        src_grid = patch_grid(source_pe_size, p)
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
    return pe, src_grid, distilled


def _patch_position_embeddings(
    pe: np.ndarray, src_grid: tuple[int, int], target_grid: tuple[int, int], notes: list[str]
) -> np.ndarray:
    """pos_embed_patches [1, gh, gw, D] float32 on the `target_grid` (init_pe_size's) from `pe` ([CLS] first)
    on `src_grid`: as finetune_det, bicubic (PyTorch's, align_corners=False) from the pre-training grid."""
    d = pe.shape[-1]
    patches = pe[:, 1 : 1 + src_grid[0] * src_grid[1]].reshape(1, *src_grid, d)
    resized = vit.resize_posemb_grid_np(patches, target_grid) if patches.shape[1:3] != target_grid else patches
    if patches.shape[1:3] != target_grid:
        notes.append(
            f"patch position embeddings resized {src_grid[0]}x{src_grid[1]} -> {target_grid[0]}x{target_grid[1]}"
        )
    return resized.astype(np.float32)


def _encoder_norm(r: KeyReader, prefix: str, d: int, notes: list[str]) -> dict[str, np.ndarray]:
    """The encoder's final LayerNorm: `norm`, or `fc_norm` for an MAE global-pool checkpoint (no `norm`)."""
    if r.has(prefix + "norm.weight") or not r.has(prefix + "fc_norm.weight"):
        norm = layernorm(r, prefix + "norm", d)
        r.ignore(lambda k: k.startswith(prefix + "fc_norm."))
        return norm
    # MAE fine-tuned with global pooling keeps its final LayerNorm as fc_norm (there is no `norm`).
    notes.append("no `norm`: using `fc_norm` (MAE global-pool checkpoint) as the encoder's final LayerNorm")
    return layernorm(r, prefix + "fc_norm", d)


def _ignore_non_backbone(r: KeyReader, prefix: str, d: int, num_heads: int, notes: list[str]) -> None:
    """Marks as known and unused what such checkpoints hold besides the backbone: classifier heads, the distillation
    token, DINO/MoCo projection heads, MoCo's momentum encoder and predictor, MAE's decoder and mask token."""
    not_backbone = ("head.", "head_dist.", "pre_logits.", "dist_token", "decoder_", "mask_token", "decoder.")
    drop = tuple(prefix + s for s in not_backbone)
    drop += ("module.momentum_encoder.", "momentum_encoder.", "module.predictor.", "predictor.")
    r.ignore(lambda k: k.startswith(drop))
    if prefix == "backbone.":
        r.ignore(lambda k: k.startswith("head."))  # DINO full checkpoint: the DINO head
    if prefix in ("module.base_encoder.", "base_encoder."):
        notes.append("MoCo v3: base encoder taken; projection head, momentum encoder and predictor dropped")
        if d == 384 and num_heads != 12:
            # Head count is invisible in the weights; MoCo v3's vit_small (moco-v3 vits.py) uses 12 heads.
            notes.append(
                f"MoCo v3's ViT-S was pre-trained with 12 heads; this conversion uses {num_heads}. "
                "Pass --model num_heads=12 (and the same in config.model) to match its pre-training"
            )


def convert_timm(
    src: Source, variant: Optional[str], overrides: Mapping[str, Any], source_pe_size: Optional[tuple]
) -> Converted:
    """A timm-style ViT (DeiT, DINO, MoCo v3, MAE; any wrapper prefix) -> a 'backbone' tree, its patch position
    embeddings resized to the variant's init_pe_size grid as the original's `finetune_det`."""
    st = src.state
    prefix = _timm_prefix(st)
    r = KeyReader(st, src.path)
    notes = []
    if prefix:
        notes.append(f"weights under prefix {prefix!r}")
    hidden = st[prefix + "cls_token"].shape[-1] if prefix + "cls_token" in st else 0
    depth = count_blocks(st, re.escape(prefix) + r"blocks\.(\d+)\.")
    cfg, variant = base_config(variant, hidden, depth, overrides)
    check_dims(cfg, hidden, depth, src.path)
    d, p, L = cfg["hidden_size"], cfg["patch_size"], cfg["depth"]

    pe, src_grid, distilled = _source_position_embeddings(r, st, prefix + "pos_embed", d, p, source_pe_size, notes)
    params: dict[str, Any] = {
        "patch_embed": patch_embedding(r, prefix + "patch_embed.proj", d, p),
        "cls_token": r.get(prefix + "cls_token", (1, 1, d)),
        "pos_embed_cls": pe[:, :1],
        "pos_embed_patches": _patch_position_embeddings(pe, src_grid, patch_grid(cfg["init_pe_size"], p), notes),
    }
    params.update(timm_blocks(r, prefix, L, d, mlp_dim(cfg)))
    params["encoder_norm"] = _encoder_norm(r, prefix, d, notes)
    _ignore_non_backbone(r, prefix, d, cfg["num_heads"], notes)
    r.check("timm ViT backbone")
    meta = dict(
        source_format="timm_vit",
        variant=variant,
        distilled=distilled,
        source_grid=list(src_grid),
        eval_size=DEFAULT_EVAL_SIZE.get(variant or "", FALLBACK_EVAL_SIZE),
        notes=notes,
    )
    return Converted(params, cfg, "backbone", meta)


_HF_VIT_NOT_BACKBONE = re.compile(r"((vit|deit)\.)?(pooler\.|embeddings\.mask_token)|classifier\.|cls_classifier\.|"
                                  r"distillation_classifier\.")


def convert_hf_vit(
    src: Source, variant: Optional[str], overrides: Mapping[str, Any], source_pe_size: Optional[tuple]
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
    out = convert_timm(dataclasses.replace(src, state=renamed), variant, overrides, source_pe_size)
    out.meta["source_format"] = "hf_vit"
    out.meta["notes"] = ["HF ViT/DeiT weights, renamed to timm's (q, k, v fused)"] + (
        [f"not part of the backbone, not used: {sorted(dropped)[:8]}"] if dropped else []) + out.meta["notes"]
    return out
