"""Partial-sequence fine-tuning (MIMDet Sec. 2.1): train-step time at token_keep_ratio 0.5 against 1.0.

    /work/venv/bin/python benchmarks/bench_partial_sequence.py                 # YOLOS-S, 1x800x1216, CPU
    /work/venv/bin/python benchmarks/bench_partial_sequence.py --variant=ti --hw=512,688 --batch=2

One step = the project's jitted train step (`train_step.make_train_step`): forward with `train=True`
(the 50% model draws its kept patches from the 'tokens' rng), host Hungarian matching, the DETR set
loss, backward, clipping, AdamW; float32, 1-device mesh. Both models share the same randomly
initialised parameters (the partial sequence adds none) and the same batch (random normalised-looking
images without padding, 5..20 random boxes per image). Steps are interleaved (full, partial, partial,
full, ...) so that load from other processes hits both alike. Printed: per-model median wall time and
process CPU time per step, the ratio of medians (partial / full; the goal is <= 0.6), the spread of the
per-round ratios, the encoder's token counts, and the load average during timing.
The goal compares with MIMDet Table 2 (50% trains in 20.3 h vs 31.0 h at 100%: 0.65x, whole detector).
"""

from __future__ import annotations

import argparse
import os
import time

import cpu_setup  # noqa: E402  (benchmarks/; pins cores, XLA flags, allocator: before jax and torch)

cpu_setup.prepare()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from synthetic_batch import random_train_batch  # noqa: E402
from yolos_jax import config as config_lib  # noqa: E402
from yolos_jax import data, losses, matcher, optim, sharding, train_step, variants  # noqa: E402
from yolos_jax.yolos import YOLOS  # noqa: E402


def build(variant: str, ratios, hw, batch: int, seed: int):
    """{ratio: (step_fn, state)} sharing one set of initial parameters, and the device batch."""
    mesh_cfg = sharding.default_mesh_config()
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    base_cfg = config_lib.model_config(variant).to_dict()
    models = {r: YOLOS(**{**base_cfg, "token_keep_ratio": r}) for r in ratios}
    first = models[ratios[0]]
    params = jax.jit(lambda: first.init(jax.random.PRNGKey(seed), np.zeros((1, *hw, 3), np.float32)))()["params"]
    params = jax.device_get(params)
    optim_cfg = optim.default_optim_config()
    out = {}
    for r, m in models.items():
        tx, schedule = optim.make_optimizer(optim_cfg, params, batch, total_steps=10_000)
        _, shardings = train_step.abstract_state_and_shardings(m, tx, seed, hw, mesh, mesh_cfg)
        state = jax.device_put(
            {"step": np.int32(0), "params": params, "opt_state": jax.jit(tx.init)(params),
             "rng": np.asarray(jax.random.PRNGKey(seed))},
            shardings,
        )
        step = train_step.make_train_step(m, tx, schedule, losses.default_loss_config(),
                                          matcher.default_matcher_config(), mesh, shardings)
        out[r] = [step, state]
    host = random_train_batch(seed, batch, hw, base_cfg["num_classes"], max_boxes=20)
    return out, data.to_global_batch(train_step.select_train_batch(host), sharding.batch_sharding(mesh)), base_cfg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="s", help="model variant of yolos_jax.config (ti, s, b, ...)")
    parser.add_argument("--hw", default="800,1216", help="image height,width (multiples of the patch size)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5, help="token_keep_ratio compared with 1.0")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each: one step of each model)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after compilation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hw = tuple(int(v) for v in args.hw.split(","))
    ratios = (1.0, args.ratio)

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), cores {len(os.sched_getaffinity(0))}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, load average at start {os.getloadavg()}")
    steps, batch, cfg = build(args.variant, ratios, hw, args.batch, args.seed)
    p = cfg["patch_size"]
    n = (hw[0] // p) * (hw[1] // p)
    tokens = {r: 1 + variants.num_kept_patches(n, r) + cfg["num_det_tokens"] for r in ratios}
    print(f"YOLOS-{args.variant} (D={cfg['hidden_size']}, depth {cfg['depth']}), batch {args.batch}x{hw[0]}x{hw[1]}, "
          f"{n} patches; encoder tokens: " + ", ".join(f"ratio {r}: {tokens[r]}" for r in ratios))

    def run(r):
        step, state = steps[r]
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        steps[r][1] = state
        return metrics

    for r in ratios:
        t0 = time.perf_counter()
        metrics = jax.device_get(run(r))
        print(f"ratio {r}: first step (compile included) {time.perf_counter() - t0:.1f} s, "
              f"loss {float(metrics['loss']):.4f}, finite {bool(metrics['finite'])}", flush=True)
    for _ in range(args.warmup):
        for r in ratios:
            run(r)

    wall = {r: [] for r in ratios}
    cpu = {r: [] for r in ratios}
    loads = [os.getloadavg()[0]]
    for i in range(args.repeats):
        for r in ratios if i % 2 == 0 else ratios[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            run(r)
            wall[r].append(time.perf_counter() - t0)
            cpu[r].append(time.process_time() - c0)
        loads.append(os.getloadavg()[0])
        print(f"round {i}: " + ", ".join(f"ratio {r} {wall[r][-1]:.2f} s" for r in ratios), flush=True)

    full, part = (np.array(wall[r]) for r in ratios)
    cfull, cpart = (np.array(cpu[r]) for r in ratios)
    pair = part / full
    print(f"rounds {args.repeats} (after {args.warmup} warm-up); 1-min load average during timing "
          f"min {min(loads):.2f} median {np.median(loads):.2f} max {max(loads):.2f}")
    for r, t, c in ((1.0, full, cfull), (args.ratio, part, cpart)):
        print(f"ratio {r}: step median {np.median(t):.2f} s (min {t.min():.2f}), CPU time median {np.median(c):.2f} s")
    print(f"RATIO partial/full (medians, wall) {np.median(part) / np.median(full):.3f}; per-round ratios median "
          f"{np.median(pair):.3f}, range {pair.min():.3f}-{pair.max():.3f}; ratio of minima "
          f"{part.min() / full.min():.3f}; CPU-time ratio {np.median(cpart) / np.median(cfull):.3f} (goal <= 0.6)")
    return dict(full=full, partial=part, cpu_full=cfull, cpu_partial=cpart, loads=loads)


if __name__ == "__main__":
    main()
