"""Input-pipeline throughput: the full train pipeline vs JPEG decoding alone, in the same run.

    python benchmarks/bench_input.py [--num_images=256] [--batches=24] [--threads=2] [--workdir=/tmp/yolos_bench_input]

Data: `num_images` synthetic 640x480 JPEGs (quality 90, textured), prepared once under --workdir.
Measured, each twice in alternation (best kept, the machine being shared):
  decode       read the prepared records + tf.io.decode_jpeg, images delivered to numpy, same tf.data
               parallelism: the floor any pipeline pays
  train f32    make_train_iterator at S scales (480..800, max 1333, crop branch, flip), host float32
               normalised padded batches (the default schema)
  train uint8  the same with input.image_format='uint8' (normalisation moves to the device)
Reported: images/s (wall) and CPU-ms per image (process CPU time, all threads): the ratio of CPU
times is the "cost relative to decoding alone" and is robust to other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def _decode_only(ds, threads: int, n_images: int):
    from yolos_jax.data.tf_setup import get_tf

    tf = get_tf()
    src = ds.source_for("train")
    n = len(src)

    def gen():
        for k in range(n_images):
            yield src[k % n]["image"]

    d = tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec([], tf.string))
    d = d.map(lambda b: tf.io.decode_jpeg(b, channels=3), num_parallel_calls=threads, deterministic=True)
    d = d.prefetch(16)
    opts = tf.data.Options()
    opts.threading.private_threadpool_size = threads + 1
    opts.threading.max_intra_op_parallelism = 1
    d = d.with_options(opts)
    it = d.as_numpy_iterator()
    for _ in range(8):  # warm-up
        next(it)
    w0, c0 = time.perf_counter(), time.process_time()
    count = 0
    for img in it:
        assert img.shape == (480, 640, 3)
        count += 1
    return count, time.perf_counter() - w0, time.process_time() - c0


def _train(cfg, batches: int):
    from yolos_jax import data

    it = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
    for _ in range(3):  # warm-up: the first batches pay tf.data start-up
        next(it)
    w0, c0 = time.perf_counter(), time.process_time()
    count = 0
    for _ in range(batches):
        count += next(it)["image"].shape[0]
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    stats = it.epoch_stats(0)
    it.close()
    return count, wall, cpu, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="tf.data map parallelism (cores to use)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/yolos_bench_input")
    p.add_argument("--json_out", default="")
    a = p.parse_args(argv)

    from yolos_jax.data import pipeline, synthetic

    src = os.path.join(a.workdir, f"jpeg640x480_{a.num_images}")
    if not os.path.isdir(src):
        synthetic.generate(src, a.num_images, 0, seed=0, image_size=(480, 640), max_objects=8)
    cfg = pipeline.default_input_config("s")
    cfg.data_dir = os.path.join(a.workdir, "tfds")
    cfg.dataset_name = f"bench640x480_{a.num_images}"
    cfg.source_dir = src
    cfg.auto_prepare = True
    cfg.train_split, cfg.val_split = "train", "val"
    cfg.batch_size = a.batch_size
    cfg.num_parallel_calls = a.threads
    ds = pipeline.open_dataset(cfg)
    sizes = [os.path.getsize(os.path.join(src, "train", f)) for f in os.listdir(os.path.join(src, "train"))]
    n_dec = a.batches * a.batch_size

    results: dict[str, list] = {"decode": [], "train_f32": [], "train_uint8": []}
    padding = None
    for _ in range(a.repeats):
        n, wall, cpu = _decode_only(ds, a.threads, n_dec + 8)
        results["decode"].append((n, wall, cpu))
        for name, fmt in (("train_f32", "float32"), ("train_uint8", "uint8")):
            c = cfg.copy_and_resolve_references()
            c.image_format = fmt
            n, wall, cpu, padding = _train(c, a.batches)
            results[name].append((n, wall, cpu))

    def best(rows):
        n, wall, cpu = min(rows, key=lambda r: r[2] / r[0])  # least CPU per image
        return {"images": n, "images_per_s": n / wall, "cpu_ms_per_image": 1000 * cpu / n,
                "best_wall_images_per_s": max(r[0] / r[1] for r in rows)}

    summary = {k: best(v) for k, v in results.items()}
    dec = summary["decode"]["cpu_ms_per_image"]
    for k in ("train_f32", "train_uint8"):
        summary[k]["cpu_cost_vs_decode"] = summary[k]["cpu_ms_per_image"] / dec
    load = os.getloadavg()
    summary["setup"] = {
        "cpus": os.cpu_count(), "threads": a.threads, "batch_size": a.batch_size, "jpeg_kb_mean": float(np.mean(sizes)) / 1e3,
        "load_avg_1m": load[0], "python": sys.version.split()[0], "machine": platform.machine(),
        "epoch_padding": padding,
    }
    print(json.dumps(summary, indent=1))
    print("\n| pipeline | images/s (wall, best) | CPU ms / image | CPU cost vs decode |")
    print("|---|---|---|---|")
    for k in ("decode", "train_f32", "train_uint8"):
        s = summary[k]
        print(f"| {k} | {s['best_wall_images_per_s']:.0f} | {s['cpu_ms_per_image']:.2f} | "
              f"{s.get('cpu_cost_vs_decode', 1.0):.2f}x |")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
