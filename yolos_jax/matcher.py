"""DETR's bipartite matcher, as YOLOS uses it: one query per target box, minimum total cost.

cost[b, q, m] = cost_class * (-softmax(logits[b, q])[labels[b, m]])
              + cost_bbox  * L1(boxes[b, q], target_boxes[b, m])        (cxcywh, relative units)
              + cost_giou  * (-GIoU(boxes[b, q], target_boxes[b, m]))
with the weights of `config.matcher` (DETR/YOLOS: 1, 5, 2). This is HF transformers' `HungarianMatcher`.

The cost is computed on the device, in float32, inside the jitted step. The assignment is solved either
  * 'host':   by `scipy.optimize.linear_sum_assignment` in a `jax.pure_callback`. With a mesh, the callback
              sits inside `jax.shard_map` over the batch axes, so every device hands only its own images'
              [B_local, Q, M] cost to its own host: nothing is gathered onto one device or process;
  * 'device': by an exact shortest-augmenting-path (Jonker-Volgenant / Crouse) solver written with
              `lax.while_loop` and vmapped over the images, for accelerators where a host round trip per
              step hurts (TPU pods). It replicates scipy's algorithm step by step, tie-breaking included,
              in float32 arithmetic.
Both return the same `pred_index` contract, carry no gradient, and exclude padded target slots.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P
from scipy.optimize import linear_sum_assignment

from yolos_jax import box_ops

IMPLEMENTATIONS = ("host", "device")

# Non-finite costs (e.g. from NaN predictions) are replaced, as HF does, so that they are only used when
# nothing else is possible. The host solver works in float64 and takes float32's max as HF does; the
# float32 device solver needs head-room for sums of a few costs, hence a smaller stand-in.
_HOST_BAD_COST = float(np.finfo(np.float32).max)
_DEVICE_BAD_COST = 1e15


def default_matcher_config() -> ml_collections.ConfigDict:
    """`config.matcher`: DETR/YOLOS cost weights and the assignment solver ('host' or 'device')."""
    return ml_collections.ConfigDict(
        dict(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, implementation="host")
    )


def validate_matcher_config(cfg: Mapping[str, Any]) -> None:
    """Raises ValueError naming the `config.matcher` field that is wrong."""
    for name in ("cost_class", "cost_bbox", "cost_giou", "implementation"):
        if name not in cfg:
            raise ValueError(f"config.matcher.{name} is missing; start from matcher.default_matcher_config()")
    for name in ("cost_class", "cost_bbox", "cost_giou"):
        value = cfg[name]
        if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise ValueError(f"config.matcher.{name} must be a finite number >= 0, got {value!r}")
    if cfg["cost_class"] == 0 and cfg["cost_bbox"] == 0 and cfg["cost_giou"] == 0:
        raise ValueError("config.matcher.cost_class, cost_bbox and cost_giou are all 0: nothing to match on")
    if cfg["implementation"] not in IMPLEMENTATIONS:
        raise ValueError(
            f"config.matcher.implementation must be one of {IMPLEMENTATIONS}, got {cfg['implementation']!r}"
        )


def cost_matrix(logits: jax.Array, boxes: jax.Array, labels: jax.Array, target_boxes: jax.Array,
                matcher_cfg: Mapping[str, Any]) -> jax.Array:
    """The matching cost of every (query, target) pair, float32.

    logits: [B, Q, C+1] class logits (last = no object); boxes: [B, Q, 4] predicted cxcywh (relative);
    labels: [B, M] int target classes; target_boxes: [B, M, 4] cxcywh (relative);
    returns [B, Q, M] float32. Padded target slots get a finite but meaningless cost: callers exclude them.
    Non-finite entries are replaced by float32's max (as HF does).
    """
    logits = jnp.asarray(logits, jnp.float32)
    boxes = jnp.asarray(boxes, jnp.float32)
    target_boxes = jnp.asarray(target_boxes, jnp.float32)
    prob = jax.nn.softmax(logits, axis=-1)
    # A gather rather than a one-hot matmul: exact in float32 on every backend (no TF32).
    class_cost = -jnp.take_along_axis(prob, labels[:, None, :].astype(jnp.int32), axis=-1)
    bbox_cost = jnp.sum(jnp.abs(boxes[:, :, None, :] - target_boxes[:, None, :, :]), axis=-1)
    giou_cost = -box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(target_boxes))
    cost = (matcher_cfg["cost_bbox"] * bbox_cost + matcher_cfg["cost_class"] * class_cost
            + matcher_cfg["cost_giou"] * giou_cost)
    return jnp.nan_to_num(cost, nan=_HOST_BAD_COST, posinf=_HOST_BAD_COST, neginf=_HOST_BAD_COST)


def match(logits: jax.Array, boxes: jax.Array, targets: Mapping[str, jax.Array],
          matcher_cfg: Mapping[str, Any], *, mesh: Optional[jax.sharding.Mesh] = None,
          batch_axes: Optional[Sequence[str]] = None) -> jax.Array:
    """Optimal one-to-one assignment of queries to target boxes, per image. Jittable; no gradient.

    logits: [B, Q, C+1]; boxes: [B, Q, 4] cxcywh relative (the model's outputs);
    targets: {'labels': int [B, M], 'boxes': [B, M, 4] cxcywh relative, 'box_mask': bool [B, M]};
    matcher_cfg: `config.matcher` (see `default_matcher_config`);
    mesh, batch_axes: when the step runs over a Mesh, the mesh and the tuple of its axes that shard the
      batch dimension (e.g. ('data', 'fsdp')); the solve then runs per device shard. batch_axes defaults
      to all mesh axes. Mesh axes not in batch_axes hold replicas: each replica solves its own copy.
    Returns pred_index: int32 [B, M], the query matched to each target slot, or -1 for padded slots
      (box_mask False) and for targets left unmatched because the image has more targets than queries
      (only possible with M > Q; 'device' requires M <= Q). Matched entries of one image are distinct.
    """
    validate_matcher_config(matcher_cfg)
    logits, boxes = jax.lax.stop_gradient((logits, boxes))
    labels = targets["labels"]
    target_boxes = jax.lax.stop_gradient(targets["boxes"])
    box_mask = jnp.asarray(targets["box_mask"], bool)
    b, q = logits.shape[:2]
    m = labels.shape[1]
    if boxes.shape[:2] != (b, q) or target_boxes.shape[:2] != (b, m) or box_mask.shape != (b, m):
        raise ValueError(
            f"match: inconsistent shapes logits {logits.shape}, boxes {boxes.shape}, targets labels "
            f"{labels.shape}, boxes {target_boxes.shape}, box_mask {box_mask.shape}; expected "
            "[B, Q, C+1], [B, Q, 4], [B, M], [B, M, 4], [B, M]"
        )
    implementation = matcher_cfg["implementation"]
    if implementation == "device" and m > q:
        raise ValueError(
            f"config.matcher.implementation='device' needs at most as many target slots as queries, got "
            f"M={m} > Q={q}: set config.input.max_boxes <= config.model.num_det_tokens (training validates "
            "this), or use implementation='host'"
        )
    cost_weights = {k: float(matcher_cfg[k]) for k in ("cost_class", "cost_bbox", "cost_giou")}

    def local(logits, boxes, labels, target_boxes, box_mask):
        # Runs on one device's images: the cost never leaves the device that computed it.
        cost = cost_matrix(logits, boxes, labels, target_boxes, cost_weights)
        if implementation == "host":
            return _host_assignment(cost, box_mask)
        return device_assignment(cost, box_mask)

    if mesh is None:
        return local(logits, boxes, labels, target_boxes, box_mask)
    axes = tuple(mesh.axis_names) if batch_axes is None else tuple(batch_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"match: batch_axes {unknown} are not axes of the mesh {tuple(mesh.axis_names)}")
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    if b % shards:
        raise ValueError(f"match: batch size {b} is not divisible by the {shards} shards of mesh axes {axes}")
    spec = P(axes)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)
    return sharded(logits, boxes, labels, target_boxes, box_mask)


# ------------------------------------------------------------------------------------------- host solve


def _host_assignment(cost: jax.Array, box_mask: jax.Array) -> jax.Array:
    """pure_callback wrapper: cost [b, Q, M] float32, box_mask [b, M] -> int32 [b, M] (see `match`)."""
    out = jax.ShapeDtypeStruct(box_mask.shape, jnp.int32)
    # 'sequential': under an outer vmap, call the host once per mapped slice, each with its own batch.
    return jax.pure_callback(_solve_on_host, out, cost, box_mask, vmap_method="sequential")


class _CallLog:
    """Shapes of the cost arrays the host solver received (for tests and profiling), thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.enabled = False
        self.shapes: list[tuple[int, ...]] = []

    def record(self, shape):
        if self.enabled:
            with self._lock:
                self.shapes.append(tuple(shape))


host_call_log = _CallLog()


def _solve_on_host(cost: np.ndarray, box_mask: np.ndarray) -> np.ndarray:
    """scipy's Hungarian per image on the real (unpadded) target columns, in HF's order."""
    cost = np.asarray(cost)
    box_mask = np.asarray(box_mask, bool)
    host_call_log.record(cost.shape)
    out = np.full(box_mask.shape, -1, np.int32)
    for i in range(cost.shape[0]):
        cols = np.flatnonzero(box_mask[i])
        if cols.size == 0:
            continue
        rows, picked = linear_sum_assignment(cost[i][:, cols])
        out[i, cols[picked]] = rows
    return out


# ----------------------------------------------------------------------------------------- device solve


def device_assignment(cost: jax.Array, box_mask: jax.Array) -> jax.Array:
    """Exact assignment on the accelerator: cost [B, Q, M] float, box_mask [B, M] bool -> int32 [B, M].

    Same contract as the host solve (-1 for padded slots); requires M <= Q.
    """
    cost = jnp.asarray(cost)
    if cost.shape[-1] > cost.shape[-2]:
        raise ValueError(f"device_assignment needs M <= Q, got cost of shape {cost.shape} ([B, Q, M])")
    return jax.vmap(_solve_one)(cost, jnp.asarray(box_mask, bool))


def _solve_one(cost_qm: jax.Array, valid: jax.Array) -> jax.Array:
    """One image: cost_qm [Q, M] float, valid [M] bool -> int32 [M], the query of each target or -1.

    scipy solves a tall [Q, n] matrix (n real targets < Q) with the targets as rows, and a square one with
    the queries as rows; both orientations are kept so that even tied costs give scipy's assignment.
    """
    q, m = cost_qm.shape
    dtype = cost_qm.dtype if jnp.issubdtype(cost_qm.dtype, jnp.floating) else jnp.float32
    cost_qm = jnp.asarray(cost_qm, dtype)
    by_target = lambda: _lsap(cost_qm.T, valid)
    if m != q:
        return by_target()

    def by_query():  # every target real and M == Q: rows are the queries; invert the permutation.
        target_of_query = _lsap(cost_qm, jnp.ones((q,), bool))
        return jnp.zeros((m,), jnp.int32).at[target_of_query].set(jnp.arange(q, dtype=jnp.int32))

    return jax.lax.cond(jnp.all(valid), by_query, by_target)


def _lsap(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """Shortest augmenting path (Crouse 2016, as scipy's `linear_sum_assignment`) for R <= C.

    cost: [R, C] float; valid: [R] bool, rows to assign. Rows are added one at a time in order (invalid
    rows are skipped, which is exactly scipy on the matrix without them); each addition is a Dijkstra
    search over reduced costs for the cheapest path to a free column, then the duals are updated and the
    path flipped. One loop iteration is one Dijkstra step or one step along the augmenting path, so the
    loop is flat (a single `while_loop`, friendly to vmap). Scipy's scan order over the `remaining` columns
    and its tie rule are kept, so on ties the result is scipy's assignment too (exactly so when the
    arithmetic is exact, e.g. small integer costs; otherwise up to float32 rounding of the duals).

    Returns col4row: int32 [R], the column of each row, -1 for invalid rows.
    """
    m, q = cost.shape  # m rows (targets), q columns (queries)
    dtype = cost.dtype
    c = jnp.where(jnp.isfinite(cost), jnp.minimum(cost, _DEVICE_BAD_COST), _DEVICE_BAD_COST)
    # scipy shifts the matrix to be non-negative (over the solved entries only).
    c = c - jnp.min(jnp.where(valid[:, None], c, jnp.inf), initial=jnp.inf)
    c = jnp.where(valid[:, None], c, 0.0)
    inf = jnp.array(jnp.inf, dtype)
    rows = jnp.arange(m, dtype=jnp.int32)
    positions = jnp.arange(q, dtype=jnp.int32)
    remaining0 = (q - 1 - positions).astype(jnp.int32)  # scipy fills `remaining` in reverse

    def next_row(after):
        later = valid & (rows > after)
        return jnp.where(jnp.any(later), jnp.argmax(later), m).astype(jnp.int32)

    def fresh_search(row):
        return dict(i=row, min_val=jnp.zeros((), dtype), spc=jnp.full((q,), inf), sr=jnp.zeros((m,), bool),
                    sc=jnp.zeros((q,), bool), remaining=remaining0, num_rem=jnp.int32(q))

    first = next_row(jnp.int32(-1))
    state = dict(u=jnp.zeros((m,), dtype), v=jnp.zeros((q,), dtype), col4row=jnp.full((m,), -1, jnp.int32),
                 row4col=jnp.full((q,), -1, jnp.int32), path=jnp.full((q,), -1, jnp.int32), cur_row=first,
                 augmenting=jnp.bool_(False), j_aug=jnp.int32(0), steps=jnp.int32(0), **fresh_search(first))
    # Each row needs at most Q Dijkstra steps and M path steps: a hard bound that only a bug could reach.
    max_steps = m * (q + m) + 1

    def cond(s):
        return (s["cur_row"] < m) & (s["steps"] < max_steps)

    def body(s):
        searching = ~s["augmenting"]
        i, cur = s["i"], s["cur_row"]
        # ---- one Dijkstra step from row i (scipy's inner `for it < num_remaining` loop, vectorised).
        sr = s["sr"].at[i].set(True)
        r = s["min_val"] + c[i] - s["u"][i] - s["v"]  # same evaluation order as scipy
        improve = ~s["sc"] & (r < s["spc"])
        path = jnp.where(improve, i, s["path"])
        spc = jnp.where(improve, r, s["spc"])
        in_rem = positions < s["num_rem"]
        vals = jnp.where(in_rem, spc[s["remaining"]], inf)
        lowest = jnp.min(vals)
        is_min = in_rem & (vals == lowest)
        free_min = is_min & (s["row4col"][s["remaining"]] == -1)
        # scipy's sequential rule picks the last free minimum in scan order, else the first minimum.
        index = jnp.where(jnp.any(free_min), q - 1 - jnp.argmax(free_min[::-1]), jnp.argmax(is_min))
        j = s["remaining"][index]
        sc = s["sc"].at[j].set(True)
        remaining = s["remaining"].at[index].set(s["remaining"][s["num_rem"] - 1])
        sink = s["row4col"][j] == -1
        # Dual update when the path is complete (uses the assignment before the flip).
        du = lowest - spc[jnp.maximum(s["col4row"], 0)]
        u_new = jnp.where(sr & (rows != cur), s["u"] + du, s["u"]).at[cur].add(lowest)
        v_new = jnp.where(sc, s["v"] - (lowest - spc), s["v"])
        found = searching & sink
        # ---- one step of flipping the augmenting path (the first one in the same iteration as the sink).
        path_now = jnp.where(searching, path, s["path"])
        aug = found | s["augmenting"]
        j_aug = jnp.where(searching, j, s["j_aug"])
        i_aug = path_now[j_aug]
        row4col = jnp.where(aug, s["row4col"].at[j_aug].set(i_aug), s["row4col"])
        col4row = jnp.where(aug, s["col4row"].at[i_aug].set(j_aug), s["col4row"])
        row_done = aug & (i_aug == cur)
        new_cur = jnp.where(row_done, next_row(cur), cur)
        out = dict(
            u=jnp.where(found, u_new, s["u"]), v=jnp.where(found, v_new, s["v"]),
            col4row=col4row, row4col=row4col, path=path_now, cur_row=new_cur,
            augmenting=aug & ~row_done, j_aug=s["col4row"][i_aug], steps=s["steps"] + 1,
            i=jnp.where(searching & ~sink, s["row4col"][j], i),
            min_val=jnp.where(searching, lowest, s["min_val"]),
            spc=jnp.where(searching, spc, s["spc"]), sr=jnp.where(searching, sr, s["sr"]),
            sc=jnp.where(searching, sc, s["sc"]), remaining=jnp.where(searching, remaining, s["remaining"]),
            num_rem=jnp.where(searching, s["num_rem"] - 1, s["num_rem"]),
        )
        # A finished row starts the next row's search from scratch.
        restart = fresh_search(new_cur)
        return {k: (jnp.where(row_done, restart[k], v) if k in restart else v) for k, v in out.items()}

    final = jax.lax.while_loop(cond, body, state)
    return jnp.where(valid, final["col4row"], -1)
