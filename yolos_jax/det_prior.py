"""Spatial priors for the [DET] tokens: reference points, Gaussian attention priors, box offsets.

Plain YOLOS starts every [DET] token with uniform attention over the image and learns where to look from
the set loss alone; from scratch (no ImageNet pre-training) that takes far longer than a small demo or a
short fine-tune can afford. The DETR line fixed the same slow start with spatial priors on the queries:
reference points (Anchor DETR, Deformable DETR: a query predicts its box relative to a point) and
Gaussian-modulated attention around them (SMCA-DETR). This module adds both to YOLOS, off by default:

  det_reference_grid = (rows, cols): [DET] token i = r * cols + c owns the reference point
      ((c + 0.5) / cols, (r + 0.5) / rows) in the un-padded image's normalised (x, y) coordinates
      (so num_det_tokens must be rows * cols).
  det_attention_sigma = (s_0, s_1, ...): per head h (missing entries = 0), the logits of [DET] queries
      against patch keys get the additive bias  -d^2 / (2 s_h^2), d = the distance, in patches, between the
      patch centre and the token's reference point; s_h = 0 leaves head h free. The same bias in every
      block. [CLS] and [DET] keys, and all patch / [CLS] queries, are untouched.
  det_box_offset: the box head predicts (cx, cy) relative to the reference point: logit(reference) is added
      to the (cx, cy) logits before the sigmoid (w, h unchanged).

The bias reaches the attention as `vit.SelfAttention`'s `tail_bias` (the [DET] tokens sit last).

With padding, the reference points and distances are laid over each image's valid patches, consistent
with boxes being normalised to the un-padded image. The priors compose with every attention_impl and
with remat; not (yet) with windowed attention, partial sequences or the FP-DETR adapter / late [DET]
insertion (`validate_options` says so).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def enabled(model: Any) -> bool:
    return getattr(model, "det_reference_grid", None) is not None


def validate_options(model: Any) -> None:
    """Clear errors for inconsistent prior settings (model: a YOLOS or any object with its fields)."""
    grid = getattr(model, "det_reference_grid", None)
    sigma = tuple(getattr(model, "det_attention_sigma", ()) or ())
    box_offset = bool(getattr(model, "det_box_offset", False))
    if grid is None:
        if any(s for s in sigma) or box_offset:
            raise ValueError(
                "config.model.det_attention_sigma / det_box_offset need config.model.det_reference_grid = (rows, cols)"
            )
        return
    if len(grid) != 2 or any(int(g) < 1 for g in grid):
        raise ValueError(f"config.model.det_reference_grid must be (rows, cols) >= 1, got {tuple(grid)!r}")
    rows, cols = (int(g) for g in grid)
    if rows * cols != model.num_det_tokens:
        raise ValueError(
            f"config.model.det_reference_grid {rows}x{cols} = {rows * cols} reference points, but config.model.num_det_tokens "
            f"= {model.num_det_tokens}: set num_det_tokens = rows * cols"
        )
    if len(sigma) > model.num_heads or any(s < 0 for s in sigma):
        raise ValueError(
            f"config.model.det_attention_sigma must give at most num_heads = {model.num_heads} values >= 0 (0 = no prior "
            f"for that head), got {sigma!r}"
        )
    clashes = [name for name, on in (
        ("window_size", getattr(model, "window_size", 0)),
        ("token_keep_ratio < 1", getattr(model, "token_keep_ratio", 1.0) < 1.0),
        ("rel_pos", getattr(model, "rel_pos", False)),
        ("adapter", getattr(model, "adapter", False)),
        ("adapter_insert_det_at", getattr(model, "adapter_insert_det_at", 0)),
    ) if on]
    if clashes:
        raise ValueError(f"the [DET] spatial priors (det_reference_grid) do not combine with {', '.join(clashes)} yet")


def reference_points(rows: int, cols: int) -> np.ndarray:
    """[rows * cols, 2] float32 (x, y) cell centres in [0, 1], token-major (r * cols + c)."""
    ys, xs = np.meshgrid((np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)


def valid_extent(images_hw: Sequence[int], pixel_mask: Optional[jax.Array], batch: int) -> tuple[jax.Array, jax.Array]:
    """(valid height, valid width) in pixels, each [B] float32: the un-padded image sizes (padding sits
    bottom/right), or the full image size without a mask."""
    if pixel_mask is None:
        return (jnp.full((batch,), images_hw[0], jnp.float32), jnp.full((batch,), images_hw[1], jnp.float32))
    rows_valid = jnp.any(pixel_mask, axis=2)  # [B, H]
    cols_valid = jnp.any(pixel_mask, axis=1)  # [B, W]
    return jnp.sum(rows_valid, axis=1).astype(jnp.float32), jnp.sum(cols_valid, axis=1).astype(jnp.float32)


def attention_bias(
    grid: Sequence[int],
    sigma: Sequence[float],
    num_heads: int,
    grid_hw: Sequence[int],
    patch_size: int,
    valid_hw: tuple[jax.Array, jax.Array],
) -> jax.Array:
    """Additive logits of the [DET] queries over all keys ([CLS], patches, [DET]).

    grid: (rows, cols) of reference points; sigma: per-head widths in patches (0 = none); grid_hw: the
    patch grid (gh, gw); valid_hw: each image's un-padded (height, width) in pixels, [B] each.
    Returns [B, H, Q, 1 + gh * gw + Q] float32 (0 outside the [DET]-query x patch-key block).
    """
    rows, cols = (int(g) for g in grid)
    q = rows * cols
    gh, gw = (int(g) for g in grid_hw)
    refs = jnp.asarray(reference_points(rows, cols))  # [Q, 2] (x, y)
    valid_h, valid_w = valid_hw
    # Reference points in patch units of each image's valid area; patch centres at (c + 0.5, r + 0.5).
    ref_x = refs[None, :, 0] * (valid_w[:, None] / patch_size)  # [B, Q]
    ref_y = refs[None, :, 1] * (valid_h[:, None] / patch_size)
    py, px = np.meshgrid(np.arange(gh) + 0.5, np.arange(gw) + 0.5, indexing="ij")
    d2 = (ref_x[:, :, None] - px.ravel()[None, None]) ** 2 + (ref_y[:, :, None] - py.ravel()[None, None]) ** 2
    s = np.zeros((num_heads,), np.float64)
    s[: len(sigma)] = sigma
    inv = np.where(s > 0, 1.0 / (2.0 * np.maximum(s, 1e-12) ** 2), 0.0).astype(np.float32)  # [H]
    patch_bias = -d2[:, None] * jnp.asarray(inv)[None, :, None, None]  # [B, H, Q, P]
    batch = patch_bias.shape[0]
    return jnp.concatenate(
        [jnp.zeros((batch, num_heads, q, 1), jnp.float32), patch_bias, jnp.zeros((batch, num_heads, q, q), jnp.float32)],
        axis=-1,
    )


def box_logit_offset(grid: Sequence[int]) -> np.ndarray:
    """[Q, 4] float32: logit of each reference point added to the (cx, cy) box logits, 0 for (w, h)."""
    refs = reference_points(*(int(g) for g in grid)).astype(np.float64)
    out = np.zeros((refs.shape[0], 4), np.float32)
    out[:, :2] = np.log(refs / (1.0 - refs))
    return out
