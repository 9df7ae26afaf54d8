"""Softmax attention kernels: the einsum form, the blocked CPU kernel with its flash-attention style
backward, and the dispatch to `jax.nn.dot_product_attention` (`vit.SelfAttention` is their layer).

Shapes: q [..., t, Dh] (queries), k, v [..., S, Dh] (keys, values); token-major [B, T, H, Dh] where a
function says so, head-major [B, H, T, Dh] otherwise. key_mask: [B, S] bool, True = the key may be
attended to. Softmax arithmetic is float32 whatever the inputs' dtype; outputs are in v's dtype.

Public API:
  CPU_QUERY_CHUNK, ATTENTION_IMPLS, resolve_impl: the query block size and the implementations;
  softmax_attend, softmax_attention: the explicit (einsum) forms, any backend;
  attention_heads_major, chunked_self_attention, dot_product_attention: attention by implementation
    ('splash', the Pallas TPU kernel with the key mask as segment ids, lives in `yolos_jax/attention_tpu.py`);
  keys_valid_first: a key mask as per-image lengths of reordered keys (cuDNN's fused kernel takes only those);
  key_bias, to_blocks, from_blocks, blocked_attention: the blocked kernel's pieces, which the windowed
    kernels (`yolos_jax/attention_windowed.py`) reuse with one window per batch row.

`CPU_QUERY_CHUNK` is read at call time (module attribute), so tests and benchmarks may monkeypatch it.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

Dtype = Any

# Attention on CPU (measured on XLA:CPU, jax 0.10; benchmarks/RESULTS_forward.md): in the head-major
# layout [B, H, T, Dh] both attention matmuls are plain batched matmuls that XLA hands to YNNPACK, while
# the token-major layout of `jax.nn.dot_product_attention` ([B, T, H, Dh]) makes XLA transpose the
# [B, H, T, S] weights before the second matmul (3-4x slower at T = 1477). Computing one head and one
# block of queries at a time keeps the [chunk, S] logits in cache (YOLOS-S, T = 3401: 1.7 MB rather
# than 10 MB for all heads at once): attention at S ran 1.3-1.9x faster than with all heads per block.
# Blocks of 64..512 were within noise of each other for whole S forwards; 128 was among the best in
# isolated attention timings at both Ti and S sizes.
CPU_QUERY_CHUNK = 128

ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum", "chunked", "splash")


def resolve_impl(impl: Optional[str]) -> Optional[str]:
    """The attention implementation to run: `impl` checked against `ATTENTION_IMPLS`, None mapped to
    'chunked' on CPU and 'splash' on TPU (elsewhere None stays: `jax.nn.dot_product_attention`'s own
    choice, cuDNN's fused kernel on GPUs that have it)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl is None:
        return {"cpu": "chunked", "tpu": "splash"}.get(jax.default_backend())
    return impl


def softmax_attend(logits: jax.Array, v: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """logits: [..., t, S]; v: [..., S, Dh]; mask: broadcastable to logits, bool, or None. -> [..., t, Dh].

    Masked logits are replaced by their dtype's minimum; float32 softmax, normalised after the second
    matmul ((e @ v) / sum(e), as flash attention does): t * Dh divisions instead of t * S (measured a
    few % faster on CPU).
    """
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    logits = logits.astype(jnp.float32)
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("...ts,...sd->...td", e.astype(v.dtype), v).astype(jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)


def softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array], bias: Optional[jax.Array] = None
) -> jax.Array:
    """q: [..., t, Dh]; k, v: [..., S, Dh]; key_mask: [B, S] bool or None (leading axes [B, H] or [B, 1]);
    bias: None or additive float32 logits broadcastable to [..., t, S].

    Returns [..., t, Dh]: the scaled logits (rounded to q's dtype), plus bias, through `softmax_attend`.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("...td,...sd->...ts", q * jnp.asarray(scale, q.dtype), k)
    if bias is not None:
        logits = logits.astype(jnp.float32) + bias
    return softmax_attend(logits, v, None if key_mask is None else key_mask[:, None, None, :])


def attention_heads_major(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array], chunk: Optional[int] = None
) -> jax.Array:
    """Softmax attention in head-major layout, optionally one (head, block of `chunk` queries) at a time.

    q: [B, H, T, Dh]; k, v: [B, H, S, Dh]; key_mask: [B, S] bool or None. Returns [B, H, T, Dh]. Query
    rows are independent, so chunking changes no result; it bounds a step's logits to [B, chunk, S] (see
    the note above `CPU_QUERY_CHUNK`). The chunked form has a hand-written backward (`blocked_attention`).
    `vit.SelfAttention` calls `chunked_self_attention` instead, which also takes the layout changes into its
    custom backward.

    A row whose keys are all masked (impossible in the model: [CLS] and [DET] are always valid keys)
    averages v uniformly over all keys and passes no gradient to q or k, as `softmax_attention`'s `where`
    does, in both forms.
    """
    batch, heads, tokens, head_dim = q.shape
    if chunk is None or tokens <= chunk:
        return softmax_attention(q, k, v, key_mask)
    bias, q_scale = key_bias(key_mask, batch, head_dim, q.dtype)
    q = to_blocks(jnp.swapaxes(q * q_scale[:, None, None, None], 1, 2), chunk)  # [H, n, B, chunk, Dh]
    k, v = (jnp.moveaxis(a, 1, 0) for a in (k, v))  # [H, B, S, Dh]
    out = blocked_attention(q, k, v, bias)
    return jnp.swapaxes(from_blocks(out, tokens), 1, 2)


def chunked_self_attention(
    qkv: jax.Array, key_mask: Optional[jax.Array], chunk: Optional[int] = None
) -> jax.Array:
    """Self-attention straight from the fused projection, one (head, block of `chunk` queries) at a time.

    qkv: [B, T, 3, H, Dh] (q | k | v); key_mask: [B, T] bool or None; chunk: None = `CPU_QUERY_CHUNK`
    (read at call time). Returns [B, T, H, Dh]: the result
    of `attention_heads_major(q, k, v, key_mask, chunk)` in token-major layout, with the re-layouts
    (qkv -> head-major blocks, and back) inside the custom backward: there the gradient leaves as one
    [B, T, 3, H, Dh] array, where autodiff of the transposes had XLA write three copies of it, one per
    consumer (7% of a Ti block's backward).
    """
    batch, tokens, _, heads, head_dim = qkv.shape
    chunk = CPU_QUERY_CHUNK if chunk is None else chunk
    if tokens <= chunk:
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each [B, H, T, Dh]
        return jnp.swapaxes(softmax_attention(q, k, v, key_mask), 1, 2)
    bias, q_scale = key_bias(key_mask, batch, head_dim, qkv.dtype)
    return _qkv_attention(qkv, bias, q_scale, chunk)


def key_bias(
    key_mask: Optional[jax.Array], batch: int, head_dim: int, dtype: Dtype
) -> tuple[Optional[jax.Array], jax.Array]:
    """The key mask as (additive float32 logit bias [B, S] or None, query factor [B] in `dtype`).

    The bias is 0 or the float32 minimum, which absorbs any logit (|logit| << its ulp): a masked logit
    equals the minimum exactly and exp(min - row max) = 0, as with `softmax_attention`'s `where`. The
    query factor is the softmax scale Dh^-1/2 (rounded to `dtype` as `softmax_attention` does), or 0
    for a batch element without any valid key, whose bias is 0 instead: all its logits are then 0, so it
    averages v uniformly over all keys (the `where` form's all-equal logits), its log-sum-exp stays
    finite (log S, where min + log S would round back to min), and q and k get no gradient from it.
    """
    scale = jnp.full((batch,), head_dim**-0.5, dtype)
    if key_mask is None:
        return None, scale
    valid = jnp.any(key_mask, axis=-1)  # [B]
    bias = jnp.where(key_mask | ~valid[:, None], 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    return bias, jnp.where(valid, scale, jnp.zeros((), dtype))


def to_blocks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, H, Dh] -> [H, n, B, chunk, Dh] query blocks, T zero-padded to n * chunk."""
    batch, tokens, heads, head_dim = x.shape
    n = -(-tokens // chunk)
    x = jnp.pad(x, ((0, 0), (0, n * chunk - tokens), (0, 0), (0, 0)))  # padded rows are dropped at the end
    return x.reshape(batch, n, chunk, heads, head_dim).transpose(3, 1, 0, 2, 4)


def from_blocks(x: jax.Array, tokens: int) -> jax.Array:
    """[H, n, B, chunk, Dh] -> [B, T, H, Dh], dropping the padded rows: `to_blocks`' inverse."""
    heads, n, batch, chunk, head_dim = x.shape
    return x.transpose(2, 1, 3, 0, 4).reshape(batch, n * chunk, heads, head_dim)[:, :tokens]


def _block_logits(qc: jax.Array, kh: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """Float32 logits [B, c, S] of scaled queries qc [B, c, Dh] against keys kh [B, S, Dh], plus the key
    bias [B, S] (or None). The product is rounded to the inputs' dtype first, as `softmax_attention`'s."""
    logits = jnp.einsum("bcd,bsd->bcs", qc, kh).astype(jnp.float32)
    return logits if bias is None else logits + bias[:, None, :]


def _blocked_forward(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array]):
    """Softmax attention one (head, query block) at a time.

    q: [H, n, B, c, Dh] queries, already scaled, in blocks of c; k, v: [H, B, S, Dh]; bias: [B, S]
    float32 (0 or the float32 minimum) or None. Returns (out [H, n, B, c, Dh] in v's dtype, float32
    log-sum-exp of each row's logits [H, n, B, c]). The softmax is float32 and normalised after the
    second matmul ((e @ v) / sum(e): c * Dh divisions instead of c * S), as `softmax_attention`.
    """

    # Outer loop over heads, inner over query blocks: the inner loop reads its head's k and v as
    # loop invariants (a flat loop indexing k[h] copied them at every step: 5% of YOLOS-S's time).
    def one_head(args):
        qh, kh, vh = args  # [n, B, c, Dh], [B, S, Dh], [B, S, Dh]

        def step(qc):
            logits = _block_logits(qc, kh, bias)
            row_max = jnp.max(logits, axis=-1, keepdims=True)
            e = jnp.exp(logits - row_max)
            total = jnp.sum(e, axis=-1, keepdims=True)
            out = jnp.einsum("bcs,bsd->bcd", e.astype(vh.dtype), vh).astype(jnp.float32)
            return (out / total).astype(vh.dtype), (row_max + jnp.log(total))[..., 0]

        return jax.lax.map(step, qh)

    return jax.lax.map(one_head, (q, k, v))


def _blocked_backward(q, k, v, bias, out, lse, d_out):
    """Flash-attention backward of `_blocked_forward` (same shapes; d_out like out).

    Per query block: p = exp(logits - lse), dv += p^T do, dp = do v^T, ds = p (dp - rowsum(do * out)),
    dq = ds k, dk += ds^T q. q is pre-scaled, so dq is the gradient of the scaled queries and dk needs no
    scale. dk and dv accumulate over the blocks in float32 (bf16 inputs keep their accuracy) and are cast
    at the end. Returns (dq [H, n, B, c, Dh], dk, dv [H, B, S, Dh]) in the inputs' dtypes.
    """
    # rowsum(do * out) = sum_s p_s dp_s, the softmax's correction term, for all rows at once.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [H, n, B, c]

    def one_head(args):
        qh, kh, vh, doh, lseh, deltah = args  # [n, B, c, Dh], [B, S, Dh] x2, [n, B, c, Dh], [n, B, c] x2

        # The weights are recomputed transposed, [B, S, c]: then dv and dk are plain matmuls (XLA:CPU
        # hands a matmul contracting a non-minor axis to a slower Eigen kernel; measured 5% faster than
        # [B, c, S], where dv and dk both did). dq is computed transposed as well, k^T ds -> [B, Dh, c], from
        # the head's k^T taken once: copying each block's ds to [B, c, S] instead cost 3% of YOLOS-Ti's
        # train step. The barrier keeps XLA from folding k^T back into the dot.
        kh_t = jax.lax.optimization_barrier(jnp.swapaxes(kh, 1, 2))  # [B, Dh, S]

        def step(carry, xs):
            dk, dv = carry  # [B, S, Dh] float32
            qc, doc, lsec, deltac = xs
            logits = jnp.einsum("bsd,bcd->bsc", kh, qc).astype(jnp.float32)
            if bias is not None:
                logits = logits + bias[:, :, None]
            p = jnp.exp(logits - lsec[:, None, :])  # [B, S, c] float32
            dv = dv + jnp.einsum("bsc,bcd->bsd", p.astype(doc.dtype), doc, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bsd,bcd->bsc", vh, doc, preferred_element_type=jnp.float32)
            ds = (p * (dp - deltac[:, None, :])).astype(qc.dtype)
            dk = dk + jnp.einsum("bsc,bcd->bsd", ds, qc, preferred_element_type=jnp.float32)
            dq_t = jnp.einsum("bds,bsc->bdc", kh_t, ds, preferred_element_type=jnp.float32).astype(qc.dtype)
            return (dk, dv), dq_t

        zeros = jnp.zeros(kh.shape, jnp.float32)
        (dk, dv), dq_t = jax.lax.scan(step, (zeros, zeros), (qh, doh, lseh, deltah))
        return jnp.swapaxes(dq_t, -1, -2), dk.astype(kh.dtype), dv.astype(vh.dtype)

    return jax.lax.map(one_head, (q, k, v, d_out, lse, delta))


@jax.custom_vjp
def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    """`_blocked_forward`'s output, differentiable in q, k, v by `_blocked_backward` (autodiff of the
    loops cost ~4.4x the forward, as it stores or recomputes each block's weights badly)."""
    return _blocked_forward(q, k, v, bias)[0]


def _blocked_attention_fwd(q, k, v, bias):
    out, lse = _blocked_forward(q, k, v, bias)
    return out, (q, k, v, bias, out, lse)  # the [c, S] weights are recomputed from lse, not stored


def _blocked_attention_bwd(residuals, d_out):
    return (*_blocked_backward(*residuals, d_out), None)  # the bias is the key mask's: no gradient


blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _qkv_attention(qkv: jax.Array, bias: Optional[jax.Array], q_scale: jax.Array, chunk: int) -> jax.Array:
    """`chunked_self_attention`'s differentiable core: qkv [B, T, 3, H, Dh] -> [B, T, H, Dh]; bias [B, T]
    as `key_bias`; q_scale [B] multiplies the queries. No gradient to bias or q_scale."""
    return _qkv_attention_fwd(qkv, bias, q_scale, chunk)[0]


def _qkv_attention_fwd(qkv, bias, q_scale, chunk):
    tokens = qkv.shape[1]
    q = to_blocks(qkv[:, :, 0] * q_scale[:, None, None, None], chunk)  # [H, n, B, chunk, Dh]
    k, v = (jnp.transpose(qkv[:, :, i], (2, 0, 1, 3)) for i in (1, 2))  # [H, B, T, Dh]
    out, lse = _blocked_forward(q, k, v, bias)
    return from_blocks(out, tokens), (q, k, v, bias, q_scale, out, lse)


def _qkv_attention_bwd(chunk, residuals, d_out):
    q, k, v, bias, q_scale, out, lse = residuals
    tokens = d_out.shape[1]
    dq, dk, dv = _blocked_backward(q, k, v, bias, out, lse, to_blocks(d_out, chunk))
    dq = from_blocks(dq, tokens) * q_scale[:, None, None, None]
    d_qkv = jnp.stack([dq] + [jnp.transpose(a, (1, 2, 0, 3)) for a in (dk, dv)], axis=2)
    return d_qkv, None, None


_qkv_attention.defvjp(_qkv_attention_fwd, _qkv_attention_bwd)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array], impl: Optional[str]
) -> jax.Array:
    """Softmax attention. q, k, v: [B, T, H, Dh]; key_mask: [B, S] bool or None. Returns [B, T, H, Dh].

    impl: 'einsum' | 'chunked' (our head-major forms), 'splash' (the Pallas TPU kernel, the key mask as
    segment ids: `attention_tpu.splash_attention`), else passed to `jax.nn.dot_product_attention` (None there
    means jax's own choice; callers map None first: `resolve_impl`), with the key mask as per-image lengths
    of reordered keys (`keys_valid_first`), which cuDNN runs fused.
    """
    if impl == "splash":
        # Imported here: attention_tpu imports this module (its fallback), and only TPU runs need Pallas.
        from yolos_jax import attention_tpu

        return attention_tpu.splash_attention(q, k, v, key_mask)
    if impl in ("einsum", "chunked"):
        chunk = CPU_QUERY_CHUNK if impl == "chunked" else None
        out = attention_heads_major(*(jnp.swapaxes(a, 1, 2) for a in (q, k, v)), key_mask, chunk)
        return jnp.swapaxes(out, 1, 2)
    if key_mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    # An arbitrary boolean mask rules out cuDNN's fused flash kernel (jax then materialises [B, H, T, S]
    # logits); valid keys moved to the front and given as lengths use it (`keys_valid_first`).
    k, v, lengths = keys_valid_first(k, v, key_mask)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=impl)


def keys_valid_first(k: jax.Array, v: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Each image's keys and values reordered so that its valid keys form a prefix (in their own order), for
    kernels that take a padding mask as per-image lengths (`key_value_seq_lengths`: cuDNN flash attention).

    k, v: [B, S, H, Dh]; key_mask: [B, S] bool. Returns (k, v reordered, lengths [B] int32 = valid keys).
    Softmax attention sums over keys, so their order changes no query's result (nor, through the gather's
    transpose, any gradient); the queries and the outputs keep their order. The padded patches of a YOLOS
    batch sit inside the row-major patch sequence (each image is a top-left rectangle of the canvas grid), so
    they are not a suffix without this.
    """
    order = jnp.argsort(jnp.logical_not(key_mask), axis=1, stable=True)  # [B, S]: valid keys first
    k = jnp.take_along_axis(k, order[:, :, None, None], axis=1)
    v = jnp.take_along_axis(v, order[:, :, None, None], axis=1)
    return k, v, jnp.sum(key_mask, axis=1, dtype=jnp.int32)

