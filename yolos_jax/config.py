"""Configuration: the model variants of the papers, as the `config.model` sub-config (`model_config(variant)`).

The run's defaults (`run_config.default_config(variant)`) build on it, and every `configs/*.py` file on those.
Each stage reads only its own sub-config: `config.model` -> `YOLOS(**config.model)`, `config.input` -> the data
pipeline, `config.matcher`, `config.loss`, `config.optim`, `config.train`, `config.eval`.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

# Paper Table 1 and the original README (backbone_name, init_pe_size, mid_pe_size).
MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    # YOLOS-Ti: DeiT-Ti, no mid position embeddings, init_pe_size 800x1333.
    "ti": dict(hidden_size=192, depth=12, num_heads=3, init_pe_size=(800, 1333), mid_pe_size=None),
    # YOLOS-S: DeiT-S, init_pe_size = mid_pe_size = 512x864.
    "s": dict(hidden_size=384, depth=12, num_heads=6, init_pe_size=(512, 864), mid_pe_size=(512, 864)),
    # YOLOS-B: DeiT-B (distilled, 384), init_pe_size = mid_pe_size = 800x1344.
    "b": dict(hidden_size=768, depth=12, num_heads=12, init_pe_size=(800, 1344), mid_pe_size=(800, 1344)),
    # YOLOS-S (dWr): fast scaling, width first: 14 deep, 330 wide.
    "s_dWr": dict(hidden_size=330, depth=14, num_heads=6, init_pe_size=(512, 864), mid_pe_size=(512, 864)),
    # YOLOS-S (dwr): uniform compound scaling: 19 deep, 240 wide.
    "s_dwr": dict(hidden_size=240, depth=19, num_heads=6, init_pe_size=(512, 864), mid_pe_size=(512, 864)),
}


# YOLOS fields that are sequences: JSON (checkpoints, converted metadata) and ConfigDicts hand them back as
# lists, but module fields must be hashable.
SEQUENCE_FIELDS = ("init_pe_size", "mid_pe_size", "global_blocks", "det_reference_grid", "det_attention_sigma")
_INT_SEQUENCE_FIELDS = ("init_pe_size", "mid_pe_size", "global_blocks", "det_reference_grid")


def sequence_fields_as_tuples(model_cfg: dict) -> dict:
    """A copy of a model config dict with every list-valued sequence field as a tuple (ints kept int)."""
    out = dict(model_cfg)
    for k in SEQUENCE_FIELDS:
        if out.get(k) is not None:
            out[k] = tuple(int(v) if k in _INT_SEQUENCE_FIELDS else float(v) for v in out[k])
    return out


def model_config(variant: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` sub-config of a variant: exactly the keyword arguments of `YOLOS`."""
    if variant not in MODEL_VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {sorted(MODEL_VARIANTS)}")
    fields = dict(
        hidden_size=384,
        depth=12,
        num_heads=6,
        mlp_dim=None,
        patch_size=16,
        num_det_tokens=100,
        num_classes=91,
        init_pe_size=(512, 864),
        mid_pe_size=None,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        dtype="float32",
        remat=False,
        attention_impl=None,
        aux_layers=0,
        # ViT-detection options (issue 7); these defaults are the plain YOLOS model.
        drop_path_rate=0.0,  # stochastic depth, rising linearly over blocks (train only)
        token_keep_ratio=1.0,  # MIMDet partial-sequence fine-tuning: fraction of patch tokens seen in training
        patch_embed="linear",  # 'linear' (16x16 patchify) | 'conv_stem' (MIMDet ConvStem)
        adapter=False,  # FP-DETR task adapter over the [DET] tokens
        adapter_insert_det_at=0,  # block where [DET] tokens join (0: from the start)
        detach_det_tokens=False,  # [DET] token embeddings fixed at their random init (YOLOS Table 7)
        window_size=0,  # ViTDet windowed attention r (0: global attention in every block)
        global_blocks=None,  # blocks kept global with window_size > 0 (None: every depth/4-th)
        rel_pos=False,  # decomposed relative position bias (zero-initialised)
        # Spatial priors for the [DET] tokens (yolos_jax/det_prior.py); these defaults are plain YOLOS.
        det_reference_grid=None,  # (rows, cols) reference points, one per [DET] token (rows * cols = Q)
        det_attention_sigma=(),  # per-head Gaussian prior width around them, in patches (0 = none)
        det_box_offset=False,  # predict (cx, cy) relative to the reference point
    )
    fields.update(MODEL_VARIANTS[variant])
    fields.update(overrides)
    # A field that is None would take no `--config.model.x=...` override ("Type NoneType ... is not supported
    # for overriding"): a typed placeholder (still None) accepts one of its type.
    for name, field_type in NULLABLE_MODEL_FIELDS.items():
        if fields.get(name) is None:
            fields[name] = config_dict.placeholder(field_type)
    return ml_collections.ConfigDict(fields)


# The model fields whose default may be None, with the type an override gives them.
NULLABLE_MODEL_FIELDS = {"mlp_dim": int, "mid_pe_size": tuple, "attention_impl": str, "global_blocks": tuple,
                         "det_reference_grid": tuple}
