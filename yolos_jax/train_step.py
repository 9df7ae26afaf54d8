"""The train state and the sharded train step (device work only).

State (a plain pytree, donated to every step):
  {'step': int32 [], 'params': Flax params, 'opt_state': optax state, 'rng': uint32 [2] base PRNG key,
   'ema_params': Flax params (only with optim.ema_decay > 0: their exponential moving average, `optim.ema_update`)}
The step's randomness is `fold_in(rng, step)`, so a resumed run draws the same numbers as an
uninterrupted one without carrying a mutable key.

The step is one `jax.jit` over the mesh, traced and run with the mesh in context (`sharding.mesh_jit`, so that
the splash attention kernel runs per device): the batch is split over every device (`BATCH_AXES`), the state is
replicated or FSDP-sharded, the Hungarian matching runs as a per-device-shard host callback inside the loss
(see matcher.py), and metrics stay on device until the host asks for them.

Gradient accumulation (train.grad_accum_steps = k) cuts the global batch into k micro-batches, each spread over
every device as the whole batch is, and scans over them: memory follows the micro-batch, and one optimiser
update follows the k gradients' sum. Each micro-batch's loss is normalised by the whole batch's denominators
(`losses.global_normalizers`), so the sum is the whole batch's loss and gradient (matching is per image anyway).
Random draws (drop path, dropout, MIMDet's kept patches) use one key per micro-batch, so with those on an
accumulated step is the whole-batch step in distribution, not draw for draw.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from yolos_jax import losses, optim, sharding

# Batch keys the train step reads (schema in yolos_jax/data); OPTIONAL ones are passed on when present.
TRAIN_BATCH_KEYS = ("image", "pixel_mask", "boxes", "labels", "box_mask")
# `valid`: train batches have no fillers (their partial batches are completed with real repeats,
# `data.batching`), so it is all True there; passed so that the loss would leave a filler out if one came.
OPTIONAL_TRAIN_BATCH_KEYS = ("valid",)


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, image_hw: tuple[int, int],
               ema: bool = False) -> dict:
    """Fresh state (with 'ema_params', a copy of the parameters, when `ema`). Call through
    `sharding.mesh_jit(..., out_shardings=...)` (or `jax.eval_shape`) — never eagerly on one device for large
    models."""
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *image_hw, 3), jnp.float32)
    params = model.init(init_rng, dummy)["params"]
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": state_rng,
    }
    if ema:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
    return state


def abstract_state_and_shardings(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    image_hw: tuple[int, int],
    mesh: Mesh,
    mesh_cfg: ml_collections.ConfigDict,
    ema: bool = False,
) -> tuple[Any, Any]:
    """(ShapeDtypeStruct tree with shardings attached, NamedSharding tree) of the train state."""
    # Traced under the mesh as the step is, or splash attention's no-mesh fallback would warn here.
    abstract = sharding.mesh_jit(lambda: init_state(model, tx, seed, image_hw, ema), mesh).eval_shape()
    shardings = sharding.state_shardings(abstract, mesh, mesh_cfg)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_cfg: ml_collections.ConfigDict,
    matcher_cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    state_shardings: Any,
    nonfinite_policy: str = "stop",
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Builds the jitted `train_step(state, batch) -> (new_state, metrics)`.

    A non-finite loss or gradient never reaches the parameters: the update is dropped on device
    (`metrics['finite'] = 0`), whatever `nonfinite_policy` says; the host loop then either stops with a
    message ('stop') or carries on ('skip').
    grad_accum_steps: k micro-batches per update (see the module docstring); the batch's per-device rows must
      be a multiple of k. ema_decay: > 0 updates state['ema_params'] after each applied update.
    Metrics: the loss terms are the whole batch's (with k > 1 the micro-batches' sum, equal to it); matched_iou
    and cardinality_error are the micro-batches' mean.
    """
    if nonfinite_policy not in ("stop", "skip"):
        raise ValueError(f"config.train.nonfinite_policy must be 'stop' or 'skip', got {nonfinite_policy!r}")
    k = int(grad_accum_steps)
    if k < 1:
        raise ValueError(f"config.train.grad_accum_steps: must be >= 1, got {grad_accum_steps}")

    def loss_and_grads(params, batch, rng, normalizers):
        targets = {k_: batch[k_] for k_ in ("labels", "boxes", "box_mask", *OPTIONAL_TRAIN_BATCH_KEYS) if k_ in batch}

        def loss_fn(p):
            outputs = model.apply(
                {"params": p},
                batch["image"],
                batch["pixel_mask"],
                train=True,
                rngs={"dropout": rng, "drop_path": rng, "tokens": rng},
            )
            return losses.set_loss(outputs, targets, loss_cfg, matcher_cfg, mesh=mesh,
                                   batch_axes=sharding.BATCH_AXES, normalizers=normalizers)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def accumulated(params, batch, rng):
        b = batch["image"].shape[0]
        per_device = b // mesh.size  # the batch is split over every device (BATCH_AXES)
        if b % k or per_device % k:
            raise ValueError(f"config.train.grad_accum_steps={k} must divide each device's share of the batch "
                             f"({b} images over {mesh.size} devices: {per_device} each)")
        normalizers = losses.global_normalizers(
            {k_: batch[k_] for k_ in ("box_mask", "valid") if k_ in batch}, model.num_det_tokens,
            float(loss_cfg["eos_coef"]))
        # [B] -> [k, B/k]: micro-batch j takes rows j, j+k, ... so that each device keeps 1/k of its own rows
        # (its contiguous block of the batch splits evenly): no data moves between devices.
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1), batch)
        micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))), micro)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, terms_shape), grads_shape = jax.eval_shape(lambda: loss_and_grads(params, first, rng, normalizers))
        zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)  # noqa: E731

        # The running sum is sharded as the parameters are (FSDP: each device holds its slice, not a full copy).
        like_params = lambda tree: jax.lax.with_sharding_constraint(tree, state_shardings["params"])  # noqa: E731

        def body(carry, xs):
            grad_sum, loss_sum, term_sum = carry
            mb, j = xs
            (loss, terms), grads = loss_and_grads(params, mb, jax.random.fold_in(rng, j), normalizers)
            grad_sum = like_params(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads))
            term_sum = jax.tree.map(lambda a, t: a + t.astype(jnp.float32), term_sum, terms)
            return (grad_sum, loss_sum + loss, term_sum), None

        (grad_sum, loss, term_sum), _ = jax.lax.scan(
            body, (like_params(zeros(grads_shape)), jnp.zeros((), jnp.float32), zeros(terms_shape)),
            (micro, jnp.arange(k)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grad_sum, params)
        # Loss terms are shares of the whole batch's (summed); the logged ratios are averaged over micro-batches.
        terms = {name: v if name.startswith("loss") else v / k for name, v in term_sum.items()}
        terms["num_boxes"] = normalizers["num_boxes"]
        return (loss, terms), grads

    def step_fn(state: dict, batch: dict) -> tuple[dict, dict]:
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        if k == 1:
            (loss, terms), grads = loss_and_grads(state["params"], batch, rng, None)
        else:
            (loss, terms), grads = accumulated(state["params"], batch, rng)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {
            "step": step + 1,
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt_state, state["opt_state"]),
            "rng": state["rng"],
        }
        if "ema_params" in state:
            new_state["ema_params"] = keep(optim.ema_update(state["ema_params"], new_params, step + 1, ema_decay),
                                           state["ema_params"])
        metrics = {
            "loss": loss,
            **terms,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(step), jnp.float32),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    batch_sharding = sharding.batch_sharding(mesh)
    # With the mesh in context, so that the splash attention kernel runs per device (`sharding.mesh_jit`).
    return sharding.mesh_jit(
        step_fn,
        mesh,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def select_train_batch(batch: dict) -> dict:
    """The subset of a host batch the train step consumes (the rest stays on the host)."""
    keys = TRAIN_BATCH_KEYS
    if "source_image" in batch:  # input.resize_on_device: `data.to_global_batch` makes the image
        keys = ("source_image", "source_size") + keys[1:]
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"train batch lacks {missing}; see the batch schema in yolos_jax/data")
    keys = keys + tuple(k for k in OPTIONAL_TRAIN_BATCH_KEYS if k in batch)
    return {k: np.asarray(batch[k]) for k in keys}
