"""Host -> device: this process's host batches (the schema in `assembly`) become global jax.Arrays, with the
last image work done on the accelerator (uint8 normalisation, input.resize_on_device's resize)."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from yolos_jax.data import device_resize
from yolos_jax.data import transforms as T


@functools.lru_cache(maxsize=16)
def _device_normalizer(sharding):
    """jit(uint8 image [B, H, W, 3], pixel_mask [B, H, W]) -> the schema's float32 image, laid out by `sharding`."""
    mean = np.asarray(T.IMAGENET_MEAN, np.float32)
    std = np.asarray(T.IMAGENET_STD, np.float32)

    def norm(image, mask):
        x = (image.astype(jnp.float32) / 255.0 - mean) / std
        return jnp.where(mask[..., None], x, 0.0)

    return jax.jit(norm, out_shardings=sharding)


def to_global_batch(host_batch: Mapping[str, np.ndarray], sharding: Any) -> dict[str, Any]:
    """This process's host batch -> global jax.Arrays (jax.make_array_from_process_local_data).

    sharding: one jax.sharding.Sharding for every entry (e.g. NamedSharding(mesh, P('data')): batch
    axis split over the data axis) or a {key: Sharding} mapping. A uint8 image (input.image_format=
    'uint8') is normalised on device into the schema's float32 (zeros in the padding); an
    input.resize_on_device batch (`source_image`, `source_size`) is resized and normalised on device into
    that same `image` (`data.device_resize`; the source entries are consumed). int64 entries
    become int32 unless jax_enable_x64 (image ids must then fit in int32).
    """

    def shard(k):
        if not isinstance(sharding, Mapping):
            return sharding
        return sharding[k] if k in sharding else sharding["image"]  # source_* / size: laid out as the image

    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        if v.dtype == np.int64 and not jax.config.jax_enable_x64:
            if v.size and (v.max() > np.iinfo(np.int32).max or v.min() < np.iinfo(np.int32).min):
                raise ValueError(f"batch['{k}'] has values beyond int32; enable jax_enable_x64 to keep them")
            v = v.astype(np.int32)
        out[k] = jax.make_array_from_process_local_data(shard(k), v)
    if "image" in out and out["image"].dtype == np.uint8:
        out["image"] = _device_normalizer(shard("image"))(out["image"], out["pixel_mask"])
    if "source_image" in out:  # input.resize_on_device: the transforms' final resize happens here
        resize = device_resize.device_resize_normalize(shard("image"))
        out["image"] = resize(out.pop("source_image"), out.pop("source_size"), out["pixel_mask"])
    return out


def with_host_image(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A host batch with an `image` entry (uint8 when it is resized here), for host-side consumers
    (figures, show_batch): input.resize_on_device batches are resampled on the default device (the
    same function `to_global_batch` runs) and lose their `source_*` entries; other batches pass as they are."""
    if "source_image" not in batch:
        return dict(batch)
    out = {k: v for k, v in batch.items() if k not in ("source_image", "source_size")}
    mask = np.asarray(batch["pixel_mask"])
    img = device_resize.resize_batch(jnp.asarray(batch["source_image"]), jnp.asarray(batch["source_size"]),
                                     jnp.asarray(batch["size"]), mask.shape[1:3])
    out["image"] = np.asarray(img).astype(np.uint8)
    return out

