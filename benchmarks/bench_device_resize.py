"""The device side of `input.resize_on_device`: resize + normalise on the accelerator vs JPEG decoding on the host.

    python benchmarks/bench_device_resize.py [--batch=8] [--rounds=20] [--images=32]

Needs no TensorFlow (so it runs on a GPU machine that only has jax/flax): the host batches are built
directly in the BATCH SCHEMA's resize_on_device form (`source_image` uint8 [B, 480, 640, 3] + `source_size`
+ `pixel_mask` of the planned S-scale sizes), as `data.make_train_iterator` hands them over for 640x480
JPEGs at S scales (480..800 / max 1333, sides floored to 16; canvases rounded up to multiples of 64).
Measured in one run:
  decode       PIL decoding of the same synthetic 640x480 JPEGs (quality 90), one host thread: the reference
               that issue 3's goal is stated against (tf.io.decode_jpeg is ~10% faster; both libjpeg-turbo)
  to_device    `data.to_global_batch`: host -> device transfer + resize + normalisation of a batch, timed to
               block_until_ready, each batch shape compiled first (untimed). The sources are whole 640x480
               images (the no-crop branch; crop windows are smaller, so this is the dearer case).
Reported: ms per image of each, and to_device / decode. On a GPU/TPU the device time runs beside the host
pipeline (the host only enqueues), so the accelerator's share of the whole pipeline is this ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_jpegs(n: int) -> list[bytes]:
    """`n` synthetic 640x480 JPEGs (the generator's scenes), encoded."""
    from PIL import Image

    from yolos_jax.data import synthetic

    out = []
    for i in range(n):
        img, _ = synthetic.render_image(np.random.default_rng(i), 480, 640, 4, 8, texture_noise=24.0)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode_ms(jpegs: list[bytes], repeats: int = 3) -> float:
    """PIL decoding to RGB, ms per image (the best of `repeats` passes)."""
    from PIL import Image

    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for b in jpegs:
            np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        best = min(best, (time.perf_counter() - t) / len(jpegs))
    return 1000 * best


def make_host_batches(jpegs: list[bytes], batch: int, count: int, seed: int = 0) -> list[dict]:
    """resize_on_device host batches for 640x480 sources at S scales (each batch one canvas)."""
    from PIL import Image

    from yolos_jax.data import input_config, transforms as T

    cfg = input_config.default_input_config("s")
    tcfg = input_config.train_transform_config(cfg)
    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs]
    batches = []
    for _ in range(count):
        idx = rng.integers(len(sources), size=batch)
        geom = T.sample_train_geometry(rng, np.full(batch, 480), np.full(batch, 640), tcfg)
        sizes = T.output_hw(geom)
        canvas = tuple(int(-(-int(v) // 64) * 64) for v in sizes.max(0))  # a coarse canvas set, as the plans
        mask = np.zeros((batch, *canvas), bool)
        for j, (h, w) in enumerate(sizes):
            mask[j, :h, :w] = True
        batches.append({
            "source_image": np.stack([sources[i] for i in idx]),
            "source_size": np.tile(np.asarray([480, 640], np.int32), (batch, 1)),
            "pixel_mask": mask,
        })
    return batches


def time_to_global_batch(host_batches: list[dict]) -> tuple[int, list[float], float, int]:
    """`data.to_global_batch` of resize_on_device host batches (keys as `train_step.select_train_batch`
    gives them), each distinct shape compiled (and run) once first, untimed; then each batch timed to
    block_until_ready. Returns (images, wall s of each batch, CPU s in all, distinct shapes)."""
    import jax

    from yolos_jax import data, sharding

    # The runs' mesh (run_config uses the default mesh config), built without run_config, whose imports reach
    # pycocotools, which the GPU machines lack.
    spec = sharding.batch_sharding(sharding.make_mesh(sharding.default_mesh_config()))
    shapes = set()
    for b in host_batches:
        key = (b["source_image"].shape, b["pixel_mask"].shape)
        if key not in shapes:
            shapes.add(key)
            jax.block_until_ready(data.to_global_batch(b, spec)["image"])
    walls, count, c0 = [], 0, time.process_time()
    for b in host_batches:
        t = time.perf_counter()
        jax.block_until_ready(data.to_global_batch(b, spec)["image"])
        walls.append(time.perf_counter() - t)
        count += b["pixel_mask"].shape[0]
    return count, walls, time.process_time() - c0, len(shapes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20, help="timed batches")
    p.add_argument("--images", type=int, default=32, help="distinct JPEGs")
    p.add_argument("--json_out", default="")
    a = p.parse_args(argv)

    import jax

    from yolos_jax import atomic

    jpegs = make_jpegs(a.images)
    decode = decode_ms(jpegs)
    _, times, _, n_shapes = time_to_global_batch(make_host_batches(jpegs, a.batch, a.rounds))
    per_image = 1000 * float(np.median(times)) / a.batch
    out = {
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "batch": a.batch, "distinct_shapes": n_shapes, "decode_ms_per_image": decode,
        "to_device_ms_per_image": per_image, "to_device_vs_decode": per_image / decode,
        "host_cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=1))
    print(f"\n| backend | decode ms / image (PIL, 1 thread) | to_global_batch ms / image | ratio |\n|---|---|---|---|\n"
          f"| {out['backend']} ({out['device']}) | {decode:.2f} | {per_image:.2f} | {per_image / decode:.2f}x |")
    if a.json_out:
        atomic.write_json_atomic(a.json_out, out, indent=1)


if __name__ == "__main__":
    main()
