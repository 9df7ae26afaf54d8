"""The train state and the sharded train step (device work only).

State (a plain pytree, donated to every step):
  {'step': int32 [], 'params': Flax params, 'opt_state': optax state, 'rng': uint32 [2] base PRNG key}
The step's randomness is `fold_in(rng, step)`, so a resumed run draws the same numbers as an
uninterrupted one without carrying a mutable key.

The step is one `jax.jit` over the mesh: the batch is split over every device (`BATCH_AXES`), the state is
replicated or FSDP-sharded, the Hungarian matching runs as a per-device-shard host callback inside the loss
(see matcher.py), and metrics stay on device until the host asks for them.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from yolos_jax import losses, sharding

# Batch keys the train step reads (schema in yolos_jax/data); OPTIONAL ones are passed on when present.
TRAIN_BATCH_KEYS = ("image", "pixel_mask", "boxes", "labels", "box_mask")
# `valid`: train batches have no fillers (their partial batches are completed with real repeats,
# `data.batching`), so it is all True there; passed so that the loss would leave a filler out if one came.
OPTIONAL_TRAIN_BATCH_KEYS = ("valid",)


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, image_hw: tuple[int, int]) -> dict:
    """Fresh state. Call through `jax.jit(..., out_shardings=...)` (or `jax.eval_shape`) — never eagerly
    on one device for large models."""
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, *image_hw, 3), jnp.float32)
    params = model.init(init_rng, dummy)["params"]
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": state_rng,
    }


def abstract_state_and_shardings(
    model: nn.Module,
    tx: optax.GradientTransformation,
    seed: int,
    image_hw: tuple[int, int],
    mesh: Mesh,
    mesh_cfg: ml_collections.ConfigDict,
) -> tuple[Any, Any]:
    """(ShapeDtypeStruct tree with shardings attached, NamedSharding tree) of the train state."""
    abstract = jax.eval_shape(lambda: init_state(model, tx, seed, image_hw))
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
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Builds the jitted `train_step(state, batch) -> (new_state, metrics)`.

    A non-finite loss or gradient never reaches the parameters: the update is dropped on device
    (`metrics['finite'] = 0`), whatever `nonfinite_policy` says; the host loop then either stops with a
    message ('stop') or carries on ('skip').
    """
    if nonfinite_policy not in ("stop", "skip"):
        raise ValueError(f"config.train.nonfinite_policy must be 'stop' or 'skip', got {nonfinite_policy!r}")

    def step_fn(state: dict, batch: dict) -> tuple[dict, dict]:
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        targets = {k: batch[k] for k in ("labels", "boxes", "box_mask", *OPTIONAL_TRAIN_BATCH_KEYS) if k in batch}

        def loss_fn(params):
            outputs = model.apply(
                {"params": params},
                batch["image"],
                batch["pixel_mask"],
                train=True,
                rngs={"dropout": rng, "drop_path": rng, "tokens": rng},
            )
            loss, terms = losses.set_loss(
                outputs, targets, loss_cfg, matcher_cfg, mesh=mesh, batch_axes=sharding.BATCH_AXES
            )
            return loss, terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
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
        metrics = {
            "loss": loss,
            **terms,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(step), jnp.float32),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(
        step_fn,
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
