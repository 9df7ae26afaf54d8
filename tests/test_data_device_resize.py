"""input.resize_on_device: the transforms' final resize on the accelerator equals the host (TF) resize
to one grey level, and batches resized on device equal the host pipeline's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from yolos_jax import data, train_step
from yolos_jax.data import device_resize, input_config
from yolos_jax.data import transforms as T

GREY = 1.0 / 255 / min(T.IMAGENET_STD)  # one grey level after normalisation


def host_reference(image_uint8: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The host path's resize of one image (TF, exactly as `transforms.tf_apply_geometry` does it)."""
    from yolos_jax.data.tf_setup import get_tf

    tf = get_tf()
    img = tf.cast(tf.constant(image_uint8), tf.float32) + 0.5
    return tf.cast(T._tf_resize(tf, img, tf.constant(size, tf.int32)), tf.uint8).numpy()


@pytest.mark.parametrize("src,dst", [
    ((100, 120), (160, 200)),   # upsampling (YOLOS-S scales)
    ((100, 120), (90, 100)),    # mild shrink: plain bilinear
    ((100, 120), (40, 50)),     # strong shrink: antialiased
    ((100, 120), (100, 120)),   # same size: the image itself
    ((64, 64), (16, 100)),      # shrink one axis, stretch the other (antialiased)
    ((37, 53), (61, 29)),       # odd sizes
])
def test_device_resize_equals_tf_resize(src, dst):
    rng = np.random.default_rng(hash(src + dst) % 2**32)
    h, w = src
    ramp = np.linspace(0, 180, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    img = np.clip(rng.integers(0, 256, (h, w, 3)) * 0.3 + ramp, 0, 255).astype(np.uint8)
    want = host_reference(img, dst).astype(np.float32)
    canvas_src, canvas_dst = (h + 11, w + 5), (dst[0] + 7, dst[1] + 3)  # padding on both sides of the resize
    source = np.zeros((1, *canvas_src, 3), np.uint8)
    source[0, :h, :w] = img
    got = np.asarray(device_resize.resize_batch(jnp.asarray(source), jnp.asarray([src]), jnp.asarray([dst]),
                                                canvas_dst))[0]
    diff = np.abs(got[: dst[0], : dst[1]] - want)
    assert diff.max() <= 1.0 and (diff > 0).mean() <= 0.005, (diff.max(), (diff > 0).mean())
    assert not got[dst[0]:].any() and not got[:, dst[1]:].any()  # zeros in the padding
    if src == dst:
        np.testing.assert_array_equal(got[:h, :w], img)


@pytest.fixture(scope="module")
def cfgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    host = input_config.synthetic_input_config(str(root), num_train=16, num_val=6, image_size=[(48, 64), (64, 48)],
                                               image_format="uint8")
    data.dataset_info(host)
    dev = host.copy_and_resolve_references()
    dev.resize_on_device = "on"
    return host, dev


def test_train_batches_resized_on_device_equal_host_batches(cfgs):
    host_cfg, dev_cfg = cfgs
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    host_it = data.make_train_iterator(host_cfg, seed=2, process_index=0, process_count=1)
    dev_it = data.make_train_iterator(dev_cfg, seed=2, process_index=0, process_count=1)
    for _ in range(3):
        a, b = next(host_it), next(dev_it)
        assert "image" not in b and b["source_image"].dtype == np.uint8
        assert b["source_image"].shape[1:3] == (64, 64)  # the split's largest image, rounded up to 32
        for k in ("pixel_mask", "boxes", "labels", "box_mask", "image_id", "size"):
            np.testing.assert_array_equal(a[k], b[k])
        ga = data.to_global_batch(train_step.select_train_batch(a), sharding)
        gb = data.to_global_batch(train_step.select_train_batch(b), sharding)
        assert set(ga) == set(gb) and gb["image"].sharding == sharding
        diff = np.abs(np.asarray(ga["image"]) - np.asarray(gb["image"]))
        assert diff.max() <= GREY * 1.001 and (diff > 1e-6).mean() < 0.01
        assert np.all(np.asarray(gb["image"])[~a["pixel_mask"]] == 0)
        # host-side consumers (figures, show_batch) get the same image back
        np.testing.assert_allclose(data.with_host_image(b)["image"].astype(np.float32), a["image"].astype(np.float32),
                                   atol=1.0)
    host_it.close()
    dev_it.close()


def test_eval_batches_resized_on_device(cfgs):
    host_cfg, dev_cfg = cfgs
    a_all = list(data.make_eval_iterator(host_cfg, batch_size=2, process_index=0, process_count=1))
    b_all = list(data.make_eval_iterator(dev_cfg, batch_size=2, process_index=0, process_count=1))
    assert len(a_all) == len(b_all)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for a, b in zip(a_all, b_all):
        img = np.asarray(data.to_global_batch(b, sharding)["image"])
        ref = np.where(a["pixel_mask"][..., None], T.normalize_np(a["image"]), 0)
        assert np.abs(img - ref).max() <= GREY * 1.001


def test_resize_on_device_config_errors(cfgs):
    _, dev_cfg = cfgs
    for field, value in (("large_scale_jitter", True), ("crop_in_original", False)):
        bad = dev_cfg.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match="resize_on_device"):
            data.make_train_iterator(bad, seed=0, process_index=0, process_count=1)
    bad = dev_cfg.copy_and_resolve_references()
    bad.resize_on_device = "yes"
    with pytest.raises(ValueError, match="'on', 'off' or 'auto'"):
        data.make_train_iterator(bad, seed=0, process_index=0, process_count=1)
    auto = dev_cfg.copy_and_resolve_references()
    auto.resize_on_device = "auto"  # CPU backend here: the host resizes
    assert input_config.resize_on_device(auto) is (jax.default_backend() != "cpu")
    auto.large_scale_jitter = True  # 'auto' steps aside where the transform needs the host resize
    assert input_config.resize_on_device(auto) is False
