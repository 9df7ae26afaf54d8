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

Relative position bias (decomposed; MViTv2, ViTDet's `add_decomposed_rel_pos`; the formula and kernels in
`yolos_jax/attention_windowed.py`): tables rel_pos_h [2 sh - 1, Dh], rel_pos_w [2 sw - 1, Dh] shared by
the heads, zero-initialised (as ViTDet does for every initialisation without pre-trained biases, so a
model starts as without them), one pair per block (as detectron2's ViTDet and MViTv2; the benchmarking
paper shares one pair among the windowed blocks and one among the global blocks). (sh, sw) is the nominal
window: (r, r) in windowed blocks, the grid (gh, gw) in global blocks. Global blocks store their tables for
`rel_pos_grid` (YOLOS: the init_pe_size grid) and resize them in the forward pass to another input grid
(each image's own grid in a padded batch). Tables of a checkpoint trained with another r or grid are
resized once on the host (`attention_windowed.resize_rel_pos_np`), since Flax parameters keep their shapes.

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

from yolos_jax import attention, attention_windowed, vit

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




class WindowedSelfAttention(nn.Module):
    """Self-attention over [prefix | patch grid | suffix] tokens with windowed patch attention.

    Same parameters as `vit.SelfAttention` (qkv [D, 3D] in (q|k|v) order, proj), plus rel_pos_h
    [2 sh - 1, Dh] and rel_pos_w [2 sw - 1, Dh] when rel_pos is on (see the module docstring for the
    attention pattern and the bias).

    Attributes:
      num_heads, qkv_bias, dtype: as `vit.SelfAttention`.
      attention_impl: as SelfAttention's: None (on CPU) or 'chunked' run the patch queries' attention
        through blocked flash-style kernels (`attention_windowed.blocked_window_attention`, with the
        relative position bias added per query block); otherwise explicit head-major einsums. The [CLS]/[DET] queries'
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
        impl = attention.resolve_impl(self.attention_impl)
        gh, gw = int(self.grid_hw[0]), int(self.grid_hw[1])
        n_pre, n_patch = int(self.num_prefix_tokens), gh * gw
        if tokens < n_pre + n_patch:
            raise ValueError(
                f"windowed attention over a {gh} x {gw} grid after {n_pre} prefix tokens needs >= "
                f"{n_pre + n_patch} tokens, got {tokens}"
            )
        head_dim = width // heads
        (wh, ww), _ = window_layout((gh, gw), self.window_size)

        qkv = vit.Dense(3 * width, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=vit.trunc_normal_02,
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
        blocked = impl == "chunked"
        patch_out = attention_windowed.window_attention(qw, kw, vw, ke, ve, cell_mask, extra_mask, rel, (wh, ww),
                                                        blocked)
        # patch_out: [B, nW, H, S, Dh]
        patch_out = window_unpartition(jnp.transpose(patch_out, (0, 1, 3, 2, 4)), (wh, ww), (gh, gw))
        patch_out = patch_out.reshape(batch, n_patch, width)

        # Extra queries: global over all T tokens, no bias.
        qe = jnp.transpose(extras(q_all), (0, 2, 1, 3))  # [B, H, E, Dh]
        k_t, v_t = (jnp.transpose(a, (0, 2, 1, 3)) for a in (k_all, v_all))  # [B, H, T, Dh]
        logits_e = jnp.einsum("bhqd,bhkd->bhqk", qe * jnp.asarray(head_dim**-0.5, qe.dtype), k_t)
        extra_out = attention.softmax_attend(logits_e, v_t, None if key_mask is None else key_mask[:, None, None, :])
        extra_out = jnp.transpose(extra_out, (0, 2, 1, 3)).reshape(batch, n_extra, width)

        out = jnp.concatenate([extra_out[:, :n_pre], patch_out, extra_out[:, n_pre:]], axis=1)
        return vit.Dense(width, dtype=self.dtype, kernel_init=vit.trunc_normal_02, name="proj")(out)

    def _rel_pos_tables(self, head_dim: int, grid_hw, window_hw, valid_grid=None) -> tuple[jax.Array, jax.Array]:
        """(rh [wh, wh, Dh], rw [ww, ww, Dh]): the tables' entries for every (query, key) row / column pair.

        valid_grid: None, or [B, 2] each image's own grid in a global block: the spans are then each
        image's (`attention_windowed.rel_pos_matrix_per_image`, tables [B, gh, gh, Dh] and [B, gw, gw, Dh]),
        as the image alone would have them. Windowed blocks need none: their span is the window, the same on any canvas.
        """
        if self.window_size > 0:
            init_hw = span = (self.window_size, self.window_size)
        else:
            span = grid_hw
            init_hw = tuple(self.rel_pos_grid) if self.rel_pos_grid is not None else grid_hw
        rel_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * init_hw[0] - 1, head_dim))
        rel_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * init_hw[1] - 1, head_dim))
        if valid_grid is not None:
            return (attention_windowed.rel_pos_matrix_per_image(rel_h, valid_grid[:, 0], window_hw[0]),
                    attention_windowed.rel_pos_matrix_per_image(rel_w, valid_grid[:, 1], window_hw[1]))
        rh = attention_windowed.rel_pos_matrix(rel_h, span[0], window_hw[0])
        rw = attention_windowed.rel_pos_matrix(rel_w, span[1], window_hw[1])
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


VITDET_WINDOW = 14  # ViTDet: r = the pre-training grid (224 / 16); the windowed config files' default
