"""Mesh and shardings: host trees placed on the mesh (`place_host`) hold exactly the host values, laid out as asked;
`mesh_jit` traces under the mesh and changes nothing else."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from yolos_jax import sharding


def test_place_host_with_one_sharding_or_a_tree_of_them():
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    assert mesh.devices.size == 8
    tree = {"w": np.arange(32, dtype=np.float32).reshape(8, 4), "b": {"x": np.arange(3, dtype=np.int32)}}
    rep = sharding.place_host(tree, sharding.replicated(mesh))
    for got, want in zip(jax.tree.leaves(rep), jax.tree.leaves(tree)):
        assert got.sharding == sharding.replicated(mesh) and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)
    split = {"w": sharding.batch_sharding(mesh), "b": {"x": NamedSharding(mesh, P())}}
    placed = sharding.place_host(tree, split)
    assert placed["w"].sharding == split["w"] and len(placed["w"].addressable_shards) == 8
    assert placed["w"].addressable_shards[1].data.shape == (1, 4)
    np.testing.assert_array_equal(np.asarray(placed["w"]), tree["w"])
    np.testing.assert_array_equal(np.asarray(placed["b"]["x"]), tree["b"]["x"])


def test_mesh_jit_traces_under_the_mesh_and_changes_no_sharding():
    """`mesh_jit`: the traced code sees the mesh (calls, `.lower`, `.eval_shape`), while the results and their
    shardings (in/out shardings, `with_sharding_constraint`) are the plain `jax.jit`'s; the compiled executable
    runs outside the context."""
    cfg = sharding.default_mesh_config()
    cfg.fsdp = 2
    mesh = sharding.make_mesh(cfg)
    seen = []

    def f(w, x):
        seen.append(jax.sharding.get_abstract_mesh().shape_tuple)
        y = jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
        return {"w": w + 1, "y": y.sum(1) @ w}

    w_sharding = NamedSharding(mesh, P(None, sharding.FSDP_AXIS))
    kwargs = dict(in_shardings=(w_sharding, sharding.batch_sharding(mesh)),
                  out_shardings={"w": w_sharding, "y": sharding.replicated(mesh)})
    w = jax.device_put(np.arange(16, dtype=np.float32).reshape(4, 4), w_sharding)
    x = jax.device_put(np.arange(96, dtype=np.float32).reshape(8, 3, 4), sharding.batch_sharding(mesh))
    plain = jax.jit(f, **kwargs)(w, x)
    assert seen == [()]
    in_mesh = sharding.mesh_jit(f, mesh, **kwargs)
    got = in_mesh(w, x)
    assert seen[-1] == (("data", 4), ("fsdp", 2))
    for k in plain:
        assert got[k].sharding == plain[k].sharding, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(plain[k]))
    in_mesh(w, x)
    assert len(seen) == 2 and in_mesh.__wrapped__ is f  # traced once; other attributes are the jitted function's
    # New functions (jax caches traces per function and context): `.lower` and `.eval_shape` trace under the mesh.
    compiled = sharding.mesh_jit(lambda w, x: f(w, x), mesh, **kwargs).lower(w, x).compile()
    assert len(seen) == 3 and seen[-1] == seen[1]
    np.testing.assert_array_equal(np.asarray(compiled(w, x)["y"]), np.asarray(plain["y"]))
    assert sharding.mesh_jit(lambda w, x: f(w, x), mesh).eval_shape(w, x)["y"].shape == (8, 4)
    assert len(seen) == 4 and seen[-1] == seen[1]


def test_single_device_mesh_is_the_first_device_alone():
    """The mesh of jits without one of their own (inference, visualisation, the speed protocol): ('data', 'fsdp')
    = (1, 1) over this process's first device: in one process `jax.devices()[0]`, where `jax.device_put` and
    uncommitted arrays go."""
    mesh = sharding.single_device_mesh()
    assert mesh.axis_names == sharding.BATCH_AXES and mesh.devices.shape == (1, 1)
    assert mesh.devices.flat[0] == jax.devices()[0] == jax.device_put(np.zeros(1)).devices().pop()


def test_on_single_device_brings_replicated_sharded_and_host_arrays_to_the_device():
    """Params replicated over the whole mesh (as `Evaluator.place` leaves them), split over it, or on the host all
    land, unchanged, on the one device of `single_device_mesh()`: what its jits (speed protocol, attention
    figures) need, where arguments committed to other devices do not fit."""
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    one = sharding.single_device_mesh()
    host = {"w": np.arange(32, dtype=np.float32).reshape(8, 4), "n": np.arange(3, dtype=np.int32)}
    trees = {
        "replicated": sharding.place_host(host, sharding.replicated(mesh)),
        "split": sharding.place_host(host, {"w": sharding.batch_sharding(mesh), "n": sharding.replicated(mesh)}),
        "host": host,
    }
    (device,) = one.devices.flat
    for name, tree in trees.items():
        moved = sharding.on_single_device(tree, one)
        for got, want in zip(jax.tree.leaves(moved), jax.tree.leaves(host)):
            assert got.devices() == {device} and got.dtype == want.dtype, name
            np.testing.assert_array_equal(np.asarray(got), want)
    f = sharding.mesh_jit(lambda t: t["w"].sum() + t["n"].sum(), one)
    assert float(f(sharding.on_single_device(trees["replicated"], one))) == float(host["w"].sum() + 3)
    with pytest.raises(ValueError, match="one-device mesh"):
        sharding.on_single_device(host, mesh)
