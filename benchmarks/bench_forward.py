"""Forward latency of yolos_jax against HF transformers' YolosForObjectDetection (sdpa), on CPU.

    /work/venv/bin/python benchmarks/bench_forward.py                     # Ti 1x512x688, S 1x800x1066
    /work/venv/bin/python benchmarks/bench_forward.py --threads=1         # both pinned to one core
    /work/venv/bin/python benchmarks/bench_forward.py --dtype=float32,bfloat16 --variants=ti
    /work/venv/bin/python benchmarks/bench_forward.py --threads=1 --pixel-mask   # ours as eval runs it

Cases (batch 1): YOLOS-Ti at 1x512x688 (position embeddings stored for 800x1333, no mid embeddings)
and YOLOS-S at 1x800x1066 (both embeddings stored for 512x864, so both are resized in every call).
With --pixel-mask ours also gets a pixel mask (all real pixels), as eval batches and `Detector.predict`
call it: the position embeddings are then resized per image inside the jitted call (traced bicubic
weights, batched matmuls, `vit.resize_posemb_grid_per_image`) instead of by host-computed taps.

Both models get the same random weights (HF is built with random init; its state dict is mapped onto our
parameter tree here and the tree is checked against the model's own), the same input and the same
cores: the process is pinned to the first `--threads` cores before jax and torch start their thread
pools (XLA sizes its pool from the affinity mask; torch gets `set_num_threads`). Ours is the jitted
`model.apply` (parameters are arguments, not constants; compiled before timing); HF runs under
`torch.inference_mode()` with `attn_implementation='sdpa'`. After one untimed call of each (the
outputs are compared: max |ours - HF|), calls are interleaved (ours, HF, HF, ours, ...) so that load
from other processes hits both alike. Printed per case: medians, the ratio of medians (ours / HF; < 1
means ours is faster), the interquartile range of the per-round ratios and the spread (max - min) /
median of each side as noise figures, and the extra resident memory of one call (peak RSS during the
call above the RSS before it, after returning freed heap to the OS) plus XLA's own temp-buffer figure.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time

import cpu_setup  # noqa: E402  (benchmarks/; pins cores, XLA flags, allocator: before jax and torch)

THREADS = cpu_setup.prepare(sys.argv[1:], pin=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from yolos_jax.config import model_config  # noqa: E402
from yolos_jax.yolos import YOLOS  # noqa: E402

IMAGE_HW = {"ti": (512, 688), "s": (800, 1066)}


# ------------------------------------------------------------------------------------------- models


def hf_model(cfg) -> torch.nn.Module:
    """HF YolosForObjectDetection (sdpa) with random weights and the architecture of our `cfg`."""
    from transformers import YolosConfig, YolosForObjectDetection

    if cfg.mid_pe_size is not None and tuple(cfg.mid_pe_size) != tuple(cfg.init_pe_size):
        raise ValueError("HF YOLOS stores one grid (image_size) for both position embeddings")
    hf_cfg = YolosConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim or 4 * cfg.hidden_size,
        image_size=list(cfg.init_pe_size),
        patch_size=cfg.patch_size,
        num_detection_tokens=cfg.num_det_tokens,
        use_mid_position_embeddings=cfg.mid_pe_size is not None,
        num_labels=cfg.num_classes,
        layer_norm_eps=cfg.layer_norm_eps,
        qkv_bias=cfg.qkv_bias,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = YolosForObjectDetection(hf_cfg).eval()
    # HF's init leaves tokens and position embeddings at zero and LayerNorms at identity; randomise
    # everything (weights scaled by fan-in so activations stay O(1)) so the output check means something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif p.ndim >= 2 and "position_embeddings" not in name and "token" not in name:
                p.normal_(0.0, p[0].numel() ** -0.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def hf_to_params(state: dict, cfg) -> dict:
    """Maps a HF YOLOS state dict onto our parameter tree (float32 numpy)."""
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()}
    q, p, d = cfg.num_det_tokens, cfg.patch_size, cfg.hidden_size
    gh, gw = cfg.init_pe_size[0] // p, cfg.init_pe_size[1] // p

    def dense(prefix):
        return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}

    def ln(prefix):
        return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

    pos = sd["vit.embeddings.position_embeddings"]  # [1, 1 + gh * gw + Q, D]
    params = {
        "patch_embed": {
            "proj": {
                "kernel": sd["vit.embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
                "bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
            }
        },
        "cls_token": sd["vit.embeddings.cls_token"],
        "det_tokens": sd["vit.embeddings.detection_tokens"],
        "pos_embed_cls": pos[:, :1],
        "pos_embed_patches": pos[:, 1:-q].reshape(1, gh, gw, d),
        "pos_embed_det": pos[:, -q:],
        "encoder_norm": ln("vit.layernorm"),
    }
    if cfg.mid_pe_size is not None:
        mid = sd["vit.encoder.interpolation.mid_position_embeddings"][:, 0]  # [depth - 1, T, D]
        params["mid_pos_embed_cls"] = mid[:, :1]
        params["mid_pos_embed_patches"] = mid[:, 1:-q].reshape(-1, gh, gw, d)
        params["mid_pos_embed_det"] = mid[:, -q:]
    for i in range(cfg.depth):
        h = f"vit.encoder.layer.{i}."
        a = h + "attention.attention."
        params[f"block_{i}"] = {
            "norm1": ln(h + "layernorm_before"),
            "attn": {
                "qkv": {  # fused [D, 3D] in (q | k | v) order
                    "kernel": np.concatenate([sd[a + n + ".weight"].T for n in ("query", "key", "value")], 1),
                    "bias": np.concatenate([sd[a + n + ".bias"] for n in ("query", "key", "value")], 0),
                },
                "proj": dense(h + "attention.output.dense"),
            },
            "norm2": ln(h + "layernorm_after"),
            "mlp": {"fc1": dense(h + "intermediate.dense"), "fc2": dense(h + "output.dense")},
        }
    for ours, theirs in (("class_head", "class_labels_classifier"), ("box_head", "bbox_predictor")):
        params[ours] = {f"layers_{j}": dense(f"{theirs}.layers.{j}") for j in range(3)}
    return params


def check_tree(params, model, image_shape) -> None:
    """Fails loudly if the mapped tree differs from the model's own (names or shapes)."""
    want = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape, jnp.float32))["params"]
    want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), want)
    got = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), params)
    if want != got:
        raise AssertionError(f"mapped HF parameters do not match the model's tree:\n{want}\nvs\n{got}")


# ---------------------------------------------------------------------------------------- measuring


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def extra_rss_mib(fn) -> float:
    """Peak RSS during one call of `fn` above the RSS before it, in MiB (Linux; nan elsewhere).

    Freed heap is first returned to the OS (malloc_trim) and the peak counter reset (clear_refs = 5), so
    buffers a library keeps cached between calls count only if they stay resident.
    """
    try:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_bytes("VmRSS")
        fn()
        return (_proc_status_bytes("VmHWM") - before) / 2**20
    except (OSError, KeyError):
        return float("nan")


def interleaved(fns: dict, repeats: int) -> dict:
    """Calls each fn once per round, reversing the order every other round; returns {name: [seconds]}."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_case(variant: str, dtype: str, attention_impl, repeats: int, pixel_mask: bool = False) -> dict:
    h, w = IMAGE_HW[variant]
    # HF-converted YOLOS configs carry eps 1e-12; both models get the same.
    cfg = model_config(variant, dtype=dtype, attention_impl=attention_impl, layer_norm_eps=1e-12)
    torch_model = hf_model(cfg)
    params = hf_to_params(torch_model.state_dict(), cfg)
    model = YOLOS(**cfg)
    check_tree(params, model, (1, h, w, 3))
    params = jax.device_put(params)

    image = np.random.default_rng(0).standard_normal((1, h, w, 3)).astype(np.float32)
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))  # HF takes NCHW
    image_j = jax.device_put(image)

    mask_j = jax.device_put(np.ones((1, h, w), bool)) if pixel_mask else None
    t0 = time.perf_counter()
    fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m)).lower(params, image_j, mask_j).compile()
    compile_s = time.perf_counter() - t0

    def ours():
        return jax.block_until_ready(fwd(params, image_j, mask_j))

    def hf():
        with torch.inference_mode():
            return torch_model(pixel_values=image_t)

    out_j, out_t = ours(), hf()  # also the warm-up call of each
    ref = {"logits": out_t.logits.numpy(), "boxes": out_t.pred_boxes.numpy()}
    err = {k: float(np.abs(np.asarray(out_j[k]) - ref[k]).max()) for k in ref}
    scale = {k: float(np.abs(ref[k]).max()) for k in ref}
    mem = {"ours": extra_rss_mib(ours), "hf": extra_rss_mib(hf)}
    analysis = fwd.memory_analysis()
    xla_temp = analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")

    times = interleaved({"ours": ours, "hf": hf}, repeats)
    t_ours, t_hf = np.array(times["ours"]), np.array(times["hf"])
    return dict(
        variant=variant,
        dtype=dtype + ("+mask" if pixel_mask else ""),
        image=f"1x{h}x{w}",
        tokens=1 + (h // cfg.patch_size) * (w // cfg.patch_size) + cfg.num_det_tokens,
        ours_ms=1e3 * np.median(t_ours),
        hf_ms=1e3 * np.median(t_hf),
        ratio=float(np.median(t_ours) / np.median(t_hf)),
        pair_iqr=np.percentile(t_ours / t_hf, [25, 75]),
        spread_ours=float(np.ptp(t_ours) / np.median(t_ours)),
        spread_hf=float(np.ptp(t_hf) / np.median(t_hf)),
        compile_s=compile_s,
        err=err,
        scale=scale,
        mem=mem,
        xla_temp_mib=xla_temp,
    )


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="ti,s", help="comma-separated subset of: ti, s")
    parser.add_argument(
        "--dtype", default="float32", help="comma-separated compute dtypes of ours (HF: float32)"
    )
    parser.add_argument("--attention-impl", default=None, help="YOLOS.attention_impl of ours (default: None)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, each one call of each model")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="cores for both libraries (the process is pinned to the first N; default all)")
    parser.add_argument("--pixel-mask", action="store_true",
                        help="ours gets a pixel mask (per-image position embeddings, as in evaluation)")
    args = parser.parse_args(argv)
    for v in args.variants.split(","):
        if v not in IMAGE_HW:
            parser.error(f"--variants: unknown variant {v!r}; choose from {sorted(IMAGE_HW)}")

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}; both on cores "
          f"{sorted(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(cpu_setup.describe_cpu(), flush=True)
    print("case               tokens  ours ms    HF ms  ours/HF  [per-round IQR]  spread ours/HF  "
          "max|d| logits, boxes (max|HF|)   extra RSS ours/HF MiB (XLA temp)  compile s", flush=True)
    rows = []
    for dtype in args.dtype.split(","):
        for variant in args.variants.split(","):
            r = bench_case(variant, dtype, args.attention_impl, args.repeats, args.pixel_mask)
            rows.append(r)
            print(
                f"{r['variant']:>2} {r['dtype']:<13} {r['image']:>11} {r['tokens']:5d} {r['ours_ms']:8.0f} "
                f"{r['hf_ms']:8.0f}  {r['ratio']:6.3f}  [{r['pair_iqr'][0]:.3f}, {r['pair_iqr'][1]:.3f}]  "
                f"{100 * r['spread_ours']:5.0f}%/{100 * r['spread_hf']:.0f}%  "
                f"{r['err']['logits']:.1e}, {r['err']['boxes']:.1e} ({r['scale']['logits']:.1f}, "
                f"{r['scale']['boxes']:.2f})   {r['mem']['ours']:6.0f} / {r['mem']['hf']:.0f} "
                f"({r['xla_temp_mib']:.0f})   {r['compile_s']:.1f}",
                flush=True,
            )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return rows


if __name__ == "__main__":
    main()
