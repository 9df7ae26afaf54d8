"""One YOLOS-Ti train step of yolos_jax against HF transformers + torch AdamW, on CPU, in the same run.

    /work/venv/bin/python benchmarks/bench_train_step.py                  # Ti, batch 2 of 512x688
    /work/venv/bin/python benchmarks/bench_train_step.py --repeats=15 --attention-impl=einsum
    /work/venv/bin/python benchmarks/bench_train_step.py --threads=2 --host-devices=2  # ours over 2 CPU devices

One step = forward, Hungarian matching, set loss, backward, gradient clipping at global norm 0.1, AdamW.
  ours: `train_step.make_train_step` (one jitted program, float32) on a 1-device mesh (--host-devices=N: N
        CPU devices, the batch split over them); the matching is the host scipy callback of `matcher.py`
        ('host' implementation, as configured by default).
  HF:   `YolosForObjectDetection(config)(pixel_values, labels=...)` (its own `HungarianMatcher` and
        `ImageLoss`), `loss.backward()`, `torch.nn.utils.clip_grad_norm_(..., 0.1)`, `torch.optim.AdamW`
        (default implementation, the original's decay / no-decay groups), `zero_grad`.
Both start from the same random weights: HF's model is saved with `save_pretrained` and converted with
`yolos_jax.convert.convert_state`. Before timing, the first step's loss terms and pre-clipping gradient
norm of both sides are compared (they must agree: same weights, same matching, same loss).

Both get the same cores (the process is pinned to the first `--threads` cores; torch.set_num_threads and
XLA's intra-op pool use that many). Steps are interleaved (ours, HF, HF, ours, ...) so that load from
other processes hits both alike; the report gives medians, the ratio of medians (ours / HF; < 1 = ours
faster), the spread of per-round ratios, CPU seconds per step, the load average, and the share of our
step spent inside the host Hungarian callback (`matcher._solve_on_host`, wrapped here with a timer) —
plus the jitted matching call on its own, and HF's own scipy share.

Also printed: the model's FLOPs per step (forward + backward, XLA's cost analysis of the same model with
explicit-matmul attention), the FLOP/s each side achieves with them, and the FLOP/s of a large fp32 matmul on
the same cores measured in the same run: each step's share of that limit is the figure to raise.

On a machine shared with other processes, torch's OpenMP workers spin-wait for descheduled peers, which
inflates HF's multi-threaded times far more than XLA's: also run with `--threads=1`, or with
`OMP_WAIT_POLICY=PASSIVE` in the environment, for the like-for-like ratio (see RESULTS_train_step.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

import cpu_setup  # noqa: E402  (benchmarks/; pins cores, XLA flags, allocator: before jax and torch)

THREADS = cpu_setup.prepare(sys.argv[1:], pin=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import transformers.loss.loss_for_object_detection as hf_loss_lib  # noqa: E402
from transformers import YolosConfig, YolosForObjectDetection  # noqa: E402

from hf_reference import hf_adamw, hf_inputs, redraw_for_training  # noqa: E402
from synthetic_batch import random_train_batch  # noqa: E402
from yolos_jax import convert, data, losses, matcher, optim, sharding, speed, train_step  # noqa: E402
from yolos_jax.yolos import YOLOS  # noqa: E402

IMAGE_HW = (512, 688)
BATCH = 2
NUM_CLASSES = 91


# ------------------------------------------------------------------------------------- host timers


class HostTimer:
    """Accumulates wall time spent inside a wrapped host function. With --host-devices the step calls it once per
    device, possibly from several threads at once: the total is then the sum over devices (an upper bound of
    what it adds to the step), kept under a lock."""

    def __init__(self):
        self.total = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.total += time.perf_counter() - t0
                    self.calls += 1

        return timed

    def take(self) -> float:
        with self._lock:
            total, self.total = self.total, 0.0
        return total


OUR_MATCH = HostTimer()
HF_MATCH = HostTimer()
# `_host_assignment` looks `_solve_on_host` up when the step is traced, so this must precede tracing.
matcher._solve_on_host = OUR_MATCH.wrap(matcher._solve_on_host)
# HF's HungarianMatcher calls the name it imported from scipy; time the solve itself.
hf_loss_lib.linear_sum_assignment = HF_MATCH.wrap(hf_loss_lib.linear_sum_assignment)


# ------------------------------------------------------------------------------------- models


def hf_ti_model(seed: int) -> YolosForObjectDetection:
    """HF YOLOS-Ti (hidden 192, 12 layers, 3 heads, 100 [DET], 91 classes, PE grid 800x1333, no mid PE),
    re-drawn as a training start would be: trunc-normal(0.02) weights, tokens and position embeddings,
    zero biases, unit LayerNorm scales (HF's own init leaves tokens/PEs near constant, which would make
    every [DET] token predict the same box and the matching degenerate)."""
    cfg = YolosConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=[800, 1333],
        patch_size=16,
        num_detection_tokens=100,
        use_mid_position_embeddings=False,
        num_labels=NUM_CLASSES,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = YolosForObjectDetection(cfg)
    return redraw_for_training(model)


def converted_params(hf: YolosForObjectDetection, attention_impl):
    """Our (params, YOLOS) from HF's weights through the project's converter."""
    with tempfile.TemporaryDirectory() as tmp:
        transformers.utils.logging.disable_progress_bar()
        hf.save_pretrained(tmp)
        out = convert.convert_state(tmp)
    cfg = dict(out.model_cfg)
    cfg["attention_impl"] = attention_impl
    cfg["dtype"] = "float32"
    return out.params, YOLOS(**cfg), cfg


# ------------------------------------------------------------------------------------- benchmark


def build(args):
    hf = hf_ti_model(args.seed)
    params, model, model_cfg = converted_params(hf, args.attention_impl)
    batch = random_train_batch(args.seed, BATCH, IMAGE_HW, NUM_CLASSES, args.max_boxes)

    # Ours: the Ti recipe's optimiser (lr 5e-5 at batch 16, linearly scaled) on a mesh of --host-devices CPU devices.
    mesh_cfg = sharding.default_mesh_config()
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:args.host_devices])
    optim_cfg = optim.default_optim_config()
    optim_cfg.base_lr, optim_cfg.base_batch_size = 5e-5, 16
    tx, schedule = optim.make_optimizer(optim_cfg, params, BATCH, total_steps=10_000)
    _, shardings = train_step.abstract_state_and_shardings(model, tx, 0, IMAGE_HW, mesh, mesh_cfg)
    state = jax.device_put(
        {"step": np.int32(0), "params": params, "opt_state": jax.jit(tx.init)(params),
         "rng": np.asarray(jax.random.PRNGKey(0))},
        shardings,
    )
    step = train_step.make_train_step(
        model, tx, schedule, losses.default_loss_config(), matcher.default_matcher_config(), mesh, shardings
    )
    device_batch = data.to_global_batch(train_step.select_train_batch(batch), sharding.batch_sharding(mesh))

    # The whole matching call on its own (cost matrix on device + host callback + transfers), at the
    # step's shapes and on the same mesh: an upper bound of what matching adds to a step.
    rng = np.random.default_rng(args.seed + 1)
    q, c1 = model_cfg["num_det_tokens"], model_cfg["num_classes"] + 1
    logits = rng.standard_normal((BATCH, q, c1)).astype(np.float32)
    pred = np.concatenate([rng.uniform(0.2, 0.8, (BATCH, q, 2)), rng.uniform(0.05, 0.5, (BATCH, q, 2))], -1)
    match_args = data.to_global_batch({"logits": logits, "boxes": pred.astype(np.float32)}, sharding.batch_sharding(mesh))
    targets = {k: device_batch[k] for k in ("labels", "boxes", "box_mask")}
    match_fn = jax.jit(lambda a, t: matcher.match(a["logits"], a["boxes"], t, matcher.default_matcher_config(),
                                                  mesh=mesh, batch_axes=sharding.BATCH_AXES))

    # HF: its own loss (HungarianMatcher + ImageLoss), clip 0.1, AdamW with the same lr and decay.
    lr = optim.peak_learning_rate(optim_cfg, BATCH)
    opt = hf_adamw(hf, lr, optim_cfg.weight_decay)
    pixel_values, labels = hf_inputs(batch)
    return dict(hf=hf, opt=opt, pixel_values=pixel_values, labels=labels, step=step, state=state,
                batch=device_batch, model_cfg=model_cfg, match=lambda: match_fn(match_args, targets),
                model_flops=model_step_flops(params, model_cfg, batch))


def model_step_flops(params, model_cfg: dict, batch: dict) -> float:
    """The model's FLOPs in one train step: forward + backward of the batch, from XLA's cost analysis of the
    same model with explicit-matmul attention (`speed.compiled_flops`; loss, matching and optimiser excluded,
    a fraction of a percent). One figure for both sides: the same model on the same batch."""
    count_model = YOLOS(**(model_cfg | {"attention_impl": "einsum"}))
    images, mask = jax.device_put(batch["image"]), jax.device_put(batch["pixel_mask"])

    def total(p):
        out = count_model.apply({"params": p}, images, mask)
        return jnp.sum(out["logits"]) + jnp.sum(out["boxes"])

    return speed.compiled_flops(jax.jit(jax.grad(total)).lower(params).compile())


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul on the same cores (XLA): the machine's limit a step is measured against."""
    rng = np.random.default_rng(0)
    a, b = (jax.device_put(rng.standard_normal((size, size)).astype(np.float32)) for _ in range(2))
    matmul = jax.jit(jnp.dot)
    jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * size**3 / float(np.median(times))


def first_step_check(b) -> tuple[dict, dict, float]:
    """Runs one step of each from the identical start; returns (ours, HF, compile seconds)."""
    t0 = time.perf_counter()
    b["state"], metrics = b["step"](b["state"], b["batch"])
    ours = {k: float(v) for k, v in jax.device_get(metrics).items()}
    compile_s = time.perf_counter() - t0
    hf, opt = b["hf"], b["opt"]
    opt.zero_grad(set_to_none=True)
    out = hf(pixel_values=b["pixel_values"], labels=b["labels"])
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.1)
    opt.step()
    theirs = {"loss": out.loss.item(), "grad_norm": norm.item(),
              **{k: out.loss_dict[k].item() for k in ("loss_ce", "loss_bbox", "loss_giou")}}
    OUR_MATCH.take(), HF_MATCH.take()
    return ours, theirs, compile_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (each: one step of each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the checked first step")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="cores for both libraries (the process is pinned to the first N; default all)")
    parser.add_argument("--max-boxes", type=int, default=100,
                        help="box slots per image in our padded batch (the input pipeline's default)")
    parser.add_argument("--attention-impl", default=None,
                        help="config.model.attention_impl for ours (default: the model's CPU default)")
    parser.add_argument("--host-devices", type=int, default=1,
                        help="ours: split the CPU into this many XLA devices (jax_num_cpu_devices) and the batch of "
                             f"{BATCH} over them, data parallel; HF is unchanged")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.host_devices < 1 or BATCH % args.host_devices:
        parser.error(f"--host-devices={args.host_devices} must be >= 1 and divide the batch of {BATCH}")
    if args.host_devices > 1:  # before jax's CPU backend starts: the next line is the first to touch a device
        jax.config.update("jax_num_cpu_devices", args.host_devices)

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, pinned to cores {sorted(os.sched_getaffinity(0))}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset: torch threads spin-wait)')}  "
          f"load average at start {os.getloadavg()}")
    print(cpu_setup.describe_cpu())

    b = build(args)
    ours, theirs, compile_s = first_step_check(b)
    print(f"attention_impl={b['model_cfg']['attention_impl']!r}  ours on {args.host_devices} CPU device(s)  "
          f"batch {BATCH}x{IMAGE_HW[0]}x{IMAGE_HW[1]}, "
          f"boxes per image {b['batch']['box_mask'].sum(1).tolist()}, max_boxes {args.max_boxes}; "
          f"first step (compile included) {compile_s:.1f} s")
    check = {k: abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12)
             for k in ("loss", "loss_ce", "loss_bbox", "loss_giou", "grad_norm")}
    print("first step ours vs HF: " + ", ".join(
        f"{k} {ours[k]:.6g}/{theirs[k]:.6g} (rel {check[k]:.1e})" for k in check))
    if max(check.values()) > 1e-3:
        raise SystemExit("ours and HF disagree on the first step: the comparison would not be like for like")

    def ours_fn():
        b["state"], metrics = b["step"](b["state"], b["batch"])
        jax.block_until_ready((b["state"], metrics))

    def hf_fn():
        b["opt"].zero_grad(set_to_none=True)
        out = b["hf"](pixel_values=b["pixel_values"], labels=b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(b["hf"].parameters(), 0.1)
        b["opt"].step()

    fns = {"ours": ours_fn, "hf": hf_fn}
    for _ in range(args.warmup):
        ours_fn(), hf_fn()
    jax.block_until_ready(b["match"]())
    match_call = []
    for _ in range(20):
        t0 = time.perf_counter()
        jax.block_until_ready(b["match"]())
        match_call.append(time.perf_counter() - t0)
    OUR_MATCH.take(), HF_MATCH.take()
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    match = {"ours": [], "hf": []}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for name in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            match[name].append((OUR_MATCH if name == "ours" else HF_MATCH).take())
        loads.append(os.getloadavg()[0])

    t_ours, t_hf = np.array(times["ours"]), np.array(times["hf"])
    c_ours, c_hf = np.array(cpu["ours"]), np.array(cpu["hf"])
    m_ours, m_hf = np.array(match["ours"]), np.array(match["hf"])
    pair = t_ours / t_hf
    print(f"rounds {args.repeats} (after {args.warmup} warm-up), 1-min load average during timing "
          f"min {min(loads):.2f} median {np.median(loads):.2f} max {max(loads):.2f}")
    print(f"ours  step median {1e3 * np.median(t_ours):8.1f} ms (min {1e3 * t_ours.min():.1f}); host matching "
          f"(summed over devices) median {1e3 * np.median(m_ours):.2f} ms = "
          f"{100 * np.median(m_ours / t_ours):.2f}% of the step")
    print(f"      jitted matcher.match alone (cost matrix + callback + transfers) median "
          f"{1e3 * np.median(match_call):.2f} ms = {100 * np.median(match_call) / np.median(t_ours):.2f}% of the step")
    print(f"HF    step median {1e3 * np.median(t_hf):8.1f} ms (min {1e3 * t_hf.min():.1f}); scipy matching "
          f"median {1e3 * np.median(m_hf):.2f} ms = {100 * np.median(m_hf / t_hf):.2f}% of the step")
    print(f"ratio ours/HF (medians) {np.median(t_ours) / np.median(t_hf):.3f}; per-round ratios median "
          f"{np.median(pair):.3f}, IQR {np.percentile(pair, 25):.3f}-{np.percentile(pair, 75):.3f}; "
          f"ratio of minima {t_ours.min() / t_hf.min():.3f}")
    # CPU seconds of the whole process per step (all threads): closer to the work done than wall time on a
    # busy machine, but cache contention still inflates it, and so does torch's OpenMP spin-waiting.
    print(f"CPU time per step (process, all threads): ours median {np.median(c_ours):.2f} s, HF "
          f"{np.median(c_hf):.2f} s, ratio {np.median(c_ours) / np.median(c_hf):.3f}; cores kept busy "
          f"ours {np.median(c_ours / t_ours):.2f}, HF {np.median(c_hf / t_hf):.2f} of {args.threads}")
    # The step's share of the machine's limit: model FLOPs per step over the step time, against a large matmul
    # on the same cores measured now (after the timed rounds, under the same load).
    limit = matmul_flops_per_s()
    flops = b["model_flops"]
    print(f"model FLOPs per step {flops / 1e9:.1f} G (forward + backward, XLA cost analysis); achieved: ours "
          f"{flops / np.median(t_ours) / 1e9:.1f} GFLOP/s, HF {flops / np.median(t_hf) / 1e9:.1f} GFLOP/s; "
          f"fp32 matmul on the same {args.threads} core(s) {limit / 1e9:.1f} GFLOP/s: ours at "
          f"{100 * flops / np.median(t_ours) / limit:.1f}% of it, HF at {100 * flops / np.median(t_hf) / limit:.1f}%")
    # What a ratio asks of our step here: ours/HF = r needs the model's FLOPs at (HF's share / r) of the matmul
    # rate above. Not a hard bound (that rate is XLA's 2048^3 product, measured once, not the core's peak, and
    # smaller products sometimes beat it), but a step far above 100% of it is not a kernel-tuning target.
    hf_share = flops / np.median(t_hf) / limit
    print(f"what the goal asks: ours/HF = 0.5 needs our step at {100 * hf_share / 0.5:.0f}% of that matmul rate "
          f"({1e3 * 0.5 * np.median(t_hf):.0f} ms); at 100% of it the ratio would be {hf_share:.3f}")
    if np.median(loads) > os.cpu_count():
        print(f"NOTE: the machine is oversubscribed (load {np.median(loads):.1f} > {os.cpu_count()} CPUs). With "
              "several threads, torch's OpenMP workers spin-wait for descheduled peers and HF's wall and CPU "
              "times inflate far more than XLA's; compare with --threads=1 or OMP_WAIT_POLICY=PASSIVE.")
    return dict(ours=t_ours, hf=t_hf, cpu_ours=c_ours, cpu_hf=c_hf, match_ours=m_ours, match_hf=m_hf,
                match_call=np.array(match_call), loads=loads, model_flops=flops, matmul_flops_per_s=limit)


if __name__ == "__main__":
    main()
