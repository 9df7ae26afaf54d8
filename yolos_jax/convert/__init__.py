"""The weight converter: PyTorch / HF checkpoints -> converted-checkpoint directories (a tool).

Sources read by `convert(source, output, ...)` (the format is detected from the parameter names):

  'hf_yolos'        HF transformers `YolosForObjectDetection`: a `save_pretrained` folder, a
                    `model.safetensors` or a `pytorch_model.bin` (sharded folders too). `config.json` beside
                    the weights gives the model config; without it the shapes and `variant` do.
  'yolos_original'  hustvl/YOLOS detector checkpoints (`{'model': sd, 'args': Namespace, ...}` with
                    `backbone.*`, `class_embed.*`, `bbox_embed.*`); `args` gives init/mid PE sizes.
  'timm_vit'        timm-style ViT backbones: DeiT as Facebook released it (`{'model': sd}`, distilled ones
                    included), DINO (plain state dicts, or full checkpoints via their 'teacher'), MoCo v3
                    (`{'state_dict': ...}` with the `module.base_encoder.` prefix), MAE (`{'model': sd}`).
  'hf_vit'          HF `ViTModel` / `DeiTModel` weights (also the image classifiers'), renamed to timm's.

Two kinds of output, both in the converted-checkpoint directory format:

  kind 'detector'  every parameter of `YOLOS`, position embeddings kept on the source's own grid (the model
                   resizes by grid shape at run time, as HF does), for inference or fine-tuning;
  kind 'backbone'  only the ViT: patch_embed, cls_token, pos_embed_cls, pos_embed_patches (resized to the
                   variant's `init_pe_size` grid, as the original's `finetune_det`), block_*, encoder_norm.
                   Training starts from it via `config.init_from` -> `init_from.init_params_from`, which keeps fresh
                   [DET] tokens, det position embeddings, mid position embeddings and heads.

The directory format (yolos_jax.json + params/) and its loader belong to `yolos_jax.weights`; this package
only writes it. Modules: `readers` (files -> state dicts, format detection), `keymaps` (PyTorch -> Flax names and
layouts, the implied model config), `detectors` (HF YOLOS, hustvl/YOLOS), `backbones` (timm ViTs, HF ViT/DeiT).
Only convert_torch_weights.py, the tests and the benchmarks import it.

The weight surgery is numpy; torch is imported only to read .pth/.bin files (safetensors need no torch).
The number of attention heads is not visible in any weights: it comes from config.json (HF), the variant
or `model_overrides` (e.g. MoCo v3's ViT-S has 12 heads where DeiT-S has 6). Writes are atomic: the directory
is built beside DIR and renamed into place at the end.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from yolos_jax import config as config_lib
from yolos_jax.convert.backbones import convert_hf_vit, convert_timm
from yolos_jax.convert.detectors import convert_hf_yolos, convert_original
from yolos_jax.convert.keymaps import DEFAULT_EVAL_SIZE, Converted, hf_vit_to_timm_names, infer_variant
from yolos_jax.convert.readers import ConversionError, Source, detect_format, read_checkpoint
from yolos_jax.weights import (
    FORMAT, META_FILE, VERSION, expected_param_shapes, flatten_params, is_backbone_leaf, is_converted_dir,
    model_cfg_json, save_params_dir, unflatten_params,
)

__all__ = [
    "ConversionError", "Converted", "DEFAULT_EVAL_SIZE", "Source", "convert", "convert_state", "detect_format",
    "hf_vit_to_timm_names", "infer_variant", "read_checkpoint",
]

_CONVERTERS = {"hf_yolos": convert_hf_yolos, "yolos_original": convert_original, "timm_vit": convert_timm,
               "hf_vit": convert_hf_vit}


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
    return {**out.meta, "model": model_cfg_json(out.model_cfg), "format": FORMAT, "version": VERSION}


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
    if not is_converted_dir(output):
        raise FileExistsError(f"{output} exists and is not a converted checkpoint (no {META_FILE} in it): "
                              "--overwrite only replaces an earlier conversion; choose another --output")
