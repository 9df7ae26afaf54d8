"""The splash (Pallas TPU) attention route (yolos_jax/attention_tpu.py), run on CPU in Pallas interpret mode
(the kernel's own code as XLA ops): outputs and gradients against the masked einsum path
(`attention.softmax_attention`) for a YOLOS-like key mask (row-major top-left rectangles, valid keys not a
prefix), no mask, fewer queries than keys, an image without any valid key and bf16 inputs; a tiny YOLOS with
attention_impl='splash' against 'einsum'; the shard_map split over a mesh in context (8 simulated CPU
devices, tests/conftest.py) and the fallback without one. Shapes are the smallest that exercise the padding
to 128 lanes: interpret mode is slow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval_fixtures import perturbed_params
from yolos_jax import attention, attention_tpu, sharding

GRID = (8, 11)  # patches of a 64 x 88 canvas at patch 8
EXTRA = (1, 6)  # [CLS] before the patches, [DET] tokens after
TOKENS = EXTRA[0] + GRID[0] * GRID[1] + EXTRA[1]  # 95: padded to 128 inside the kernel wrapper


def _key_mask(batch, none_valid=False):
    """[B, T] bool: each image's patches a top-left rectangle of the grid (row-major, so the valid keys are
    not a prefix), [CLS] and [DET] valid; `none_valid` empties the last image's mask."""
    sizes = ((5, 7), (8, 4), (3, 11))
    mask = np.ones((batch, TOKENS), bool)
    for i in range(batch):
        cells = np.zeros(GRID, bool)
        h, w = sizes[i % len(sizes)]
        cells[:h, :w] = True
        mask[i, EXTRA[0]: EXTRA[0] + cells.size] = cells.reshape(-1)
    if none_valid:
        mask[-1] = False
    return mask


def _inputs(batch, heads, q_len, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, head_dim))
    k, v = (rng.standard_normal((batch, TOKENS, heads, head_dim)) for _ in range(2))
    d_out = rng.standard_normal((batch, q_len, heads, head_dim))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v, d_out))


def _vjp(impl, q, k, v, key_mask, d_out):
    """(out, dq, dk, dv) of `attention.dot_product_attention` under jit, float32 for comparison."""
    out, vjp = jax.vjp(jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, key_mask, impl)), q, k, v)
    return tuple(np.asarray(a, np.float32) for a in (out, *vjp(d_out)))


def _max_errors(a, b):
    return [float(np.abs(x - y).max()) for x, y in zip(a, b)]


@pytest.mark.parametrize("case", ["rectangles", "no_mask", "fewer_queries", "none_valid"])
def test_splash_equals_masked_path(case):
    """float32, head dim 64: outputs and gradients wrt q, k, v within 1e-5 of the masked einsum path."""
    batch = 3 if case == "none_valid" else 2
    q_len = TOKENS - EXTRA[1] if case == "fewer_queries" else TOKENS  # the [DET] prior's split: t < S
    q, k, v, d_out = _inputs(batch, 2, q_len, 64, jnp.float32)
    key_mask = None if case == "no_mask" else jnp.asarray(_key_mask(batch, none_valid=case == "none_valid"))
    splash = _vjp("splash", q, k, v, key_mask, d_out)
    masked = _vjp("einsum", q, k, v, key_mask, d_out)
    assert all(np.isfinite(a).all() for a in splash)
    errors = _max_errors(splash, masked)
    assert max(errors) <= 1e-5, (case, errors)


def test_splash_bfloat16():
    """bf16 inputs: bf16 outputs, float32 softmax; within bf16 accuracy of the einsum path (which rounds the
    logits to bf16 first, where the kernel keeps them float32) and of the float32 result."""
    q, k, v, d_out = _inputs(2, 2, TOKENS, 64, jnp.bfloat16, seed=1)
    key_mask = jnp.asarray(_key_mask(2))
    splash = _vjp("splash", q, k, v, key_mask, d_out)
    assert attention.dot_product_attention(q, k, v, key_mask, "splash").dtype == jnp.bfloat16
    masked = _vjp("einsum", q, k, v, key_mask, d_out)
    exact = _vjp("einsum", *(a.astype(jnp.float32) for a in (q, k, v)), key_mask, d_out.astype(jnp.float32))
    for a, b, c in zip(splash, masked, exact):
        scale = float(np.abs(c).max())
        assert float(np.abs(a - c).max()) <= 2e-2 * scale
        assert float(np.abs(a - b).max()) <= 3e-2 * scale


@pytest.mark.parametrize("variant", ["plain", "det_prior", "windowed_adapter"])
def test_yolos_splash_equals_einsum(monkeypatch, variant):
    """A tiny YOLOS on a padded batch (images top-left on a larger canvas): outputs and parameter gradients
    with attention_impl='splash' within 1e-5 of 'einsum'. 'det_prior' biases the [DET] rows (they keep the
    einsum softmax), so the kernel sees fewer queries than keys; in 'windowed_adapter' block 0 is windowed
    (its own einsum kernels whatever the impl), block 1 global (the kernel), and the FP-DETR task adapter's
    [DET]-only attention (6 queries and keys, no mask) takes the kernel too."""
    from yolos_jax import convert
    from yolos_jax.yolos import YOLOS

    kw = dict(hidden_size=32, depth=2, num_heads=2, patch_size=8, num_det_tokens=6, num_classes=4,
              init_pe_size=(48, 64))
    if variant == "det_prior":
        kw |= dict(mid_pe_size=(40, 56), det_reference_grid=(2, 3), det_attention_sigma=(1.0, 0.0))
    if variant == "windowed_adapter":
        kw |= dict(mid_pe_size=(40, 56), window_size=3, global_blocks=(1,), adapter=True, adapter_insert_det_at=1)
    rng = np.random.RandomState(0)
    canvas = rng.randn(2, 64, 88, 3).astype(np.float32) * 5  # what padding holds must not matter
    mask = np.zeros((2, 64, 88), bool)
    for i, (h, w) in enumerate(((45, 70), (64, 48))):
        mask[i, :h, :w] = True
    canvas[mask] = rng.randn(int(mask.sum()), 3)
    params = perturbed_params(YOLOS(**kw), canvas[0, :45, :70])

    def run(impl):
        model = YOLOS(**(kw | dict(attention_impl=impl)))

        def loss(p):
            out = model.apply({"params": p}, canvas, mask)
            return jnp.sum(out["logits"] * 0.3) + jnp.sum(jnp.sin(7.0 * out["boxes"])), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    calls = []  # the query count of each kernel call traced: the model does route through it
    local = attention_tpu.splash_attention_local

    def recording(q, *args, **kwargs):
        calls.append(q.shape[1])
        return local(q, *args, **kwargs)

    monkeypatch.setattr(attention_tpu, "splash_attention_local", recording)
    (_, out_s), grad_s = run("splash")
    expected = {"plain": {95}, "det_prior": {89}, "windowed_adapter": {95, 6}}[variant]
    assert set(calls) == expected, calls
    (_, out_e), grad_e = run("einsum")
    for name in ("logits", "boxes"):
        err = float(np.abs(np.asarray(out_s[name]) - np.asarray(out_e[name])).max())
        assert err <= 1e-5, (name, err)
    flat_s, flat_e = convert.flatten_params(grad_s), convert.flatten_params(grad_e)
    for name in flat_e:
        err = float(np.abs(np.asarray(flat_s[name]) - np.asarray(flat_e[name])).max())
        assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("batch, masked", [(8, True), (6, True), (6, False)])
def test_splash_shard_maps_over_the_mesh_in_context(monkeypatch, batch, masked):
    """With a ('data', 'fsdp') = (4, 2) mesh set by `jax.set_mesh`, each device runs the kernel on its own
    images (one each: 8 images split as the train step splits them, or 6 replicated ones padded to 8), with
    a key mask or none, and outputs and gradients equal the masked path's."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    cfg = sharding.default_mesh_config()
    cfg.fsdp = 2
    mesh = sharding.make_mesh(cfg, jax.devices()[:8])
    local_batches = []
    local = attention_tpu.splash_attention_local

    def recording(q, *args, **kwargs):
        local_batches.append(q.shape[0])
        return local(q, *args, **kwargs)

    monkeypatch.setattr(attention_tpu, "splash_attention_local", recording)
    q, k, v, d_out = _inputs(batch, 2, TOKENS, 64, jnp.float32, seed=2)
    key_mask = jnp.asarray(_key_mask(batch)) if masked else None
    reference = _vjp("einsum", q, k, v, key_mask, d_out)
    placement = sharding.batch_sharding(mesh) if batch % 8 == 0 else sharding.replicated(mesh)
    q, k, v, d_out, key_mask = jax.device_put((q, k, v, d_out, key_mask), placement)
    with jax.set_mesh(mesh):
        splash = _vjp("splash", q, k, v, key_mask, d_out)
    assert local_batches and set(local_batches) == {1}, local_batches
    errors = _max_errors(splash, reference)
    assert max(errors) <= 1e-5, errors


def test_splash_without_a_mesh_on_several_devices_falls_back(monkeypatch):
    """Not interpreted, several devices and no mesh in context: XLA could not partition the kernel, so the
    call takes the 'xla' (reordered keys) path, with a warning, and gives the masked path's result."""
    if jax.device_count() < 2:
        pytest.skip("needs several devices (tests/conftest.py simulates them on CPU)")
    monkeypatch.setattr(attention_tpu, "INTERPRET", False)
    monkeypatch.setattr(attention_tpu, "splash_attention_local", None)  # must not be reached
    q, k, v, d_out = _inputs(2, 2, TOKENS, 64, jnp.float32, seed=3)
    key_mask = jnp.asarray(_key_mask(2))
    with pytest.warns(UserWarning, match="without a mesh in context"):
        out = attention.dot_product_attention(q, k, v, key_mask, "splash")
    ref = attention.dot_product_attention(q, k, v, key_mask, "einsum")
    assert float(jnp.abs(out - ref).max()) <= 1e-5


def test_splash_lowers_for_tpu_under_a_mesh(monkeypatch):
    """The real (not interpreted) kernels, forward and both backward ones, lower for TPU from this CPU host
    (bf16, head dim 64, padded lengths): per device under a mesh in context; without one, jax refuses the
    kernel in a multi-device jit (hence the fallback). Mosaic's own compile needs a TPU and is not run."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    monkeypatch.setattr(attention_tpu, "INTERPRET", False)
    monkeypatch.setattr(attention_tpu, "NO_MESH_FALLBACK", None)
    cfg = sharding.default_mesh_config()
    cfg.fsdp = 2
    mesh = sharding.make_mesh(cfg, jax.devices()[:8])
    split = sharding.batch_sharding(mesh)
    qkv = jax.ShapeDtypeStruct((8, TOKENS, 2, 64), jnp.bfloat16, sharding=split)
    key_mask = jax.ShapeDtypeStruct((8, TOKENS), jnp.bool_, sharding=split)

    def loss(q, k, v, m):
        return jnp.sum(attention.dot_product_attention(q, k, v, m, "splash").astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
        text = grad.trace(qkv, qkv, qkv, key_mask).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dq, dk/dv
    with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
        grad.trace(qkv, qkv, qkv, key_mask).lower(lowering_platforms=("tpu",))
