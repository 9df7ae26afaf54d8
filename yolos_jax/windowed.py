"""Windowed self-attention (ViTDet) and decomposed relative position bias (MViTv2 / ViTDet) for YOLOS.

ViTDet (vitdet_benchmarking_paper.md §2.1) partitions the h x w patch grid into non-overlapping r x r
windows and attends within each window, in every block except a few global ones spaced at depth/4
(the "hybrid"). Attention then costs O(r^2 h w) instead of O(h^2 w^2) in those blocks.

Token layout read here (the encoder's sequence, yolos.py):
  x = [prefix tokens (num_prefix_tokens: the [CLS]) | patches, gh * gw in row-major order | suffix tokens
       (the [DET] tokens: all the rest)]              [B, T, D], T = num_prefix + gh * gw + num_suffix
The suffix length is read from T, so blocks that see more or fewer [DET] tokens work unchanged.

The [CLS] and [DET] tokens ("extra" tokens, E = prefix + suffix) keep global attention; this is our
choice, since ViTDet has no such tokens:
  * an extra-token query attends to every token (all patches of every window and all extra tokens);
  * a patch query attends to the patches of its own window and to every extra token;
  * so patch -> patch attention is restricted to the window, and [DET] tokens, the only outputs YOLOS
    predicts from, still see the whole image in every block. The extra tokens also carry information
    between windows, which windowed-only ViTDet gets from convolutions outside the backbone.
It is computed without a T x T mask: windowed patch queries [B, nW, H, r*r] meet the keys [their window's
r*r patches | the E extra tokens], and the E extra queries meet all T keys. At 1024 x 1024 (64 x 64
patches, r = 14, E = 101) a windowed block's logits are 25 x 196 x 297 per head instead of 4197^2: 12x fewer.

Padding: the grid is padded at the bottom/right to whole windows (separately per axis: 50 x 84 patches
with r = 14 pad to 56 x 84, 4 x 6 windows). Padded cells are never attended to and their query outputs
are dropped. The window size is clipped per axis to the grid (`window_layout`): a 5 x 9 grid with r = 8
gives 5 x 8 windows, which groups the real cells exactly as 8 x 8 windows would, with less padding.
The padding key mask (patches of image padding, False in `key_mask`) is honoured by every query.

Relative position bias (decomposed; MViTv2, and ViTDet's `add_decomposed_rel_pos`): for a patch query
at (i, j) with (unscaled) query vector q and a patch key at (i', j') in the same window,
  logit += q . Rh[i - i' + sh - 1] + q . Rw[j - j' + sw - 1],
with tables rel_pos_h [2 sh - 1, Dh], rel_pos_w [2 sw - 1, Dh] shared by the heads, zero-initialised (as
ViTDet does for every initialisation without pre-trained biases, so a model starts as without them), one
pair per block (as detectron2's ViTDet and MViTv2; the benchmarking paper shares one pair among the
windowed blocks and one among the global blocks). Coordinates (i, j) are within the window; (sh, sw) is the
nominal window: (r, r) in windowed blocks (clipped windows use the central part of the same tables), the
grid (gh, gw) in global blocks. Global blocks store their tables for `rel_pos_grid` (YOLOS: the
init_pe_size grid); at another input grid they are resized in the forward pass to 2 s - 1 by linear
interpolation as PyTorch's `F.interpolate(mode='linear', align_corners=False)`, as ViTDet's `get_rel_pos`
does. Tables of a checkpoint trained with another r or grid are resized once on the host
(`resize_rel_pos_np`, the same function), since Flax parameters keep their shapes. Pairs involving an
extra token get no bias (they have no grid position).

The attention layer keeps `vit.SelfAttention`'s parameters (attn/qkv, attn/proj), so a windowed model has
the same parameter tree as the global one (plus attn/rel_pos_h, attn/rel_pos_w when rel_pos is on) and
loads the same checkpoints.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yolos_jax import vit

Dtype = Any


# --------------------------------------------------------------------------------------------------
# Which blocks are windowed
# --------------------------------------------------------------------------------------------------


def default_global_blocks(depth: int) -> tuple[int, ...]:
    """ViTDet's global blocks at every depth/4: indices k * depth // 4 - 1 for k = 1..4.

    depth 12 -> (2, 5, 8, 11) as ViTDet-B; depth 14 -> (2, 6, 9, 13). The last block is always global.
    """
    return tuple(sorted({k * depth // 4 - 1 for k in range(1, 5)} - {-1}))


def resolve_global_blocks(depth: int, global_blocks: Optional[Sequence[int]]) -> tuple[int, ...]:
    """`global_blocks` checked against `depth` (None -> `default_global_blocks`)."""
    if global_blocks is None:
        return default_global_blocks(depth)
    blocks = tuple(int(b) for b in global_blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(
            f"config.model.global_blocks: block indices {bad} are outside [0, depth={depth}); "
            f"use indices of blocks, e.g. {default_global_blocks(depth)}"
        )
    return blocks


def validate_window_options(window_size: Any, global_blocks: Any, rel_pos: Any, depth: int) -> None:
    """Raises ValueError naming the config.model field that is wrong."""
    if isinstance(window_size, bool) or not isinstance(window_size, (int, np.integer)) or window_size < 0:
        raise ValueError(
            f"config.model.window_size must be an integer >= 0 (0 = global attention everywhere, ViTDet: 14), "
            f"got {window_size!r}"
        )
    if global_blocks is not None and not isinstance(global_blocks, (tuple, list)):
        raise ValueError(
            f"config.model.global_blocks must be None or a tuple of block indices, got {global_blocks!r}"
        )
    resolve_global_blocks(depth, global_blocks)
    if not isinstance(rel_pos, (bool, np.bool_)):
        raise ValueError(f"config.model.rel_pos must be True or False, got {rel_pos!r}")


def block_attention(
    index: int,
    depth: int,
    grid_hw: Sequence[int],
    window_size: int,
    global_blocks: Optional[Sequence[int]],
    rel_pos: bool,
    rel_pos_grid: Optional[Sequence[int]] = None,
) -> Optional[Callable[..., nn.Module]]:
    """The attention layer factory for encoder block `index` (for `vit.EncoderBlock.attention`).

    Returns None where the block's attention is plain global attention (`vit.SelfAttention`): window_size
    0 without rel_pos, a global block without rel_pos, or a window that covers the whole grid without
    rel_pos (one window is global attention, so the fast global path gives the same output bit for bit).
    Otherwise a `WindowedSelfAttention` partial taking SelfAttention's (num_heads, qkv_bias, dtype,
    attention_impl) arguments. rel_pos_grid: (h, w) in patches the global blocks' tables are stored for.
    """
    validate_window_options(window_size, global_blocks, rel_pos, depth)
    is_global = window_size == 0 or index in resolve_global_blocks(depth, global_blocks)
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if not rel_pos and (is_global or (window_size >= gh and window_size >= gw)):
        return None
    return functools.partial(
        WindowedSelfAttention,
        grid_hw=(gh, gw),
        window_size=0 if is_global else int(window_size),
        rel_pos=bool(rel_pos),
        rel_pos_grid=None if rel_pos_grid is None else tuple(int(s) for s in rel_pos_grid),
    )


# --------------------------------------------------------------------------------------------------
# Window partition
# --------------------------------------------------------------------------------------------------


def window_layout(grid_hw: Sequence[int], window_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((wh, ww) window in patches, (nh, nw) windows per axis) for a grid; window_size 0 = one window.

    The window is clipped per axis to the grid: on an axis shorter than r there is one window either way,
    and clipping only drops padding. Height and width are handled separately (non-square grids).
    """
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if gh <= 0 or gw <= 0:
        raise ValueError(f"windowed attention needs a non-empty patch grid, got {gh} x {gw}")
    if window_size <= 0:
        return (gh, gw), (1, 1)
    wh, ww = min(window_size, gh), min(window_size, gw)
    return (wh, ww), (-(-gh // wh), -(-gw // ww))


def window_partition(x: jax.Array, window_hw: Sequence[int]) -> jax.Array:
    """[B, gh, gw, ...] -> [B, nh * nw, wh * ww, ...]: zero-padded at the bottom/right to whole windows.

    Windows are numbered row-major over (nh, nw), cells row-major within a window.
    """
    batch, gh, gw = x.shape[:3]
    rest = x.shape[3:]
    wh, ww = window_hw
    nh, nw = -(-gh // wh), -(-gw // ww)
    pad = [(0, 0), (0, nh * wh - gh), (0, nw * ww - gw)] + [(0, 0)] * len(rest)
    x = jnp.pad(x, pad)
    x = x.reshape(batch, nh, wh, nw, ww, *rest)
    x = jnp.swapaxes(x, 2, 3)  # [B, nh, nw, wh, ww, ...]
    return x.reshape(batch, nh * nw, wh * ww, *rest)


def window_unpartition(windows: jax.Array, window_hw: Sequence[int], grid_hw: Sequence[int]) -> jax.Array:
    """Inverse of `window_partition`: [B, nh * nw, wh * ww, ...] -> [B, gh, gw, ...] (padding cropped)."""
    batch = windows.shape[0]
    rest = windows.shape[3:]
    wh, ww = window_hw
    gh, gw = grid_hw
    nh, nw = -(-gh // wh), -(-gw // ww)
    x = windows.reshape(batch, nh, nw, wh, ww, *rest)
    x = jnp.swapaxes(x, 2, 3).reshape(batch, nh * wh, nw * ww, *rest)
    return x[:, :gh, :gw]


@functools.lru_cache(maxsize=64)
def window_valid_cells(grid_hw: tuple[int, int], window_hw: tuple[int, int]) -> np.ndarray:
    """[nh * nw, wh * ww] bool: True at cells of the real grid, False at the padding."""
    gh, gw = grid_hw
    wh, ww = window_hw
    nh, nw = -(-gh // wh), -(-gw // ww)
    rows = np.arange(nh * wh).reshape(nh, 1, wh, 1) < gh  # numpy: this runs inside traces
    cols = np.arange(nw * ww).reshape(1, nw, 1, ww) < gw
    return (rows & cols).reshape(nh * nw, wh * ww)


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
# Attention
# --------------------------------------------------------------------------------------------------


def _softmax_attend(logits: jax.Array, v: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
    """logits: [..., t, S]; v: [..., S, Dh]; mask: broadcastable to logits, bool, or None. -> [..., t, Dh].

    float32 softmax, normalised after the second matmul (as vit._softmax_attention).
    """
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    logits = logits.astype(jnp.float32)
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("...ts,...sd->...td", e.astype(v.dtype), v).astype(jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)


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
    kernels of `_blocked_window_attention` (one window per batch row; hand-written flash-style
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
        return _blocked_window_attention(qw, keys, values, mask, rel, window_hw)
    logits = jnp.einsum("bnhqd,bnhkd->bnhqk", qw * jnp.asarray(head_dim**-0.5, qw.dtype), keys)
    if rel is not None:  # the bias covers the S window columns; the E extra columns get none
        bias = decomposed_rel_pos_bias(qw, rel[0], rel[1], window_hw)
        logits = logits + jnp.pad(bias, [(0, 0)] * 4 + [(0, n_extra)])
    return _softmax_attend(logits, values, mask[:, :, None, None, :])


def _blocked_window_attention(
    qw: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    rel: Optional[tuple[jax.Array, jax.Array]] = None,
    window_hw: Optional[Sequence[int]] = None,
) -> jax.Array:
    """qw [B, nW, H, S, Dh] (unscaled) over keys, values [B, nW, H, K, Dh] (K = S cells | E extras) with
    mask [B, nW, K] -> [B, nW, H, S, Dh], through a custom-VJP blocked attention with each window a
    batch row. `vit._key_bias` gives the mask's semantics: a window without any valid key (impossible
    with valid extra tokens) averages its values uniformly, as `_softmax_attend` does.

    Without rel all S queries are one block (`vit._blocked_attention`). With rel = (rh [wh, wh, Dh],
    rw [ww, ww, Dh]) the queries go in balanced blocks of <= `vit.CPU_QUERY_CHUNK` and each block adds
    its decomposed relative position bias inside `_relpos_blocked_attention`: a global block at
    1024 x 1024 never holds a [4096, 4197] logit or bias array per head.
    """
    batch, n_win, heads, n_cells, head_dim = qw.shape
    n_keys = keys.shape[3]
    rows = batch * n_win
    if rel is not None and rel[0].ndim == 4:  # per-image tables -> one per batch row (image, window)
        rel = tuple(jnp.repeat(t, n_win, axis=0) for t in rel)
    bias, q_scale = vit._key_bias(mask.reshape(rows, n_keys), rows, head_dim, qw.dtype)
    q = qw.reshape(rows, heads, n_cells, head_dim) * q_scale[:, None, None, None]
    k, v = (jnp.transpose(a.reshape(rows, heads, n_keys, head_dim), (1, 0, 2, 3)) for a in (keys, values))
    if rel is None:
        q = jnp.transpose(q, (1, 0, 2, 3))[:, None]  # [H, 1 block, rows, S, Dh]
        out = vit._blocked_attention(q, k, v, bias)[:, 0]  # [H, rows, S, Dh]
        return jnp.transpose(out, (1, 0, 2, 3)).reshape(batch, n_win, heads, n_cells, head_dim)
    n_blocks = -(-n_cells // vit.CPU_QUERY_CHUNK)
    chunk = -(-n_cells // n_blocks)
    q = vit._to_blocks(jnp.transpose(q, (0, 2, 1, 3)), chunk)  # [H, n, rows, c, Dh]
    # The bias takes the unscaled query (ViTDet): q_scaled . (table / scale) = q . table. Where a row
    # has no valid key its q_scale is 0, and so is its bias, as the reference's all-equal logits.
    inv_scale = jnp.asarray(head_dim**0.5, rel[0].dtype)
    cells = np.arange(n_blocks * chunk).reshape(n_blocks, chunk)
    cell_rows = np.minimum(cells // window_hw[1], window_hw[0] - 1).astype(np.int32)  # padded rows: any row
    cell_cols = (cells % window_hw[1]).astype(np.int32)
    out = _relpos_blocked_attention(q, k, v, bias, rel[0] * inv_scale, rel[1] * inv_scale,
                                    jnp.asarray(cell_rows), jnp.asarray(cell_cols))
    out = vit._from_blocks(out, n_cells)  # [rows, S, H, Dh]
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
    """Forward of `_relpos_blocked_attention`: (out [H, n, R, c, Dh], log-sum-exp [H, n, R, c])."""
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
def _relpos_blocked_attention(q, k, v, key_bias, rh, rw, cell_rows, cell_cols):
    """Softmax attention of window cells with the decomposed relative position bias, one (head, query
    block) at a time, with a flash-attention style backward (the weights are recomputed from the saved
    log-sum-exp, never stored).

    q: [H, n, R, c, Dh] scaled queries of the S = wh * ww cells in blocks (rows past S are zero padding);
    k, v: [H, R, K, Dh], K = S cell keys then the extra keys; key_bias: [R, K] float32 (0 or the float32
    minimum) or None; rh [wh, wh, Dh], rw [ww, ww, Dh]: `rel_pos_matrix` tables divided by the query
    scale, shared by the rows, or one per row ([R, wh, wh, Dh], [R, ww, ww, Dh]: per-image tables); cell_rows, cell_cols: [n, c] int32, each query's row and column in the window. The logit of
    query i and cell key (y, x) is q_i . k + q_i . rh[row_i, y] + q_i . rw[col_i, x]. Returns
    [H, n, R, c, Dh]; gradients reach q, k, v, rh and rw.
    """
    return _relpos_forward(q, k, v, key_bias, rh, rw, cell_rows, cell_cols)[0]


def _relpos_blocked_attention_fwd(q, k, v, key_bias, rh, rw, cell_rows, cell_cols):
    out, lse = _relpos_forward(q, k, v, key_bias, rh, rw, cell_rows, cell_cols)
    return out, (q, k, v, key_bias, rh, rw, cell_rows, cell_cols, out, lse)


def _relpos_blocked_attention_bwd(residuals, d_out):
    """As `vit._blocked_backward`, plus the bias: with ds the logit gradient of the cell keys reshaped to
    [R, wh, ww, c], dbh = sum over ww and dbw = sum over wh; then dq += dbh . rh[row] + dbw . rw[col],
    and rh[row_i] += dbh_i q_i, rw[col_i] += dbw_i q_i (scatter-adds over the block's queries, as one-hot
    matmuls), accumulated in float32 over blocks; heads are summed at the end (tables are shared)."""
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


_relpos_blocked_attention.defvjp(_relpos_blocked_attention_fwd, _relpos_blocked_attention_bwd)


class WindowedSelfAttention(nn.Module):
    """Self-attention over [prefix | patch grid | suffix] tokens with windowed patch attention.

    Same parameters as `vit.SelfAttention` (qkv [D, 3D] in (q|k|v) order, proj), plus rel_pos_h
    [2 sh - 1, Dh] and rel_pos_w [2 sw - 1, Dh] when rel_pos is on (see the module docstring for the
    attention pattern and the bias).

    Attributes:
      num_heads, qkv_bias, dtype: as `vit.SelfAttention`.
      attention_impl: as SelfAttention's: None (on CPU) or 'chunked' run the patch queries' attention
        through blocked flash-style kernels (`_blocked_window_attention`, with the relative position
        bias added per query block); otherwise explicit head-major einsums. The [CLS]/[DET] queries'
        global attention is always einsums (E x T logits).
      grid_hw: (gh, gw) patch grid of the tokens.
      num_prefix_tokens: tokens before the patches ([CLS]).
      window_size: r; 0 = one window over the whole grid (a global block, used with rel_pos).
      rel_pos: add the decomposed relative position bias.
      rel_pos_grid: (h, w) in patches that a global block's tables are created for (default grid_hw);
        other grids resize them. Windowed blocks' tables are always created for (r, r).
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    grid_hw: Sequence[int] = (0, 0)
    num_prefix_tokens: int = 1
    window_size: int = 0
    rel_pos: bool = False
    rel_pos_grid: Optional[Sequence[int]] = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: Optional[jax.Array] = None) -> jax.Array:
        """x: [B, T, D] in the layout of the module docstring; key_mask: [B, T] bool or None -> [B, T, D]."""
        batch, tokens, width = x.shape
        heads = self.num_heads
        if width % heads:
            raise ValueError(f"hidden_size {width} is not divisible by num_heads {heads}")
        if self.attention_impl not in vit.ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {vit.ATTENTION_IMPLS}, got {self.attention_impl!r}")
        gh, gw = int(self.grid_hw[0]), int(self.grid_hw[1])
        n_pre, n_patch = int(self.num_prefix_tokens), gh * gw
        if tokens < n_pre + n_patch:
            raise ValueError(
                f"windowed attention over a {gh} x {gw} grid after {n_pre} prefix tokens needs >= "
                f"{n_pre + n_patch} tokens, got {tokens}"
            )
        head_dim = width // heads
        (wh, ww), _ = window_layout((gh, gw), self.window_size)

        qkv = nn.Dense(3 * width, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=vit.trunc_normal_02,
                       name="qkv")(x)
        qkv = jnp.transpose(qkv.reshape(batch, tokens, 3, heads, head_dim), (2, 0, 1, 3, 4))  # [3, B, T, H, Dh]
        patch_slice = slice(n_pre, n_pre + n_patch)

        def extras(a):  # [..., T, ...] along axis 1 -> the prefix and suffix tokens, [B, E, ...]
            return jnp.concatenate([a[:, :n_pre], a[:, n_pre + n_patch:]], axis=1)

        def windows(a):  # [B, P, H, Dh] -> [B, nW, H, S, Dh]
            a = window_partition(a.reshape(batch, gh, gw, heads, head_dim), (wh, ww))
            return jnp.transpose(a, (0, 1, 3, 2, 4))

        q_all, k_all, v_all = qkv[0], qkv[1], qkv[2]  # [B, T, H, Dh]
        qw, kw, vw = (windows(a[:, patch_slice]) for a in (q_all, k_all, v_all))
        ke, ve = (jnp.transpose(extras(a), (0, 2, 1, 3)) for a in (k_all, v_all))  # [B, H, E, Dh]
        n_extra = ke.shape[2]

        cell_mask = jnp.asarray(window_valid_cells((gh, gw), (wh, ww)))[None]  # [1, nW, S]
        if key_mask is not None:
            cell_mask = cell_mask & window_partition(key_mask[:, patch_slice].reshape(batch, gh, gw), (wh, ww))
            extra_mask = extras(key_mask)
        else:
            extra_mask = jnp.ones((batch, n_extra), bool)
        valid_grid = None  # [B, 2] each image's own patch grid, read off the key mask (top-left rectangle)
        if key_mask is not None and self.rel_pos and self.window_size <= 0:
            cells = key_mask[:, patch_slice].reshape(batch, gh, gw)
            valid_grid = jnp.stack([jnp.sum(jnp.any(cells, axis=2), axis=1), jnp.sum(jnp.any(cells, axis=1), axis=1)],
                                   axis=-1)
        rel = self._rel_pos_tables(head_dim, (gh, gw), (wh, ww), valid_grid) if self.rel_pos else None
        impl = self.attention_impl
        if impl is None and jax.default_backend() == "cpu":
            impl = "chunked"
        blocked = impl == "chunked"
        patch_out = window_attention(qw, kw, vw, ke, ve, cell_mask, extra_mask, rel, (wh, ww), blocked)
        # patch_out: [B, nW, H, S, Dh]
        patch_out = window_unpartition(jnp.transpose(patch_out, (0, 1, 3, 2, 4)), (wh, ww), (gh, gw))
        patch_out = patch_out.reshape(batch, n_patch, width)

        # Extra queries: global over all T tokens, no bias.
        qe = jnp.transpose(extras(q_all), (0, 2, 1, 3))  # [B, H, E, Dh]
        k_t, v_t = (jnp.transpose(a, (0, 2, 1, 3)) for a in (k_all, v_all))  # [B, H, T, Dh]
        logits_e = jnp.einsum("bhqd,bhkd->bhqk", qe * jnp.asarray(head_dim**-0.5, qe.dtype), k_t)
        extra_out = _softmax_attend(logits_e, v_t, None if key_mask is None else key_mask[:, None, None, :])
        extra_out = jnp.transpose(extra_out, (0, 2, 1, 3)).reshape(batch, n_extra, width)

        out = jnp.concatenate([extra_out[:, :n_pre], patch_out, extra_out[:, n_pre:]], axis=1)
        return nn.Dense(width, dtype=self.dtype, kernel_init=vit.trunc_normal_02, name="proj")(out)

    def _rel_pos_tables(self, head_dim: int, grid_hw, window_hw, valid_grid=None) -> tuple[jax.Array, jax.Array]:
        """(rh [wh, wh, Dh], rw [ww, ww, Dh]): the tables' entries for every (query, key) row / column pair.

        valid_grid: None, or [B, 2] each image's own grid in a global block: the spans are then each
        image's (`rel_pos_matrix_per_image`, tables [B, gh, gh, Dh] and [B, gw, gw, Dh]), as the image
        alone would have them. Windowed blocks need none: their span is the window, the same on any canvas.
        """
        if self.window_size > 0:
            init_hw = span = (self.window_size, self.window_size)
        else:
            span = grid_hw
            init_hw = tuple(self.rel_pos_grid) if self.rel_pos_grid is not None else grid_hw
        rel_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * init_hw[0] - 1, head_dim))
        rel_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * init_hw[1] - 1, head_dim))
        if valid_grid is not None:
            return (rel_pos_matrix_per_image(rel_h, valid_grid[:, 0], window_hw[0]),
                    rel_pos_matrix_per_image(rel_w, valid_grid[:, 1], window_hw[1]))
        rh = rel_pos_matrix(rel_h, span[0], window_hw[0])
        rw = rel_pos_matrix(rel_w, span[1], window_hw[1])
        return rh, rw


def encoder_attention(model: Any, grid_hw: Sequence[int], partial_sequence: bool = False) -> list:
    """Per-block `vit.EncoderBlock.attention` factories for a YOLOS model (None = global SelfAttention).

    model: a `YOLOS` (or its config) with depth, patch_size, init_pe_size, window_size, global_blocks,
    rel_pos; grid_hw: the input's patch grid; partial_sequence: the model is configured to train on a
    random subset of the patches (MIMDet), which leaves no grid to window or to measure relative
    positions on (refused at init too, not only in the training step).
    """
    window_size = getattr(model, "window_size", 0)
    rel_pos = getattr(model, "rel_pos", False)
    depth = int(model.depth)
    if partial_sequence and (window_size or rel_pos):
        raise ValueError(
            "config.model.token_keep_ratio < 1 drops patch tokens in training, which leaves no patch grid for "
            "config.model.window_size / config.model.rel_pos: use partial sequences or the windowed / "
            "relative-position options, not both"
        )
    pe_grid = (int(model.init_pe_size[0]) // model.patch_size, int(model.init_pe_size[1]) // model.patch_size)
    return [
        block_attention(i, depth, grid_hw, window_size, getattr(model, "global_blocks", None), rel_pos, pe_grid)
        for i in range(depth)
    ]


# --------------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------------

VITDET_WINDOW = 14  # ViTDet: r = the pre-training grid (224 / 16)


def parse_config_arg(arg: Optional[str], source: str) -> dict[str, Any]:
    """Options of a windowed config file's argument, e.g. `configs/yolos_s_windowed.py:window=7,rel_pos`.

    Accepts comma-separated `window=R` (int >= 0), `rel_pos` / `rel_pos=True|False`, `global=2.5.8.11`
    (block indices separated by dots). Returns {'window_size', 'rel_pos', 'global_blocks'} for the keys
    given. source: the config file, named in errors.
    """
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, _, value = item.partition("=")
        try:
            if key == "window":
                out["window_size"] = int(value)
            elif key == "rel_pos":
                if value not in ("", "True", "False", "1", "0"):
                    raise ValueError(value)
                out["rel_pos"] = value in ("", "True", "1")
            elif key == "global":
                out["global_blocks"] = tuple(int(v) for v in value.split(".") if v)
            else:
                raise KeyError(key)
        except (KeyError, ValueError):
            raise ValueError(
                f"{source}: cannot read config argument {item!r}; use comma-separated window=R, "
                f"rel_pos[=True|False], global=I.J.K (e.g. ':window=14,rel_pos')"
            ) from None
    return out


def apply_window_options(model_cfg: Any, arg: Optional[str], source: str, **defaults: Any) -> None:
    """Sets window_size / global_blocks / rel_pos on `config.model` (an unlocked ConfigDict) in place.

    defaults: the file's own values (window_size, rel_pos, global_blocks); `arg` overrides them. The
    global blocks are written out (not None) so that `--config.model.global_blocks=...` type-checks.
    """
    options = dict(window_size=VITDET_WINDOW, rel_pos=False, global_blocks=None)
    options.update(defaults)
    options.update(parse_config_arg(arg, source))
    if options["global_blocks"] is None:
        options["global_blocks"] = default_global_blocks(int(model_cfg.depth))
    validate_window_options(options["window_size"], options["global_blocks"], options["rel_pos"], int(model_cfg.depth))
    model_cfg.window_size = int(options["window_size"])
    model_cfg.global_blocks = tuple(options["global_blocks"])
    model_cfg.rel_pos = bool(options["rel_pos"])
