"""On-device assignment solver vs host scipy (pure_callback), both inside one jitted matching call.

    python benchmarks/bench_matcher.py [--repeats 50]

For Q = 100 queries, M in {5, 20, 50} target boxes (all real) and batch 2 and 8, times
`jax.jit(matcher.match)` (cost matrix + solve, result on device) with config.matcher.implementation
'host' and 'device' on random predictions, checks that both give the same assignment, and prints the
median (and min) times and the device/host ratio (< 1: the device solver is faster). Runs on whatever backend
jax picks (CPU here; on a GPU/TPU the host variant includes the device->host->device round trip).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from yolos_jax import matcher


def random_inputs(rng, b, q, m, num_classes=91):
    logits = rng.normal(0, 2, (b, q, num_classes + 1)).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (b, q, 2)), rng.uniform(0.05, 0.5, (b, q, 2))], -1)
    targets = dict(
        labels=rng.integers(0, num_classes, (b, m)).astype(np.int32),
        boxes=np.concatenate([rng.uniform(0.2, 0.8, (b, m, 2)), rng.uniform(0.05, 0.5, (b, m, 2))], -1)
        .astype(np.float32),
        box_mask=np.ones((b, m), bool),
    )
    return jax.device_put((logits, boxes.astype(np.float32), targets))


def times_ms(fn, args, repeats):
    """(median, min) wall time of one call in ms; the min is the robust figure on a busy machine."""
    fn(*args).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, float(np.min(times)) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--boxes", type=int, nargs="+", default=[5, 20, 50])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), Q={args.queries}, "
          f"median of {args.repeats}")
    fns = {}
    for impl in ("host", "device"):
        cfg = matcher.default_matcher_config()
        cfg.implementation = impl
        fns[impl] = jax.jit(lambda l, b, t, cfg=cfg: matcher.match(l, b, t, cfg))
    rng = np.random.default_rng(0)
    print(f"{'batch':>5} {'M':>4} {'host ms (min)':>16} {'device ms (min)':>16} {'device/host (min)':>18}  same")
    for b in args.batches:
        for m in args.boxes:
            inputs = random_inputs(rng, b, args.queries, m)
            same = np.array_equal(np.asarray(fns["host"](*inputs)), np.asarray(fns["device"](*inputs)))
            host = times_ms(fns["host"], inputs, args.repeats)
            device = times_ms(fns["device"], inputs, args.repeats)
            print(f"{b:>5} {m:>4} {host[0]:>7.3f} ({host[1]:>6.3f}) {device[0]:>7.3f} ({device[1]:>6.3f}) "
                  f"{device[0] / host[0]:>8.2f} ({device[1] / host[1]:>5.2f})  {same}")


if __name__ == "__main__":
    main()
