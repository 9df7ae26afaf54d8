"""Windowed attention and decomposed relative position bias (yolos_jax/windowed.py) against an independent
float64 numpy reference (full T x T attention with an explicit "same window" mask, PyTorch's linear
interpolation for the tables), and global attention; block selection, partition, options and configs."""

import functools
import importlib.util
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_models as ref
from yolos_jax import attention, vit, windowed
from yolos_jax.yolos import YOLOS

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# --------------------------------------------------------------------------------------------------
# The numpy reference
# --------------------------------------------------------------------------------------------------


def reference_attention(x, params, num_heads, grid_hw, window, key_mask=None, num_prefix=1, rel_span=None):
    """Windowed self-attention, written from the definition (module docstrings of windowed.py and
    attention_windowed.py).

    x: [B, T, D]; params: the attention's Flax params; window: r (0 = global); key_mask: [B, T] bool.
    rel_span: (sh, sw) nominal extent of the rel-pos offsets when params hold rel_pos_h/w, else None; or
    a list of one (sh, sw) per example (global blocks: each image's own grid).
    Token t in [num_prefix, num_prefix + gh * gw) is the patch at (row, col) = divmod(t - num_prefix, gw).
    """
    x = np.asarray(x, np.float64)
    batch, tokens, width = x.shape
    gh, gw = grid_hw
    head_dim = width // num_heads
    qkv = x @ np.asarray(params["qkv"]["kernel"], np.float64) + np.asarray(params["qkv"]["bias"], np.float64)
    qkv = qkv.reshape(batch, tokens, 3, num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]

    t = np.arange(tokens)
    is_patch = (t >= num_prefix) & (t < num_prefix + gh * gw)
    row, col = np.divmod(np.where(is_patch, t - num_prefix, 0), gw)
    if window:
        win_r, win_c = row // window, col // window
    else:
        win_r = win_c = np.zeros_like(row)
    same_window = (win_r[:, None] == win_r[None]) & (win_c[:, None] == win_c[None])
    # Extra tokens attend everywhere; every token attends to extra tokens; patches within a window.
    allowed = ~is_patch[:, None] | ~is_patch[None, :] | same_window  # [T, T]
    patch_pair = is_patch[:, None] & is_patch[None, :] & same_window

    def rel_tables(span):
        sh, sw = span
        rh = ref.torch_linear_resize(np.asarray(params["rel_pos_h"]), 2 * sh - 1)
        rw = ref.torch_linear_resize(np.asarray(params["rel_pos_w"]), 2 * sw - 1)
        local_r, local_c = (row % window, col % window) if window else (row, col)
        dh = local_r[:, None] - local_r[None, :] + sh - 1  # [T, T] offsets (valid on patch pairs)
        dw = local_c[:, None] - local_c[None, :] + sw - 1
        inside = patch_pair & (dh >= 0) & (dh < 2 * sh - 1) & (dw >= 0) & (dw < 2 * sw - 1)
        return rh, rw, np.where(inside, dh, 0), np.where(inside, dw, 0)

    out = np.zeros((batch, tokens, num_heads, head_dim))
    for b in range(batch):
        if rel_span is not None:
            rh, rw, dh, dw = rel_tables(rel_span[b] if isinstance(rel_span, list) else rel_span)
        mask = allowed if key_mask is None else allowed & np.asarray(key_mask[b])[None, :]
        for h in range(num_heads):
            for start in range(0, tokens, 1024):  # row blocks keep the 50 x 84 case small
                rows = slice(start, min(start + 1024, tokens))
                logits = q[b, rows, h] @ k[b, :, h].T / np.sqrt(head_dim)
                if rel_span is not None:
                    bias_h = (q[b, rows, h] @ rh.T)[np.arange(logits.shape[0])[:, None], dh[rows]]
                    bias_w = (q[b, rows, h] @ rw.T)[np.arange(logits.shape[0])[:, None], dw[rows]]
                    logits = logits + np.where(patch_pair[rows], bias_h + bias_w, 0.0)
                logits = np.where(mask[rows], logits, -np.inf)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                out[b, rows, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h]
    out = out.reshape(batch, tokens, width)
    return out @ np.asarray(params["proj"]["kernel"], np.float64) + np.asarray(params["proj"]["bias"], np.float64)


def random_attention_case(grid_hw, window, width, heads, num_det, rel_pos, rel_pos_grid=None, batch=2,
                          padded=None, table_len=None, seed=0, attention_impl=None):
    """(module, params, x, key_mask) with random weights and random (non-zero) rel-pos tables."""
    rng = np.random.RandomState(seed)
    gh, gw = grid_hw
    tokens = 1 + gh * gw + num_det
    x = rng.randn(batch, tokens, width).astype(np.float32)
    key_mask = None
    if padded is not None:  # last `padded` = (rows, cols) of the grid are image padding in example 1
        patch = np.ones((batch, gh, gw), bool)
        patch[1, gh - padded[0]:, :] = False
        patch[1, :, gw - padded[1]:] = False
        key_mask = np.concatenate([np.ones((batch, 1), bool), patch.reshape(batch, -1),
                                   np.ones((batch, num_det), bool)], axis=1)
    module = windowed.WindowedSelfAttention(
        num_heads=heads, grid_hw=grid_hw, window_size=window, rel_pos=rel_pos, rel_pos_grid=rel_pos_grid,
        attention_impl=attention_impl,
    )
    params = flax.core.unfreeze(jax.jit(module.init)(jax.random.PRNGKey(seed), x, key_mask)["params"])
    # Larger-than-init weights: attention far from uniform, so a wrong mask or bias shows.
    params["qkv"]["kernel"] = rng.randn(*params["qkv"]["kernel"].shape).astype(np.float32) * 0.5
    params["qkv"]["bias"] = rng.randn(*params["qkv"]["bias"].shape).astype(np.float32) * 0.1
    if rel_pos:
        for name in ("rel_pos_h", "rel_pos_w"):
            assert not np.any(params[name]), "rel-pos tables must start at zero"
            length = params[name].shape[0] if table_len is None else table_len
            params[name] = rng.randn(length, width // heads).astype(np.float32) * 0.3
    return module, params, x, key_mask


# --------------------------------------------------------------------------------------------------
# Partition
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid_hw,r", [((5, 9), 4), ((50, 84), 14), ((56, 83), 14), ((3, 7), 8), ((4, 4), 2)])
def test_window_partition_layout_and_roundtrip(grid_hw, r):
    gh, gw = grid_hw
    (wh, ww), (nh, nw) = windowed.window_layout(grid_hw, r)
    # Height and width handled separately: 50 x 84 with r = 14 is 4 x 6 windows (56 x 84), not 6 x 4.
    assert (nh, nw) == (-(-gh // min(r, gh)), -(-gw // min(r, gw)))
    assert (wh, ww) == (min(r, gh), min(r, gw))
    x = np.random.RandomState(0).randn(2, gh, gw, 3).astype(np.float32)
    win = np.asarray(windowed.window_partition(jnp.asarray(x), (wh, ww)))
    assert win.shape == (2, nh * nw, wh * ww, 3)
    valid = windowed.window_valid_cells((gh, gw), (wh, ww))
    for n in range(nh * nw):  # explicit: cell (y, x) of window (a, b) is grid cell (a wh + y, b ww + x)
        a, b = divmod(n, nw)
        for c in range(wh * ww):
            y, xx = divmod(c, ww)
            i, j = a * wh + y, b * ww + xx
            inside = i < gh and j < gw
            assert valid[n, c] == inside
            np.testing.assert_array_equal(win[:, n, c], x[:, i, j] if inside else 0.0)
    back = np.asarray(windowed.window_unpartition(jnp.asarray(win), (wh, ww), (gh, gw)))
    np.testing.assert_array_equal(back, x)


# --------------------------------------------------------------------------------------------------
# Attention against the reference
# --------------------------------------------------------------------------------------------------

CASES = {
    # grid, r, width, heads, [DET], rel_pos, rel_pos_grid, padded (rows, cols), table length override
    "5x9_r4": ((5, 9), 4, 32, 2, 4, False, None, None, None),
    "5x9_r4_padmask": ((5, 9), 4, 32, 2, 4, False, None, (2, 3), None),
    "9x5_r4_relpos_padmask": ((9, 5), 4, 32, 2, 4, True, None, (1, 2), None),
    "5x9_r8_clipped_relpos": ((5, 9), 8, 32, 2, 3, True, None, None, None),
    "6x7_r3_relpos": ((6, 7), 3, 32, 2, 3, True, None, None, None),
    "global_relpos_resized": ((4, 6), 0, 32, 2, 3, True, (7, 3), (1, 1), None),  # tables for 7x3, used at 4x6
    "global_relpos_same_grid": ((4, 6), 0, 32, 2, 3, True, None, None, None),
}


# 'chunked' = the blocked flash-style kernels for the windows' patch queries (the CPU default; with rel-pos
# the bias is added per query block), 'einsum' = the explicit einsums every backend can run.
@pytest.mark.parametrize("impl", ["chunked", "einsum"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_matches_numpy_reference(case, impl):
    grid_hw, r, width, heads, num_det, rel_pos, rel_grid, padded, table_len = CASES[case]
    module, params, x, key_mask = random_attention_case(
        grid_hw, r, width, heads, num_det, rel_pos, rel_grid, padded=padded, table_len=table_len,
        attention_impl=impl,
    )
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, key_mask))
    span = None
    if rel_pos:
        span = (r, r) if r else grid_hw
    if rel_pos and not r and padded is not None:
        # A global block measures relative positions over each image's own grid, as the image alone would.
        span = [grid_hw, (grid_hw[0] - padded[0], grid_hw[1] - padded[1])]
    want = reference_attention(x, params, heads, grid_hw, r, key_mask, rel_span=span)
    if isinstance(span, list):  # padded cells' query outputs are dropped by the model: compare real tokens
        got, want = got * key_mask[..., None], want * key_mask[..., None]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    if padded is not None:  # and the mask matters here: without it the reference differs
        unmasked = reference_attention(x, params, heads, grid_hw, r, None, rel_span=span)
        assert np.abs(unmasked - want).max() > 1e-2


@pytest.mark.parametrize("impl", ["chunked", "einsum"])
def test_attention_50x84_grid_matches_numpy_reference(impl):
    """The full-size non-square case (800 x 1344 pixels at patch 16), hidden 16: 4 x 6 windows of 14."""
    module, params, x, key_mask = random_attention_case((50, 84), 14, 16, 2, 3, False, batch=1, padded=None,
                                                        attention_impl=impl)
    key_mask = np.ones((1, x.shape[1]), bool)
    key_mask[0, 1:1 + 50 * 84] = ((np.arange(50)[:, None] < 45) & (np.arange(84)[None] < 79)).ravel()  # pad 5, 5
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, key_mask))
    want = reference_attention(x, params, 2, (50, 84), 14, key_mask)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # A transposed layout (the height/width swap bug) would give another function.
    swapped = reference_attention(x, params, 2, (84, 50), 14, key_mask)
    assert np.abs(swapped - want).max() > 1e-2


def test_one_window_over_the_grid_equals_global_attention():
    """r >= both grid sides: the windowed computation equals vit.SelfAttention (float32 rounding only)."""
    grid_hw, width, heads, num_det = (5, 7), 32, 2, 4
    module, params, x, key_mask = random_attention_case(grid_hw, 7, width, heads, num_det, False, padded=(1, 2))
    got = np.asarray(jax.jit(module.apply)({"params": params}, x, key_mask))
    for impl in ("einsum", "chunked"):
        glob = vit.SelfAttention(heads, attention_impl=impl)
        want = np.asarray(jax.jit(glob.apply)({"params": params}, x, key_mask))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    # r = 0 (one window over the grid) is the same function.
    module0 = windowed.WindowedSelfAttention(num_heads=heads, grid_hw=grid_hw, window_size=0)
    np.testing.assert_allclose(np.asarray(jax.jit(module0.apply)({"params": params}, x, key_mask)), got, atol=1e-6)


GRAD_CASES = {
    # grid, r, rel_pos, padded (rows, cols), query chunk (small: several query blocks, a padded last one)
    "5x9_r4_padmask": ((5, 9), 4, False, (2, 5), None),  # window (1, 1) holds only padding
    "5x9_r4_relpos_padmask": ((5, 9), 4, True, (2, 5), 5),
    "global_5x9_relpos_padmask": ((5, 9), 0, True, (1, 2), 7),  # 45 queries in 7 blocks of 7
    "global_4x6_relpos": ((4, 6), 0, True, None, 128),  # one block
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_blocked_window_gradients_match_einsum_and_float64(case, monkeypatch):
    """The blocked kernels' hand-written backwards: gradients in x and every parameter (the rel-pos
    tables included) equal those of the einsum path (autodiff) and of a float64 run of it."""
    grid_hw, r, rel_pos, padded, chunk = GRAD_CASES[case]
    if chunk is not None:
        monkeypatch.setattr(attention, "CPU_QUERY_CHUNK", chunk)
    module_b, params, x, key_mask = random_attention_case(grid_hw, r, 32, 2, 4, rel_pos, padded=padded,
                                                          attention_impl="chunked")
    module_e = windowed.WindowedSelfAttention(num_heads=2, grid_hw=grid_hw, window_size=r, rel_pos=rel_pos,
                                              attention_impl="einsum")
    cotangent = np.random.RandomState(1).randn(*x.shape)

    def grads(module, dtype):
        def loss(p, xx):
            return jnp.vdot(module.apply({"params": p}, xx, key_mask), jnp.asarray(cotangent, dtype))
        cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(cast(params), cast(x))

    got, want = grads(module_b, jnp.float32), grads(module_e, jnp.float32)
    with jax.enable_x64(True):
        exact = grads(module_e, jnp.float64)
    for g, w, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(exact)):
        scale = np.abs(np.asarray(e)).max()
        assert scale > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=0, atol=2e-5 * scale)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-5 * scale)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

TINY = dict(hidden_size=32, depth=3, num_heads=2, num_det_tokens=4, num_classes=5, init_pe_size=(64, 96),
            attention_impl="einsum")
IMAGE_HW = (80, 144)  # a 5 x 9 patch grid


def tiny_inputs(seed=0, pad=(16, 32)):
    rng = np.random.RandomState(seed)
    images = rng.randn(2, *IMAGE_HW, 3).astype(np.float32)
    mask = np.ones((2, *IMAGE_HW), bool)
    mask[1, IMAGE_HW[0] - pad[0]:] = False
    mask[1, :, IMAGE_HW[1] - pad[1]:] = False
    images[~mask] = 0.0
    return images, mask


@functools.lru_cache(maxsize=None)
def tiny_apply(**options):
    """A jitted `apply` per set of options: compiled once for the whole file."""
    return jax.jit(YOLOS(**TINY, **options).apply)


def tiny_params(seed=0, **options):
    """Random parameters in the model's tree (no init to compile): qkv kernels large enough for peaked
    attention, so that windows visibly matter; relative position tables zero as their initialiser."""
    shapes = jax.eval_shape(YOLOS(**TINY, **options).init, jax.random.PRNGKey(0), tiny_inputs()[0])["params"]
    rng = np.random.RandomState(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "rel_pos" in name:
            return np.zeros(s.shape, np.float32)
        std = 0.4 if "qkv" in name and "kernel" in name else 0.05
        return (rng.randn(*s.shape) * std + ("scale" in name)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def global_run():
    images, mask = tiny_inputs()
    params = tiny_params()
    return params, tiny_apply()({"params": params}, images, mask)


def test_default_global_blocks():
    assert windowed.default_global_blocks(12) == (2, 5, 8, 11)  # ViTDet-B
    assert windowed.default_global_blocks(24) == (5, 11, 17, 23)  # ViTDet-L
    assert windowed.default_global_blocks(14) == (2, 6, 9, 13)
    assert windowed.default_global_blocks(4) == (0, 1, 2, 3)


def test_window_covering_grid_is_global_attention_exactly(global_run):
    params, want = global_run
    images, mask = tiny_inputs()
    big = dict(window_size=9, global_blocks=())  # r = 9 >= the 5 x 9 grid: one window, in every block
    shapes = jax.eval_shape(YOLOS(**TINY, **big).init, jax.random.PRNGKey(0), images)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    got = tiny_apply(**big)({"params": params}, images, mask)
    for key in ("logits", "boxes"):
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_windowed_model_shapes_params_and_padding(global_run):
    params, glob = global_run
    images, mask = tiny_inputs()
    opts = dict(window_size=4, global_blocks=(1,))
    shapes = jax.eval_shape(YOLOS(**TINY, **opts).init, jax.random.PRNGKey(0), images)["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)  # the same checkpoints load
    out = tiny_apply(**opts)({"params": params}, images, mask)
    assert out["logits"].shape == (2, 4, 6) and out["boxes"].shape == (2, 4, 4)
    assert np.abs(np.asarray(out["logits"]) - np.asarray(glob["logits"])).max() > 1e-3  # windows changed it
    # Image padding is never attended to: other values in the padded pixels change nothing.
    noisy = images.copy()
    noisy[~mask] = np.random.RandomState(1).randn(int((~mask).sum()), 3)
    out2 = tiny_apply(**opts)({"params": params}, noisy, mask)
    for key in ("logits", "boxes"):
        np.testing.assert_allclose(np.asarray(out2[key]), np.asarray(out[key]), rtol=0, atol=1e-6)


def test_rel_pos_zero_init_equals_no_rel_pos():
    images, mask = tiny_inputs()
    opts = dict(window_size=4, global_blocks=(1,))
    params = tiny_params(**opts, rel_pos=True)  # tables zero, as their initialiser (checked above)
    head_dim = TINY["hidden_size"] // TINY["num_heads"]
    for i in range(TINY["depth"]):
        attn = params[f"block_{i}"]["attn"]
        # windowed blocks: tables for the 4 x 4 window; the global block: for the 4 x 6 position-embedding grid
        want_len = (7, 11) if i == 1 else (7, 7)
        assert (attn["rel_pos_h"].shape, attn["rel_pos_w"].shape) == ((want_len[0], head_dim), (want_len[1], head_dim))
    plain = {k: v for k, v in params.items()}
    for i in range(TINY["depth"]):
        plain[f"block_{i}"] = dict(plain[f"block_{i}"])
        plain[f"block_{i}"]["attn"] = {k: v for k, v in params[f"block_{i}"]["attn"].items() if "rel_pos" not in k}
    want = tiny_apply(**opts)({"params": plain}, images, mask)
    got = tiny_apply(**opts, rel_pos=True)({"params": params}, images, mask)
    for key in ("logits", "boxes"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=0, atol=1e-5)


def test_gradients_reach_every_parameter():
    images, mask = tiny_inputs()
    opts = dict(window_size=4, global_blocks=(1,), rel_pos=True)
    params = tiny_params(**opts)
    model = YOLOS(**TINY, **opts, remat=True)

    def loss(p):
        out = model.apply({"params": p}, images, mask)
        return jnp.sum(out["logits"] ** 2) + jnp.sum(out["boxes"])

    grads = jax.jit(jax.grad(loss))(params)
    last = f"['block_{TINY['depth'] - 1}']['attn']['rel_pos"
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g, name = np.asarray(g), jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        if name.startswith(last):
            # Only the [DET] outputs of the last block reach the heads, and they carry no rel-pos bias.
            assert np.abs(g).max() == 0, name
        else:
            assert np.abs(g).max() > 0, f"no gradient reaches {name}"


def test_bad_options_raise_naming_the_field():
    images, _ = tiny_inputs()
    for opts, field in [
        (dict(window_size=-1), "window_size"),
        (dict(window_size=4, global_blocks=(7,)), "global_blocks"),
        (dict(window_size=4, rel_pos="yes"), "rel_pos"),
    ]:
        with pytest.raises(ValueError, match=f"config.model.{field}"):
            jax.eval_shape(YOLOS(**TINY, **opts).init, jax.random.PRNGKey(0), images)
    for opts in (dict(rel_pos=True), dict(window_size=4)):  # partial sequences leave no grid
        with pytest.raises(ValueError, match="config.model.token_keep_ratio"):
            jax.eval_shape(YOLOS(**TINY, **opts, token_keep_ratio=0.5).init, jax.random.PRNGKey(0), images)


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


@pytest.mark.parametrize("name", ["yolos_ti_windowed", "yolos_s_windowed", "yolos_b_windowed", "vitdet_b"])
def test_configs(name):
    get_config = _load_config(name)
    cfg = get_config()
    assert cfg.model.window_size == 14 and tuple(cfg.model.global_blocks) == (2, 5, 8, 11)  # depth 12
    assert cfg.model.rel_pos == (name == "vitdet_b")
    cfg7 = get_config("window=7,rel_pos=False,global=5.11")
    assert (cfg7.model.window_size, tuple(cfg7.model.global_blocks), cfg7.model.rel_pos) == (7, (5, 11), False)
    with pytest.raises(ValueError, match=f"configs/{name}.py"):
        get_config("windows=7")
    if name == "vitdet_b":
        assert cfg.input.large_scale_jitter and cfg.input.lsj_size == 1024
        assert cfg.model.drop_path_rate == 0.1 and tuple(cfg.model.init_pe_size) == (1024, 1024)
        assert cfg.optim.weight_decay == 0.1 and cfg.optim.warmup_steps == 462 and cfg.optim.min_lr == 0.0
        # The whole model traces at 1024 x 1024 (shapes only).
        shapes = jax.eval_shape(lambda: YOLOS(**cfg.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 1024, 1024, 3))))
        attn = shapes["params"]["block_0"]["attn"]
        assert attn["rel_pos_h"].shape == (27, 64)  # windowed: 2 r - 1
        assert shapes["params"]["block_2"]["attn"]["rel_pos_h"].shape == (127, 64)  # global: 2 x 64 - 1
