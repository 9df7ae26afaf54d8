"""Mesh and shardings: host trees placed on the mesh (`place_host`) hold exactly the host values, laid out as asked."""

import jax
import numpy as np
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
