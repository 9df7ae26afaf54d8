"""The ViT layers (yolos_jax/vit.py): SelfAttention's chunked and einsum implementations agree in their
gradients, and the custom-JVP GELU equals the exact GELU and PyTorch's, with its derivatives. (The
position-embedding resize is checked against PyTorch in test_yolos.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import torch
import torch.nn.functional as F

from yolos_jax import vit


def _padded_mask(batch, keys):
    """[batch, keys] bool key mask with padded keys in the first two images (test_attention's "padded")."""
    padded = np.ones((batch, keys), bool)
    padded[0, keys - keys // 3:] = False
    padded[1, ::5] = False
    return padded


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
