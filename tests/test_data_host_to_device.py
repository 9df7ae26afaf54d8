"""Host -> device: uint8 host batches are normalised on device into the schema's float32; float32 batches
pass unchanged; int64 entries become int32."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from test_data_iterators import cfg, take  # noqa: F401 - cfg: the shared prepared synthetic dataset (fixture)
from yolos_jax import data
from yolos_jax.data import transforms as T


def test_uint8_batches_normalised_on_device(cfg):
    fmt = cfg.copy_and_resolve_references()
    fmt.image_format = "uint8"
    f32 = take(data.make_train_iterator(cfg, seed=2, process_index=0, process_count=1), 2)
    u8 = take(data.make_train_iterator(fmt, seed=2, process_index=0, process_count=1), 2)
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    for a, b in zip(f32, u8):
        assert b["image"].dtype == np.uint8
        g = data.to_global_batch(b, sharding)
        assert set(g) == set(b) and g["image"].dtype == np.float32 and g["image"].shape == b["image"].shape
        assert g["image"].sharding == sharding and g["image_id"].dtype == np.int32
        dev = np.asarray(g["image"])
        np.testing.assert_allclose(dev, np.where(b["pixel_mask"][..., None], T.normalize_np(b["image"]), 0), atol=1e-5)
        np.testing.assert_allclose(dev, a["image"], atol=0.5 / 255 / min(T.IMAGENET_STD) + 1e-5)
        np.testing.assert_array_equal(np.asarray(g["boxes"]), a["boxes"])
        g32 = data.to_global_batch(a, sharding)
        np.testing.assert_array_equal(np.asarray(g32["image"]), a["image"])

