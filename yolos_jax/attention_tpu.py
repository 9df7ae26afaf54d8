"""Softmax attention through the Pallas TPU splash-attention kernel, the padding key mask as segment ids
(`attention.dot_product_attention(..., impl='splash')`; `attention.resolve_impl(None)` on TPU).

Shapes: q [B, T, H, Dh]; k, v [B, S, H, Dh] (token-major, as `attention.dot_product_attention` gets them);
key_mask [B, S] bool (True = the key may be attended to) or None. Returns [B, T, H, Dh] in v's dtype, queries
in their own order: the same result as the masked einsum path (`attention.softmax_attention`).

How the kernel is used:
  * segment ids: a query attends a key where their ids are equal. Keys get 1 where valid and 0 where
    padded; every query gets 1, so padded queries attend the valid keys (finite outputs, as on the masked
    path). An arbitrary boolean mask needs no reordering here (the cuDNN route, `attention.keys_valid_first`,
    does): the ids are per key, wherever the padded patches sit in the row-major sequence;
  * T and S are zero-padded to multiples of the kernel's 128-lane tiles (`LANES`), the added keys marked
    invalid and the added query rows dropped from the output; blocks are the largest of `MAX_BLOCK`,
    `MAX_BLOCK` / 2, ..., 128 dividing the padded length (`block_sizes`; not tuned on a TPU);
  * the queries are scaled by Dh^-1/2 in their dtype before the kernel (the kernel has no scale), as
    `attention.softmax_attention` scales them;
  * the kernel's logits, softmax and accumulators are float32 whatever the inputs' dtype (bf16 inputs: the
    logits are not rounded to bf16 first, unlike the einsum path's, so bf16 results agree to bf16 accuracy);
  * the kernel works on one example ([H, T, Dh]); `jax.vmap` maps it over the batch. Its custom VJP runs
    splash's own dq and dk/dv backward kernels;
  * an image without any valid key (impossible in the model: [CLS] and [DET] are always valid) averages v
    uniformly over its S keys and passes no gradient to q or k, as the masked path does: its queries are
    scaled by 0 and its S keys all marked valid (splash itself would spread it over the padded keys too).

Interpretation: `INTERPRET` (module attribute, read at call time): None = Pallas interpret mode wherever the
default backend is not TPU (the kernel's own code, run as XLA ops: how the CPU tests run it; on GPU it works
but is slow: use 'cudnn' or 'xla' there), True / False to force.

Sharding: XLA's SPMD partitioner cannot split a Mosaic kernel (jax raises "Mosaic kernels cannot be
automatically partitioned" when one sits in a jit over several devices), so
  * with a mesh in context (`with jax.set_mesh(mesh):` around the jit or its tracing), the call is wrapped
    in `jax.shard_map` over every axis of the mesh not already manual: the batch is split over those of
    `BATCH_AXES` (`sharding.BATCH_AXES`, ('data', 'fsdp')), each device runs the kernel on its own images,
    other axes replicate the work. A batch that does not divide among the shards is padded with zero rows
    (all keys valid), dropped after. Inside a `shard_map` over every axis, the kernel runs directly;
  * without a mesh in context, on one device the kernel runs directly; with several devices (not in
    interpret mode) the jit's device assignment is unknown at trace time, so, unless `NO_MESH_FALLBACK` is
    None, the call takes `attention.dot_product_attention(..., 'xla')` (the reordered-keys path, which GSPMD
    partitions) and warns. The train step, the train state's init (also `init_from`'s), evaluation's predict,
    the `inference.Detector` forward, visualisation and the speed protocol are jitted by `sharding.mesh_jit`
    (over the run's mesh, or `sharding.single_device_mesh()`), which traces and runs them under
    `jax.set_mesh(mesh)`, so they take the kernel. Export always uses 'einsum'. Set
    `NO_MESH_FALLBACK = None` to call the kernel anyway (right when the jit runs on one device of several).

Windowed blocks (`yolos_jax/windowed.py`) and the [DET] prior's biased rows do not route through here: they
keep their own masked kernels (explicit einsums for any impl but 'chunked'). The FP-DETR task adapter's
[DET]-only attention takes the kernel when 'splash' is named; its None stays jax's own choice off CPU
(`variants.TaskAdapter` does not call `resolve_impl`).

Public API: INTERPRET, LANES, MAX_BLOCK, BATCH_AXES, NO_MESH_FALLBACK, interpret_mode, block_sizes,
splash_attention (with the sharding above), splash_attention_local (one device's call).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from yolos_jax import attention, sharding

INTERPRET: Optional[bool] = None
LANES = splash_kernel.NUM_LANES  # 128: sequence lengths and blocks must be multiples of the lane width
MAX_BLOCK = 512
BATCH_AXES = sharding.BATCH_AXES
NO_MESH_FALLBACK: Optional[str] = "xla"


def interpret_mode() -> bool:
    """Whether the kernel runs in Pallas interpret mode: `INTERPRET`, or (None) when not on TPU."""
    return jax.default_backend() != "tpu" if INTERPRET is None else bool(INTERPRET)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_sizes(q_len: int, kv_len: int) -> splash_kernel.BlockSizes:
    """Forward and backward tile sizes for padded lengths (multiples of `LANES`): per axis the largest of
    MAX_BLOCK, MAX_BLOCK / 2, ..., LANES that divides the length."""

    def largest(n):
        b = MAX_BLOCK
        while b > LANES and n % b:
            b //= 2
        return b

    bq, bkv = largest(q_len), largest(kv_len)
    return splash_kernel.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                    block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def splash_attention_local(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array], interpret: bool
) -> jax.Array:
    """One device's call (no sharding logic): q [B, T, H, Dh]; k, v [B, S, H, Dh]; key_mask [B, S] bool or
    None -> [B, T, H, Dh] in v's dtype. See the module docstring for the padding, scale and segment ids."""
    batch, tokens, heads, head_dim = q.shape
    keys = k.shape[1]
    t_pad, s_pad = _round_up(tokens, LANES), _round_up(keys, LANES)
    scale = jnp.full((batch,), head_dim**-0.5, q.dtype)
    kv_ids = None
    if key_mask is not None:
        any_valid = jnp.any(key_mask, axis=-1)  # [B]
        scale = jnp.where(any_valid, scale, jnp.zeros((), q.dtype))
        kv_ids = (key_mask | ~any_valid[:, None]).astype(jnp.int32)
    elif s_pad != keys:
        kv_ids = jnp.ones((batch, keys), jnp.int32)
    segment_ids = None
    if kv_ids is not None:
        kv_ids = jnp.pad(kv_ids, ((0, 0), (0, s_pad - keys)))  # added keys: id 0, never attended
        segment_ids = splash_kernel.SegmentIds(q=jnp.ones((batch, t_pad), jnp.int32), kv=kv_ids)

    def heads_major(a, length):  # [B, n, H, Dh] -> [B, H, length, Dh], zero rows appended
        a = jnp.pad(a, ((0, 0), (0, length - a.shape[1]), (0, 0), (0, 0)))
        return jnp.swapaxes(a, 1, 2)

    q = heads_major(q * scale[:, None, None, None], t_pad)
    k, v_h = heads_major(k, s_pad), heads_major(v, s_pad)
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((t_pad, s_pad))] * heads)
    kernel = splash_kernel.make_splash_mha(mask, block_sizes=block_sizes(t_pad, s_pad), head_shards=1,
                                           q_seq_shards=1, interpret=interpret)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v_h)
    else:
        out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v_h, segment_ids)
    return jnp.swapaxes(out, 1, 2)[:, :tokens].astype(v.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array]) -> jax.Array:
    """Softmax attention by the splash kernel, sharded by the mesh in context (module docstring).

    q: [B, T, H, Dh]; k, v: [B, S, H, Dh]; key_mask: [B, S] bool or None. Returns [B, T, H, Dh] in v's dtype.
    """
    interpret = interpret_mode()
    mesh = jax.sharding.get_abstract_mesh()
    free = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if free:
        return _shard_mapped(q, k, v, key_mask, interpret, mesh, free)
    if mesh.empty and not interpret and jax.device_count() > 1 and NO_MESH_FALLBACK is not None:
        # Python's default warning filter shows this once per call site, not once per traced layer.
        warnings.warn(
            f"attention_impl='splash' without a mesh in context on {jax.device_count()} devices: a Mosaic "
            f"kernel cannot be partitioned by XLA, so attention runs as '{NO_MESH_FALLBACK}'. Trace the jit "
            "under `jax.set_mesh(mesh)` to run the kernel per device (yolos_jax/attention_tpu.py).",
            stacklevel=2,
        )
        return attention.dot_product_attention(q, k, v, key_mask, NO_MESH_FALLBACK)
    return splash_attention_local(q, k, v, key_mask, interpret)


def _shard_mapped(q, k, v, key_mask, interpret, mesh, free):
    """`splash_attention_local` per device under `jax.shard_map` over the mesh's free axes, the batch split
    over those in `BATCH_AXES` (padded with zero rows, all keys valid, to a multiple of their shards)."""
    batch = q.shape[0]
    axes = tuple(a for a in free if a in BATCH_AXES)
    shards = math.prod(mesh.shape[a] for a in axes)
    padded = _round_up(batch, shards)
    if padded != batch:
        extra = padded - batch

        def pad(a):  # zero rows: uniform attention, finite, and no gradient shared with the real rows
            return jnp.pad(a, ((0, extra),) + ((0, 0),) * (a.ndim - 1))

        q, k, v = pad(q), pad(k), pad(v)
        if key_mask is not None:
            key_mask = jnp.concatenate([key_mask, jnp.ones((extra, key_mask.shape[1]), bool)], axis=0)
    spec = P(axes) if axes else P()
    # A missing mask stays missing (not an all-valid one): each device then makes the call the unsharded
    # path makes, without segment ids where the keys need no padding.
    args = (q, k, v) if key_mask is None else (q, k, v, key_mask)

    def per_device(q, k, v, key_mask=None):
        return splash_attention_local(q, k, v, key_mask, interpret)

    # check_vma=False: the pallas_call inside carries no varying-axes types; every input is split alike.
    fn = jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                       axis_names=set(free), check_vma=False)
    return fn(*args)[:batch]
