"""The windowed and relative-position attention kernels (yolos_jax/attention_windowed.py): the rel-pos
table resize against PyTorch's linear interpolation, and the blocked window kernels against the einsum
form. (The whole windowed layer against a float64 reference, gradients included: test_windowed.py.)"""

import jax.numpy as jnp
import numpy as np
import pytest

import reference_models as ref
from yolos_jax import attention, attention_windowed


def test_rel_pos_resize_matches_torch_linear():
    table = np.random.RandomState(0).randn(13, 5).astype(np.float32)
    for length in (27, 13, 7, 3, 1):
        got = np.asarray(attention_windowed.resize_rel_pos(jnp.asarray(table), length))
        np.testing.assert_allclose(got, ref.torch_linear_resize(table, length), rtol=0, atol=1e-6)
        np.testing.assert_allclose(attention_windowed.resize_rel_pos_np(table.astype(np.float64), length),
                                   ref.torch_linear_resize(table, length), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rel", ["none", "shared", "per_image"])
def test_blocked_window_attention_equals_einsum_form(rel, monkeypatch):
    """`window_attention`'s blocked kernels compute its einsum form, to float32 rounding: one block per
    window without rel-pos; with it, queries in several blocks (a ragged last one) and tables shared by
    the windows or one per image. Masked cells and extra keys (and a window without valid cells) count."""
    monkeypatch.setattr(attention, "CPU_QUERY_CHUNK", 4)  # 15 cells: blocks of 4, 3 in the last
    rng = np.random.default_rng(0)
    batch, n_win, heads, (wh, ww), n_extra, head_dim = 2, 3, 2, (3, 5), 5, 8
    cells = wh * ww

    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    qw, kw, vw = (draw(batch, n_win, heads, cells, head_dim) for _ in range(3))
    ke, ve = (draw(batch, heads, n_extra, head_dim) for _ in range(2))
    cell_mask = rng.random((batch, n_win, cells)) > 0.25
    cell_mask[1, 2] = False  # a window of padding only: its queries see the extra keys
    extra_mask = np.ones((batch, n_extra), bool)
    extra_mask[1, -2:] = False
    tables = [draw(2 * wh - 1, head_dim) * 0.3, draw(2 * ww - 1, head_dim) * 0.3]
    if rel == "none":
        rel_tables = None
    elif rel == "shared":
        rel_tables = (attention_windowed.rel_pos_matrix(tables[0], wh, wh),
                      attention_windowed.rel_pos_matrix(tables[1], ww, ww))
    else:
        rel_tables = (attention_windowed.rel_pos_matrix_per_image(tables[0], jnp.asarray([wh, wh - 1]), wh),
                      attention_windowed.rel_pos_matrix_per_image(tables[1], jnp.asarray([ww, ww - 2]), ww))
    args = (qw, kw, vw, ke, ve, jnp.asarray(cell_mask), jnp.asarray(extra_mask), rel_tables, (wh, ww))
    einsum = np.asarray(attention_windowed.window_attention(*args, blocked=False))
    blocked = np.asarray(attention_windowed.window_attention(*args, blocked=True))
    assert blocked.shape == einsum.shape == (batch, n_win, heads, cells, head_dim)
    np.testing.assert_allclose(blocked, einsum, rtol=0, atol=2e-6 * np.abs(einsum).max())
    if rel != "none":  # and the bias matters
        plain = np.asarray(attention_windowed.window_attention(*args[:7], None, (wh, ww), blocked=False))
        assert np.abs(plain - einsum).max() > 1e-2
