"""Vision Transformer building blocks: patch embedding, position-embedding resizing, the attention layer,
blocks. The attention kernels it runs live in `yolos_jax/attention.py`.

Layout conventions used throughout the package:
  * images are NHWC: [B, H, W, 3] float, ImageNet-normalised;
  * token sequences are [B, T, D];
  * attention keys can be masked with a boolean key mask [B, T] (True = the token may be attended to).

The bicubic resize here reproduces PyTorch's `F.interpolate(mode='bicubic', align_corners=False)`
(Keys' cubic with a = -0.75, clamped borders, no antialiasing) so that converted position embeddings give
the same outputs as the reference. `jax.image.resize(method='cubic')` uses a = -0.5 and antialiasing on
downsampling, which is a different function.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yolos_jax import attention

Dtype = Any

# Initialisers as timm's ViT (the DeiT/YOLOS reference): `trunc_normal_(std=.02)` for tokens, position embeddings
# and linear layers, zero biases. timm truncates at a=-2, b=2 in absolute units, i.e. at +-100 standard
# deviations: in effect N(0, 0.02^2). (flax's bounds are in standard deviations: its default +-2 would give a
# standard deviation of 0.0176, 12% short.)
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)


@jax.custom_vjp
def _dense_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., K] @ kernel [K, N] -> [..., N], with the kernel's gradient as one canonical matmul."""
    return jnp.einsum("...k,kn->...n", x, kernel)


def _dense_product_fwd(x, kernel):
    return _dense_product(x, kernel), (x, kernel)


def _dense_product_bwd(residuals, dy):
    """dx = dy kernel^T; d kernel = x^T dy over all M tokens, as a row-major matmul of the narrower side's
    transpose: x^T [K, M] @ dy [M, N], or (dy^T [N, M] @ x [M, K])^T when N < K.

    Left to autodiff, XLA:CPU's layout assignment copied dy to [N, M] and ran the product with both operands
    transposed in Eigen (119 GFLOP/s on one core for YOLOS-Ti's fc2; 13% of its train step in all). A
    row-major product goes to YNNPACK (~200 GFLOP/s). The barriers keep XLA's simplifier from folding the
    transposes back into the product and from fusing the operand's producer into the transpose. Transposing
    the narrower operand moves the fewest bytes: for fc2 (K = 4 N) that is dy, where transposing its GELU
    input took 10 ms a layer.
    """
    x, kernel = residuals
    dx = jnp.einsum("...n,kn->...k", dy, kernel)
    x2d = x.reshape(-1, x.shape[-1])
    dy2d = dy.reshape(-1, dy.shape[-1])
    barrier = jax.lax.optimization_barrier
    accumulate = jnp.promote_types(x.dtype, jnp.float32)  # sums over all M tokens: at least float32
    if dy2d.shape[1] < x2d.shape[1]:
        d_kernel_t = jnp.dot(barrier(barrier(dy2d).T), x2d, preferred_element_type=accumulate)  # [N, K]
        d_kernel = barrier(d_kernel_t).T
    else:
        d_kernel = jnp.dot(barrier(barrier(x2d).T), dy2d, preferred_element_type=accumulate)
    return dx.astype(x.dtype), d_kernel.astype(kernel.dtype)


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`nn.Dense`'s `dot_general` on CPU: `lax.dot_general` for lhs [..., K] x rhs [K, N] with `_dense_product`'s
    backward. Any other contraction, a precision, a preferred_element_type or any further `lax.dot_general`
    argument goes to `lax.dot_general` unchanged."""
    (contract_lhs, contract_rhs), batch_dims = dimension_numbers
    plain = contract_lhs == (lhs.ndim - 1,) and contract_rhs == (0,) and batch_dims == ((), ()) and rhs.ndim == 2
    if not plain or precision is not None or preferred_element_type is not None or kwargs:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
    return _dense_product(lhs, rhs)


def Dense(features: int, **kwargs) -> nn.Dense:
    """`nn.Dense` with `dense_dot_general` on CPU (elsewhere XLA's own gradient is kept): the linear layers of
    the transformer blocks (qkv, proj, fc1, fc2; the windowed blocks' too), where nearly all of a step's
    linear-layer FLOPs are. Parameters and forward are nn.Dense's; the backend is read when the layer is built.
    Like any custom VJP, the CPU layer is differentiable in reverse mode only (`jax.grad`, `jax.vjp`), not by
    `jax.jvp`/`jax.jacfwd`; nothing in the project differentiates forward."""
    if jax.default_backend() == "cpu":
        kwargs.setdefault("dot_general", dense_dot_general)
    return nn.Dense(features, **kwargs)


# --------------------------------------------------------------------------------------------------
# Position embedding resizing
# --------------------------------------------------------------------------------------------------

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient.


def _cubic_weight_near(x: np.ndarray) -> np.ndarray:
    """Keys' kernel for |x| <= 1."""
    a = _CUBIC_A
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0


def _cubic_weight_far(x: np.ndarray) -> np.ndarray:
    """Keys' kernel for 1 < |x| < 2."""
    a = _CUBIC_A
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a


@functools.lru_cache(maxsize=256)
def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Dense [out_size, in_size] float64 matrix equal to PyTorch's 1-D bicubic interpolation.

    PyTorch (align_corners=False, size given) samples output index i at source coordinate
    `(i + 0.5) * in_size / out_size - 0.5`, takes the 4 neighbours floor(src) - 1 .. floor(src) + 2,
    clamps them into [0, in_size - 1] and weights them with Keys' cubic (a = -0.75). The 2-D resize is
    separable, so applying this matrix along height and then width reproduces `F.interpolate`.
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}")
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        base = np.floor(src)
        t = src - base
        weights = (
            _cubic_weight_far(t + 1.0),
            _cubic_weight_near(t),
            _cubic_weight_near(1.0 - t),
            _cubic_weight_far(2.0 - t),
        )
        for k, w in enumerate(weights):
            idx = int(min(max(base - 1 + k, 0), in_size - 1))
            matrix[i, idx] += w
    return matrix


def resize_posemb_grid(grid: jax.Array, new_hw: Sequence[int]) -> jax.Array:
    """Resizes patch position embeddings laid out on a 2-D grid, as PyTorch's bicubic.

    Args:
      grid: [..., gh, gw, D] embeddings on their stored (gh, gw) grid.
      new_hw: the target grid (new_gh, new_gw) in patches.
    Returns:
      [..., new_gh, new_gw, D] in grid's dtype. Identity when the grid shape already matches.
    """
    gh, gw = grid.shape[-3], grid.shape[-2]
    new_h, new_w = int(new_hw[0]), int(new_hw[1])
    if (gh, gw) == (new_h, new_w):
        return grid
    # Four weighted taps per output row and column (gathers with constant indices), not the dense
    # [out, in] matrices: XLA:CPU fuses them into elementwise loops, 3x faster than two matmuls plus the
    # transposes they need (YOLOS-S: 11 mid grids of 32x54x384 per call). Exact fp32 on every backend.
    x = grid.astype(jnp.float32)
    for axis, (size, new) in ((-3, (gh, new_h)), (-2, (gw, new_w))):
        index, weight = bicubic_taps(size, new)
        trailing = (1,) * (-axis - 1)  # weight[:, k] broadcasts along the axes after `axis`
        x = sum(jnp.take(x, index[:, k], axis=axis) * weight[:, k].reshape(-1, *trailing) for k in range(4))
    return x.astype(grid.dtype)


@functools.lru_cache(maxsize=256)
def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`bicubic_resize_matrix` as its <= 4 non-zeros per row: (index [out, 4] int32, weight [out, 4] f32).

    Unused taps (rows near a clamped border, whose duplicate neighbours were merged) get weight 0.
    """
    matrix = bicubic_resize_matrix(in_size, out_size)
    index = np.zeros((out_size, 4), np.int32)
    weight = np.zeros((out_size, 4), np.float32)
    for i, row in enumerate(matrix):
        (cols,) = np.nonzero(row)
        index[i, : len(cols)] = cols
        weight[i, : len(cols)] = row[cols]
    return index, weight


def bicubic_resize_weights(in_size: int, out_sizes: jax.Array, canvas: int) -> jax.Array:
    """Per-image `bicubic_resize_matrix` with traced output sizes, laid on a fixed canvas: jittable.

    in_size: the stored grid's extent (static); out_sizes: [B] int, each image's own extent (1..canvas);
    canvas: the padded extent (static). Returns [B, canvas, in_size] float32: for rows i < out_sizes[b],
    row i of `bicubic_resize_matrix(in_size, out_sizes[b])`; rows beyond are 0 (padded cells, masked as
    keys). Computed in float32 as PyTorch's CPU kernel (`upsample_bicubic2d`: scale = in / out and the
    source index scale * (i + 0.5) - 0.5 in the input's float type), so it agrees with the float64
    matrix to float32 rounding.
    """
    out = jnp.maximum(jnp.asarray(out_sizes, jnp.int32), 1).astype(jnp.float32)[:, None]  # [B, 1]
    i = jnp.arange(canvas, dtype=jnp.float32)[None, :]  # [1, canvas]
    src = (jnp.float32(in_size) / out) * (i + 0.5) - 0.5
    base = jnp.floor(src)
    t = src - base
    taps = (_cubic_weight_far(t + 1.0), _cubic_weight_near(t), _cubic_weight_near(1.0 - t), _cubic_weight_far(2.0 - t))
    weights = jnp.zeros((out.shape[0], canvas, in_size), jnp.float32)
    for k, w in enumerate(taps):
        index = jnp.clip(base.astype(jnp.int32) - 1 + k, 0, in_size - 1)  # PyTorch clamps at the borders
        weights = weights + w[..., None] * jax.nn.one_hot(index, in_size, dtype=jnp.float32)
    return jnp.where(i[..., None] < out[..., None], weights, 0.0)


def resize_posemb_grid_per_image(grid: jax.Array, valid_grid: jax.Array, canvas_hw: Sequence[int]) -> jax.Array:
    """Each image's position embeddings: the stored grid resized (as `resize_posemb_grid`) to *that
    image's* patch grid, laid top-left on the canvas grid.

    grid: [gh, gw, D] stored embeddings; valid_grid: [B, 2] int (rows, cols) of each image's own patch
    grid, each within canvas_hw; canvas_hw: the batch's (static) patch grid. Returns [B, ch, cw, D] in
    grid's dtype; cells outside an image's grid are 0 (they are padding, masked as attention keys).
    Static shapes: two batched matmuls with per-image weights (`bicubic_resize_weights`), so an image
    gets the embeddings it would get alone, whatever canvas it was padded into.
    """
    gh, gw = grid.shape[-3], grid.shape[-2]
    rows = bicubic_resize_weights(gh, valid_grid[:, 0], int(canvas_hw[0]))  # [B, ch, gh]
    cols = bicubic_resize_weights(gw, valid_grid[:, 1], int(canvas_hw[1]))  # [B, cw, gw]
    hp = jax.lax.Precision.HIGHEST  # exact fp32 products (the default may use bf16 passes on TPU)
    x = jnp.einsum("bwW,HWd->bHwd", cols, grid.astype(jnp.float32), precision=hp)
    x = jnp.einsum("bhH,bHwd->bhwd", rows, x, precision=hp)
    return x.astype(grid.dtype)


def resize_posemb_grid_np(grid: np.ndarray, new_hw: Sequence[int]) -> np.ndarray:
    """NumPy (float64) twin of `resize_posemb_grid`, for checkpoint surgery on the host."""
    gh, gw = grid.shape[-3], grid.shape[-2]
    mat_h = bicubic_resize_matrix(gh, int(new_hw[0]))
    mat_w = bicubic_resize_matrix(gw, int(new_hw[1]))
    x = np.einsum("oh,...hwd->...owd", mat_h, grid.astype(np.float64))
    x = np.einsum("pw,...owd->...opd", mat_w, x)
    return x.astype(grid.dtype)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (a stride-p convolution).

    [B, H, W, C] -> [B, H // p, W // p, D]. Pixels beyond the last full patch are dropped, as PyTorch's
    Conv2d does.
    """

    hidden_size: int
    patch_size: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        return nn.Conv(
            self.hidden_size,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=nn.initializers.lecun_normal(),
            name="proj",
        )(images)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    The qkv kernel is [D, 3 * D] with columns ordered (q | k | v), each head-major — the layout of timm's
    `attn.qkv` (transposed), so DeiT/YOLOS checkpoints map onto it directly.

    attention_impl:
      None: 'chunked' when running on CPU, 'splash' on TPU, else `jax.nn.dot_product_attention`'s own
        choice (cuDNN's fused flash attention on GPUs that support it, XLA otherwise);
      'xla' | 'cudnn': passed to `jax.nn.dot_product_attention`;
      'splash': the Pallas TPU splash-attention kernel, the key mask as segment ids, per device under a
        mesh in context (`yolos_jax/attention_tpu.py`; Pallas interpret mode off TPU);
      'einsum': explicit head-major matmuls and softmax (any backend);
      'chunked': the same over blocks of `attention.CPU_QUERY_CHUNK` queries (the fastest on CPU), with a
        flash-attention style hand-written backward (`attention.chunked_self_attention`).
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: Optional[jax.Array] = None, tail_bias: Optional[jax.Array] = None
    ) -> jax.Array:
        """x: [B, T, D]; key_mask: [B, T] bool or None; tail_bias: None or [B, H, t, T] float32 additive
        logits for the *last* t queries (the [DET] tokens' spatial prior, `yolos_jax/det_prior.py`). Those
        t rows then take the explicit einsum softmax and the other rows `attention_impl`; query rows are
        independent, so the split changes no result. Returns [B, T, D]."""
        batch, tokens, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"hidden_size {width} is not divisible by num_heads {self.num_heads}")
        impl = attention.resolve_impl(self.attention_impl)
        head_dim = width // self.num_heads
        qkv = Dense(
            3 * width, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=trunc_normal_02, name="qkv"
        )(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        if tail_bias is not None:
            head = tokens - tail_bias.shape[2]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, H, Dh]
            q_tail, k_h, v_h = (jnp.swapaxes(a, 1, 2) for a in (q[:, head:], k, v))  # head-major
            tail_out = attention.softmax_attention(q_tail, k_h, v_h, key_mask, tail_bias)
            head_out = attention.dot_product_attention(q[:, :head], k, v, key_mask, impl)
            out = jnp.concatenate([head_out, jnp.swapaxes(tail_out, 1, 2)], axis=1)  # [B, T, H, Dh]
        elif impl == "chunked":
            out = attention.chunked_self_attention(qkv, key_mask)  # [B, T, H, Dh]
        elif impl == "einsum":
            # One transpose of the (small) [B, T, 3D] projections buys the fused head-major attention.
            q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each [B, H, T, Dh]
            out = jnp.transpose(attention.softmax_attention(q, k, v, key_mask), (0, 2, 1, 3))  # [B, T, H, Dh]
        else:
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, H, Dh]
            out = attention.dot_product_attention(q, k, v, key_mask, impl)
        out = out.reshape(batch, tokens, width)
        return Dense(width, dtype=self.dtype, kernel_init=trunc_normal_02, name="proj")(out)


# erf as a rational function of x^2 on [-4, 4] (Eigen's and StableHLO's float32 approximation of chlo.erf;
# |error| < 4e-7 against math.erf, measured in tests/test_vit.py), written in plain elementwise ops.
_ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                  -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                    -1.42647390514189e-02)


def erf_rational(x: jax.Array) -> jax.Array:
    """erf(x) elementwise from clamp, multiplies, adds and one divide (float32 accuracy, |error| < 4e-7).

    For artifacts read by older StableHLO consumers: jax lowers `lax.erf` to `chlo.erf`, which jax 0.10
    serialises as a StableHLO composite that TensorFlow 2.21's XlaCallModule cannot read under a symbolic
    batch size (`export.py --format=savedmodel` traces the model inside `portable_erf`)."""
    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    numerator = jnp.asarray(_ERF_NUMERATOR[0], x.dtype)
    for c in _ERF_NUMERATOR[1:]:
        numerator = numerator * x2 + jnp.asarray(c, x.dtype)
    denominator = jnp.asarray(_ERF_DENOMINATOR[0], x.dtype)
    for c in _ERF_DENOMINATOR[1:]:
        denominator = denominator * x2 + jnp.asarray(c, x.dtype)
    return x * numerator / denominator


_gelu_erf: Callable[[jax.Array], jax.Array] = jax.lax.erf  # read when `gelu` is traced


@contextlib.contextmanager
def portable_erf() -> Iterator[None]:
    """Within the block, `gelu` traces with `erf_rational` instead of `lax.erf` (jit caches traced before the
    block keep their erf: trace a fresh function inside it)."""
    global _gelu_erf
    previous, _gelu_erf = _gelu_erf, erf_rational
    try:
        yield
    finally:
        _gelu_erf = previous


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU x * Phi(x), Phi(x) = (1 + erf(x / sqrt(2))) / 2 (the normal CDF), elementwise.

    Computed in at least float32 and returned in x's dtype. The same function as
    `jax.nn.gelu(approximate=False)` (which uses erfc) and PyTorch's `F.gelu` (erf, as here) to float32
    rounding, but cheaper on CPU: XLA expands erfc into both of its branches plus an exp, and autodiff of
    it evaluated erfc twice more (the GELU then cost ~8% of a Ti block's forward + backward). The
    derivative Phi(x) + x phi(x) is computed with the value (phi: the normal density), so the backward
    is one multiply.
    """
    return _gelu_and_slope(x)[0]


def _gelu_and_slope(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(gelu(x), d gelu / dx) in x's dtype, from one erf and one exp in (at least) float32."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(dtype)
    cdf = 0.5 + 0.5 * _gelu_erf(x32 * np.sqrt(0.5).astype(dtype))
    pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / np.sqrt(2.0 * np.pi)).astype(dtype)
    return (x32 * cdf).astype(x.dtype), (cdf + x32 * pdf).astype(x.dtype)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y, slope = _gelu_and_slope(x)
    return y, slope * dx


class Mlp(nn.Module):
    """Transformer feed-forward: Dense -> exact (erf) GELU (`gelu`) -> Dense."""

    mlp_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = Dense(self.mlp_dim, dtype=self.dtype, kernel_init=trunc_normal_02, name="fc1")(x)
        x = gelu(x)
        return Dense(width, dtype=self.dtype, kernel_init=trunc_normal_02, name="fc2")(x)


def drop_path(module: nn.Module, y: jax.Array, rate: float) -> jax.Array:
    """Stochastic depth (timm's `DropPath`) on a residual branch y [B, ...]: each example's branch is
    zeroed with probability `rate` (rng stream 'drop_path'), survivors are scaled by 1 / (1 - rate).
    rate 0 returns y itself (the model's inference path: callers pass 0 when not training)."""
    if rate <= 0.0:
        return y
    keep = jax.random.bernoulli(module.make_rng("drop_path"), 1.0 - rate, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(keep, y / jnp.asarray(1.0 - rate, y.dtype), jnp.zeros((), y.dtype))


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    drop_path_rate: stochastic depth on both residual branches (see `drop_path`); 0 = off.
    attention: builds the attention layer as `attention(num_heads, qkv_bias, dtype, attention_impl,
      name='attn')`; None = `SelfAttention`. `yolos_jax.windowed.block_attention` gives the windowed /
      relative-position variants, which keep SelfAttention's parameters.
    """

    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    drop_path_rate: float = 0.0
    attention: Optional[Callable[..., nn.Module]] = None

    @nn.compact
    def __call__(
        self, x: jax.Array, key_mask: Optional[jax.Array] = None, attn_bias: Optional[jax.Array] = None
    ) -> jax.Array:
        """x: [B, T, D]; key_mask: [B, T] bool or None; attn_bias: `SelfAttention`'s tail_bias (the [DET]
        queries' spatial prior), passed only when given. Returns [B, T, D]."""
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
        attn = (self.attention or SelfAttention)(
            self.num_heads, self.qkv_bias, self.dtype, self.attention_impl, name="attn"
        )
        y = attn(y, key_mask) if attn_bias is None else attn(y, key_mask, attn_bias)
        x = x + drop_path(self, y, self.drop_path_rate)
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
        y = Mlp(self.mlp_dim, self.dtype, name="mlp")(y)
        return x + drop_path(self, y, self.drop_path_rate)
