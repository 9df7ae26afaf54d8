"""The YOLOS detector: a ViT encoder over [CLS] + patch tokens + N [DET] tokens, with two MLP heads.

Model output schema (the one contract every later stage reads):
  outputs = {
    'logits': [B, Q, num_classes + 1] float32  class logits; the last index is "no object",
    'boxes':  [B, Q, 4] float32                 (cx, cy, w, h) in [0, 1], relative to the *un-padded*
                                                image, as DETR/YOLOS targets are,
    'aux_outputs': list of {'logits', 'boxes'}  only when `aux_layers > 0`: predictions from the [DET]
                                                tokens after intermediate blocks (earliest first),
  }
Q = num_det_tokens. Parameters are float32 whatever the compute `dtype`.

Parameter tree (names used by the converter and the optimiser's decay mask):
  patch_embed/proj/{kernel [p, p, 3, D], bias [D]}
  cls_token [1, 1, D], det_tokens [1, Q, D]
  pos_embed_cls [1, 1, D], pos_embed_patches [1, gh, gw, D], pos_embed_det [1, Q, D]
      (gh, gw) = init_pe_size // patch_size; kept as a 2-D grid so that resizing is always by grid
      shape, never inferred from a token count.
  mid_pos_embed_{cls,patches,det}  the same with a leading [depth - 1] axis (when mid_pe_size is set)
  block_{i}/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}
  encoder_norm/{scale, bias}
  class_head/layers_{0,1,2}, box_head/layers_{0,1,2}
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yolos_jax import det_prior, variants, vit, windowed

Dtype = Any


def _as_dtype(dtype: Any) -> Any:
    return jnp.dtype(dtype) if isinstance(dtype, str) else dtype


def validate_model_config(model_cfg: Any) -> None:
    """Checks `config.model` (the `YOLOS` keyword arguments) before tracing; raises ValueError naming the field.

    Sizes are in pixels (init_pe_size, mid_pe_size: (height, width), each >= patch_size); the variant and
    [DET]-prior options are checked by `variants.validate_options` and `det_prior.validate_options`.
    """
    m = model_cfg
    for name in ("hidden_size", "depth", "num_heads", "patch_size", "num_det_tokens", "num_classes"):
        if not isinstance(m[name], int) or m[name] <= 0:
            raise ValueError(f"config.model.{name}: must be a positive integer, got {m[name]!r}")
    variants.validate_options(m)
    det_prior.validate_options(m)
    if m.hidden_size % m.num_heads:
        raise ValueError(f"config.model.num_heads: {m.num_heads} does not divide model.hidden_size={m.hidden_size}")
    for name in ("init_pe_size", "mid_pe_size"):
        size = m[name]
        if size is None and name == "mid_pe_size":
            continue
        if len(size) != 2 or any(int(s) < m.patch_size for s in size):
            raise ValueError(f"config.model.{name}: must be (height, width) in pixels, each >= patch_size, "
                             f"got {size!r}")
    if str(m.dtype) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config.model.dtype: must be 'float32', 'bfloat16' or 'float16', got {m.dtype!r}")


def valid_patch_grid(pixel_mask: jax.Array, patch_size: int, grid_hw: Sequence[int]) -> jax.Array:
    """Each image's own patch grid: [B, 2] int32 (rows, cols) = (valid height // p, valid width // p).

    pixel_mask: [B, H, W] bool (True = real pixel; padding sits bottom/right, as every pipeline here
    pads). The image alone would have exactly this grid: the patch convolution drops a partial last
    patch. Clipped to [1, canvas grid] (an image under one patch has no grid of its own).
    """
    # lax.div truncates, which is floor for these non-negative counts; `//` would add rem/sign ops that the
    # ONNX converter cannot lower under a symbolic batch size (export.py).
    rows = jax.lax.div(jnp.sum(jnp.any(pixel_mask, axis=2), axis=1, dtype=jnp.int32), jnp.int32(patch_size))
    cols = jax.lax.div(jnp.sum(jnp.any(pixel_mask, axis=1), axis=1, dtype=jnp.int32), jnp.int32(patch_size))
    return jnp.stack([jnp.clip(rows, 1, grid_hw[0]), jnp.clip(cols, 1, grid_hw[1])], axis=-1).astype(jnp.int32)


def grid_key_mask(valid_grid: jax.Array, grid_hw: Sequence[int]) -> jax.Array:
    """[B, gh * gw] bool, row-major: True on the cells of each image's own grid (top-left), False on
    padding. valid_grid: [B, 2] from `valid_patch_grid`."""
    gh, gw = (int(g) for g in grid_hw)
    inside = (jnp.arange(gh)[None, :, None] < valid_grid[:, 0, None, None]) & (
        jnp.arange(gw)[None, None, :] < valid_grid[:, 1, None, None]
    )
    return inside.reshape(valid_grid.shape[0], gh * gw)


def patch_key_mask(pixel_mask: jax.Array, patch_size: int, grid_hw: Sequence[int]) -> jax.Array:
    """Valid-patch mask from a valid-pixel mask: [B, H, W] bool -> [B, gh * gw] bool, True where the patch
    lies wholly inside the image (`valid_patch_grid`). A partly real patch is masked: the image run alone
    would not have it, since the patch convolution drops the remainder (images sized to multiples of the
    patch, as the eval transform makes them, have none)."""
    return grid_key_mask(valid_patch_grid(pixel_mask, patch_size, grid_hw), grid_hw)


def torch_linear_bias_init(fan_in: int):
    """PyTorch's default `nn.Linear` bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / float(np.sqrt(fan_in))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's default `nn.Linear` weight init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# i.e. a uniform variance scaling of 1/3. The original YOLOS builds its heads this way, after the backbone's
# own (truncated-normal) init; HF's port re-initialises them with N(0, 0.02) instead.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class MLPHead(nn.Module):
    """`num_layers` Dense layers with ReLU between them (DETR's prediction FFN), initialised as the
    original's `nn.Linear` layers (`torch_linear_kernel_init`, `torch_linear_bias_init`)."""

    hidden_size: int
    out_size: int
    num_layers: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(
                self.out_size if last else self.hidden_size,
                dtype=self.dtype,
                kernel_init=torch_linear_kernel_init,
                bias_init=torch_linear_bias_init(x.shape[-1]),
                name=f"layers_{i}",
            )(x)
            if not last:
                x = nn.relu(x)
        return x


class YOLOS(nn.Module):
    """YOLOS detector. Construct with `YOLOS(**config.model)`; see `configs/` for the variants.

    Attributes:
      hidden_size, depth, num_heads, mlp_dim: the ViT (mlp_dim defaults to 4 * hidden_size).
      patch_size: side of the square patches, in pixels.
      num_det_tokens: Q, the number of [DET] tokens (= detections per image).
      num_classes: number of class logits before "no object" (COCO: 91 ids, so 92 logits).
      init_pe_size: (H, W) in pixels of the grid the position embeddings are stored on.
      mid_pe_size: (H, W) of the mid position embeddings; None disables them.
      layer_norm_eps: 1e-6 as timm/DeiT; HF-converted configs carry 1e-12.
      dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32.
      remat: rematerialise each block in the backward pass (saves activation memory).
      attention_impl: one of `attention.ATTENTION_IMPLS`: None (on CPU 'chunked', on TPU 'splash';
        elsewhere `jax.nn.dot_product_attention`'s choice, i.e. cuDNN flash attention where available),
        'xla' | 'cudnn' (passed to it), 'einsum' (explicit head-major matmuls), 'chunked' (the same per
        head and block of queries; fastest on CPU) or 'splash' (the Pallas TPU splash-attention kernel,
        the key mask as segment ids; per device under a mesh in context: `yolos_jax/attention_tpu.py`).
      aux_layers: also predict from the [DET] tokens of this many blocks before the last.
      drop_path_rate, token_keep_ratio, patch_embed, adapter, adapter_insert_det_at, detach_det_tokens:
        the paper variants (stochastic depth, MIMDet partial sequences and ConvStem, FP-DETR task adapter,
        fixed [DET] tokens), documented in `yolos_jax/variants.py`; the defaults give the plain YOLOS.
        In training (`train=True`) they draw from the rng streams 'drop_path' and 'tokens'.
      window_size, global_blocks, rel_pos: ViTDet windowed attention over r x r patch windows (0 = global
        everywhere) in every block but `global_blocks` (None: every depth/4-th, (2, 5, 8, 11) at depth 12),
        and the decomposed relative position bias (zero-initialised); see `yolos_jax/windowed.py`.
      det_reference_grid, det_attention_sigma, det_box_offset: spatial priors for the [DET] tokens
        (reference points on a rows x cols grid, per-head Gaussian attention priors around them, boxes
        predicted relative to them); see `yolos_jax/det_prior.py`. Off by default (plain YOLOS).
    """

    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: Optional[int] = None
    patch_size: int = 16
    num_det_tokens: int = 100
    num_classes: int = 91
    init_pe_size: Sequence[int] = (512, 864)
    mid_pe_size: Optional[Sequence[int]] = None
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    dtype: Any = "float32"
    remat: bool = False
    attention_impl: Optional[str] = None
    aux_layers: int = 0
    drop_path_rate: float = 0.0
    token_keep_ratio: float = 1.0
    patch_embed: str = "linear"
    adapter: bool = False
    adapter_insert_det_at: int = 0
    detach_det_tokens: bool = False
    window_size: int = 0
    global_blocks: Optional[Sequence[int]] = None
    rel_pos: bool = False
    det_reference_grid: Optional[Sequence[int]] = None
    det_attention_sigma: Sequence[float] = ()
    det_box_offset: bool = False

    def _grid(self, size_hw: Sequence[int]) -> tuple[int, int]:
        return int(size_hw[0]) // self.patch_size, int(size_hw[1]) // self.patch_size

    def _embed_tokens(self, images: jax.Array, dtype: Any) -> tuple[jax.Array, tuple[int, int]]:
        """images [B, H, W, 3] -> ([CLS | patches | DET] tokens [B, T, D] without position embeddings,
        the canvas patch grid (gh, gw)). Called from `__call__` (creates the stem and token parameters)."""
        width, q, batch = self.hidden_size, self.num_det_tokens, images.shape[0]
        if self.patch_embed == "conv_stem":  # MIMDet Sec. 2.2
            patches = variants.ConvStem(width, self.patch_size, dtype, name="conv_stem")(images.astype(dtype))
        else:
            patches = vit.PatchEmbed(width, self.patch_size, dtype, name="patch_embed")(images.astype(dtype))
        grid_hw = tuple(patches.shape[1:3])
        patches = patches.reshape(batch, grid_hw[0] * grid_hw[1], width)
        cls_token = self.param("cls_token", vit.trunc_normal_02, (1, 1, width))
        det_tokens = self.param("det_tokens", vit.trunc_normal_02, (1, q, width))
        if self.detach_det_tokens:  # YOLOS Table 7: [DET] tokens fixed at their random initialisation
            det_tokens = jax.lax.stop_gradient(det_tokens)
        tokens = [jnp.broadcast_to(cls_token, (batch, 1, width)).astype(dtype), patches,
                  jnp.broadcast_to(det_tokens, (batch, q, width)).astype(dtype)]
        return jnp.concatenate(tokens, axis=1), grid_hw

    def _position_embeddings(
        self, grid_hw: tuple[int, int], valid_grid: Optional[jax.Array], batch: int, dtype: Any
    ) -> tuple[jax.Array, Optional[Callable[[int], jax.Array]]]:
        """(input position embeddings [B or 1, T, D], mid_pos_at: block i -> [B or 1, T, D] or None).

        valid_grid: [B, 2] each image's own patch grid, or None (every image fills the canvas grid_hw).
        The stored grids are resized to each image's own grid, not to the canvas, so an image gets the
        embeddings it would get alone. Mid embeddings are built one block at a time ([B, T, D] per block,
        not per model). Called from `__call__` (creates the position-embedding parameters).
        """
        width, q = self.hidden_size, self.num_det_tokens

        def with_patch_pos(cls: jax.Array, grid: jax.Array, det: jax.Array) -> jax.Array:
            """[CLS | patches | DET] position embeddings [B or 1, T, D] from one stored grid [gh', gw', D]."""
            if valid_grid is None:
                patch_pos = vit.resize_posemb_grid(grid, grid_hw).reshape(1, -1, width)
            else:
                patch_pos = vit.resize_posemb_grid_per_image(grid, valid_grid, grid_hw).reshape(batch, -1, width)
            n = patch_pos.shape[0]
            return jnp.concatenate(
                [jnp.broadcast_to(cls, (n, 1, width)), patch_pos, jnp.broadcast_to(det, (n, q, width))], axis=1
            ).astype(dtype)

        pos_cls = self.param("pos_embed_cls", vit.trunc_normal_02, (1, 1, width))
        pos_patches = self.param("pos_embed_patches", vit.trunc_normal_02, (1, *self._grid(self.init_pe_size), width))
        pos_det = self.param("pos_embed_det", vit.trunc_normal_02, (1, q, width))
        pos = with_patch_pos(pos_cls, pos_patches[0], pos_det)
        if self.mid_pe_size is None or self.depth <= 1:
            return pos, None
        n_mid = self.depth - 1
        mid_cls = self.param("mid_pos_embed_cls", vit.trunc_normal_02, (n_mid, 1, width))
        mid_patches = self.param("mid_pos_embed_patches", vit.trunc_normal_02,
                                 (n_mid, *self._grid(self.mid_pe_size), width))
        mid_det = self.param("mid_pos_embed_det", vit.trunc_normal_02, (n_mid, q, width))
        return pos, lambda i: with_patch_pos(mid_cls[i], mid_patches[i], mid_det[i])

    def _predict_fn(self, dtype: Any) -> Callable[[jax.Array], dict[str, jax.Array]]:
        """The shared heads: [DET] tokens [B, Q, D] -> {'logits', 'boxes'} (the module docstring's schema).
        Called from `__call__` (creates encoder_norm, class_head and box_head)."""
        width = self.hidden_size
        encoder_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=dtype, name="encoder_norm")
        class_head = MLPHead(width, self.num_classes + 1, 3, dtype, name="class_head")
        box_head = MLPHead(width, 4, 3, dtype, name="box_head")
        box_offset = 0.0
        if det_prior.enabled(self) and self.det_box_offset:
            box_offset = jnp.asarray(det_prior.box_logit_offset(self.det_reference_grid))  # [Q, 4]

        def predict(det: jax.Array) -> dict[str, jax.Array]:
            det = encoder_norm(det)
            return {
                "logits": class_head(det).astype(jnp.float32),
                "boxes": jax.nn.sigmoid(box_head(det).astype(jnp.float32) + box_offset),
            }

        return predict

    @nn.compact
    def __call__(
        self, images: jax.Array, pixel_mask: Optional[jax.Array] = None, *, train: bool = False
    ) -> dict[str, Any]:
        """images: [B, H, W, 3] float (normalised, padded); pixel_mask: [B, H, W] bool or None.

        Returns the output dict described in the module docstring.
        """
        variants.validate_options(self)
        det_prior.validate_options(self)
        dtype = _as_dtype(self.dtype)
        batch = images.shape[0]
        q = self.num_det_tokens

        x, grid_hw = self._embed_tokens(images, dtype)
        # Each image's own patch grid (None: every image fills the canvas).
        valid_grid = None if pixel_mask is None else valid_patch_grid(pixel_mask, self.patch_size, grid_hw)
        pos, mid_pos_at = self._position_embeddings(grid_hw, valid_grid, batch, dtype)
        x = x + pos
        key_mask = None
        if valid_grid is not None:
            ones = jnp.ones((batch, 1), bool)
            key_mask = jnp.concatenate([ones, grid_key_mask(valid_grid, grid_hw), jnp.ones((batch, q), bool)], axis=1)

        token_index = None  # [B, T']: the partial sequence's tokens in the full sequence
        if train and self.token_keep_ratio < 1.0:  # MIMDet Sec. 2.1: a random partial sequence
            x, key_mask, token_index = variants.keep_random_patches(
                self, x, key_mask, grid_hw[0] * grid_hw[1], q, self.token_keep_ratio
            )
        det_hook = variants.DetTokenHook.maybe_create(self, q, dtype)  # task adapter / late [DET] tokens
        if det_hook is not None:
            x, key_mask = det_hook.split(x, key_mask)
        drop_path = variants.drop_path_rates(self.drop_path_rate if train else 0.0, self.depth)

        block_cls = nn.remat(vit.EncoderBlock) if self.remat else vit.EncoderBlock
        attention = windowed.encoder_attention(self, grid_hw, partial_sequence=self.token_keep_ratio < 1.0)
        det_bias = None  # [B, H, Q, T]: the [DET] queries' attention prior, the same in every block
        if det_prior.enabled(self) and any(s > 0 for s in self.det_attention_sigma):
            valid_hw = det_prior.valid_extent(images.shape[1:3], pixel_mask, batch)
            det_bias = det_prior.attention_bias(self.det_reference_grid, self.det_attention_sigma,
                                                self.num_heads, grid_hw, self.patch_size, valid_hw)
        intermediates = []
        for i in range(self.depth):
            if det_hook is not None:
                x, key_mask = det_hook.before_block(i, x, key_mask)
            x = block_cls(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim or 4 * self.hidden_size,
                layer_norm_eps=self.layer_norm_eps,
                qkv_bias=self.qkv_bias,
                dtype=dtype,
                attention_impl=self.attention_impl,
                drop_path_rate=drop_path[i],
                attention=attention[i],
                name=f"block_{i}",
            )(x, key_mask, det_bias)
            if i >= self.depth - 1 - self.aux_layers and i < self.depth - 1:
                intermediates.append(x[:, -q:])
            if mid_pos_at is not None and i < self.depth - 1:
                mid_pos = mid_pos_at(i)
                if token_index is not None:
                    mid_pos = variants.gather_tokens(mid_pos, token_index)
                x = x + mid_pos[:, : x.shape[1]]  # [DET] tokens sit last: absent before insertion

        predict = self._predict_fn(dtype)
        outputs = predict(x[:, -q:])
        if self.aux_layers:
            outputs["aux_outputs"] = [predict(d) for d in intermediates]
        return outputs
