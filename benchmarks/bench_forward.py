"""Forward latency of yolos_jax against HF transformers' YolosForObjectDetection (sdpa), on CPU.

    /work/venv/bin/python benchmarks/bench_forward.py            # Ti 1x512x688 and S 1x800x1066
    /work/venv/bin/python benchmarks/bench_forward.py --dtype=bfloat16 --repeats=9

Both models get the same random weights (HF is built with random init and its state dict is mapped onto
our parameter tree here), the same input, batch 1 and the same number of CPU threads (`--threads`, default
all cores: torch.set_num_threads and XLA's intra-op pool both use that many). Timings are interleaved
(ours, HF, ours, HF, ...) so that load from other processes hits both alike; we report medians, the
ratio of medians, and the spread of the per-pair ratios as the noise figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

def _threads_from_argv(argv) -> int:
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
        if a == "--threads":
            return int(argv[i + 1])
    return len(os.sched_getaffinity(0))


# Both libraries must see the same cores: pin the process before jax and torch create their thread pools
# (XLA sizes its pool from the affinity mask; torch gets set_num_threads below).
THREADS = _threads_from_argv(sys.argv[1:])
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])

# XLA flags must be in the environment before jax is imported.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from yolos_jax import xla_flags  # noqa: E402  (imports no jax)

xla_flags.set_cpu_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from yolos_jax.config import model_config  # noqa: E402
from yolos_jax.yolos import YOLOS  # noqa: E402

# (variant, image (H, W), HF image_size = the stored position-embedding grid in pixels)
CASES = {
    "ti": dict(image_hw=(512, 688)),
    "s": dict(image_hw=(800, 1066)),
}


def hf_model(cfg):
    """HF YolosForObjectDetection with random weights and the same architecture as our `cfg`."""
    from transformers import YolosConfig, YolosForObjectDetection

    if cfg.mid_pe_size is not None and tuple(cfg.mid_pe_size) != tuple(cfg.init_pe_size):
        raise ValueError("HF YOLOS stores one grid for both position embeddings")
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
    # HF initialises tokens and position embeddings to zeros/near-constants; give every tensor random
    # values so that the numerical check below means something.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def hf_to_params(state: dict, cfg) -> dict:
    """Maps a HF YOLOS state dict onto our parameter tree (float32 numpy)."""
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()}
    q = cfg.num_det_tokens
    p = cfg.patch_size
    gh, gw = cfg.init_pe_size[0] // p, cfg.init_pe_size[1] // p
    d = cfg.hidden_size

    def dense(prefix):
        return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}

    def ln(prefix):
        return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

    pos = sd["vit.embeddings.position_embeddings"]  # [1, 1 + gh*gw + Q, D]
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
        mid = sd["vit.encoder.interpolation.mid_position_embeddings"][:, 0]  # [depth-1, T, D]
        params["mid_pos_embed_cls"] = mid[:, :1]
        params["mid_pos_embed_patches"] = mid[:, 1:-q].reshape(-1, gh, gw, d)
        params["mid_pos_embed_det"] = mid[:, -q:]
    for i in range(cfg.depth):
        h = f"vit.encoder.layer.{i}."
        a = h + "attention.attention."
        params[f"block_{i}"] = {
            "norm1": ln(h + "layernorm_before"),
            "attn": {
                "qkv": {
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


def check_tree(params, model, image_shape):
    """Fails loudly if the mapped tree differs from the model's own tree (names or shapes)."""
    want = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape, jnp.float32))["params"]
    got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(want) != jax.tree.leaves(got):
        raise AssertionError(f"parameter tree mismatch:\n{jax.tree.map(np.shape, want)}\nvs\n{got}")


def interleaved(fns: dict, repeats: int) -> dict:
    """Runs each fn once per round, alternating the order each round; returns {name: [seconds]}."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_case(variant: str, dtype: str, repeats: int, warmup: int) -> dict:
    case = CASES[variant]
    h, w = case["image_hw"]
    cfg = model_config(variant, dtype=dtype)
    if variant == "ti":
        cfg.layer_norm_eps = 1e-12  # as the HF-converted configs; both models get the same eps.
    else:
        cfg.layer_norm_eps = 1e-12
    torch_model = hf_model(cfg)
    params = jax.device_put(hf_to_params(torch_model.state_dict(), cfg))
    model = YOLOS(**cfg)
    check_tree(params, model, (1, h, w, 3))

    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, h, w, 3)).astype(np.float32)
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
    image_j = jax.device_put(image)

    t0 = time.perf_counter()
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, image_j).compile()
    compile_s = time.perf_counter() - t0

    def ours():
        out = fwd(params, image_j)
        jax.block_until_ready(out)
        return out

    def hf():
        with torch.inference_mode():
            return torch_model(pixel_values=image_t)

    out_j, out_t = ours(), hf()
    err = {
        "logits": float(np.abs(np.asarray(out_j["logits"]) - out_t.logits.numpy()).max()),
        "boxes": float(np.abs(np.asarray(out_j["boxes"]) - out_t.pred_boxes.numpy()).max()),
    }
    for _ in range(warmup):
        ours(), hf()
    times = interleaved({"ours": ours, "hf": hf}, repeats)
    t_ours, t_hf = np.array(times["ours"]), np.array(times["hf"])
    pair = t_ours / t_hf
    mem = fwd.memory_analysis()
    return dict(
        variant=variant,
        dtype=dtype,
        shape=(1, h, w),
        tokens=1 + (h // 16) * (w // 16) + cfg.num_det_tokens,
        ours_ms=1e3 * np.median(t_ours),
        hf_ms=1e3 * np.median(t_hf),
        ratio=np.median(t_ours) / np.median(t_hf),
        pair_q=np.percentile(pair, [25, 75]),
        spread_ours=(t_ours.max() - t_ours.min()) / np.median(t_ours),
        spread_hf=(t_hf.max() - t_hf.min()) / np.median(t_hf),
        compile_s=compile_s,
        err=err,
        temp_mb=getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else float("nan"),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="ti,s", help="comma-separated: ti, s")
    parser.add_argument("--dtype", default="float32", help="compute dtype of ours: float32 or bfloat16")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each: one call of each model)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first call")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="cores for both libraries (the process is pinned to the first N; default all)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, pinned to cores {sorted(os.sched_getaffinity(0))}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []
    for variant in args.variants.split(","):
        r = bench_case(variant, args.dtype, args.repeats, args.warmup)
        rows.append(r)
        print(
            f"{r['variant']:>3} {r['dtype']:>8} {'x'.join(map(str, r['shape'])):>11} T={r['tokens']:5d} "
            f"ours {r['ours_ms']:8.1f} ms  HF {r['hf_ms']:8.1f} ms  ratio {r['ratio']:.3f} "
            f"(pair IQR {r['pair_q'][0]:.3f}-{r['pair_q'][1]:.3f}; spread ours {100 * r['spread_ours']:.0f}% "
            f"HF {100 * r['spread_hf']:.0f}%)  max|d| logits {r['err']['logits']:.1e} boxes "
            f"{r['err']['boxes']:.1e}  compile {r['compile_s']:.1f} s  XLA temp {r['temp_mb']:.0f} MiB",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
