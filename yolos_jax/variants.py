"""ViT-detection variants from the papers, as options of `YOLOS` (every default keeps the plain model).

  drop_path_rate        stochastic depth (timm): block i drops each residual branch of an example with
                        probability rate * i / (depth - 1); training only (rng stream 'drop_path').
  token_keep_ratio      partial-sequence fine-tuning (MIMDet Sec. 2.1): in training the encoder sees
                        ceil(ratio * num_patches) randomly chosen patch tokens (with their position and
                        mid position embeddings) plus [CLS] and every [DET] token; inference sees all.
  patch_embed           'linear' (the ViT's stride-p patchify) | 'conv_stem' (MIMDet Sec. 2.2, Architecture
                        1: log2(p) stride-2 3x3 convolutions with LayerNorm + GELU, doubling channels up to
                        the width, then a 1x1 projection; the same token grid).
  adapter               FP-DETR Sec. 3.3 task adaptor: one self-attention layer over the [DET] tokens,
                        shared by every block and applied before each of them, whose queries and keys carry
                        learnable query position embeddings (the "visual prompts").
  adapter_insert_det_at the block before which the [DET] tokens join the sequence (0 = from the start);
                        earlier blocks see [CLS] + patches only.
  detach_det_tokens     YOLOS Table 7: the [DET] token embeddings stay at their random initialisation
                        (stop_gradient: zero gradient, so AdamW without decay on them never moves them).

Auxiliary losses on the last k blocks use the model's existing `aux_layers` field with `config.loss.aux_loss`.

Choices the papers leave open, stated once here:
  * Partial sequences respect the padding mask: the kept patches are a uniformly random subset of the
    image's *valid* patches (those of its own grid, `yolos.valid_patch_grid`). An image with fewer valid
    patches than the fixed count keeps all of them and fills the rest with padding patches, which stay
    masked as attention keys, so they change nothing the other tokens see. The number kept is static (jit
    needs static shapes: ceil(ratio * canvas patches)), and kept patches stay in raster order.
    Batch invariance, and its bound: given the kept set, an image's output equals its output alone with
    the same patches kept (its position embeddings are its own grid's; the padding patches are masked);
    inference (every patch) is exactly batch-invariant. The *draw* is not: how many of an image's patches
    are kept follows the canvas's patch count, and the random subset depends on the batch row, as any
    random draw over a batch does (`tests/test_variants.py` tests the conditional equality).
  * The adapter is pre-LN with a residual (z + Attn(LN(z) + p, LN(z) + p, LN(z))), like the ViT blocks it
    sits between; FP-DETR's own layer is post-LN, which would re-normalise the [DET] stream before every
    pre-trained pre-LN block. Its prompts p [1, Q, D] are its own parameters (shared like the rest of it),
    separate from `pos_embed_det`, which only enters at the input as in YOLOS.
  * [DET] tokens inserted at block k enter as det_tokens + pos_embed_det; the mid position embeddings of
    the [DET] slots of earlier blocks are not used.
  * ConvStem crops the image to whole patches first (as the patchify stem drops the remainder), so its
    grid is exactly (H // p, W // p); padding is 1 on each side as PyTorch's Conv2d(padding=1). It is
    batch-invariant exactly: a stride-2 3x3 convolution's output cell o reads input cells 2o - 1 .. 2o + 1,
    so the cells of an image's own grid never read past its last whole patch, whatever the padding holds.

Parameters added only when an option is on: conv_stem/{conv_i/kernel, norm_i/{scale, bias}, proj} (instead
of patch_embed), adapter/{query_pos [1, Q, D], norm, qk [D, 2D], v [D, D], proj}.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from yolos_jax import attention, vit

PATCH_EMBEDS = ("linear", "conv_stem")
TOKEN_KEEP_RANGE = (0.25, 1.0)

# Field -> default: the options this module implements (the plain YOLOS when all are at their default).
OPTION_DEFAULTS: dict[str, Any] = dict(
    drop_path_rate=0.0,
    token_keep_ratio=1.0,
    patch_embed="linear",
    adapter=False,
    adapter_insert_det_at=0,
    detach_det_tokens=False,
)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_options(cfg: Any) -> None:
    """Checks the variant fields of a model config (`config.model` mapping or a `YOLOS` instance).

    Raises ValueError naming `config.model.<field>` and the accepted values.
    """
    depth = int(_get(cfg, "depth", 12))
    rate = _get(cfg, "drop_path_rate", 0.0)
    if not _is_number(rate) or not 0.0 <= rate < 1.0:
        raise ValueError(f"config.model.drop_path_rate must be a number in [0, 1), got {rate!r} (0 disables it)")
    ratio = _get(cfg, "token_keep_ratio", 1.0)
    lo, hi = TOKEN_KEEP_RANGE
    if not _is_number(ratio) or not lo <= ratio <= hi:
        raise ValueError(
            f"config.model.token_keep_ratio must be a number in [{lo}, {hi}] (the fraction of patch tokens "
            f"the encoder sees in training; MIMDet uses 0.25-0.5, 1.0 disables it), got {ratio!r}"
        )
    stem = _get(cfg, "patch_embed", "linear")
    if stem not in PATCH_EMBEDS:
        raise ValueError(f"config.model.patch_embed must be one of {PATCH_EMBEDS}, got {stem!r}")
    if stem == "conv_stem":
        conv_stem_depth(int(_get(cfg, "patch_size", 16)))  # raises for a patch size that is no power of 2
    for name in ("adapter", "detach_det_tokens"):
        if not isinstance(_get(cfg, name, False), bool):
            raise ValueError(f"config.model.{name} must be True or False, got {_get(cfg, name)!r}")
    insert = _get(cfg, "adapter_insert_det_at", 0)
    if isinstance(insert, bool) or not isinstance(insert, int) or not 0 <= insert < depth:
        raise ValueError(
            f"config.model.adapter_insert_det_at must be a block index in [0, depth={depth}) (0 = [DET] "
            f"tokens from the start), got {insert!r}"
        )
    aux = int(_get(cfg, "aux_layers", 0) or 0)
    if insert and depth - 1 - aux < insert:
        raise ValueError(
            f"config.model.aux_layers={aux} asks for predictions after block {depth - 1 - aux}, before the "
            f"[DET] tokens join at block config.model.adapter_insert_det_at={insert}: use aux_layers <= "
            f"{depth - 1 - insert}"
        )
    if ratio < 1.0 and (_get(cfg, "window_size", 0) or _get(cfg, "rel_pos", False)):
        # Checked here too (windowed.py refuses it when tracing in training) so a config fails at once.
        raise ValueError(
            "config.model.token_keep_ratio < 1 drops patch tokens in training, which leaves no patch grid "
            "for config.model.window_size / config.model.rel_pos: use one or the other"
        )


def require_rng(module: nn.Module, stream: str, field: str) -> jax.Array:
    """`module.make_rng(stream)`, with an error naming the config field that needs it when it is absent."""
    if not module.has_rng(stream):
        raise ValueError(
            f"config.model.{field} needs the PRNG stream {stream!r} in training: call "
            f"model.apply(..., train=True, rngs={{{stream!r}: key, ...}}) (the train step passes it)"
        )
    return module.make_rng(stream)


# --------------------------------------------------------------------------------------------------
# Drop path (stochastic depth)
# --------------------------------------------------------------------------------------------------


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop-path rates, rising linearly from 0 (first block) to `rate` (last), as timm's
    `torch.linspace(0, rate, depth)`. All zeros for rate 0."""
    if depth == 1:
        return [0.0]
    return [rate * i / (depth - 1) for i in range(depth)]


# --------------------------------------------------------------------------------------------------
# Partial sequences (MIMDet Sec. 2.1)
# --------------------------------------------------------------------------------------------------


def num_kept_patches(num_patches: int, ratio: float) -> int:
    """ceil(ratio * num_patches), robust to float round-off (0.3 * 10 is 3.0000000000000004)."""
    return max(1, min(num_patches, math.ceil(round(ratio * num_patches, 6))))


def sample_patch_index(rng: jax.Array, patch_mask: Optional[jax.Array], batch: int, num_patches: int,
                       num_keep: int) -> jax.Array:
    """Indices of the patches each image keeps: int32 [B, num_keep], ascending (raster order).

    patch_mask: [B, num_patches] bool (True = the patch holds a real pixel) or None (all valid).
    Policy: a uniformly random subset of the valid patches; when an image has fewer valid patches than
    `num_keep`, all of them plus random padding patches (see the module docstring).
    """
    scores = jax.random.uniform(rng, (batch, num_patches))  # iid keys: top-k of them is a uniform subset
    if patch_mask is not None:
        scores = scores + patch_mask.astype(scores.dtype)  # valid patches in [1, 2) outrank padding [0, 1)
    _, index = jax.lax.top_k(scores, num_keep)
    return jnp.sort(index, axis=-1).astype(jnp.int32)


def token_index(patch_index: jax.Array, num_patches: int, num_det: int) -> jax.Array:
    """Sequence positions [B, 1 + K + Q] of [CLS], the kept patches and the [DET] tokens in the full
    [CLS | patches | DET] sequence (int32)."""
    batch = patch_index.shape[0]
    cls = jnp.zeros((batch, 1), jnp.int32)
    det = jnp.broadcast_to(1 + num_patches + jnp.arange(num_det, dtype=jnp.int32), (batch, num_det))
    return jnp.concatenate([cls, patch_index + 1, det], axis=1)


def keep_random_patches(
    module: nn.Module,
    x: jax.Array,
    key_mask: Optional[jax.Array],
    num_patches: int,
    num_det: int,
    ratio: float,
) -> tuple[jax.Array, Optional[jax.Array], jax.Array]:
    """The training-time partial sequence. Call from the model's compact `__call__` (draws rng 'tokens').

    x: [B, T, D] embedded tokens (position embeddings already added), T = 1 + num_patches + num_det;
    key_mask: [B, T] bool or None.
    Returns (x [B, T', D], key_mask [B, T'] or None, token_index [B, T'] int32) with
    T' = 1 + ceil(ratio * num_patches) + num_det; `gather_tokens(values, token_index)` takes any other
    per-token array (the mid position embeddings) to the same sequence. The kept patch indices are sown
    as 'intermediates'/'kept_patch_index' [B, K] (read them with `mutable=['intermediates']`).
    """
    batch = x.shape[0]
    keep = num_kept_patches(num_patches, ratio)
    patch_mask = None if key_mask is None else key_mask[:, 1 : 1 + num_patches]
    patch_index = sample_patch_index(require_rng(module, "tokens", "token_keep_ratio"), patch_mask, batch,
                                     num_patches, keep)
    module.sow("intermediates", "kept_patch_index", patch_index)
    index = token_index(patch_index, num_patches, num_det)  # [B, T']
    x = gather_tokens(x, index)
    if key_mask is not None:
        key_mask = jnp.take_along_axis(key_mask, index, axis=1)
    return x, key_mask, index


def gather_tokens(values: jax.Array, index: jax.Array) -> jax.Array:
    """values [B or 1, T, D] at the sequence positions index [B, T'] -> [B, T', D]."""
    values = jnp.broadcast_to(values, (index.shape[0], *values.shape[1:]))
    return jnp.take_along_axis(values, index[..., None], axis=1)


# --------------------------------------------------------------------------------------------------
# ConvStem (MIMDet Sec. 2.2)
# --------------------------------------------------------------------------------------------------


def conv_stem_depth(patch_size: int) -> int:
    """log2(patch_size) stride-2 convolutions; the patch size must be a power of two >= 2."""
    n = int(round(math.log2(patch_size))) if patch_size > 0 else 0
    if patch_size < 2 or 2**n != patch_size:
        raise ValueError(
            f"config.model.patch_embed='conv_stem' needs config.model.patch_size to be a power of 2 (>= 2), "
            f"got {patch_size}"
        )
    return n


def conv_stem_channels(hidden_size: int, patch_size: int) -> list[int]:
    """Output channels of each stride-2 conv: doubling, ending at the width (B, p 16: 96, 192, 384, 768)."""
    n = conv_stem_depth(patch_size)
    return [max(1, -(-hidden_size // 2 ** (n - 1 - i))) for i in range(n)]


class ConvStem(nn.Module):
    """MIMDet's ConvStem: [B, H, W, 3] -> [B, H // p, W // p, D], replacing the patchify stem.

    Each stage: Conv 3x3 stride 2 padding 1 (no bias) -> LayerNorm over channels (eps 1e-6) -> exact GELU;
    then a 1x1 projection (with bias) to the width. Randomly initialised (it is not pre-trained).
    """

    hidden_size: int
    patch_size: int = 16
    dtype: Any = jnp.float32
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        gh, gw = images.shape[1] // p, images.shape[2] // p
        if gh == 0 or gw == 0:
            raise ValueError(f"ConvStem: image {images.shape[1:3]} is smaller than one {p}x{p} patch")
        x = images[:, : gh * p, : gw * p]  # whole patches only: the grid of the patchify stem
        for i, channels in enumerate(conv_stem_channels(self.hidden_size, p)):
            x = nn.Conv(
                channels,
                kernel_size=(3, 3),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                dtype=self.dtype,
                # He-normal for the GELU that follows (the LayerNorm makes the scale matter little).
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
                name=f"conv_{i}",
            )(x)
            x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=f"norm_{i}")(x)
            x = nn.gelu(x, approximate=False)
        # MIMDet's final Conv2d(C, D, 1x1): a Dense on the channel axis.
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=nn.initializers.lecun_normal(),
                        name="proj")(x)


# --------------------------------------------------------------------------------------------------
# FP-DETR task adapter and late [DET] insertion
# --------------------------------------------------------------------------------------------------


class TaskAdapter(nn.Module):
    """FP-DETR's task adaptor: self-attention over the [DET] tokens with learnable prompts.

    det: [B, Q, D] -> [B, Q, D] = det + proj(Attn(q = k = LN(det) + p, v = LN(det))), with the visual
    prompts p = `query_pos` [1, Q, D]. One instance serves every block (its parameters are shared).
    """

    num_heads: int
    num_queries: int
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, det: jax.Array) -> jax.Array:
        batch, q, width = det.shape
        if q != self.num_queries:
            raise ValueError(f"TaskAdapter built for {self.num_queries} [DET] tokens got {q}")
        heads = self.num_heads
        prompts = self.param("query_pos", vit.trunc_normal_02, (1, q, width))
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(det)
        dense = lambda n, name, v: nn.Dense(  # noqa: E731
            n, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=vit.trunc_normal_02, name=name)(v)
        qk = dense(2 * width, "qk", y + prompts.astype(y.dtype)).reshape(batch, q, 2, heads, width // heads)
        v = dense(width, "v", y).reshape(batch, q, heads, width // heads)
        impl = self.attention_impl
        if impl is None and jax.default_backend() == "cpu":
            impl = "einsum"  # Q tokens fit one query block: 'chunked' would be the same computation
        out = attention.dot_product_attention(qk[:, :, 0], qk[:, :, 1], v, None, impl).reshape(batch, q, width)
        return det + nn.Dense(width, dtype=self.dtype, kernel_init=vit.trunc_normal_02, name="proj")(out)


class DetTokenHook:
    """What happens to the [DET] tokens between blocks: late insertion and the shared task adapter.

    A plain Python helper used inside `YOLOS.__call__` (the adapter it creates is a submodule of the
    model named 'adapter'). `split` runs once before the blocks, `before_block(i, ...)` before block i.
    """

    def __init__(self, model: Any, num_det: int, dtype: Any):
        self.num_det = num_det
        self.insert_at = int(model.adapter_insert_det_at)
        self.held: Optional[jax.Array] = None
        self.adapter = None
        if model.adapter:
            self.adapter = TaskAdapter(
                num_heads=model.num_heads,
                num_queries=num_det,
                layer_norm_eps=model.layer_norm_eps,
                qkv_bias=model.qkv_bias,
                dtype=dtype,
                attention_impl=model.attention_impl,
                name="adapter",
            )

    @staticmethod
    def maybe_create(model: Any, num_det: int, dtype: Any) -> Optional["DetTokenHook"]:
        """None for the plain model (no adapter, [DET] tokens from the start)."""
        if not model.adapter and not model.adapter_insert_det_at:
            return None
        return DetTokenHook(model, num_det, dtype)

    def split(self, x: jax.Array, key_mask: Optional[jax.Array]) -> tuple[jax.Array, Optional[jax.Array]]:
        """x [B, T, D] with the [DET] tokens last -> the sequence the first block sees."""
        if self.insert_at == 0:
            return x, key_mask
        q = self.num_det
        self.held = x[:, -q:]
        return x[:, :-q], None if key_mask is None else key_mask[:, :-q]

    def before_block(
        self, i: int, x: jax.Array, key_mask: Optional[jax.Array]
    ) -> tuple[jax.Array, Optional[jax.Array]]:
        """Inserts the held [DET] tokens before block `insert_at`; applies the adapter from then on."""
        if self.insert_at and i == self.insert_at:
            x = jnp.concatenate([x, self.held.astype(x.dtype)], axis=1)
            if key_mask is not None:
                key_mask = jnp.concatenate([key_mask, jnp.ones(self.held.shape[:2], bool)], axis=1)
        if self.adapter is not None and i >= self.insert_at:
            q = self.num_det
            x = jnp.concatenate([x[:, :-q], self.adapter(x[:, -q:])], axis=1)
        return x, key_mask
