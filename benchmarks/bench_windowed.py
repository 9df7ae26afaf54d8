"""Windowed-hybrid against global attention: YOLOS-B train step at 1024 x 1024, batch 1 (ViTDet Table 3).

    /work/venv/bin/python benchmarks/bench_windowed.py                       # global vs hybrid, 2 timed rounds
    /work/venv/bin/python benchmarks/bench_windowed.py --models=global,hybrid,hybrid_relpos --repeats=1
    /work/venv/bin/python benchmarks/bench_windowed.py --results=benchmarks/RESULTS_windowed.md

Models (YOLOS-B: hidden 768, depth 12, 12 heads, 100 [DET] tokens, 91 classes; position embeddings and
mid position embeddings stored for the 1024 x 1024 grid (64 x 64 patches) so that no resize runs; float32;
the attention implementation is the model's default for the backend):
  global         every block global (the plain YOLOS-B);
  hybrid         14 x 14 windows (64 x 64 patches pad to 70 x 70: 25 windows), global blocks 2, 5, 8, 11;
  hybrid_relpos  the same with the decomposed relative position bias in every block (the ViTDet backbone);
  global_naive   every block global through plain einsum attention, which stores each block's [H, T, T]
                 probabilities for the backward (the kind of baseline ViTDet's Table 3 compares against;
                 the default CPU attention recomputes them).
One step = forward, Hungarian matching (the host scipy callback), the YOLOS set loss, backward to the
gradients of every parameter: `jax.jit(jax.value_and_grad(loss))`. The optimiser update (identical for all
models, elementwise over the parameters) is left out.

Peak memory is XLA's own account of the compiled step (`.lower().compile().memory_analysis()`):
temp (activations and scratch) + arguments (parameters, batch) + outputs (gradients, loss) - aliased bytes.
Step time: the compiled step run `--repeats` times after `--warmup` untimed runs, models interleaved round
by round (load from other processes hits all alike); medians of the wall time and of the process's CPU
time (user + system over XLA's threads; on a shared, loaded machine the steadier measure of work).
Also the step's FLOPs from XLA's cost analysis (of the same step with loop-free 'einsum' attention, since
the analysis counts a loop body once), which bound what a compute-bound backend (a CPU) can gain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import cpu_setup  # noqa: E402  (benchmarks/; pins cores, XLA flags, allocator: before jax and torch)

cpu_setup.prepare()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from synthetic_batch import random_train_batch  # noqa: E402
from yolos_jax import config as config_lib  # noqa: E402
from yolos_jax import atomic, losses, matcher  # noqa: E402
from yolos_jax.yolos import YOLOS  # noqa: E402

MODELS = {
    "global": dict(window_size=0),
    "hybrid": dict(window_size=14, global_blocks=(2, 5, 8, 11)),
    "hybrid_relpos": dict(window_size=14, global_blocks=(2, 5, 8, 11), rel_pos=True),
    # Every block global through plain einsum attention, which stores each block's [H, T, T]
    # probabilities for the backward: the kind of baseline ViTDet's Table 3 compares against.
    "global_naive": dict(window_size=0, attention_impl="einsum"),
}


def model_for(name: str, image: int, variant: str, **overrides) -> YOLOS:
    cfg = config_lib.model_config(variant).to_dict()
    cfg.update(init_pe_size=(image, image), mid_pe_size=(image, image))
    cfg.update({**MODELS[name], **overrides})
    return YOLOS(**cfg)


def random_params(model: YOLOS, image_shape) -> dict:
    """Random float32 parameters in the model's tree (drawn on the host: no init program to compile)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(image_shape, jnp.float32))["params"]
    rng = np.random.default_rng(0)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "rel_pos" in name:
            return np.zeros(s.shape, np.float32)
        return (rng.standard_normal(s.shape, np.float32) * 0.02 + ("scale" in name)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def make_step(model: YOLOS):
    loss_cfg, matcher_cfg = losses.default_loss_config(), matcher.default_matcher_config()

    def step(params, batch):
        def loss_fn(p):
            outputs = model.apply({"params": p}, batch["image"], batch["pixel_mask"], train=True)
            return losses.set_loss(outputs, batch, loss_cfg, matcher_cfg)[0]

        return jax.value_and_grad(loss_fn)(params)

    return jax.jit(step)


def compile_step(name: str, args) -> dict:
    model = model_for(name, args.image, args.variant)
    batch = random_train_batch(0, args.batch, (args.image, args.image), model.num_classes, max_boxes=100)
    params = random_params(model, batch["image"].shape)
    t0 = time.perf_counter()
    compiled = make_step(model).lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    # FLOPs of the same step with loop-free attention: XLA's cost analysis counts a loop body once, and
    # the CPU default ('chunked') loops over heads and query blocks.
    loop_free = model_for(name, args.image, args.variant, attention_impl="einsum")
    cost = make_step(loop_free).lower(params, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    return dict(name=name, compiled=compiled, params=params, batch=batch, compile_s=compile_s,
                temp=mem.temp_size_in_bytes, argument=mem.argument_size_in_bytes,
                output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes, peak=peak,
                flops=float(cost.get("flops", float("nan"))) if cost else float("nan"), times=[])


def run_once(r: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all of XLA's threads) of one step."""
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(r["compiled"](r["params"], r["batch"]))
    return time.perf_counter() - t0, time.process_time() - c0


def report(results: list[dict], args, header: str) -> str:
    base = results[0]
    gib = 2.0**30

    def median(r, i):
        return statistics.median(t[i] for t in r["times"]) if r["times"] else float("nan")

    b = base["name"]
    lines = [header, "",
             f"| model | step CPU s | CPU / {b} | step wall s | wall / {b} | peak GiB (temp + args + out) "
             f"| peak / {b} | temp GiB | temp / {b} | step TFLOP | FLOP / {b} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cpu, wall = median(r, 1), median(r, 0)
        lines.append(
            f"| {r['name']} | {cpu:.1f} | {cpu / median(base, 1):.3f} | {wall:.1f} | {wall / median(base, 0):.3f} "
            f"| {r['peak'] / gib:.2f} | {r['peak'] / base['peak']:.3f} | {r['temp'] / gib:.2f} "
            f"| {r['temp'] / base['temp']:.3f} | {r['flops'] / 1e12:.2f} | {r['flops'] / base['flops']:.3f} |"
        )
    lines += ["", f"Times are medians of {args.repeats} timed rounds after {args.warmup} warm-up round(s)."]
    for r in results:
        lines.append(f"- {r['name']}: (wall, CPU) s per round {[(round(w, 1), round(c, 1)) for w, c in r['times']]}, "
                     f"compile {r['compile_s']:.0f} s, "
                     f"arguments {r['argument'] / gib:.2f} GiB, outputs {r['output'] / gib:.2f} GiB, "
                     f"aliased {r['alias'] / gib:.2f} GiB")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="global,hybrid",
                        help=f"comma-separated, first = baseline; of {list(MODELS)}")
    parser.add_argument("--variant", default="b", help="config.MODEL_VARIANTS key (default b)")
    parser.add_argument("--image", type=int, default=1024, help="square canvas side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (each: one step of each model)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--memory-only", action="store_true", help="compile and report memory / FLOPs only")
    parser.add_argument("--results", default="", help="also write the report (markdown) to this file, atomically")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")

    dev = jax.devices()[0]
    header = (f"YOLOS-{args.variant.upper()} train step (forward + host matching + set loss + backward), batch "
              f"{args.batch} x {args.image} x {args.image}, float32; jax {jax.__version__} on {dev.platform} "
              f"({dev.device_kind}), {len(os.sched_getaffinity(0))} cores visible, load average at start "
              f"{tuple(round(x, 1) for x in os.getloadavg())}")
    print(header, flush=True)
    results = []
    for name in names:
        r = compile_step(name, args)
        print(f"{name}: compiled in {r['compile_s']:.0f} s, peak {r['peak'] / 2**30:.2f} GiB "
              f"(temp {r['temp'] / 2**30:.2f}), {r['flops'] / 1e12:.2f} TFLOP", flush=True)
        results.append(r)
    if not args.memory_only:
        for round_ in range(args.warmup + args.repeats):
            for r in results:
                wall, cpu = run_once(r)
                if round_ >= args.warmup:
                    r["times"].append((wall, cpu))
                print(f"round {round_} {'(warm-up) ' if round_ < args.warmup else ''}{r['name']}: wall {wall:.1f} s, "
                      f"CPU {cpu:.1f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    text = report(results, args, header)
    print(text)
    if args.results:
        with atomic.atomic_file(args.results, suffix=".md") as tmp:
            with open(tmp, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
