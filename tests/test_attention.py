"""The attention kernels (yolos_jax/attention.py): the chunked CPU attention and its hand-written
(flash-attention style) backward against float64 numpy references: outputs and gradients, with and
without key masks, token counts that are and are not multiples of the query chunk, a batch element
without any valid key, bf16 inputs, under jit, and through a whole YOLOS with per-block
rematerialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yolos_jax import attention


def reference_attention(q, k, v, key_mask, d_out):
    """float64 softmax attention and its vjp. q: [B, H, T, Dh]; k, v: [B, H, S, Dh]; key_mask: [B, S]
    bool or None; d_out: [B, H, T, Dh]. Returns (out, dq, dk, dv).

    Masked keys get no attention. A batch element whose keys are all masked averages v uniformly over
    all keys and passes no gradient to q or k (what the `where`-masked einsum form does: every logit is
    replaced by the same constant)."""
    q, k, v, d_out = (np.asarray(a, np.float64) for a in (q, k, v, d_out))
    scale = q.shape[-1] ** -0.5
    logits = np.einsum("bhtd,bhsd->bhts", q, k) * scale
    none_valid = np.zeros(q.shape[0], bool)
    if key_mask is not None:
        key_mask = np.asarray(key_mask)
        logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
        none_valid = ~key_mask.any(-1)
        logits[none_valid] = 0.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhts,bhsd->bhtd", p, v)
    dv = np.einsum("bhts,bhtd->bhsd", p, d_out)
    dp = np.einsum("bhtd,bhsd->bhts", d_out, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    ds[none_valid] = 0.0
    dq = np.einsum("bhts,bhsd->bhtd", ds, k) * scale
    dk = np.einsum("bhts,bhtd->bhsd", ds, q) * scale
    return out, dq, dk, dv


def _inputs(seed, batch, heads, tokens, head_dim, keys=None):
    rng = np.random.default_rng(seed)
    keys = tokens if keys is None else keys
    q = rng.standard_normal((batch, heads, tokens, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, heads, keys, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, heads, keys, head_dim)).astype(np.float32)
    d_out = rng.standard_normal((batch, heads, tokens, head_dim)).astype(np.float32)
    return q, k, v, d_out


def _masks(batch, keys):
    """None; padded keys in one image; and a batch element without any valid key."""
    padded = np.ones((batch, keys), bool)
    padded[0, keys - keys // 3:] = False
    padded[1, ::5] = False
    none_valid = padded.copy()
    none_valid[-1] = False
    return {"none": None, "padded": padded, "none_valid": none_valid}


def _vjp_heads_major(q, k, v, key_mask, d_out, chunk, jit=True):
    mask = None if key_mask is None else jnp.asarray(key_mask)
    f = lambda q, k, v: attention.attention_heads_major(q, k, v, mask, chunk)  # noqa: E731
    if jit:
        f = jax.jit(f)
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(jnp.asarray(d_out, out.dtype)))


def _vjp_qkv(q, k, v, key_mask, d_out, chunk):
    """`chunked_self_attention` from [B, T, 3, H, Dh], gradients returned head-major as the reference's."""
    mask = None if key_mask is None else jnp.asarray(key_mask)
    qkv = jnp.stack([jnp.swapaxes(jnp.asarray(a), 1, 2) for a in (q, k, v)], axis=2)
    out, vjp = jax.vjp(jax.jit(lambda x: attention.chunked_self_attention(x, mask, chunk)), qkv)
    (d_qkv,) = vjp(jnp.swapaxes(jnp.asarray(d_out, out.dtype), 1, 2))
    return (jnp.swapaxes(out, 1, 2), *(jnp.swapaxes(d_qkv[:, :, i], 1, 2) for i in range(3)))


def _assert_close(got, want, tol, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        g = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
        scale = max(float(np.abs(w).max()), 1e-6)
        err = float(np.abs(g - w).max())
        assert g.shape == w.shape, (what, name, g.shape, w.shape)
        assert err <= tol * scale, (what, name, err, scale)


# tokens vs chunk: a padded last chunk (300 = 2 * 128 + 44), an exact multiple (256), one chunk only
# (100 <= 128: the einsum form), and small chunks (many blocks, padded).
@pytest.mark.parametrize("tokens,chunk", [(300, 128), (256, 128), (100, 128), (77, 16)])
@pytest.mark.parametrize("mask_name", ["none", "padded", "none_valid"])
def test_chunked_attention_matches_float64(tokens, chunk, mask_name):
    batch, heads, head_dim = 3, 2, 16
    q, k, v, d_out = _inputs(0, batch, heads, tokens, head_dim)
    key_mask = _masks(batch, tokens)[mask_name]
    want = reference_attention(q, k, v, key_mask, d_out)
    if key_mask is not None:
        assert np.abs(want[0] - reference_attention(q, k, v, None, d_out)[0]).max() > 0.1  # the mask matters
    for what, got in [
        ("heads_major chunked", _vjp_heads_major(q, k, v, key_mask, d_out, chunk)),
        ("heads_major chunked, no jit", _vjp_heads_major(q, k, v, key_mask, d_out, chunk, jit=False)),
        ("heads_major einsum", _vjp_heads_major(q, k, v, key_mask, d_out, None)),
        ("qkv chunked", _vjp_qkv(q, k, v, key_mask, d_out, chunk)),
    ]:
        _assert_close(got, want, 2e-5, what)


def test_valid_keys_first_dot_product_attention_matches_float64():
    """`attention.dot_product_attention` through `jax.nn.dot_product_attention` (XLA) with the key mask as
    per-image lengths of reordered keys (`keys_valid_first`, the form cuDNN fuses) equals the float64 masked
    attention, outputs and gradients, for masks whose valid keys are not a prefix (padding inside the
    sequence, as a padded YOLOS batch has)."""
    batch, heads, tokens, head_dim = 3, 2, 50, 16
    q, k, v, d_out = _inputs(4, batch, heads, tokens, head_dim)
    key_mask = _masks(batch, tokens)["padded"]
    key_mask[2, 10:20] = False  # a hole in the middle
    want = reference_attention(q, k, v, key_mask, d_out)
    token_major = lambda a: jnp.swapaxes(jnp.asarray(a), 1, 2)  # noqa: E731
    f = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, jnp.asarray(key_mask), "xla"))
    out, vjp = jax.vjp(f, *(token_major(a) for a in (q, k, v)))
    got = (out, *vjp(token_major(d_out)))
    _assert_close([jnp.swapaxes(g, 1, 2) for g in got], want, 2e-5, "valid keys first")

    k2, v2, lengths = attention.keys_valid_first(token_major(k), token_major(v), jnp.asarray(key_mask))
    np.testing.assert_array_equal(lengths, key_mask.sum(1))
    for b in range(batch):  # each image's valid keys, in order, then its masked ones
        order = np.concatenate([np.flatnonzero(key_mask[b]), np.flatnonzero(~key_mask[b])])
        np.testing.assert_array_equal(np.asarray(k2[b]), np.swapaxes(k, 1, 2)[b][order])


def test_chunked_attention_more_keys_than_queries():
    """attention_heads_major's chunked form with S != T (queries in blocks, all keys each block)."""
    q, k, v, d_out = _inputs(1, 2, 2, 150, 8, keys=210)
    key_mask = _masks(2, 210)["padded"]
    want = reference_attention(q, k, v, key_mask, d_out)
    _assert_close(_vjp_heads_major(q, k, v, key_mask, d_out, 64), want, 2e-5, "S != T")


@pytest.mark.parametrize("mask_name", ["none", "padded"])
def test_chunked_attention_bf16(mask_name):
    """bf16 inputs: the float32 softmax and float32 dK/dV accumulation over query blocks keep the error
    at bf16 rounding of the inputs and outputs, not growing with the number of blocks."""
    batch, heads, tokens, head_dim, chunk = 2, 2, 600, 32, 64
    q, k, v, d_out = _inputs(2, batch, heads, tokens, head_dim)
    key_mask = _masks(batch, tokens)[mask_name]
    # the reference sees the bf16-rounded inputs: what remains is the computation's own error
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in (q, k, v, d_out)]
    want = reference_attention(*rounded[:3], key_mask, rounded[3])
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    for what, got in [("heads_major bf16", _vjp_heads_major(*bf16, key_mask, d_out, chunk)),
                      ("qkv bf16", _vjp_qkv(*bf16, key_mask, d_out, chunk))]:
        assert all(a.dtype == jnp.bfloat16 for a in got), what
        _assert_close(got, want, 2e-2, what)
    # the float32 path on the same rounded inputs is far closer: the tolerance above is bf16's
    _assert_close(_vjp_heads_major(*rounded[:3], key_mask, rounded[3], chunk), want, 2e-5, "f32")


def test_chunked_attention_forward_equals_einsum_form():
    """The chunked forward computes what the einsum form does (same scale rounding, float32 softmax
    normalised after the second matmul), to float32 rounding."""
    q, k, v, _ = _inputs(3, 2, 3, 333, 64)
    key_mask = _masks(2, 333)["padded"]
    a = attention.attention_heads_major(q, k, v, jnp.asarray(key_mask), 128)
    b = attention.attention_heads_major(q, k, v, jnp.asarray(key_mask), None)
    assert float(jnp.abs(a - b).max()) <= 1e-6


def test_resolve_impl(monkeypatch):
    """None runs the chunked kernel on CPU (the tests' backend), the splash kernel on TPU and jax's own choice
    on GPU; other names pass through; names outside ATTENTION_IMPLS are refused, naming the choices."""
    assert jax.default_backend() == "cpu"
    assert attention.resolve_impl(None) == "chunked"
    for impl in ("xla", "cudnn", "einsum", "chunked", "splash"):
        assert attention.resolve_impl(impl) == impl
    for backend, impl in (("tpu", "splash"), ("gpu", None)):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert attention.resolve_impl(None) == impl, backend
    monkeypatch.undo()
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attention.resolve_impl("flash")


# --------------------------------------------------------------------------------------------------
# Whole model: rematerialised blocks give the same gradients
# --------------------------------------------------------------------------------------------------


def test_remat_gradients_match():
    """YOLOS with per-block remat (the custom backward re-runs the chunked forward inside each block's
    recomputation) gives the gradients of the plain model, through the chunked path with a padded last
    chunk and a pixel mask that pads keys in one image."""
    from yolos_jax.yolos import YOLOS

    cfg = dict(hidden_size=48, depth=2, num_heads=3, mlp_dim=96, num_det_tokens=5, num_classes=4,
               init_pe_size=(64, 96), attention_impl="chunked")
    chunk = attention.CPU_QUERY_CHUNK
    gh, gw = 9, chunk // 9 + 3  # 1 + gh * gw + 5 tokens > chunk, not a multiple of it
    assert (1 + gh * gw + 5) % chunk and gh * gw > chunk
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 16 * gh, 16 * gw, 3)).astype(np.float32))
    pixel_mask = np.ones((2, 16 * gh, 16 * gw), bool)
    pixel_mask[1, :, 16 * (gw - 4):] = False
    pixel_mask = jnp.asarray(pixel_mask)
    models = {remat: YOLOS(**cfg, remat=remat) for remat in (False, True)}
    params = jax.jit(models[False].init)(jax.random.PRNGKey(0), x, pixel_mask)["params"]
    w = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32))
         for k, s in (("logits", (2, 5, 5)), ("boxes", (2, 5, 4)))}

    def grads(model):
        def loss(p):
            o = model.apply({"params": p}, x, pixel_mask)
            return sum(jnp.sum(o[k] * w[k]) for k in w)
        return jax.jit(jax.grad(loss))(params)

    plain, remat = grads(models[False]), grads(models[True])
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(float(jnp.abs(b).max()), 1e-3)
