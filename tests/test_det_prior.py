"""[DET] spatial priors (yolos_jax/det_prior.py) against an independent float64 numpy reference, plain
YOLOS (priors off), and einsum autodiff (gradients)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yolos_jax import config as config_lib
from yolos_jax import attention, det_prior, vit
from yolos_jax.yolos import YOLOS

TINY = dict(hidden_size=24, depth=2, num_heads=3, patch_size=8, num_det_tokens=6, num_classes=3,
            init_pe_size=(32, 48), mid_pe_size=(32, 48))
PRIORS = dict(det_reference_grid=(2, 3), det_attention_sigma=(0.7, 0.0, 1.5), det_box_offset=True)


def numpy_bias(grid, sigma, num_heads, grid_hw, patch, valid_hw):
    """The bias written from the docstring with loops, float64: [B, H, Q, 1 + P + Q]."""
    rows, cols = grid
    gh, gw = grid_hw
    q, p = rows * cols, gh * gw
    out = np.zeros((len(valid_hw), num_heads, q, 1 + p + q))
    for b, (vh, vw) in enumerate(valid_hw):
        for token in range(q):
            r, c = divmod(token, cols)
            ref_x, ref_y = (c + 0.5) / cols * vw / patch, (r + 0.5) / rows * vh / patch  # in patches
            for i in range(gh):
                for j in range(gw):
                    d2 = (j + 0.5 - ref_x) ** 2 + (i + 0.5 - ref_y) ** 2
                    for h in range(num_heads):
                        s = sigma[h] if h < len(sigma) else 0.0
                        out[b, h, token, 1 + i * gw + j] = -d2 / (2 * s * s) if s > 0 else 0.0
    return out


def numpy_prior_attention(x, params, num_heads, num_det, key_mask, bias):
    """Self-attention, float64, full T x T, the bias added to the last `num_det` query rows."""
    x = np.asarray(x, np.float64)
    batch, tokens, width = x.shape
    hd = width // num_heads
    qkv = x @ np.asarray(params["qkv"]["kernel"], np.float64) + np.asarray(params["qkv"]["bias"], np.float64)
    qkv = qkv.reshape(batch, tokens, 3, num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
    logits[:, :, tokens - num_det:] += bias
    logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", w, v).reshape(batch, tokens, width)
    return out @ np.asarray(params["proj"]["kernel"], np.float64) + np.asarray(params["proj"]["bias"], np.float64)


def pixel_mask_for(valid_hw, hw):
    m = np.zeros((len(valid_hw), *hw), bool)
    for b, (vh, vw) in enumerate(valid_hw):
        m[b, :vh, :vw] = True
    return m


def test_attention_bias_matches_loops_with_padding():
    valid_hw = [(40, 64), (24, 40), (33, 51)]  # full, padded, and not a multiple of the patch
    mask = pixel_mask_for(valid_hw, (40, 64))
    got = det_prior.attention_bias((2, 3), (0.7, 0.0, 1.5), 3, (5, 8), 8,
                                   det_prior.valid_extent((40, 64), jnp.asarray(mask), 3))
    want = numpy_bias((2, 3), (0.7, 0.0, 1.5), 3, (5, 8), 8, valid_hw)
    assert got.shape == want.shape == (3, 3, 6, 1 + 40 + 6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[:, 1] == 0)  # sigma 0: that head is free
    no_mask = det_prior.attention_bias((2, 3), (0.7,), 3, (5, 8), 8, det_prior.valid_extent((40, 64), None, 2))
    np.testing.assert_allclose(np.asarray(no_mask), numpy_bias((2, 3), (0.7,), 3, (5, 8), 8, [(40, 64)] * 2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "einsum", "xla"])
def test_prior_attention_matches_numpy(impl, monkeypatch):
    monkeypatch.setattr(attention, "CPU_QUERY_CHUNK", 16)  # 1 + 40 + 6 tokens: several blocks, a ragged last one
    rng = np.random.default_rng(0)
    batch, gh, gw, q, width, heads = 3, 5, 8, 6, 24, 3
    tokens = 1 + gh * gw + q
    x = rng.normal(size=(batch, tokens, width)).astype(np.float32)
    valid_hw = [(40, 64), (24, 40), (33, 51)]
    patch_mask = np.zeros((batch, gh, gw), bool)
    for b, (vh, vw) in enumerate(valid_hw):
        patch_mask[b, : -(-vh // 8), : -(-vw // 8)] = True
    key_mask = np.concatenate([np.ones((batch, 1), bool), patch_mask.reshape(batch, -1), np.ones((batch, q), bool)], 1)
    bias = det_prior.attention_bias((2, 3), (0.7, 0.0, 1.5), heads, (gh, gw), 8,
                                    det_prior.valid_extent((40, 64), jnp.asarray(pixel_mask_for(valid_hw, (40, 64))),
                                                           batch))
    module = vit.SelfAttention(heads, attention_impl=impl)
    params = jax.jit(module.init)(jax.random.PRNGKey(1), x, jnp.asarray(key_mask), bias)["params"]
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)  # O(1)
    got = module.apply({"params": params}, x, jnp.asarray(key_mask), bias)
    want = numpy_prior_attention(x, params, heads, q, key_mask, np.asarray(bias, np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5)
    # A zero bias (the split path) gives the unbiased attention (the fused path).
    unbiased = module.apply({"params": params}, x, jnp.asarray(key_mask))
    zero = module.apply({"params": params}, x, jnp.asarray(key_mask), jnp.zeros_like(bias))
    np.testing.assert_allclose(np.asarray(zero), np.asarray(unbiased), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(unbiased) - np.asarray(got))[:, -q:].max() > 1e-2  # the prior changes [DET] rows
    # ... and only them. Not bit for bit: the two paths multiply different row counts (T against T - q), which
    # XLA may tile differently (bit-equal on an AVX-512 host, up to 1.6e-6 apart on an AVX2 one, for O(1) values
    # summed over 24 channels: float32 rounding, 1e-5 allows for it and stays far below the [DET] rows' 1e-2).
    np.testing.assert_allclose(np.asarray(unbiased)[:, :-q], np.asarray(got)[:, :-q], rtol=1e-5, atol=1e-5)


def test_prior_attention_gradients_match_einsum_autodiff(monkeypatch):
    """Gradients in x and the parameters (the patch rows take the chunked custom-VJP kernel) equal
    autodiff of one dense einsum formulation with the bias laid into a full [T, T] matrix."""
    monkeypatch.setattr(attention, "CPU_QUERY_CHUNK", 16)
    rng = np.random.default_rng(3)
    batch, gh, gw, q, width, heads = 2, 5, 8, 6, 24, 3
    tokens = 1 + gh * gw + q
    x = jnp.asarray(rng.normal(size=(batch, tokens, width)).astype(np.float32))
    key_mask = np.ones((batch, tokens), bool)
    key_mask[1, 1 + 3 * gw: 1 + gh * gw] = False  # bottom rows of image 1 padded
    key_mask = jnp.asarray(key_mask)
    bias = det_prior.attention_bias((2, 3), (0.7, 0.0, 1.5), heads, (gh, gw), 8,
                                    (jnp.asarray([40.0, 24.0]), jnp.asarray([64.0, 64.0])))
    module = vit.SelfAttention(heads, attention_impl="chunked")
    params = jax.jit(module.init)(jax.random.PRNGKey(1), x, key_mask, bias)["params"]
    cot = jnp.asarray(rng.normal(size=(batch, tokens, width)).astype(np.float32))

    def ours(p, x):
        return jnp.sum(module.apply({"params": p}, x, key_mask, bias) * cot)

    def dense(p, x):
        qkv = (x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(batch, tokens, 3, heads, width // heads)
        qh, kh, vh = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bthd,bshd->bhts", qh, kh) / np.sqrt(width // heads)
        full_bias = jnp.zeros((batch, heads, tokens, tokens)).at[:, :, tokens - q:].set(bias)
        logits = jnp.where(key_mask[:, None, None, :], logits + full_bias, -1e30)
        out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), vh).reshape(batch, tokens, width)
        return jnp.sum((out @ p["proj"]["kernel"] + p["proj"]["bias"]) * cot)

    g_ours = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, x)
    g_dense = jax.jit(jax.grad(dense, argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_dense)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(2, 40, 64, 3)).astype(np.float32))
    mask = jnp.asarray(pixel_mask_for([(40, 64), (24, 48)], (40, 64)))
    return images, mask


def _init(model, images, mask):
    """The model's initial parameters (host arrays), its initialisers run as one program (eagerly they compile
    hundreds of small ones)."""
    return jax.device_get(jax.jit(model.init)(jax.random.PRNGKey(0), images, mask)["params"])


def test_model_with_priors_off_equals_plain_yolos():
    """The grid alone (no sigma, no offset) changes nothing: same parameters, same outputs."""
    images, mask = _inputs()
    plain = YOLOS(**TINY)
    params = _init(plain, images, mask)
    gridded = YOLOS(**TINY, det_reference_grid=(2, 3))
    assert jax.tree.structure(jax.eval_shape(gridded.init, jax.random.PRNGKey(0), images, mask)["params"]) == \
        jax.tree.structure(params)
    a, b = jax.jit(plain.apply)({"params": params}, images, mask), jax.jit(gridded.apply)({"params": params}, images, mask)
    for k in ("logits", "boxes"):
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-6)


def test_box_offset_puts_untrained_boxes_on_the_reference_points():
    images, mask = _inputs()
    model = YOLOS(**TINY, **PRIORS)
    params = _init(model, images, mask)
    last = sorted(params["box_head"])[-1]
    params["box_head"][last] = jax.tree.map(np.zeros_like, params["box_head"][last])
    boxes = np.asarray(jax.jit(model.apply)({"params": params}, images, mask)["boxes"])
    refs = det_prior.reference_points(2, 3)
    np.testing.assert_allclose(boxes[:, :, :2], np.broadcast_to(refs, (2, 6, 2)), atol=1e-6)
    np.testing.assert_allclose(boxes[:, :, 2:], 0.5, atol=1e-6)


def test_model_with_priors_remat_and_grad():
    images, mask = _inputs()
    model = YOLOS(**TINY, **PRIORS)
    params = _init(model, images, mask)
    remat = YOLOS(**TINY, **PRIORS, remat=True)

    def loss(m, p):
        out = m.apply({"params": p}, images, mask)
        return jnp.sum(out["logits"] ** 2) + jnp.sum(out["boxes"])

    g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g1))


@pytest.mark.parametrize("fields, message", [
    (dict(det_reference_grid=(2, 2)), "num_det_tokens"),
    (dict(det_attention_sigma=(1.0,)), "det_reference_grid"),
    (dict(det_box_offset=True), "det_reference_grid"),
    (dict(det_reference_grid=(2, 3), det_attention_sigma=(1.0, 1.0, 1.0, 1.0)), "at most num_heads"),
    (dict(det_reference_grid=(2, 3), det_attention_sigma=(-1.0,)), ">= 0"),
    (dict(det_reference_grid=(2, 3), window_size=2), "window_size"),
    (dict(det_reference_grid=(2, 3), token_keep_ratio=0.5), "token_keep_ratio"),
])
def test_bad_prior_options_are_refused(fields, message):
    images, mask = _inputs()
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(YOLOS(**TINY, **fields).init, jax.random.PRNGKey(0), images, mask)
    cfg = config_lib.model_config("ti", **TINY, **fields)
    with pytest.raises(ValueError, match=message):
        det_prior.validate_options(cfg)


def test_prior_fields_survive_a_json_round_trip(tmp_path):
    """Checkpoints store the model config as JSON (lists); loading gives hashable tuples that rebuild."""
    from yolos_jax import weights

    images, mask = _inputs()
    model = YOLOS(**TINY, **PRIORS)
    params = _init(model, images, mask)
    cfg = json.loads(json.dumps(config_lib.model_config("ti", **TINY, **PRIORS).to_dict()))
    assert isinstance(cfg["det_reference_grid"], list)
    weights.save_params_dir(str(tmp_path / "ckpt"), jax.tree.map(np.asarray, params), cfg)
    loaded_params, loaded, _ = weights.load_model(str(tmp_path / "ckpt"))
    assert loaded.det_reference_grid == (2, 3) and loaded.det_attention_sigma == (0.7, 0.0, 1.5)
    want = jax.jit(model.apply)({"params": params}, images, mask)
    got = jax.jit(loaded.apply)({"params": loaded_params}, images, mask)
    np.testing.assert_array_equal(np.asarray(got["boxes"]), np.asarray(want["boxes"]))
