"""The train step on one GPU: yolos_jax (bf16) against HF transformers + torch AdamW (bf16 autocast, sdpa),
in the same run, with FLOP/s, MFU and peak memory (issue 19, item 3).

    python benchmarks/bench_gpu.py                          # Ti 512x688, S and B 800x1088; < 8 min on one H200
    python benchmarks/bench_gpu.py --variants=s --batch=s=24 --steps=30
    python benchmarks/bench_gpu.py --tiny --variants=ti,s,b # tiny shapes and depth: the CPU test of the script

On the GPU machines lent to this project (Python 3.12, jax with the CUDA 13 plugin, PyTorch, transformers, but
no TensorFlow, tfds, pycocotools or ml_collections): nothing here imports TensorFlow, tfds or pycocotools, but
`yolos_jax` needs `ml_collections` (pure Python; flax, optax, orbax, scipy and Pillow too, there already: check
with `python -c "import flax, optax, orbax.checkpoint, scipy, PIL"` and carry wheels of anything missing).
Fetch the wheel on a machine with PyPI, inside the checkout so that it travels with the working tree, then
install it there first:

    pip download ml_collections --no-deps -d wheels/        # here (wheels/ must not be git-ignored, or carry it)
    pip install --no-deps wheels/*.whl && python benchmarks/bench_gpu.py --json-out=$OUT/bench_gpu.json

Per case (model, image size, batch; synthetic images and 5..20 random boxes per image, all pixels valid):
  ours   `train_step.make_train_step` (forward, host Hungarian matching, set loss, backward, clip 0.1, AdamW;
         one jitted program, compiled ahead of time) with the model's compute dtype 'bfloat16' (parameters and
         optimiser state float32) and attention as configured for the backend (`--attention-impl`, default
         None: `jax.nn.dot_product_attention`'s choice, cuDNN's fused kernel on a GPU).
  HF     `YolosForObjectDetection(pixel_values, labels=...)` (its HungarianMatcher + ImageLoss) under
         `torch.autocast(bfloat16)` with attn_implementation='sdpa', `loss.backward()`,
         `clip_grad_norm_(0.1)`, `torch.optim.AdamW` (torch's default implementation; decay / no-decay groups
         as the original).
Both start from the same random weights (HF's `save_pretrained`, converted with `yolos_jax.convert.convert_state`,
as benchmarks/bench_train_step.py does); the first step's losses of both are printed side by side (in bf16 they
agree to a few %, not to 1e-3). Then `--warmup` untimed steps and `--steps` timed ones of each, back to back
(`block_until_ready` / `torch.cuda.synchronize` at the end): images/s = steps * batch / seconds.
  model FLOPs per step   XLA's cost analysis of the same step with explicit-matmul attention (attention_impl=
                         'einsum', lowered only): the cost analysis counts a fused attention custom call (cuDNN)
                         not at all and a loop body once, so the timed program's own count (`compiled.cost_analysis()`,
                         also printed) under-reports the attention. XLA counts a multiply-add as 2 FLOPs.
  MFU                    achieved model FLOP/s / `--peak-tflops` (H200 bf16 dense: 989 TFLOP/s).
  peak memory            ours: `memory_stats()['peak_bytes_in_use']` of the device (the process's peak so far:
                         cases run smallest first) and the compiled step's own need (`memory_analysis()`: arguments
                         + outputs - donated + temporaries); HF: `torch.cuda.max_memory_allocated` (reset per case).
                         JAX does not preallocate here (XLA_PYTHON_CLIENT_PREALLOCATE=false) so torch has room.
  latency                batch-1 forward (ours jitted `model.apply`; HF under inference_mode + autocast), median.
After the cases, the device share of the input pipeline's resize (`input.resize_on_device`, the figure
benchmarks/bench_device_resize.py is for, measured with its own batches): `data.to_global_batch` of uint8 640x480
sources at S scales (transfer + resize + normalisation on the device) per image, against PIL decoding of the same
JPEGs on one host core, and against the S train step's device time per image.

A time guard keeps the default run under 8 minutes: `--time-budget` seconds (default 420) from the start are
shared among the cases left; each timed loop stops early (after at least 2 steps) past its share, and a case
that no longer fits is skipped with a note. `--json-out` is rewritten after every case, so a run cut short
still leaves what it measured. The last thing printed is a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

# Before jax starts: JAX must not take 75% of the GPU up front, torch runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import YolosConfig, YolosForObjectDetection  # noqa: E402

from hf_reference import hf_adamw, hf_inputs, redraw_for_training  # noqa: E402
from synthetic_batch import random_train_batch  # noqa: E402
from yolos_jax import convert, data, losses, matcher, optim, sharding, train_step  # noqa: E402
from yolos_jax.config import model_config  # noqa: E402
from yolos_jax.yolos import YOLOS  # noqa: E402

# variant -> (image (H, W), default batch). Batches sized for one H200 (141 GB): far below its memory on both
# sides, large enough that Ti is not launch-bound.
CASES = {"ti": ((512, 688), 32), "s": ((800, 1088), 16), "b": ((800, 1088), 8)}
TINY_HW, TINY_BATCH = (64, 96), 2
H200_BF16_DENSE_TFLOPS = 989.0


def tiny_overrides(variant: str) -> dict:
    """Tiny shapes and depth for the CPU test: 2 blocks, 16 channels per head, 10 [DET] tokens, and a
    position-embedding grid smaller than the image (so it is resized, as at full size)."""
    heads = model_config(variant).num_heads
    out = dict(depth=2, hidden_size=16 * heads, num_det_tokens=10, init_pe_size=(48, 64))
    if model_config(variant).mid_pe_size is not None:
        out["mid_pe_size"] = (48, 64)
    return out


# ------------------------------------------------------------------------------------------ models


def hf_model(cfg) -> YolosForObjectDetection:
    """HF YolosForObjectDetection (sdpa) with the architecture of our `cfg` (a `model_config`), re-drawn as a
    training start: trunc-normal(0.02) weights, tokens and position embeddings, zero biases, unit LayerNorm
    scales (bench_train_step.py: HF's own init makes every [DET] token predict the same box)."""
    if cfg.mid_pe_size is not None and tuple(cfg.mid_pe_size) != tuple(cfg.init_pe_size):
        raise ValueError("HF YOLOS stores one grid (image_size) for both position embeddings")
    hf_cfg = YolosConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim or 4 * cfg.hidden_size, image_size=list(cfg.init_pe_size),
        patch_size=cfg.patch_size, num_detection_tokens=cfg.num_det_tokens,
        use_mid_position_embeddings=cfg.mid_pe_size is not None, num_labels=cfg.num_classes,
        layer_norm_eps=cfg.layer_norm_eps, qkv_bias=cfg.qkv_bias, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = YolosForObjectDetection(hf_cfg)
    return redraw_for_training(model)


def converted(hf: YolosForObjectDetection) -> tuple[dict, dict]:
    """(params, model config dict) of ours from HF's weights through the project's converter."""
    with tempfile.TemporaryDirectory() as tmp:
        transformers.utils.logging.disable_progress_bar()
        hf.save_pretrained(tmp)
        out = convert.convert_state(tmp)
    return out.params, dict(out.model_cfg)


# ------------------------------------------------------------------------------------------ measuring


def timed_loop(fn, sync, steps: int, max_s: float) -> tuple[int, float]:
    """Runs `fn` up to `steps` times back to back (at least 2; fewer than `steps` once `max_s` has passed,
    checked every call without synchronising), then `sync()`. Returns (calls, seconds)."""
    t0 = time.perf_counter()
    n = 0
    while n < steps:
        fn()
        n += 1
        if n >= 2 and time.perf_counter() - t0 > max_s:
            break
    sync()
    return n, time.perf_counter() - t0


def median_latency_ms(fn, repeats: int, max_s: float) -> float:
    """Median ms of `fn()` (which must wait for its own result) over `repeats` calls (at least 3; fewer than
    `repeats` once `max_s` has passed)."""
    out, t_end = [], time.perf_counter() + max_s
    for _ in range(max(repeats, 3)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if len(out) >= 3 and time.perf_counter() > t_end:
            break
    return 1e3 * float(np.median(out))


def xla_flops(stage) -> float:
    """'flops' of XLA's cost analysis of a `Lowered` or `Compiled` (nan when the backend gives none)."""
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float("nan") if flops is None or flops < 0 else float(flops)


def model_flops(lowered) -> float:
    """FLOPs of the explicit-attention step: the cost analysis of its lowered (unoptimised) program, else of
    the compiled one (a backend without the former), else nan (the table then shows n/a, never a guess)."""
    for stage in (lambda: lowered, lambda: lowered.compile()):
        try:
            flops = xla_flops(stage())
        except Exception as e:  # noqa: BLE001
            print(f"cost analysis: {first_error_line(e)}", flush=True)
            continue
        if np.isfinite(flops):
            return flops
    return float("nan")


def step_memory_bytes(compiled) -> float:
    """The compiled program's own device memory: arguments + outputs - donated aliases + temporaries."""
    try:
        m = compiled.memory_analysis()
        return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend / jax version reports it)
        return float("nan")


def jax_peak_bytes() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else float("nan")


def first_error_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ------------------------------------------------------------------------------------------ one case


class Case:
    """One model/size/batch: builds both sides from the same weights, then measures them."""

    def __init__(self, variant: str, hw: tuple[int, int], batch: int, args):
        self.variant, self.hw, self.batch, self.args = variant, hw, batch, args
        overrides = tiny_overrides(variant) if args.tiny else {}
        cfg = model_config(variant, **overrides)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.hf = hf_model(cfg)
        params, model_cfg = converted(self.hf)
        self.hf = self.hf.to(self.device)
        model_cfg.update(dtype="bfloat16", attention_impl=args.attention_impl)
        self.model = YOLOS(**model_cfg)
        self.count_model = YOLOS(**{**model_cfg, "attention_impl": "einsum"})
        max_boxes = min(args.max_boxes, model_cfg["num_det_tokens"])
        host = random_train_batch(args.seed, batch, hw, model_cfg["num_classes"], max_boxes)

        mesh_cfg = sharding.default_mesh_config()
        mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
        optim_cfg = optim.default_optim_config()
        tx, schedule = optim.make_optimizer(optim_cfg, params, batch, total_steps=10_000)
        _, shardings = train_step.abstract_state_and_shardings(self.model, tx, 0, hw, mesh, mesh_cfg)
        self.state = jax.device_put({"step": np.int32(0), "params": params, "opt_state": jax.jit(tx.init)(params),
                                     "rng": np.asarray(jax.random.PRNGKey(0))}, shardings)
        self.batch_dev = data.to_global_batch(train_step.select_train_batch(host), sharding.batch_sharding(mesh))

        def make(model):
            return train_step.make_train_step(model, tx, schedule, losses.default_loss_config(),
                                              matcher.default_matcher_config(), mesh, shardings)

        t0 = time.perf_counter()
        self.step = make(self.model).lower(self.state, self.batch_dev).compile()
        self.compile_s = time.perf_counter() - t0
        self.flops_compiled = xla_flops(self.step)
        self.flops_model = model_flops(make(self.count_model).lower(self.state, self.batch_dev))
        self.step_mem = step_memory_bytes(self.step)

        self.opt = hf_adamw(self.hf, optim.peak_learning_rate(optim_cfg, batch), optim_cfg.weight_decay)
        self.pixel_values, self.labels = hf_inputs(host, self.device)
        self.image1 = host["image"][:1]

    # --- steps
    def ours_step(self):
        self.state, self.metrics = self.step(self.state, self.batch_dev)

    def ours_sync(self):
        jax.block_until_ready((self.state, self.metrics))

    def autocast(self):
        on = self.args.hf_autocast == "on" or (self.args.hf_autocast == "auto" and self.device == "cuda")
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=on)

    def hf_step(self):
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.hf(pixel_values=self.pixel_values, labels=self.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.hf.parameters(), 0.1)
        self.opt.step()
        return out

    def hf_sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    # --- measurements
    def run_ours(self, max_s: float) -> dict:
        t0 = time.perf_counter()
        self.ours_step()
        self.ours_sync()
        first = {k: float(v) for k, v in jax.device_get(self.metrics).items() if k.startswith("loss")}
        first_s = time.perf_counter() - t0
        for _ in range(self.args.warmup):
            self.ours_step()
        self.ours_sync()
        n, sec = timed_loop(self.ours_step, self.ours_sync, self.args.steps, max_s)
        ips = n * self.batch / sec
        achieved = self.flops_model * n / sec
        return dict(ours_ips=ips, ours_steps=n, ours_step_ms=1e3 * sec / n, ours_first_loss=first,
                    ours_first_step_s=first_s, ours_tflops=achieved / 1e12,
                    mfu=achieved / (self.args.peak_tflops * 1e12), ours_peak_bytes=jax_peak_bytes())

    def run_hf(self, max_s: float) -> dict:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = self.hf_step()
        terms = {"loss": out.loss, **(getattr(out, "loss_dict", None) or {})}
        first = {k: float(torch.as_tensor(v).detach().float()) for k, v in terms.items()}
        del out
        for _ in range(self.args.warmup):
            self.hf_step()
        self.hf_sync()
        n, sec = timed_loop(self.hf_step, self.hf_sync, self.args.steps, max_s)
        peak = float(torch.cuda.max_memory_allocated()) if self.device == "cuda" else float("nan")
        return dict(hf_ips=n * self.batch / sec, hf_steps=n, hf_step_ms=1e3 * sec / n, hf_first_loss=first,
                    hf_peak_bytes=peak)

    def run_latency(self, max_s: float, skip_hf: bool) -> dict:
        """Batch-1 forward of each (ours: the jitted `model.apply`, no pixel mask; HF: inference_mode)."""
        params = self.state["params"]
        x = jax.device_put(self.image1)
        fwd = jax.jit(lambda p, x: self.model.apply({"params": p}, x)).lower(params, x).compile()
        ours = lambda: jax.block_until_ready(fwd(params, x))  # noqa: E731
        ours()
        out = dict(ours_b1_ms=median_latency_ms(ours, self.args.latency_repeats, max_s / 2))
        if not skip_hf:
            self.hf.eval()
            x_t = self.pixel_values[:1]

            def hf_fwd():
                with torch.inference_mode(), self.autocast():
                    self.hf(pixel_values=x_t)
                self.hf_sync()

            hf_fwd()
            out["hf_b1_ms"] = median_latency_ms(hf_fwd, self.args.latency_repeats, max_s / 2)
            self.hf.train()
        return out

    def close(self):
        for name in ("state", "step", "batch_dev", "metrics", "hf", "opt", "pixel_values", "labels"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        jax.clear_caches()


# ------------------------------------------------------------------------------------------ input resize


def resize_share(batch: int, rounds: int, images: int) -> dict:
    """The device side of `input.resize_on_device`, with bench_device_resize.py's JPEGs and host batches
    (640x480 sources, S scales, one canvas per batch): ms per image of `data.to_global_batch` (transfer +
    resize + normalisation, timed to block_until_ready, each batch shape compiled first) and of PIL decoding.
    Its own `time_to_global_batch` is not called: it builds its mesh through `run_config`, which imports
    pycocotools (absent on the GPU machines); the mesh here is the same default one."""
    import bench_device_resize as bdr

    jpegs = bdr.make_jpegs(images)
    decode_ms = bdr.decode_ms(jpegs)
    host_batches = bdr.make_host_batches(jpegs, batch, rounds)
    spec = sharding.batch_sharding(sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1]))
    shapes = set()
    for b in host_batches:
        key = (b["source_image"].shape, b["pixel_mask"].shape)
        if key not in shapes:
            shapes.add(key)
            jax.block_until_ready(data.to_global_batch(b, spec)["image"])
    walls = []
    for b in host_batches:
        t0 = time.perf_counter()
        jax.block_until_ready(data.to_global_batch(b, spec)["image"])
        walls.append(time.perf_counter() - t0)
    to_device_ms = 1e3 * float(np.median(walls)) / batch
    return dict(batch=batch, rounds=rounds, distinct_shapes=len(shapes), decode_ms_per_image=decode_ms,
                to_device_ms_per_image=to_device_ms, to_device_vs_decode=to_device_ms / decode_ms)


# ------------------------------------------------------------------------------------------ report


def _f(v, fmt: str, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return format(v, fmt) + unit


def markdown_table(rows: list, resize: dict | None, device: str, peak_tflops: float) -> str:
    """The results as markdown for BENCHMARKS.md."""
    lines = [
        f"Device: {device}; MFU against {peak_tflops:g} TFLOP/s (bf16 dense). Model FLOPs: XLA's cost analysis "
        "of the step with explicit-matmul attention (2 per multiply-add).",
        "",
        "| model | image | batch | ours img/s | HF img/s | ours / HF | model TFLOP / step | ours TFLOP/s | MFU "
        "| ours peak GiB (step's own) | HF peak GiB | batch-1 forward ours / HF ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gib = 2.0**30
    nan = float("nan")
    for r in rows:
        head = f"| {r['variant']} | {r['image']} | {r['batch']} |"
        if "ours_ips" not in r and "hf_ips" not in r:
            lines.append(head + f" {r.get('error') or r.get('skipped', 'n/a')} |" + " |" * 8)
            continue
        lines.append(
            f"{head} {r.get('error') or _f(r['ours_ips'], '.4g')} | {r.get('hf_error') or _f(r.get('hf_ips'), '.4g')} | "
            f"{_f(r.get('ratio'), '.2f')} | {_f(r.get('flops_model', nan) / 1e12, '.4g')} | "
            f"{_f(r.get('ours_tflops'), '.4g')} | {_f(100 * r.get('mfu', nan), '.3g', '%')} | "
            f"{_f(r.get('ours_peak_bytes', nan) / gib, '.3g')} ({_f(r.get('step_mem_bytes', nan) / gib, '.3g')}) | "
            f"{_f(r.get('hf_peak_bytes', nan) / gib, '.3g')} | "
            f"{_f(r.get('ours_b1_ms'), '.3g')} / {_f(r.get('hf_b1_ms'), '.3g')} |")
    if resize:
        lines += [
            "",
            "| input resize on the device (S scales, 640x480 sources) | to_global_batch ms / image | PIL decode "
            "ms / image (1 core) | resize / decode | resize / S train step time per image |",
            "|---|---|---|---|---|",
            f"| batch {resize['batch']}, {resize['rounds']} batches, {resize['distinct_shapes']} shapes | "
            f"{_f(resize['to_device_ms_per_image'], '.3g')} | {_f(resize['decode_ms_per_image'], '.3g')} | "
            f"{_f(resize['to_device_vs_decode'], '.2f', 'x')} | {_f(resize.get('vs_s_step'), '.1%')} |",
        ]
    return "\n".join(lines)


def parse_batches(spec: str, variants: list, tiny: bool) -> dict:
    """--batch: '' (defaults), 'N' (every case) or 'ti=32,s=16' (per variant, the rest default)."""
    out = {v: TINY_BATCH if tiny else CASES[v][1] for v in variants}
    for part in filter(None, spec.split(",")):
        if "=" in part:
            k, n = part.split("=", 1)
            if k not in CASES:
                raise ValueError(f"--batch: unknown variant {k!r}")
            out[k] = int(n)
        else:
            out = {v: int(part) for v in variants}
    return out


def write_json(path: str, results: dict) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=float)
        os.replace(tmp, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="ti,s,b", help="comma-separated subset of: ti, s, b (run in this order)")
    parser.add_argument("--batch", default="", help="'N' for every case or 'ti=32,s=16,b=8' (default: those)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps of each side (default 20, tiny 3; fewer past the time guard)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after the first (compiling) one (default 3, tiny 1)")
    parser.add_argument("--latency-repeats", type=int, default=None,
                        help="timed batch-1 forwards of each side (default 20, tiny 3)")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS,
                        help="the device's bf16 dense peak for MFU (H200: 989)")
    parser.add_argument("--skip-hf", action="store_true", help="ours only")
    parser.add_argument("--skip-resize", action="store_true", help="no input-resize measurement")
    parser.add_argument("--resize-batch", type=int, default=None, help="images per resize batch (default 8; tiny 2)")
    parser.add_argument("--resize-rounds", type=int, default=None, help="timed resize batches (default 20; tiny 2)")
    parser.add_argument("--tiny", action="store_true",
                        help="2-block models of 16 channels per head, 64x96 images, batch 2: the CPU test")
    parser.add_argument("--attention-impl", default=None, help="config.model.attention_impl of ours (default None)")
    parser.add_argument("--hf-autocast", choices=("auto", "on", "off"), default="auto",
                        help="HF under torch.autocast(bfloat16): 'auto' = on a GPU only (bf16 autocast on a CPU "
                             "is many times slower than float32 there)")
    parser.add_argument("--max-boxes", type=int, default=100, help="box slots per image (capped at the [DET] tokens)")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds from the start shared among the cases (the guard of the 8-minute run)")
    parser.add_argument("--min-case-s", type=float, default=None,
                        help="skip a case whose share of the budget is below this (default 45; tiny 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default="", help="results as JSON, rewritten after every case")
    args = parser.parse_args(argv)
    for name, full, tiny in (("steps", 20, 3), ("warmup", 3, 1), ("latency_repeats", 20, 3)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in CASES:
            parser.error(f"--variants: unknown variant {v!r}; choose from {sorted(CASES)}")
    batches = parse_batches(args.batch, variants, args.tiny)
    min_case_s = args.min_case_s if args.min_case_s is not None else (0.0 if args.tiny else 45.0)
    deadline = START + args.time_budget
    if args.tiny and not torch.cuda.is_available():
        torch.set_num_threads(1)  # the CPU test: torch's OpenMP workers spin-wait on a busy machine

    dev = jax.devices()[0]
    torch_dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    device = f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}, torch {torch.__version__} on {torch_dev}"
    print(f"{device}; transformers {transformers.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    results = {"device": device, "peak_tflops": args.peak_tflops, "tiny": args.tiny, "cases": [], "resize": None}
    rows = results["cases"]
    for i, variant in enumerate(variants):
        hw = TINY_HW if args.tiny else CASES[variant][0]
        row = dict(variant=variant, image=f"{hw[0]}x{hw[1]}", batch=batches[variant])
        rows.append(row)
        share = (deadline - time.perf_counter()) / (len(variants) - i)
        if share < min_case_s:
            row["skipped"] = f"skipped: {share:.0f} s of the time budget left for it"
            print(f"{variant}: {row['skipped']}", flush=True)
            continue
        t_case = time.perf_counter()
        case = None
        try:
            case = Case(variant, hw, batches[variant], args)
            row.update(compile_s=case.compile_s, flops_model=case.flops_model, flops_compiled=case.flops_compiled,
                       step_mem_bytes=case.step_mem)
            row.update(case.run_ours(0.15 * share))
        except Exception as e:  # noqa: BLE001  (one failing case, e.g. out of memory, must not lose the others)
            traceback.print_exc()
            row["error"] = f"ours failed: {first_error_line(e)}"
        if case is not None and not args.skip_hf:  # HF's figures are worth having even if ours failed
            try:
                row.update(case.run_hf(0.2 * share))
                if "ours_ips" in row:
                    row["ratio"] = row["ours_ips"] / row["hf_ips"]
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row["hf_error"] = f"HF failed: {first_error_line(e)}"
        if case is not None and "ours_ips" in row:
            if time.perf_counter() < deadline:
                try:
                    row.update(case.run_latency(0.1 * share, args.skip_hf or "hf_error" in row))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    row["latency_error"] = first_error_line(e)
            else:
                row["latency_error"] = "skipped (time budget)"
        if case is not None:
            case.close()
        row["case_s"] = time.perf_counter() - t_case
        if "ours_ips" in row:
            print(f"{variant} {row['image']} batch {row['batch']}: compile {row['compile_s']:.1f} s; ours "
                  f"{row['ours_ips']:.4g} img/s ({row['ours_steps']} steps of {row['ours_step_ms']:.4g} ms), "
                  f"HF {_f(row.get('hf_ips'), '.4g')} img/s; model {row['flops_model'] / 1e9:.5g} GFLOP/step "
                  f"(the timed program's own count {row['flops_compiled'] / 1e9:.5g}); first-step loss ours "
                  f"{row['ours_first_loss'].get('loss', float('nan')):.5g} / HF "
                  f"{row.get('hf_first_loss', {}).get('loss', float('nan')):.5g}; case {row['case_s']:.0f} s",
                  flush=True)
        else:
            print(f"{variant}: {row.get('error') or row.get('skipped')}; HF {_f(row.get('hf_ips'), '.4g')} img/s "
                  f"{row.get('hf_error', '')}; case {row['case_s']:.0f} s", flush=True)
        write_json(args.json_out, results)

    if not args.skip_resize:
        if deadline - time.perf_counter() > (0 if args.tiny else 20):
            try:
                resize = resize_share(args.resize_batch or (2 if args.tiny else 8),
                                      args.resize_rounds or (2 if args.tiny else 20), 2 if args.tiny else 16)
                s_rows = [r for r in rows if r["variant"] == "s" and "ours_ips" in r]
                if s_rows:
                    resize["vs_s_step"] = resize["to_device_ms_per_image"] / (1e3 / s_rows[0]["ours_ips"])
                results["resize"] = resize
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                results["resize_error"] = first_error_line(e)
        else:
            print("input resize: skipped (time budget)", flush=True)
    results["total_s"] = time.perf_counter() - START
    write_json(args.json_out, results)
    results["table"] = markdown_table(rows, results["resize"], device, args.peak_tflops)
    print(f"\ntotal {results['total_s']:.0f} s\n\n{results['table']}", flush=True)
    return results


if __name__ == "__main__":
    main()
