"""The paper variants of YOLOS (yolos_jax/variants.py): drop path, partial sequences, ConvStem, the FP-DETR
task adapter with late [DET] insertion, detached [DET] tokens.

References: a float64 numpy YOLOS forward written here from the papers' descriptions (token subsets with
their position embeddings, the adapter, late insertion, per-example branch scaling), PyTorch for MIMDet's
ConvStem (Architecture 1) and timm's drop-path schedule (torch.linspace), the paper's 4.1M ConvStem size.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F

import train_fixtures as tf_
from yolos_jax import data as data_lib
from yolos_jax import losses, matcher, optim, sharding, train_step, variants, vit
from yolos_jax.yolos import YOLOS

HW = (64, 96)  # the stored PE grid (4 x 6 patches): no resizing, so PE gradients map 1:1 to patches
GRID = (4, 6)
N = GRID[0] * GRID[1]
Q = 4
BASE = dict(hidden_size=32, depth=3, num_heads=2, num_det_tokens=Q, num_classes=5, init_pe_size=HW,
            mid_pe_size=HW)
TOL = 2e-5


def model(**kw) -> YOLOS:
    return YOLOS(**{**BASE, **kw})


def randomize(params, seed):
    """O(1) parameters (the 0.02 init would let mistakes hide under tiny activations)."""
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        r = rng.standard_normal(leaf.shape)
        if name == "scale":
            v = 1.0 + 0.2 * r
        elif name == "bias":
            v = 0.2 * r
        elif name == "kernel":
            v = r / math.sqrt(int(np.prod(leaf.shape[:-1])))
        else:  # tokens, position embeddings, prompts
            v = 0.5 * r
        return np.asarray(v, np.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def init_params(m: YOLOS, seed=0):
    """Random O(1) parameters of m's tree (shapes from `jax.eval_shape`: nothing is computed)."""
    return randomize(jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, *HW, 3))))["params"], seed)


@functools.lru_cache(maxsize=None)
def forward(m: YOLOS, train: bool):
    """Jitted (params, images, pixel_mask, key) -> (outputs, intermediates) for model m."""

    def f(params, images, pixel_mask, key):
        rngs = {"dropout": key, "drop_path": key, "tokens": key}
        out, state = m.apply({"params": params}, images, pixel_mask, train=train, rngs=rngs,
                             mutable=["intermediates"])
        return out, state.get("intermediates", {})

    return jax.jit(f)


@functools.lru_cache(maxsize=None)
def grad_fn(m: YOLOS, train: bool):
    """Jitted gradient of a loss that reads every output, w.r.t. the params."""

    def loss(params, images, pixel_mask, key):
        rngs = {"dropout": key, "drop_path": key, "tokens": key}
        out = m.apply({"params": params}, images, pixel_mask, train=train, rngs=rngs)
        total = jnp.sum(jnp.sin(out["logits"])) + jnp.sum(out["boxes"] ** 2)
        for aux in out.get("aux_outputs", []):
            total += jnp.sum(jnp.cos(aux["logits"]))
        return total

    return jax.jit(jax.grad(loss))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, *HW, 3)).astype(np.float32)
    mask = np.ones((2, *HW), bool)
    mask[1, 40:, :] = False  # image 1: 40 x 64 real pixels -> its own grid 2 x 4 (the partial third patch
    # row is masked: alone, the patch conv drops it), padded into the 4 x 6 canvas grid
    mask[1, :, 64:] = False
    images[~mask] = 0.0
    return images, mask


@pytest.fixture(scope="module")
def base_params():
    return init_params(model(), seed=1)


# --------------------------------------------------------------------------------------------------
# The float64 numpy reference
# --------------------------------------------------------------------------------------------------


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_ln(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def np_attention(q, k, v, heads, key_mask=None):
    b, t, d = q.shape
    split = lambda a: a.reshape(b, a.shape[1], heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
    logits = np.einsum("bhtd,bhsd->bhts", split(q), split(k)) / math.sqrt(d // heads)
    if key_mask is not None:
        logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bhtd", w, split(v)).transpose(0, 2, 1, 3).reshape(b, t, d)


def np_block(x, p, heads, key_mask, scale=(1.0, 1.0)):
    d = x.shape[-1]
    qkv = np_dense(np_ln(x, p["norm1"]), p["attn"]["qkv"])
    o = np_attention(qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :], heads, key_mask)
    x = x + scale[0] * np_dense(o, p["attn"]["proj"])
    y = np_dense(np_ln(x, p["norm2"]), p["mlp"]["fc1"])
    y = 0.5 * y * (1.0 + scipy.special.erf(y / math.sqrt(2.0)))
    return x + scale[1] * np_dense(y, p["mlp"]["fc2"])


def np_adapter(det, p, heads):
    """FP-DETR task adaptor, pre-LN residual: q = k = LN(z) + prompts, v = LN(z)."""
    d = det.shape[-1]
    y = np_ln(det, p["norm"])
    qk = np_dense(y + p["query_pos"], p["qk"])
    o = np_attention(qk[..., :d], qk[..., d:], np_dense(y, p["v"]), heads)
    return det + np_dense(o, p["proj"])


def np_yolos(params, images, pixel_mask=None, *, keep=None, insert_at=0, adapter=False, scales=None,
             aux_layers=0, heads=2, patch=16):
    """YOLOS in float64 from our parameter tree. keep: int [B, K] kept patch indices (partial sequence);
    insert_at: block where the [DET] tokens join; scales[i] = (attn, mlp) residual multipliers (drop path)."""
    p = _np(params)
    b, h, w, _ = images.shape
    gh, gw = h // patch, w // patch
    d = p["cls_token"].shape[-1]
    pe = p["patch_embed"]["proj"]
    tok = images.astype(np.float64).reshape(b, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    tok = tok.reshape(b, gh * gw, -1) @ pe["kernel"].reshape(-1, d) + pe["bias"]
    q = p["det_tokens"].shape[1]
    x = np.concatenate(
        [np.broadcast_to(p["cls_token"], (b, 1, d)), tok, np.broadcast_to(p["det_tokens"], (b, q, d))], 1)
    # Each image's own grid: whole patches of its real pixels (padding bottom/right); its position
    # embeddings are the stored grid resized to that grid by torch's bicubic (float64), top-left.
    own = np.array([[gh, gw]] * b) if pixel_mask is None else np.stack(
        [pixel_mask.any(2).sum(1) // patch, pixel_mask.any(1).sum(1) // patch], 1)

    def laid_out(grid):  # [L, gh', gw', D] stored -> [L, B, gh * gw, D] per image on the canvas grid
        out = np.zeros((grid.shape[0], b, gh, gw, d))
        for i, (vh, vw) in enumerate(own):
            r = F.interpolate(torch.from_numpy(grid).permute(0, 3, 1, 2), size=(int(vh), int(vw)), mode="bicubic",
                              align_corners=False).permute(0, 2, 3, 1).numpy()
            out[:, i, :vh, :vw] = r
        return out.reshape(grid.shape[0], b, gh * gw, d)

    def with_cls_det(cls, patches, det):  # [L, 1, D], [L, B, P, D], [L, Q, D] -> [L, B, T, D]
        lead = patches.shape[:2]
        return np.concatenate([np.broadcast_to(cls[:, None], (*lead, 1, d)), patches,
                               np.broadcast_to(det[:, None], (*lead, q, d))], 2)

    x = x + with_cls_det(p["pos_embed_cls"], laid_out(p["pos_embed_patches"]), p["pos_embed_det"])[0]
    depth = sum(k.startswith("block_") for k in p)
    mid = with_cls_det(p["mid_pos_embed_cls"], laid_out(p["mid_pos_embed_patches"]), p["mid_pos_embed_det"])
    keys = np.ones((b, x.shape[1]), bool)
    cells = (np.arange(gh)[None, :, None] < own[:, 0, None, None]) & (np.arange(gw)[None, None, :] < own[:, 1, None, None])
    keys[:, 1 : 1 + gh * gw] = cells.reshape(b, -1)
    if keep is not None:
        n = gh * gw
        idx = np.concatenate([np.zeros((b, 1), int), keep + 1, np.broadcast_to(1 + n + np.arange(q), (b, q))], 1)
        x = np.take_along_axis(x, idx[..., None], 1)
        keys = np.take_along_axis(keys, idx, 1)
        mid = np.stack([mid[:, i, idx[i]] for i in range(b)], 1)  # [L, B, T', D]
    held = None
    if insert_at:
        x, held, keys = x[:, :-q], x[:, -q:], keys[:, :-q]
    aux = []
    for i in range(depth):
        if insert_at and i == insert_at:
            x = np.concatenate([x, held], 1)
            keys = np.concatenate([keys, np.ones((b, q), bool)], 1)
        if adapter and i >= insert_at:
            x = np.concatenate([x[:, :-q], np_adapter(x[:, -q:], p["adapter"], heads)], 1)
        x = np_block(x, p[f"block_{i}"], heads, keys, (1.0, 1.0) if scales is None else scales[i])
        if depth - 1 - aux_layers <= i < depth - 1:
            aux.append(x[:, -q:])
        if i < depth - 1:
            x = x + mid[i][:, : x.shape[1]]

    def predict(det):
        det = np_ln(det, p["encoder_norm"])
        out = {}
        for head, key in (("class_head", "logits"), ("box_head", "boxes")):
            v = det
            for j in range(3):
                v = np_dense(v, p[head][f"layers_{j}"])
                v = np.maximum(v, 0) if j < 2 else v
            out[key] = v
        out["boxes"] = scipy.special.expit(out["boxes"])
        return out

    out = predict(x[:, -q:])
    if aux_layers:
        out["aux_outputs"] = [predict(a) for a in aux]
    return out


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_outputs_close(got, want, tol=TOL):
    for k in ("logits", "boxes"):
        assert max_abs(got[k], want[k]) < tol, (k, max_abs(got[k], want[k]))
    assert len(got.get("aux_outputs", [])) == len(want.get("aux_outputs", []))
    for g, w in zip(got.get("aux_outputs", []), want.get("aux_outputs", [])):
        assert_outputs_close(g, w, tol)


def assert_identical(a, b):
    fa, fb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


KEY = jax.random.PRNGKey(7)


# --------------------------------------------------------------------------------------------------
# Defaults and inactive options
# --------------------------------------------------------------------------------------------------


def test_default_matches_numpy_and_inactive_options_change_nothing(data, base_params):
    images, mask = data
    default, _ = forward(model(), False)(base_params, images, mask, KEY)
    assert_outputs_close(default, np_yolos(base_params, images, mask))
    # Train-only options at inference, and detach (forward-neutral): bit-identical to the plain model.
    inactive = model(drop_path_rate=0.3, token_keep_ratio=0.5, detach_det_tokens=True)
    out, inter = forward(inactive, False)(base_params, images, mask, KEY)
    assert_identical(out, default)
    assert not inter  # no token sampling at inference
    # train=True with every option at its default: still the plain model, bit for bit.
    out, _ = forward(model(), True)(base_params, images, mask, KEY)
    assert_identical(out, default)


def test_default_param_tree_has_no_variant_parameters(base_params):
    assert sorted(base_params) == sorted(
        ["patch_embed", "cls_token", "det_tokens", "pos_embed_cls", "pos_embed_patches", "pos_embed_det",
         "mid_pos_embed_cls", "mid_pos_embed_patches", "mid_pos_embed_det", "block_0", "block_1", "block_2",
         "encoder_norm", "class_head", "box_head"])
    full = jax.eval_shape(lambda: model(drop_path_rate=0.1, token_keep_ratio=0.5, detach_det_tokens=True).init(
        jax.random.PRNGKey(0), jnp.zeros((1, *HW, 3))))["params"]
    assert jax.tree.structure(full) == jax.tree.structure(base_params)


def test_validation_names_the_field():
    x = jnp.zeros((1, *HW, 3))
    for kw, field in [
        (dict(token_keep_ratio=0.2), "config.model.token_keep_ratio"),
        (dict(token_keep_ratio=1.5), "config.model.token_keep_ratio"),
        (dict(drop_path_rate=1.0), "config.model.drop_path_rate"),
        (dict(patch_embed="conv"), "config.model.patch_embed"),
        (dict(patch_embed="conv_stem", patch_size=12), "config.model.patch_size"),
        (dict(adapter_insert_det_at=3), "config.model.adapter_insert_det_at"),
        (dict(adapter_insert_det_at=2, aux_layers=1), "config.model.aux_layers"),
        (dict(adapter="yes"), "config.model.adapter"),
        (dict(token_keep_ratio=0.5, window_size=2), "config.model.token_keep_ratio"),
    ]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            jax.eval_shape(lambda: model(**kw).init(jax.random.PRNGKey(0), x))
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            variants.validate_options({**BASE, **kw})
    # Training without the rng stream: the error says which stream and which field.
    m = model(token_keep_ratio=0.5)
    with pytest.raises(ValueError, match=r"token_keep_ratio.*'tokens'"):
        jax.eval_shape(lambda: m.apply(m.init(jax.random.PRNGKey(0), x), x, train=True))


# --------------------------------------------------------------------------------------------------
# Drop path
# --------------------------------------------------------------------------------------------------


def test_drop_path_rates_match_timm():
    for rate, depth in ((0.1, 12), (0.3, 3), (0.2, 1), (0.0, 5)):
        want = torch.linspace(0, rate, depth, dtype=torch.float64).tolist()
        np.testing.assert_allclose(variants.drop_path_rates(rate, depth), want, rtol=0, atol=1e-15)


class _DropPath(vit.nn.Module):
    rate: float

    def __call__(self, y):
        return vit.drop_path(self, y, self.rate)


def test_drop_path_per_example_and_rescaled():
    rate, b = 0.3, 4000
    y = jnp.ones((b, 3, 2))
    out = np.asarray(_DropPath(rate).apply({}, y, rngs={"drop_path": jax.random.PRNGKey(0)}))
    per_example = out.reshape(b, -1)
    assert np.all(per_example == per_example[:, :1])  # one decision per example
    kept = per_example[:, 0] != 0
    np.testing.assert_allclose(per_example[kept], 1.0 / (1.0 - rate), rtol=1e-6)
    sigma = math.sqrt(rate * (1 - rate) / b)
    assert abs((~kept).mean() - rate) < 4 * sigma
    assert _DropPath(0.0).apply({}, y) is y  # rate 0: the branch itself, no rng needed


def test_drop_path_in_the_model_matches_numpy(data, base_params):
    """depth 3 at rate 0.6: blocks 1 and 2 drop their branches (rates 0.3, 0.6). Every example's output
    equals the numpy forward with some choice of branch multipliers in {0, 1 / (1 - rate)}."""
    images, mask = data
    reps = 6
    imgs, masks = np.repeat(images[:1], reps, 0), np.repeat(mask[:1], reps, 0)
    m = model(drop_path_rate=0.6)
    out, _ = forward(m, True)(base_params, imgs, masks, KEY)
    rates = variants.drop_path_rates(0.6, 3)
    choices = [(a, c) for a in (0, 1) for c in (0, 1)]
    matched = []
    refs = {}
    for i in range(reps):
        found = None
        for c1 in choices:
            for c2 in choices:
                key = (c1, c2)
                if key not in refs:
                    s = [(1.0, 1.0)] + [tuple(k / (1 - r) for k in c) for c, r in zip(key, rates[1:])]
                    refs[key] = np_yolos(base_params, imgs[:1], masks[:1], scales=s)
                if max_abs(out["logits"][i], refs[key]["logits"][0]) < TOL and \
                        max_abs(out["boxes"][i], refs[key]["boxes"][0]) < TOL:
                    found = key
        assert found is not None, f"example {i} matches no drop pattern"
        matched.append(found)
    assert len(set(matched)) > 1  # the examples of one batch draw their own patterns


# --------------------------------------------------------------------------------------------------
# Partial sequences
# --------------------------------------------------------------------------------------------------


def test_num_kept_patches():
    assert variants.num_kept_patches(24, 0.5) == 12
    assert variants.num_kept_patches(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004 in floats
    assert variants.num_kept_patches(3800, 0.5) == 1900
    assert variants.num_kept_patches(7, 0.25) == 2
    assert variants.num_kept_patches(7, 1.0) == 7


def test_sampling_prefers_valid_patches_uniformly():
    n, k, draws = 24, 12, 3000
    valid = np.zeros((2, n), bool)
    valid[0, :9] = True  # fewer valid patches than kept: all of them, padding fills the rest
    valid[1, 2:22] = True  # 20 valid: a uniform 12-subset of them
    sample = jax.jit(jax.vmap(lambda key: variants.sample_patch_index(key, jnp.asarray(valid), 2, n, k)))
    idx = np.asarray(sample(jax.random.split(jax.random.PRNGKey(3), draws)))  # [draws, 2, k]
    assert idx.shape == (draws, 2, k) and idx.dtype == np.int32
    assert np.all(np.diff(idx, axis=-1) > 0)  # distinct and in raster order
    assert all(set(range(9)) <= set(row) for row in idx[:, 0])
    assert np.all(valid[1][idx[:, 1]])
    counts = np.bincount(idx[:, 1].ravel(), minlength=n)[2:22]
    expected = draws * k / 20
    # Each valid patch is kept with probability 12/20; 5 sigma of the binomial count.
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(draws * 0.6 * 0.4)), counts
    pad = np.bincount(idx[:, 0].ravel(), minlength=n)[9:]  # the 3 filler slots spread over padding
    assert pad.sum() == draws * 3 and pad.min() > 0


class _Gather(vit.nn.Module):
    def __call__(self, x, key_mask, mid_pos):
        x, key_mask, index = variants.keep_random_patches(self, x, key_mask, N, Q, 0.5)
        return x, key_mask, jnp.stack([variants.gather_tokens(m, index) for m in mid_pos])


def test_token_gather_matches_numpy():
    rng = np.random.default_rng(4)
    b, d, depth_1 = 3, 5, 2
    x = rng.standard_normal((b, 1 + N + Q, d)).astype(np.float32)
    key_mask = rng.random((b, 1 + N + Q)) < 0.8
    key_mask[:, 0] = key_mask[:, -Q:] = True
    mid = rng.standard_normal((depth_1, 1, 1 + N + Q, d)).astype(np.float32)
    (gx, gmask, gmid), state = _Gather().apply({}, x, key_mask, mid, rngs={"tokens": jax.random.PRNGKey(5)},
                                                mutable=["intermediates"])
    keep = np.asarray(state["intermediates"]["kept_patch_index"][0])
    assert keep.shape == (b, 12)
    for i in range(b):
        rows = [0] + [1 + j for j in keep[i]] + list(range(1 + N, 1 + N + Q))
        np.testing.assert_array_equal(np.asarray(gx[i]), x[i, rows])
        np.testing.assert_array_equal(np.asarray(gmask[i]), key_mask[i, rows])
        np.testing.assert_array_equal(np.asarray(gmid[:, i]), mid[:, 0, rows])
        assert key_mask[i, 1 + keep[i]].all() or key_mask[i, 1 : 1 + N].sum() < 12


# detach_det_tokens changes no forward value; sharing this model with the detach test saves a compile.
PARTIAL = model(token_keep_ratio=0.5, aux_layers=1, detach_det_tokens=True)


def test_partial_sequence_forward_and_gradients(data, base_params):
    """Given the kept patches, each image's training output is the float64 reference's with the same
    patches (its own position-embedding grid, padding masked): the bound of batch invariance for a random
    draw (variants module docstring)."""
    images, mask = data
    m = PARTIAL
    out, inter = forward(m, True)(base_params, images, mask, KEY)
    keep = np.asarray(inter["kept_patch_index"][0])
    assert keep.shape == (2, 12)
    valid1 = np.zeros(GRID, bool)
    valid1[:2, :4] = True  # image 1's own 2 x 4 grid, top-left
    valid1 = valid1.reshape(-1)
    assert valid1.sum() == 8 and set(np.flatnonzero(valid1)) <= set(keep[1])  # every valid one, + padding
    assert_outputs_close(out, np_yolos(base_params, images, mask, keep=keep, aux_layers=1))
    full, _ = forward(m, False)(base_params, images, mask, KEY)  # inference: every token
    assert_outputs_close(full, np_yolos(base_params, images, mask, aux_layers=1))
    # Only the kept patches' position embeddings (and mid PEs) get gradients. Without padding the images'
    # grids are the stored one (no resize), so position-embedding cells map 1:1 to patches.
    no_pad = np.ones_like(mask)
    _, inter = forward(m, True)(base_params, images, no_pad, KEY)
    keep = np.asarray(inter["kept_patch_index"][0])
    g = grad_fn(m, True)(base_params, images, no_pad, KEY)
    kept = np.zeros(N, bool)
    kept[np.union1d(keep[0], keep[1])] = True
    assert not kept.all()
    for name in ("pos_embed_patches", "mid_pos_embed_patches"):
        per_patch = np.abs(np.asarray(g[name])).reshape(-1, N, BASE["hidden_size"]).sum((0, 2))
        assert np.all(per_patch[~kept] == 0) and np.all(per_patch[kept] > 0), name


def test_all_variants_train_step():
    """The real train step (rng streams, host matching, set loss, clipping, AdamW) with every variant on.

    AdamW's first step moves every parameter with a non-zero gradient by about the learning rate
    (m / sqrt(v) = sign(g)), and one without by at most lr * weight_decay * |p|: a leaf that moved by
    more than lr / 2 had a gradient."""
    # (ConvStem is left out here to keep the compile small; its gradients: test_conv_stem_matches_torch.)
    m = tf_.tiny_model().clone(token_keep_ratio=0.5, drop_path_rate=0.1, adapter=True, adapter_insert_det_at=1,
                               detach_det_tokens=True)
    mesh_cfg = sharding.default_mesh_config()
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    abstract = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, *tf_.IMAGE_HW, 3))))["params"]
    before = randomize(abstract, 8)
    assert "adapter" in before
    optim_cfg = optim.default_optim_config()
    optim_cfg.base_lr = 1e-3
    tx, schedule = optim.make_optimizer(optim_cfg, abstract, 4, 10)
    _, shardings = train_step.abstract_state_and_shardings(m, tx, 0, tf_.IMAGE_HW, mesh, mesh_cfg)
    state = jax.device_put({"step": np.int32(0), "params": before, "opt_state": tx.init(before),
                            "rng": np.asarray(jax.random.PRNGKey(0))}, shardings)
    lr = optim.peak_learning_rate(optim_cfg, 4)
    step = train_step.make_train_step(m, tx, schedule, losses.default_loss_config(),
                                      matcher.default_matcher_config(), mesh, shardings)
    batch = data_lib.to_global_batch(train_step.select_train_batch(tf_.fake_batch(4, seed=0)),
                                     sharding.batch_sharding(mesh))
    state, metrics = step(state, batch)
    after = jax.device_get(state["params"])
    assert float(metrics["finite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
    # Detached [DET] tokens: zero gradient and no decay, so AdamW leaves them exactly as initialised ...
    np.testing.assert_array_equal(after["det_tokens"], before["det_tokens"])
    # ... while every leaf of the adapter, and the [DET] position embeddings, train.
    for name in ("adapter", "pos_embed_det"):
        for path, a in jax.tree_util.tree_flatten_with_path(after[name])[0]:
            b = before[name]
            for k in path:
                b = b[k.key]
            assert np.max(np.abs(a - b)) > lr / 2, (name, jax.tree_util.keystr(path))


# --------------------------------------------------------------------------------------------------
# ConvStem
# --------------------------------------------------------------------------------------------------


def torch_conv_stem(params, channels, eps=1e-6):
    """MIMDet Architecture 1 in PyTorch (Conv2d 3x3/2 pad 1 no bias, LayerNorm2d, GELU; 1x1 Conv2d)."""

    def run(x):  # x: NCHW float64; params: float64 torch tensors in our (flax) layout
        for i, _ in enumerate(channels):
            x = F.conv2d(x, params[f"conv_{i}"]["kernel"].permute(3, 2, 0, 1), stride=2, padding=1)
            n = params[f"norm_{i}"]
            x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), n["scale"], n["bias"], eps).permute(0, 3, 1, 2)
            x = F.gelu(x)
        return F.conv2d(x, params["proj"]["kernel"].T[:, :, None, None], params["proj"]["bias"])

    return run


def test_conv_stem_matches_torch():
    stem = variants.ConvStem(32, 16)
    assert variants.conv_stem_channels(32, 16) == [4, 8, 16, 32]
    x = np.random.default_rng(5).standard_normal((2, 72, 100, 3)).astype(np.float32)  # not whole patches
    params = randomize(jax.eval_shape(stem.init, jax.random.PRNGKey(0), x)["params"], 6)
    weights = np.random.default_rng(7).standard_normal((2, 4, 6, 32))  # a loss reading every output

    def loss(p):
        out = stem.apply({"params": p}, x)
        return jnp.sum(out * weights), out

    (_, got), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert got.shape == (2, 72 // 16, 100 // 16, 32)  # the patchify stem's grid
    # PyTorch on the cropped image, float64, with autograd for the gradients.
    tparams = jax.tree.map(lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True), params)
    crop = torch.from_numpy(x[:, :64, :96].astype(np.float64)).permute(0, 3, 1, 2)
    want = torch_conv_stem(tparams, [4, 8, 16, 32])(crop).permute(0, 2, 3, 1)
    assert max_abs(got, want.detach().numpy()) < 1e-4 and float(want.detach().std()) > 0.3
    (want * torch.from_numpy(weights)).sum().backward()
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        t = tparams
        for k in path:
            t = t[k.key]
        ref = t.grad.numpy()
        assert np.abs(ref).max() > 1e-3  # every leaf gets a gradient ...
        assert max_abs(g, ref) < 1e-4 * (1 + np.abs(ref).max()), jax.tree_util.keystr(path)  # ... the right one


def test_conv_stem_size_as_mimdet():
    """Architecture 1 for ViT-Base: 96-192-384-768 channels, 4.1M parameters."""
    assert variants.conv_stem_channels(768, 16) == [96, 192, 384, 768]
    assert variants.conv_stem_channels(384, 8) == [96, 192, 384]
    shapes = jax.eval_shape(lambda: variants.ConvStem(768, 16).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    assert count == 4_079_712 and f"{count / 1e6:.1f}M" == "4.1M"


# --------------------------------------------------------------------------------------------------
# FP-DETR task adapter, late [DET] insertion
# --------------------------------------------------------------------------------------------------


def test_adapter_is_shared_and_matches_numpy(data, base_params):
    images, mask = data
    m = model(adapter=True, adapter_insert_det_at=1, aux_layers=1)
    params = init_params(m, seed=3)
    assert sorted(k for k in params if "adapter" in k) == ["adapter"]  # one set for every block
    assert sorted(params["adapter"]) == ["norm", "proj", "qk", "query_pos", "v"]
    assert params["adapter"]["query_pos"].shape == (1, Q, BASE["hidden_size"])
    out, _ = forward(m, False)(params, images, mask, KEY)
    assert_outputs_close(out, np_yolos(params, images, mask, insert_at=1, adapter=True, aux_layers=1))
    # The adapter (and the late insertion) change the outputs of the same backbone weights.
    plain = {k: v for k, v in params.items() if k != "adapter"}
    ref_plain = np_yolos(plain, images, mask, aux_layers=1)
    assert max_abs(out["logits"], ref_plain["logits"]) > 0.1
    # Its gradients: see test_all_variants_train_step (every adapter leaf takes a full Adam step).


def test_adapter_from_the_start(data):
    images, mask = data
    m = model(adapter=True)
    params = init_params(m, seed=4)
    out, _ = forward(m, False)(params, images, mask, KEY)
    assert_outputs_close(out, np_yolos(params, images, mask, adapter=True))


# --------------------------------------------------------------------------------------------------
# Detached [DET] tokens
# --------------------------------------------------------------------------------------------------


def test_detached_det_tokens_get_no_gradient(data, base_params):
    """x = det_tokens + pos_embed_det at the input: without the detach both get the same gradient, so a
    non-zero gradient of pos_embed_det shows what det_tokens would have received. (No optimiser update
    either: test_all_variants_train_step.)"""
    images, mask = data
    g = grad_fn(PARTIAL, True)(base_params, images, mask, KEY)
    assert np.any(np.asarray(g["pos_embed_det"]) != 0)
    assert np.all(np.asarray(g["det_tokens"]) == 0)
