"""The ViT building blocks (yolos_jax/vit.py): the position-embedding resizes equal PyTorch's bicubic
`F.interpolate` (whole batch and per image), SelfAttention's chunked and einsum implementations agree in
their gradients, the CPU linear layer's custom gradient equals a float64 numpy product and is the one the blocks
use, and the custom-JVP GELU equals the exact GELU and PyTorch's, with its derivatives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F

import reference_models as ref
from yolos_jax import vit


def _padded_mask(batch, keys):
    """[batch, keys] bool key mask with padded keys in the first two images (test_attention's "padded")."""
    padded = np.ones((batch, keys), bool)
    padded[0, keys - keys // 3:] = False
    padded[1, ::5] = False
    return padded


# --------------------------------------------------------------------------------------------------
# Position-embedding resizing = F.interpolate(bicubic, align_corners=False)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,dst",
    [((4, 6), (7, 9)), ((10, 14), (3, 5)), ((6, 4), (3, 8)), ((5, 7), (5, 12)), ((3, 3), (1, 2))],
    ids=["up", "down", "mixed", "one-axis", "tiny"],
)
def test_resize_posemb_grid_matches_torch(src, dst):
    rng = np.random.RandomState(0)
    grid = rng.randn(2, *src, 5).astype(np.float32)  # a leading axis, as mid position embeddings have
    want = F.interpolate(
        torch.from_numpy(grid.astype(np.float64)).permute(0, 3, 1, 2), size=dst, mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).numpy()
    got_np = vit.resize_posemb_grid_np(grid.astype(np.float64), dst)
    got_jax = np.asarray(vit.resize_posemb_grid(grid, dst))
    assert got_np.shape == got_jax.shape == want.shape
    assert ref.max_abs(got_np, want) < 1e-12
    assert ref.max_abs(got_jax, want) < 1e-5
    # and float32 torch, the precision converted weights meet at run time in HF
    want32 = F.interpolate(torch.from_numpy(grid).permute(0, 3, 1, 2), size=dst, mode="bicubic", align_corners=False)
    assert ref.max_abs(got_jax, want32.permute(0, 2, 3, 1).numpy()) < 1e-5


def test_per_image_resize_weights_match_torch():
    """`bicubic_resize_weights` (traced sizes, float32) equals PyTorch's bicubic for each image's size,
    and is 0 past it."""
    grid = np.random.RandomState(8).randn(5, 7, 3).astype(np.float32)
    sizes = np.array([[3, 7], [5, 12], [9, 2], [1, 1]], np.int32)  # down, up, mixed, a single cell
    got = np.asarray(vit.resize_posemb_grid_per_image(jnp.asarray(grid), jnp.asarray(sizes), (9, 12)))
    for (h, w), g in zip(sizes, got):
        want = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(int(h), int(w)), mode="bicubic",
                             align_corners=False)[0].permute(1, 2, 0).numpy()
        assert ref.max_abs(g[:h, :w], want) < 1e-5
        assert not g[h:].any() and not g[:, w:].any()


def test_chunked_self_attention_module_gradients():
    """SelfAttention's parameter and input gradients through 'chunked' equal those through 'einsum'."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 290, 48)).astype(np.float32))
    key_mask = jnp.asarray(_padded_mask(2, 290))
    layers = {impl: vit.SelfAttention(3, attention_impl=impl) for impl in ("chunked", "einsum")}
    params = layers["einsum"].init(jax.random.PRNGKey(0), x, key_mask)
    w = jnp.asarray(rng.standard_normal((2, 290, 48)).astype(np.float32))
    grads = {}
    for impl, layer in layers.items():
        loss = lambda p, x, layer=layer: jnp.sum(layer.apply(p, x, key_mask) * w)  # noqa: E731
        grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(grads["chunked"]), jax.tree.leaves(grads["einsum"])):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(float(jnp.abs(b).max()), 1.0)


# --------------------------------------------------------------------------------------------------
# The linear layer's product (vit.dense_dot_general)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape,features", [((2, 37, 24), 40), ((2, 37, 40), 24), ((53, 16), 16)],
                         ids=["wide-out", "narrow-out", "2d"])
def test_dense_product_gradient_equals_float64_numpy(x_shape, features):
    """Both branches of the kernel gradient (x^T dy, and (dy^T x)^T when the output is narrower) and the
    input gradient (float32) equal the closed-form products x^T dy and dy kernel^T in float64 numpy."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal((x_shape[-1], features)).astype(np.float32)
    dy = rng.standard_normal(x_shape[:-1] + (features,)).astype(np.float32)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    y, vjp = jax.vjp(lambda a, b: vit.dense_dot_general(a, b, dims), jnp.asarray(x), jnp.asarray(kernel))
    dx, dk = vjp(jnp.asarray(dy))
    x64, k64, dy64 = (a.astype(np.float64) for a in (x, kernel, dy))
    scale = np.abs(x64).max() * np.abs(k64).max() * x_shape[-1]
    assert np.abs(np.asarray(y, np.float64) - x64 @ k64).max() <= 1e-6 * scale
    assert np.abs(np.asarray(dx, np.float64) - dy64 @ k64.T).max() <= 1e-6 * scale
    want_dk = x64.reshape(-1, x_shape[-1]).T @ dy64.reshape(-1, features)
    assert np.abs(np.asarray(dk, np.float64) - want_dk).max() <= 1e-6 * np.abs(want_dk).max() * 10
    assert dx.shape == x.shape and dk.shape == kernel.shape


def test_dense_layer_matches_nn_dense_and_keeps_bfloat16():
    """A Dense with the hook has nn.Dense's parameters, forward and gradients (float32 and bfloat16 compute);
    contractions other than [..., K] x [K, N] fall through to `lax.dot_general`; on CPU `vit.Dense` installs the
    hook, and the blocks' MLP and attention gradients go through it (its custom VJP is in their jaxprs)."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 11, 12)).astype(np.float32))
    assert jax.default_backend() == "cpu" and vit.Dense(4).dot_general is vit.dense_dot_general
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        ours = nn.Dense(20, dtype=dtype, dot_general=vit.dense_dot_general)
        plain = nn.Dense(20, dtype=dtype)
        params = plain.init(jax.random.PRNGKey(0), x)
        assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)
        for layer in (ours, plain):
            assert layer.apply(params, x).dtype == dtype
        loss = lambda p, x, layer: jnp.sum(jnp.sin(layer.apply(p, x).astype(jnp.float32)))  # noqa: E731
        got = jax.grad(loss, argnums=(0, 1))(params, x, ours)
        want = jax.grad(loss, argnums=(0, 1))(params, x, plain)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype
            assert float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()) <= tol * max(
                float(jnp.abs(b.astype(jnp.float32)).max()), 1.0)
    batched = (((2,), (1,)), ((0,), (0,)))  # a batched contraction: not the layer's product
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    np.testing.assert_array_equal(vit.dense_dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))
    for layer in (vit.Mlp(24), vit.SelfAttention(3, attention_impl="einsum")):
        params = layer.init(jax.random.PRNGKey(0), x)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p, layer=layer: jnp.sum(layer.apply(p, x))))(params))
        assert jaxpr.count("custom_vjp_call") == 2, jaxpr[:400]  # fc1, fc2 or qkv, proj


# --------------------------------------------------------------------------------------------------
# GELU
# --------------------------------------------------------------------------------------------------


def test_gelu_matches_exact_gelu_and_torch():
    x64 = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(5).standard_normal(1000) * 3])
    cdf = 0.5 * scipy.special.erfc(-x64 / np.sqrt(2))
    pdf = np.exp(-0.5 * x64**2) / np.sqrt(2 * np.pi)
    want, want_slope = x64 * cdf, cdf + x64 * pdf
    x = jnp.asarray(x64, jnp.float32)
    y, slope = jax.vmap(jax.value_and_grad(vit.gelu))(x)
    assert float(np.abs(np.asarray(y, np.float64) - want).max()) <= 2e-6
    assert float(np.abs(np.asarray(slope, np.float64) - want_slope).max()) <= 2e-6
    assert float(np.abs(np.asarray(y) - np.asarray(jax.nn.gelu(x, approximate=False))).max()) <= 2e-6
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)
    yt = F.gelu(xt)
    yt.sum().backward()
    assert float(np.abs(np.asarray(y) - yt.detach().numpy()).max()) <= 2e-6
    assert float(np.abs(np.asarray(slope) - xt.grad.numpy()).max()) <= 2e-6
    # second order (custom_jvp stays differentiable) and bf16 in, bf16 out
    points = np.array([-1.0, 0.0, 2.0])
    curvature = jax.vmap(jax.grad(jax.grad(vit.gelu)))(jnp.asarray(points, jnp.float32))
    want_curv = np.exp(-0.5 * points**2) / np.sqrt(2 * np.pi) * (2 - points**2)  # phi(x) (2 - x^2)
    assert float(np.abs(np.asarray(curvature) - want_curv).max()) <= 1e-5
    assert vit.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_rational_erf_of_the_portable_gelu_is_float32_accurate():
    """`vit.erf_rational` (the SavedModel trace's erf) against math.erf in float64."""
    import math

    from yolos_jax import vit

    x = np.concatenate([np.linspace(-6, 6, 20001), np.random.default_rng(0).normal(scale=2, size=20000)])
    got = np.asarray(jax.jit(vit.erf_rational)(x.astype(np.float32)), np.float64)
    want = np.array([math.erf(v) for v in x.astype(np.float32).astype(np.float64)])
    assert np.max(np.abs(got - want)) < 4e-7
    with vit.portable_erf():
        y = jax.jit(lambda v: vit.gelu(v))(x.astype(np.float32))
    np.testing.assert_allclose(y, np.asarray(jax.jit(vit.gelu)(x.astype(np.float32))), atol=2e-6, rtol=1e-6)


def test_trunc_normal_02_has_the_spread_of_timms_trunc_normal():
    """timm's `trunc_normal_(std=.02)` (= torch.nn.init.trunc_normal_, bounds +-2 in absolute units) is in effect
    N(0, 0.02^2): the [DET] tokens and position embeddings start with that spread (flax's default bounds, +-2
    standard deviations, gave 0.0176)."""
    import scipy.stats

    ours = np.asarray(vit.trunc_normal_02(jax.random.PRNGKey(0), (400_000,), jnp.float32), np.float64)
    torch.manual_seed(0)
    theirs = torch.nn.init.trunc_normal_(torch.empty(400_000, dtype=torch.float64), std=0.02).numpy()
    assert np.std(ours) == pytest.approx(0.02, rel=0.01) and np.std(theirs) == pytest.approx(0.02, rel=0.01)
    assert np.abs(ours).max() <= 2.0
    assert scipy.stats.ks_2samp(ours, theirs).pvalue > 1e-3  # the same distribution, not only the same spread
