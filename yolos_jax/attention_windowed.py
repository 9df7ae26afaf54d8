"""Windowed and relative-position attention kernels (ViTDet / MViTv2), for `windowed.WindowedSelfAttention`.

Window cells: each window's S = wh * ww patch queries attend over K = S + E keys, [its S cells | the E
extra tokens ([CLS], [DET])], with a key mask per window (padding cells and padded image patches out).
`window_attention` runs them as explicit einsums, or (`blocked_window_attention`) through the blocked
kernels of `yolos_jax/attention.py` with one window per batch row.

Relative position bias (decomposed; MViTv2, and ViTDet's `add_decomposed_rel_pos`): for a patch query
at (i, j) with (unscaled) query vector q and a patch key at (i', j') in the same window,
  logit += q . Rh[i - i' + sh - 1] + q . Rw[j - j' + sw - 1],
with tables rel_pos_h [2 sh - 1, Dh], rel_pos_w [2 sw - 1, Dh] shared by the heads. Coordinates (i, j)
are within the window; (sh, sw) is the nominal window ((r, r) in windowed blocks, whose clipped windows
use the central part of the same tables; the grid (gh, gw) in global blocks). Tables stored for another
span are resized to 2 s - 1 by linear interpolation as PyTorch's `F.interpolate(mode='linear',
align_corners=False)`, as ViTDet's `get_rel_pos` does: in the forward pass (`resize_rel_pos`,
`rel_pos_matrix`, `rel_pos_matrix_per_image`), or once on the host for checkpoint surgery
(`resize_rel_pos_np`, the same function). Pairs involving an extra token get no bias (they have no grid
position). With the bias the blocked path adds it per query block inside `relpos_blocked_attention`,
whose hand-written backward also reaches the tables.

Public API: linear_taps, resize_rel_pos, resize_rel_pos_np, rel_pos_matrix, rel_pos_matrix_per_image,
decomposed_rel_pos_bias (the bias); window_attention, blocked_window_attention, relpos_blocked_attention
(the attention). Query blocks are at most `attention.CPU_QUERY_CHUNK` rows, read at call time.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from yolos_jax import attention


# --------------------------------------------------------------------------------------------------
# Decomposed relative position bias
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's 1-D linear resize (align_corners=False) as (i0 [out], i1 [out], w1 [out] float32).

    out[i] = (1 - w1) * x[i0] + w1 * x[i1] with source coordinate (i + 0.5) * in / out - 0.5 clamped at 0
    (PyTorch clamps negative coordinates of linear modes) and i1 = min(i0 + 1, in - 1).
    """
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"relative position tables need positive sizes, got {in_size} -> {out_size}")
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int32)
    i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
    return i0, i1, (src - i0).astype(np.float32)


def resize_rel_pos(table: jax.Array, length: int) -> jax.Array:
    """[L, Dh] -> [length, Dh] by linear interpolation along L (identity when L == length)."""
    if table.shape[0] == length:
        return table
    i0, i1, w1 = linear_taps(int(table.shape[0]), int(length))
    x = table.astype(jnp.float32)
    w1 = jnp.asarray(w1)[:, None]
    return ((1.0 - w1) * jnp.take(x, i0, axis=0) + w1 * jnp.take(x, i1, axis=0)).astype(table.dtype)


def resize_rel_pos_np(table: np.ndarray, length: int) -> np.ndarray:
    """NumPy twin of `resize_rel_pos` (float64 arithmetic), for checkpoint surgery on the host: tables
    trained with another window size or grid resized to this model's [2 s - 1, Dh] parameter shape."""
    if table.shape[0] == length:
        return table
    i0, i1, _ = linear_taps(int(table.shape[0]), int(length))
    src = np.maximum((np.arange(length) + 0.5) * (table.shape[0] / length) - 0.5, 0.0)
    w1 = (src - i0)[:, None]
    x = table.astype(np.float64)
    return ((1.0 - w1) * x[i0] + w1 * x[i1]).astype(table.dtype)


def rel_pos_matrix(table: jax.Array, span: int, size: int) -> jax.Array:
    """[size, size, Dh]: entry (a, b) = table'[a - b + span - 1], table' = table resized to 2 span - 1.

    span: the nominal extent (window side or grid side) the table's offsets refer to; size <= span: the
    actual extent (a clipped window uses the central offsets of the same table).
    """
    if size > span:
        raise ValueError(f"relative positions over {size} cells need a span >= {size}, got {span}")
    table = resize_rel_pos(table, 2 * span - 1)
    coords = np.arange(size)
    return jnp.take(table, coords[:, None] - coords[None, :] + span - 1, axis=0)


def rel_pos_matrix_per_image(table: jax.Array, spans: jax.Array, size: int) -> jax.Array:
    """`rel_pos_matrix` with each image's own span: [B, size, size, Dh], entry (b, a, c) =
    table resized to 2 spans[b] - 1 (linear, as `resize_rel_pos`), at offset a - c + spans[b] - 1.

    table: [L, Dh]; spans: [B] int, each image's extent in patches (1..size); size: the canvas extent
    (static). Entries with a or c >= spans[b] are padding (their keys are masked, their queries dropped):
    the offset is clamped into the table, so they stay finite. Global blocks measure relative positions
    over the whole grid, and an image alone has its own grid, not the canvas's.
    """
    length = int(table.shape[0])
    spans = jnp.asarray(spans, jnp.int32)[:, None, None]  # [B, 1, 1]
    out_len = (2 * spans - 1).astype(jnp.float32)
    coords = np.arange(size)
    offset = jnp.clip(coords[:, None] - coords[None, :] + spans - 1, 0, 2 * spans - 2)  # [B, size, size]
    # PyTorch's linear resize (align_corners=False) at output index `offset`: `linear_taps`, traced.
    src = jnp.maximum((offset.astype(jnp.float32) + 0.5) * (length / out_len) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), length - 1)
    i1 = jnp.minimum(i0 + 1, length - 1)
    w1 = (src - i0.astype(jnp.float32))[..., None]
    x = table.astype(jnp.float32)
    return ((1.0 - w1) * jnp.take(x, i0, axis=0) + w1 * jnp.take(x, i1, axis=0)).astype(table.dtype)


def decomposed_rel_pos_bias(q: jax.Array, rh: jax.Array, rw: jax.Array, window_hw: Sequence[int]) -> jax.Array:
    """Bias of patch queries over the patch keys of their window.

    q: [..., wh * ww, Dh] unscaled queries (ViTDet adds the bias with q before the 1/sqrt(Dh) scaling);
    rh: [wh, wh, Dh], rw: [ww, ww, Dh] from `rel_pos_matrix`, or per image [B, wh, wh, Dh] and
    [B, ww, ww, Dh] (`rel_pos_matrix_per_image`; q's leading axis is then B). Returns [..., wh * ww, wh * ww].
    """
    wh, ww = window_hw
    lead = q.shape[:-2]
    q = q.reshape(*lead, wh, ww, q.shape[-1])
    if rh.ndim == 4:  # per image: q's first axis is the image's
        bias_h = jnp.einsum("b...yxc,bykc->b...yxk", q, rh.astype(q.dtype))
        bias_w = jnp.einsum("b...yxc,bxkc->b...yxk", q, rw.astype(q.dtype))
    else:
        bias_h = jnp.einsum("...yxc,ykc->...yxk", q, rh.astype(q.dtype))  # [..., wh, ww, wh (key row)]
        bias_w = jnp.einsum("...yxc,xkc->...yxk", q, rw.astype(q.dtype))  # [..., wh, ww, ww (key column)]
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # [..., wh, ww, wh, ww]
    return bias.reshape(*lead, wh * ww, wh * ww)


# --------------------------------------------------------------------------------------------------
# Attention of window cells
# --------------------------------------------------------------------------------------------------


def window_attention(
    qw: jax.Array,
    kw: jax.Array,
    vw: jax.Array,
    ke: jax.Array,
    ve: jax.Array,
    cell_mask: jax.Array,
    extra_mask: jax.Array,
    rel: Optional[tuple[jax.Array, jax.Array]],
    window_hw: Sequence[int],
    blocked: bool = False,
) -> jax.Array:
    """Attention of each window's patch queries over [the window's cells | the extra tokens].

    qw, kw, vw: [B, nW, H, S, Dh] (S = wh * ww cells; queries unscaled); ke, ve: [B, H, E, Dh];
    cell_mask: [B or 1, nW, S] bool (real, un-padded, un-masked cells); extra_mask: [B, E] bool;
    rel: None or (rh, rw) from `rel_pos_matrix`; blocked: run the softmax attention through the blocked
    kernels of `blocked_window_attention` (one window per batch row; hand-written flash-style
    backwards recompute the weights instead of storing them: half the attention temporaries and ~10%
    less CPU time for YOLOS-B's 25 windows of 196 + 101 keys; with rel-pos in a global block the
    [S, S + E] logits and bias are never stored whole). Returns [B, nW, H, S, Dh].

    The extra tokens' keys and values are copied next to each window's (E of S + E columns): one
    batched matmul per side, and the logits and softmax weights of both key sets in one block. (Two
    separate blocks with the shared extra keys unbroadcast measured ~2% more peak memory for the
    YOLOS-B train step on XLA:CPU, and +8% with rel_pos: benchmarks/RESULTS_windowed.md.)
    """
    batch, n_win, heads, n_cells, head_dim = qw.shape
    n_extra = ke.shape[2]
    shared = (batch, n_win, heads, n_extra, head_dim)
    keys = jnp.concatenate([kw, jnp.broadcast_to(ke[:, None], shared)], axis=3)  # [B, nW, H, S + E, Dh]
    values = jnp.concatenate([vw, jnp.broadcast_to(ve[:, None], shared)], axis=3)
    mask = jnp.concatenate(
        [jnp.broadcast_to(cell_mask, (batch, n_win, n_cells)),
         jnp.broadcast_to(extra_mask[:, None], (batch, n_win, n_extra))], axis=-1
    )  # [B, nW, S + E]
    if blocked:
        return blocked_window_attention(qw, keys, values, mask, rel, window_hw)
    logits = jnp.einsum("bnhqd,bnhkd->bnhqk", qw * jnp.asarray(head_dim**-0.5, qw.dtype), keys)
    if rel is not None:  # the bias covers the S window columns; the E extra columns get none
        bias = decomposed_rel_pos_bias(qw, rel[0], rel[1], window_hw)
        logits = logits + jnp.pad(bias, [(0, 0)] * 4 + [(0, n_extra)])
    return attention.softmax_attend(logits, values, mask[:, :, None, None, :])


def blocked_window_attention(
    qw: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    rel: Optional[tuple[jax.Array, jax.Array]] = None,
    window_hw: Optional[Sequence[int]] = None,
) -> jax.Array:
    """qw [B, nW, H, S, Dh] (unscaled) over keys, values [B, nW, H, K, Dh] (K = S cells | E extras) with
    mask [B, nW, K] -> [B, nW, H, S, Dh], through a custom-VJP blocked attention with each window a
    batch row. `attention.key_bias` gives the mask's semantics: a window without any valid key (impossible
    with valid extra tokens) averages its values uniformly, as `attention.softmax_attend` does.

    Without rel all S queries are one block (`attention.blocked_attention`). With rel = (rh [wh, wh, Dh],
    rw [ww, ww, Dh]) the queries go in balanced blocks of <= `attention.CPU_QUERY_CHUNK` and each block adds
    its decomposed relative position bias inside `relpos_blocked_attention`: a global block at
    1024 x 1024 never holds a [4096, 4197] logit or bias array per head.
    """
    batch, n_win, heads, n_cells, head_dim = qw.shape
    n_keys = keys.shape[3]
    rows = batch * n_win
    if rel is not None and rel[0].ndim == 4:  # per-image tables -> one per batch row (image, window)
        rel = tuple(jnp.repeat(t, n_win, axis=0) for t in rel)
    bias, q_scale = attention.key_bias(mask.reshape(rows, n_keys), rows, head_dim, qw.dtype)
    q = qw.reshape(rows, heads, n_cells, head_dim) * q_scale[:, None, None, None]
    k, v = (jnp.transpose(a.reshape(rows, heads, n_keys, head_dim), (1, 0, 2, 3)) for a in (keys, values))
    if rel is None:
        q = jnp.transpose(q, (1, 0, 2, 3))[:, None]  # [H, 1 block, rows, S, Dh]
        out = attention.blocked_attention(q, k, v, bias)[:, 0]  # [H, rows, S, Dh]
        return jnp.transpose(out, (1, 0, 2, 3)).reshape(batch, n_win, heads, n_cells, head_dim)
    n_blocks = -(-n_cells // attention.CPU_QUERY_CHUNK)
    chunk = -(-n_cells // n_blocks)
    q = attention.to_blocks(jnp.transpose(q, (0, 2, 1, 3)), chunk)  # [H, n, rows, c, Dh]
    # The bias takes the unscaled query (ViTDet): q_scaled . (table / scale) = q . table. Where a row
    # has no valid key its q_scale is 0, and so is its bias, as the reference's all-equal logits.
    inv_scale = jnp.asarray(head_dim**0.5, rel[0].dtype)
    cells = np.arange(n_blocks * chunk).reshape(n_blocks, chunk)
    cell_rows = np.minimum(cells // window_hw[1], window_hw[0] - 1).astype(np.int32)  # padded rows: any row
    cell_cols = (cells % window_hw[1]).astype(np.int32)
    out = relpos_blocked_attention(q, k, v, bias, rel[0] * inv_scale, rel[1] * inv_scale,
                                    jnp.asarray(cell_rows), jnp.asarray(cell_cols))
    out = attention.from_blocks(out, n_cells)  # [rows, S, H, Dh]
    return jnp.transpose(out, (0, 2, 1, 3)).reshape(batch, n_win, heads, n_cells, head_dim)


def _relpos_bias_block(qc: jax.Array, rhq: jax.Array, rwq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The decomposed bias factors of one query block: qc [R, c, Dh] (scaled), rhq [c, wh, Dh] and rwq
    [c, ww, Dh] (the rows of the scale-divided tables at each query's row / column) -> (bh [R, c, wh],
    bw [R, c, ww]) float32; the bias of key cell (y, x) is bh[..., y] + bw[..., x]."""
    if rhq.ndim == 4:  # per-row tables: [R, c, wh, Dh], [R, c, ww, Dh]
        bh = jnp.einsum("rcd,rcyd->rcy", qc, rhq.astype(qc.dtype), preferred_element_type=jnp.float32)
        bw = jnp.einsum("rcd,rcxd->rcx", qc, rwq.astype(qc.dtype), preferred_element_type=jnp.float32)
        return bh, bw
    bh = jnp.einsum("rcd,cyd->rcy", qc, rhq.astype(qc.dtype), preferred_element_type=jnp.float32)
    bw = jnp.einsum("rcd,cxd->rcx", qc, rwq.astype(qc.dtype), preferred_element_type=jnp.float32)
    return bh, bw


def _table_rows(table: jax.Array, index: jax.Array) -> jax.Array:
    """The rows `index` [c] of a shared table [w, w, Dh] -> [c, w, Dh], or of per-row tables
    [R, w, w, Dh] -> [R, c, w, Dh]."""
    return table[index] if table.ndim == 3 else table[:, index]


def _relpos_logits(qc, kh, key_bias, rhq, rwq, n_extra: int, transposed: bool) -> jax.Array:
    """Float32 logits of one query block with the key bias and the rel-pos bias of the cell keys (the
    first S = wh * ww keys; the n_extra extra keys get none). [R, c, K], or [R, K, c] if transposed."""
    bh, bw = _relpos_bias_block(qc, rhq, rwq)
    rows, c, wh = bh.shape
    cell_bias = (bh[..., :, None] + bw[..., None, :]).reshape(rows, c, wh * bw.shape[-1])
    cell_bias = jnp.pad(cell_bias, ((0, 0), (0, 0), (0, n_extra)))
    if transposed:
        logits = jnp.einsum("rsd,rcd->rsc", kh, qc).astype(jnp.float32) + jnp.swapaxes(cell_bias, 1, 2)
        return logits if key_bias is None else logits + key_bias[:, :, None]
    logits = jnp.einsum("rcd,rsd->rcs", qc, kh).astype(jnp.float32) + cell_bias
    return logits if key_bias is None else logits + key_bias[:, None, :]


def _relpos_forward(q, k, v, key_bias, rh, rw, cell_rows, cell_cols):
    """Forward of `relpos_blocked_attention`: (out [H, n, R, c, Dh], log-sum-exp [H, n, R, c])."""
    n_extra = k.shape[2] - rh.shape[-3] * rw.shape[-3]

    def one_head(args):
        qh, kh, vh = args

        def step(xs):
            qc, rows_c, cols_c = xs
            logits = _relpos_logits(qc, kh, key_bias, _table_rows(rh, rows_c), _table_rows(rw, cols_c), n_extra,
                                    transposed=False)
            row_max = jnp.max(logits, axis=-1, keepdims=True)
            e = jnp.exp(logits - row_max)
            total = jnp.sum(e, axis=-1, keepdims=True)
            out = jnp.einsum("rcs,rsd->rcd", e.astype(vh.dtype), vh).astype(jnp.float32)
            return (out / total).astype(vh.dtype), (row_max + jnp.log(total))[..., 0]

        return jax.lax.map(step, (qh, cell_rows, cell_cols))

    return jax.lax.map(one_head, (q, k, v))


@jax.custom_vjp
def relpos_blocked_attention(q, k, v, key_bias, rh, rw, cell_rows, cell_cols):
    """Softmax attention of window cells with the decomposed relative position bias, one (head, query
    block) at a time, with a flash-attention style backward (the weights are recomputed from the saved
    log-sum-exp, never stored).

    q: [H, n, R, c, Dh] scaled queries of the S = wh * ww cells in blocks (rows past S are zero padding);
    k, v: [H, R, K, Dh], K = S cell keys then the extra keys; key_bias: [R, K] float32 (0 or the float32
    minimum) or None; rh [wh, wh, Dh], rw [ww, ww, Dh]: `rel_pos_matrix` tables divided by the query
    scale, shared by the rows, or one per row ([R, wh, wh, Dh], [R, ww, ww, Dh]: per-image tables);
    cell_rows, cell_cols: [n, c] int32, each query's row and column in the window. The logit of query i
    and cell key (y, x) is q_i . k + q_i . rh[row_i, y] + q_i . rw[col_i, x]. Returns [H, n, R, c, Dh];
    gradients reach q, k, v, rh and rw.
    """
    return _relpos_forward(q, k, v, key_bias, rh, rw, cell_rows, cell_cols)[0]


def _relpos_blocked_attention_fwd(q, k, v, key_bias, rh, rw, cell_rows, cell_cols):
    out, lse = _relpos_forward(q, k, v, key_bias, rh, rw, cell_rows, cell_cols)
    return out, (q, k, v, key_bias, rh, rw, cell_rows, cell_cols, out, lse)


def _relpos_blocked_attention_bwd(residuals, d_out):
    """As the backward of `attention.blocked_attention`, plus the bias: with ds the logit gradient of the
    cell keys reshaped to [R, wh, ww, c], dbh = sum over ww and dbw = sum over wh; then dq += dbh . rh[row]
    + dbw . rw[col], and rh[row_i] += dbh_i q_i, rw[col_i] += dbw_i q_i (scatter-adds over the block's
    queries, as one-hot matmuls), accumulated in float32 over blocks; heads are summed at the end (tables
    are shared)."""
    q, k, v, key_bias, rh, rw, cell_rows, cell_cols, out, lse = residuals
    wh, ww = rh.shape[-3], rw.shape[-3]
    per_row = rh.ndim == 4
    n_extra = k.shape[2] - wh * ww
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [H, n, R, c]

    def one_head(args):
        qh, kh, vh, doh, lseh, deltah = args

        def step(carry, xs):
            dk, dv, drh, drw = carry
            qc, doc, lsec, deltac, rows_c, cols_c = xs
            rhq, rwq = _table_rows(rh, rows_c), _table_rows(rw, cols_c)  # [(R,) c, wh | ww, Dh]
            logits = _relpos_logits(qc, kh, key_bias, rhq, rwq, n_extra, transposed=True)  # [R, K, c]
            p = jnp.exp(logits - lsec[:, None, :])
            dv = dv + jnp.einsum("rsc,rcd->rsd", p.astype(doc.dtype), doc, preferred_element_type=jnp.float32)
            dp = jnp.einsum("rsd,rcd->rsc", vh, doc, preferred_element_type=jnp.float32)
            ds32 = p * (dp - deltac[:, None, :])  # [R, K, c] float32
            ds = ds32.astype(qc.dtype)
            dk = dk + jnp.einsum("rsc,rcd->rsd", ds, qc, preferred_element_type=jnp.float32)
            ds_rows = jax.lax.optimization_barrier(jnp.swapaxes(ds, 1, 2))  # [R, c, K]
            dq = jnp.einsum("rcs,rsd->rcd", ds_rows, kh, preferred_element_type=jnp.float32)
            cell_ds = ds32[:, :wh * ww].reshape(ds32.shape[0], wh, ww, ds32.shape[-1])  # [R, wh, ww, c]
            dbh, dbw = jnp.sum(cell_ds, axis=2), jnp.sum(cell_ds, axis=1)  # [R, wh, c], [R, ww, c]
            q32 = qc.astype(jnp.float32)
            rows_1h = jax.nn.one_hot(rows_c, wh, dtype=jnp.float32)
            cols_1h = jax.nn.one_hot(cols_c, ww, dtype=jnp.float32)
            if per_row:
                dq = dq + jnp.einsum("ryc,rcyd->rcd", dbh, rhq.astype(jnp.float32))
                dq = dq + jnp.einsum("rxc,rcxd->rcd", dbw, rwq.astype(jnp.float32))
                drh = drh + jnp.einsum("cY,ryc,rcd->rYyd", rows_1h, dbh, q32)
                drw = drw + jnp.einsum("cX,rxc,rcd->rXxd", cols_1h, dbw, q32)
            else:
                dq = dq + jnp.einsum("ryc,cyd->rcd", dbh, rhq.astype(jnp.float32))
                dq = dq + jnp.einsum("rxc,cxd->rcd", dbw, rwq.astype(jnp.float32))
                drh = drh + jnp.einsum("cY,ryc,rcd->Yyd", rows_1h, dbh, q32)
                drw = drw + jnp.einsum("cX,rxc,rcd->Xxd", cols_1h, dbw, q32)
            return (dk, dv, drh, drw), dq.astype(qc.dtype)

        init = (jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32),
                jnp.zeros(rh.shape, jnp.float32), jnp.zeros(rw.shape, jnp.float32))
        (dk, dv, drh, drw), dq = jax.lax.scan(step, init, (qh, doh, lseh, deltah, cell_rows, cell_cols))
        return dq, dk.astype(kh.dtype), dv.astype(vh.dtype), drh, drw

    dq, dk, dv, drh, drw = jax.lax.map(one_head, (q, k, v, d_out, lse, delta))
    return (dq, dk, dv, None, jnp.sum(drh, 0).astype(rh.dtype), jnp.sum(drw, 0).astype(rw.dtype), None, None)


relpos_blocked_attention.defvjp(_relpos_blocked_attention_fwd, _relpos_blocked_attention_bwd)
