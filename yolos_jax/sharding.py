"""Device mesh and shardings.

The mesh has two axes, ('data', 'fsdp'), over every device of every host:
  * the batch is split over both axes (FSDP is data parallel too), so every device sees B / n_devices images;
  * parameters and optimiser state are replicated, or — with `mesh.fsdp > 1` — each array is split along its
    largest dimension divisible by the fsdp size (ZeRO-3 style: XLA all-gathers them for the compute).

Jits over the mesh are built with `mesh_jit`, which traces and runs them with the mesh in context
(`jax.set_mesh`): code that cannot be partitioned by XLA (the splash attention kernel,
`yolos_jax/attention_tpu.py`) finds the mesh there and `shard_map`s itself over it. The mesh's axes are Auto,
so the context changes no sharding decision of XLA's (in/out shardings, `with_sharding_constraint`). Jits that
have no mesh of their own (one-process inference, visualisation, the speed protocol, evaluation without a mesh)
run under `single_device_mesh()`, a mesh of this process's first device alone; `on_single_device` brings their
arguments there (this process's replica of params replicated over a bigger mesh).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def default_mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            fsdp=1,  # devices over which parameters/optimiser state are split; 1 = pure data parallel
            min_fsdp_size=2**14,  # arrays with fewer elements stay replicated (not worth splitting)
        )
    )


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Any = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    n = devices.size
    fsdp = int(mesh_cfg.fsdp)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1 and divide the number of devices ({n})")
    return Mesh(devices.reshape(n // fsdp, fsdp), BATCH_AXES)


def single_device_mesh() -> Mesh:
    """A ('data', 'fsdp') = (1, 1) mesh of `jax.local_devices()[0]` (this process's first device; in one process
    `jax.devices()[0]`, where uncommitted arrays go), for `mesh_jit`s without a mesh of their own: the splash
    attention kernel then runs whole on that device, rather than taking the no-mesh fallback when several
    devices are visible. Arguments committed to another device do not fit it."""
    return make_mesh(default_mesh_config(), jax.local_devices()[:1])


def on_single_device(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` on the one device of `mesh` (a `single_device_mesh()`), for the jits run under it.

    Shapes and values are kept; every leaf comes back a jax.Array committed to that device, in the dtype jit would
    give it (numpy float64 becomes float32 unless x64 is on). Arrays on other devices of this process are copied
    (gathered when split). Arrays spanning other processes' devices (params that `evaluation.Evaluator.place`
    replicated over a multi-process mesh) contribute this process's own replica; such an array that is not
    replicated raises ValueError naming the leaf.
    """
    if mesh.devices.size != 1:
        raise ValueError(f"on_single_device needs a one-device mesh (single_device_mesh()), got {mesh.devices.size}")
    (device,) = mesh.devices.flat

    def one(path, x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)}: an array split over the devices of several processes cannot be "
                    "brought to one device here; pass host arrays or arrays replicated over the mesh"
                )
            x = x.addressable_data(0)  # this process's replica
        return jax.device_put(x, device)

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class MeshJit:
    """`jax.jit(fn, **jit_kwargs)` whose calls, `.trace`, `.lower` and `.eval_shape` run under
    `jax.set_mesh(mesh)` (tracing happens inside the first call, so the traced code sees the mesh through
    `jax.sharding.get_abstract_mesh()`). `.eval_shape()` is for shape-only traces of the model (no splash
    fallback warning). A `.lower(...).compile()`d executable runs without the context. Other attributes are the
    jitted function's. Call it from plain Python, not inside another jit/vmap/eval_shape trace (`jax.set_mesh`
    refuses to run there): it is an outermost jit."""

    def __init__(self, fn: Callable, mesh: Mesh, **jit_kwargs: Any):
        self.mesh = mesh
        self.jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):  # ~1 us per call (CPU)
            return self.jitted(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.trace(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args, **kwargs)

    def eval_shape(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.jitted.eval_shape(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only reached for names not defined above
        if name == "jitted":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.jitted, name)


def mesh_jit(fn: Callable, mesh: Mesh, **jit_kwargs: Any) -> MeshJit:
    """`jax.jit(fn, **jit_kwargs)` traced and run with `mesh` in context (`MeshJit`): every jit over the mesh
    that runs the model goes through here (the train step, the state init, `init_from`'s fresh init, evaluation's
    predict; on `single_device_mesh()`: the `Detector`'s forward, visualisation's and the speed protocol's)."""
    return MeshJit(fn, mesh, **jit_kwargs)


def place_host(tree: Any, shardings: Any) -> Any:
    """Host (numpy) tree -> global jax arrays laid out by `shardings` (one Sharding for every leaf, or a tree of
    them shaped like `tree`); each process supplies its addressable pieces, nothing goes through one device."""

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """Split the largest dimension divisible by `fsdp_size`; replicate small or indivisible arrays."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, mesh_cfg: ml_collections.ConfigDict) -> Any:
    """NamedShardings for a pytree of ShapeDtypeStructs (params, optimiser state, scalars)."""
    fsdp = mesh.shape[FSDP_AXIS]

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp, int(mesh_cfg.min_fsdp_size)))

    return jax.tree.map(one, abstract_state)

