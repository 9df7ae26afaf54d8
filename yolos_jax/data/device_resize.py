"""The train/eval transforms' final bilinear resample, on the accelerator (input.resize_on_device='on').

The host pipeline's most expensive op after JPEG decoding is the final resize (at YOLOS-S scales the
output has ~1.8x the input's pixels and TF's resize costs about as much as the decode). With
`input.resize_on_device='on'` the host stops before it: it ships each image at its pre-resize size in a
fixed "source canvas" (uint8, zero padded) with `source_size` and the planned `size`, and
`to_global_batch` resamples here, inside one jitted function, as separable matrix products:

    out[b] = Wy[b] @ (src[b] + 0.5) @ Wx[b]^T,   then floor -> uint8 values -> ImageNet normalisation

Wy [H, Hs] / Wx [W, Ws] hold, per output pixel, the weights TF's resize gives the source pixels:
half-pixel centres, a triangle kernel (bilinear), stretched by 1 / scale when the image shrinks below
ANTIALIAS_BELOW in either axis (TF's `antialias=True`, used by the host path then), weights over the
valid source pixels only, normalised to sum 1 (= TF's edge clamping). Rows past the planned size are zero:
the padding. The +0.5 / floor reproduces the host path's round-to-nearest, so both paths agree to one grey
level (float summation order differs; tests/test_data_device_resize.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from yolos_jax.data import transforms as T


def resize_weights(out_size: jax.Array, in_size: jax.Array, antialias: jax.Array, out_canvas: int,
                   in_canvas: int) -> jax.Array:
    """Per-image 1-D resampling matrices [B, out_canvas, in_canvas] (float32).

    out_size, in_size: [B] int sizes of one axis (planned output, valid source); antialias: [B] bool.
    """
    out_size = out_size.astype(jnp.float32)[:, None, None]
    in_size = in_size.astype(jnp.float32)[:, None, None]
    scale = out_size / in_size
    kernel_scale = jnp.where(antialias[:, None, None], jnp.minimum(scale, 1.0), 1.0)
    centre = (jnp.arange(out_canvas, dtype=jnp.float32)[None, :, None] + 0.5) / scale  # in source pixels
    src = jnp.arange(in_canvas, dtype=jnp.float32)[None, None, :] + 0.5
    w = jnp.maximum(0.0, 1.0 - jnp.abs(src - centre) * kernel_scale)
    w = jnp.where(src < in_size, w, 0.0)  # only valid source pixels (TF clamps at the edge)
    total = jnp.sum(w, axis=-1, keepdims=True)
    w = w / jnp.where(total > 0, total, 1.0)
    rows = jnp.arange(out_canvas, dtype=jnp.float32)[None, :, None]
    return jnp.where(rows < out_size, w, 0.0)


def resize_batch(source: jax.Array, source_size: jax.Array, size: jax.Array, canvas: tuple[int, int]) -> jax.Array:
    """source uint8 [B, Hs, Ws, 3] (valid top-left source_size [B, 2]) -> float32 [B, H, W, 3] holding
    the resized image's uint8 values (0..255, integral) in the top-left `size` [B, 2], zeros elsewhere."""
    H, W = canvas
    _, Hs, Ws, _ = source.shape
    shrink = jnp.any(size.astype(jnp.float32) < T.ANTIALIAS_BELOW * source_size.astype(jnp.float32), axis=-1)
    same = jnp.all(size == source_size, axis=-1)
    antialias = shrink & ~same
    wy = resize_weights(size[:, 0], source_size[:, 0], antialias, H, Hs)
    wx = resize_weights(size[:, 1], source_size[:, 1], antialias, W, Ws)
    x = source.astype(jnp.float32) + 0.5  # + 0.5, then floor: round to nearest, as the host path
    hp = jax.lax.Precision.HIGHEST  # TF resamples in float32; no reduced-precision matmuls (TPU, TF32)
    x = jnp.einsum("bih,bhwc->biwc", wy, x, precision=hp)
    x = jnp.einsum("bjw,biwc->bijc", wx, x, precision=hp)
    valid = (jnp.arange(H)[None, :, None] < size[:, None, None, 0]) & (jnp.arange(W)[None, None, :] < size[:, None, None, 1])
    return jnp.where(valid[..., None], jnp.clip(jnp.floor(x), 0.0, 255.0), 0.0)


@functools.lru_cache(maxsize=None)
def device_resize_normalize(sharding) -> "jax.stages.Wrapped":
    """Jitted (source, source_size, pixel_mask) -> the batch schema's float32 image: resized,
    ImageNet-normalised, zeros in the padding; output laid out with `sharding`. Each image's planned
    size is read off its pixel mask (a top-left rectangle), so the step needs no extra input."""
    scale = jnp.asarray(T.NORM_SCALE)
    shift = jnp.asarray(T.NORM_SHIFT)

    def fn(source, source_size, pixel_mask):
        canvas = pixel_mask.shape[1:3]
        size = jnp.stack([pixel_mask[:, :, 0].sum(1), pixel_mask[:, 0, :].sum(1)], axis=-1).astype(jnp.int32)
        x = resize_batch(source, source_size, size, canvas)
        return jnp.where(pixel_mask[..., None], x * scale + shift, 0.0)

    return jax.jit(fn, out_shardings=sharding)
