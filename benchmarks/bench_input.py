"""Input-pipeline throughput: the full train pipeline vs JPEG decoding alone, in the same run.

    python benchmarks/bench_input.py [--num_images=256] [--batches=24] [--threads=2] [--workdir=/tmp/yolos_bench_input]

Data: `num_images` synthetic 640x480 JPEGs (quality 90, textured), prepared once under --workdir, for
each --texture_noise: 6 (the synthetic default, ~85 KB files) and 24 (~160 KB, the average size of a
COCO 2017 train JPEG, so that decoding costs about what real photos cost).
Measured, each twice in alternation (best kept, the machine being shared):
  decode       read the prepared records + tf.io.decode_jpeg, images delivered to numpy, same tf.data
               parallelism: the reference
  decode_resize  the same + one TF bilinear resize to the train output sizes (S scales) and rounding to
               uint8: the floor of any TF pipeline producing those sizes
  train f32    make_train_iterator at S scales (480..800, max 1333, crop branch, flip), host float32
               normalised padded batches (the default schema)
  train uint8  the same with input.image_format='uint8' (normalisation moves to the device)
  train device_resize  the same with input.resize_on_device='on': the host decodes, crops, flips and
               pads; the final resize (and the normalisation) run on the accelerator in
               `data.to_global_batch`, measured separately:
  device_resize  `data.to_global_batch` of `--device_batches` of those host batches (transfer, resize,
               normalisation) on the JAX backend, each distinct batch shape compiled first (untimed):
               wall ms per image (= device time on a GPU/TPU; the host is idle meanwhile) and CPU ms
               per image. On a CPU backend the same cores pay it, so the whole pipeline there costs
               train device_resize + device_resize (the `whole_resize_on_cpu` row).
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


def _plan_sizes(cfg, n: int) -> np.ndarray:
    """Output sizes [n, 2] of the S-scale train transform for 640x480 images (the resize any pipeline
    must do, whatever else it does)."""
    from yolos_jax.data import input_config, transforms as T

    tcfg = input_config.train_transform_config(cfg)
    g = T.sample_train_geometry(np.random.default_rng(0), np.full(n, 480), np.full(n, 640), tcfg)
    return T.output_hw(g)


def _decode_only(ds, threads: int, n_images: int, resize_to=None):
    """Records -> decode_jpeg (-> bilinear resize to `resize_to` sizes) -> numpy uint8."""
    from yolos_jax.data.tf_setup import get_tf

    tf = get_tf()
    src = ds.source_for("train")
    n = len(src)
    sizes = np.zeros((n_images, 2), np.int32) if resize_to is None else np.asarray(resize_to, np.int32)

    def gen():
        for k in range(n_images):
            yield src[k % n]["image"], sizes[k]

    def fn(b, hw):
        img = tf.io.decode_jpeg(b, channels=3)
        if resize_to is None:
            return img
        return tf.cast(tf.image.resize(tf.cast(img, tf.float32) + 0.5, hw), tf.uint8)

    d = tf.data.Dataset.from_generator(gen, output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int32)))
    d = d.map(fn, num_parallel_calls=threads, deterministic=True)
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
        assert img.shape[-1] == 3
        count += 1
    return count, time.perf_counter() - w0, time.process_time() - c0


def _train(cfg, batches: int, keep: int = 0):
    """(images, wall s, CPU s, epoch stats, the first `keep` timed host batches)."""
    from yolos_jax import data

    it = data.make_train_iterator(cfg, seed=0, process_index=0, process_count=1)
    for _ in range(3):  # warm-up: the first batches pay tf.data start-up
        next(it)
    w0, c0 = time.perf_counter(), time.process_time()
    count, kept = 0, []
    for _ in range(batches):
        batch = next(it)
        count += batch["valid"].shape[0]
        if len(kept) < keep:
            kept.append(batch)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    stats = it.epoch_stats(0)
    it.close()
    return count, wall, cpu, stats, kept


def _device_resize(host_batches) -> tuple[int, float, float, int]:
    """(images, wall s, CPU s, distinct shapes) of `data.to_global_batch` on these host batches."""
    from bench_device_resize import time_to_global_batch  # benchmarks/, beside this script

    from yolos_jax.train_step import select_train_batch

    count, walls, cpu, shapes = time_to_global_batch([select_train_batch(b) for b in host_batches])
    return count, sum(walls), cpu, shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num_images", type=int, default=256)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="tf.data map parallelism (cores to use)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/yolos_bench_input")
    p.add_argument("--texture_noise", default="6,24", help="comma-separated background noise levels")
    p.add_argument("--device_batches", type=int, default=8,
                   help="host batches of the resize_on_device run to time through to_global_batch (0: skip)")
    p.add_argument("--json_out", default="")
    a = p.parse_args(argv)
    out = {}
    for noise in [float(v) for v in a.texture_noise.split(",") if v]:
        out[f"noise{noise:g}"] = run_one(a, noise)
    print("\n| JPEGs | pipeline | images/s (wall, best) | CPU ms / image | CPU cost vs decode |")
    print("|---|---|---|---|---|")
    for key, summary in out.items():
        kb = summary["setup"]["jpeg_kb_mean"]
        for k in ("decode", "decode_resize", "train_f32", "train_uint8", "train_device_resize", "device_resize",
                  "whole_resize_on_cpu"):
            if k not in summary:
                continue
            r = summary[k]
            label = k if k != "device_resize" else f"device_resize ({r['backend']}: {r['wall_ms_per_image']:.2f} ms/image wall)"
            wall_rate = r.get("best_wall_images_per_s", 1000 / r["wall_ms_per_image"] if "wall_ms_per_image" in r else 0)
            print(f"| 640x480, {kb:.0f} KB | {label} | {wall_rate:.0f} | {r['cpu_ms_per_image']:.2f} | "
                  f"{r.get('cpu_cost_vs_decode', 1.0):.2f}x |")
    if a.json_out:
        from yolos_jax import atomic

        atomic.write_json_atomic(a.json_out, out, indent=1)


def run_one(a, noise: float) -> dict:

    from yolos_jax.data import input_config, prepared_dataset, synthetic

    src = os.path.join(a.workdir, f"jpeg640x480_{a.num_images}_noise{noise:g}")
    if not os.path.isdir(src):
        synthetic.generate(src, a.num_images, 0, seed=0, image_size=(480, 640), max_objects=8, texture_noise=noise)
    cfg = input_config.default_input_config("s")
    cfg.data_dir = os.path.join(a.workdir, "tfds")
    cfg.dataset_name = f"bench640x480_{a.num_images}_noise{noise:g}"
    cfg.source_dir = src
    cfg.auto_prepare = True
    cfg.train_split, cfg.val_split = "train", "val"
    cfg.batch_size = a.batch_size
    cfg.num_parallel_calls = a.threads
    ds = prepared_dataset.open_dataset(cfg)
    sizes = [os.path.getsize(os.path.join(src, "train", f)) for f in os.listdir(os.path.join(src, "train"))]
    n_dec = a.batches * a.batch_size

    results: dict[str, list] = {"decode": [], "decode_resize": [], "train_f32": [], "train_uint8": [],
                                "train_device_resize": [], "device_resize": []}
    padding, device_shapes = None, 0
    for _ in range(a.repeats):
        n, wall, cpu = _decode_only(ds, a.threads, n_dec + 8)
        results["decode"].append((n, wall, cpu))
        n, wall, cpu = _decode_only(ds, a.threads, n_dec + 8, resize_to=_plan_sizes(cfg, n_dec + 8))
        results["decode_resize"].append((n, wall, cpu))
        for name, fmt in (("train_f32", "float32"), ("train_uint8", "uint8"), ("train_device_resize", "uint8")):
            c = cfg.copy_and_resolve_references()
            c.image_format = fmt
            c.resize_on_device = "on" if name == "train_device_resize" else "off"
            keep = a.device_batches if name == "train_device_resize" else 0
            n, wall, cpu, padding, kept = _train(c, a.batches, keep)
            results[name].append((n, wall, cpu))
        if a.device_batches:
            n, wall, cpu, device_shapes = _device_resize(kept)
            results["device_resize"].append((n, wall, cpu))

    def best(rows):
        n, wall, cpu = min(rows, key=lambda r: r[2] / r[0])  # least CPU per image
        return {"images": n, "images_per_s": n / wall, "cpu_ms_per_image": 1000 * cpu / n,
                "best_wall_images_per_s": max(r[0] / r[1] for r in rows)}

    summary = {k: best(v) for k, v in results.items() if v}
    dec = summary["decode"]["cpu_ms_per_image"]
    for k in ("decode_resize", "train_f32", "train_uint8", "train_device_resize"):
        summary[k]["cpu_cost_vs_decode"] = summary[k]["cpu_ms_per_image"] / dec
    if "device_resize" in summary:
        import jax

        dev = summary["device_resize"]
        dev.update(backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
                   distinct_shapes=device_shapes,
                   wall_ms_per_image=1000 * min(r[1] / r[0] for r in results["device_resize"]))
        dev["cpu_cost_vs_decode"] = dev["cpu_ms_per_image"] / dec
        if dev["backend"] == "cpu":  # the same cores decode and resize
            summary["whole_resize_on_cpu"] = {
                "cpu_ms_per_image": summary["train_device_resize"]["cpu_ms_per_image"] + dev["cpu_ms_per_image"],
                "best_wall_images_per_s": 1000 / (1000 / summary["train_device_resize"]["best_wall_images_per_s"]
                                                  + dev["wall_ms_per_image"])}
            summary["whole_resize_on_cpu"]["cpu_cost_vs_decode"] = (
                summary["whole_resize_on_cpu"]["cpu_ms_per_image"] / dec)
    load = os.getloadavg()
    summary["setup"] = {
        "cpus": os.cpu_count(), "threads": a.threads, "batch_size": a.batch_size, "jpeg_kb_mean": float(np.mean(sizes)) / 1e3,
        "load_avg_1m": load[0], "python": sys.version.split()[0], "machine": platform.machine(),
        "epoch_padding": padding,
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
