"""Why the demo uses ConvStem: how fast a from-scratch ViT learns the demo's shapes, patchify vs ConvStem.

    python benchmarks/study_demo_stem.py --data=workdir/demo/data/synthetic            # both stems
    python benchmarks/study_demo_stem.py --data=... --stems=linear --crop=aligned        # the easy control

A study, not a speed benchmark. The demo's detector found its objects (98% at IoU > 0.5) but told circles
from squares no better than a coin (BENCHMARKS.md, the demo section). This isolates the backbone from the
detection loss: a classifier with the demo's ViT (96 wide, 6 deep, 3 heads, patch 16, a [CLS] token, no
pre-training) learns circle / square / triangle from crops of the demo's images.

  --crop=context: a 96x96 window at native resolution around each object, its centre jittered by up to
      +-8 px, so the object sits anywhere relative to the patch grid (as in detection; neighbours may
      intrude);
  --crop=aligned: the object's box plus a 10% margin resized to 48x48, so it fills a 3x3 patch grid
      (the easy control).

Trains each stem with AdamW 1e-3, batch 64, the same seed and crop order, and prints validation accuracy
every 250 steps on the val split's objects. The ConvStem is the model's `patch_embed='conv_stem'`
(MIMDet; `yolos_jax.variants.ConvStem`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def load_crops(root: str, split: str, mode: str, limit: int, rng: np.random.Generator):
    """(crops [N, S, S, 3] float32 ImageNet-normalised, labels [N] int, number of classes) for the first
    `limit` objects of a split."""
    from PIL import Image

    with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
        coco = json.load(f)
    images = {im["id"]: im for im in coco["images"]}
    cats = sorted(c["id"] for c in coco["categories"])
    crops, labels, cached = [], [], (None, None)
    for ann in coco["annotations"][:limit]:
        info = images[ann["image_id"]]
        if cached[0] != info["id"]:
            cached = (info["id"], Image.open(os.path.join(root, split, info["file_name"])).convert("RGB"))
        img = cached[1]
        x, y, w, h = ann["bbox"]
        if mode == "aligned":
            m = 0.1 * max(w, h)
            crop = img.crop((x - m, y - m, x + w + m, y + h + m)).resize((48, 48), Image.BILINEAR)
        else:
            cx, cy = x + w / 2 + rng.uniform(-8, 8), y + h / 2 + rng.uniform(-8, 8)
            left, top = int(cx - 48), int(cy - 48)
            crop = img.crop((left, top, left + 96, top + 96))  # outside the image: black
        crops.append(np.asarray(crop))
        labels.append(cats.index(ann["category_id"]))
    from yolos_jax.speed import normalized  # ImageNet normalisation, as the detector reads images

    return normalized(np.asarray(crops, np.uint8)), np.asarray(labels), len(cats)


def run(stem: str, train, val, num_classes: int, steps: int, seed: int) -> list[tuple[int, float, float]]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from yolos_jax import variants, vit

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x):
            if stem == "conv_stem":
                t = variants.ConvStem(96, 16)(x)
            else:
                t = vit.PatchEmbed(96, 16)(x)
            b, gh, gw, d = t.shape
            t = t.reshape(b, gh * gw, d) + self.param("pos", vit.trunc_normal_02, (1, gh * gw, d))
            cls = jnp.broadcast_to(self.param("cls", vit.trunc_normal_02, (1, 1, d)), (b, 1, d))
            t = jnp.concatenate([cls, t], axis=1)
            for _ in range(6):
                t = vit.EncoderBlock(num_heads=3, mlp_dim=384)(t, None)
            return nn.Dense(num_classes)(nn.LayerNorm()(t[:, 0]))

    (xt, yt), (xv, yv) = train, val
    model = Classifier()
    params = model.init(jax.random.PRNGKey(seed), xt[:2])
    tx = optax.adamw(1e-3, weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    accuracy = jax.jit(lambda p, x, y: jnp.mean(model.apply(p, x).argmax(-1) == y))
    order = np.random.default_rng(seed)
    curve, start = [], time.perf_counter()
    for s in range(1, steps + 1):
        idx = order.integers(0, len(yt), 64)
        params, opt, loss = step(params, opt, xt[idx], yt[idx])
        if s % 250 == 0:
            curve.append((s, float(accuracy(params, xv, yv)), time.perf_counter() - start))
            print(f"  {stem:9s} step {s:5d}  val acc {curve[-1][1]:.3f}  ({curve[-1][2]:.0f} s)", flush=True)
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a synthetic COCO-format folder (annotations/, train/, val/)")
    p.add_argument("--stems", default="linear,conv_stem")
    p.add_argument("--crop", choices=("context", "aligned"), default="context")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from yolos_jax import runtime

    runtime.setup_host()
    rng = np.random.default_rng(1)
    xt, yt, k = load_crops(a.data, "train", a.crop, 4200, rng)
    xv, yv, _ = load_crops(a.data, "val", a.crop, 300, rng)
    print(f"{len(yt)} train / {len(yv)} val crops ({a.crop}), {k} classes; chance {np.bincount(yv).max() / len(yv):.2f}")
    results = {stem: run(stem, (xt, yt), (xv, yv), k, a.steps, a.seed) for stem in a.stems.split(",")}
    print("\n| step | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for i, (s, _, _) in enumerate(next(iter(results.values()))):
        print(f"| {s} | " + " | ".join(f"{results[st][i][1]:.3f}" for st in results) + " |")


if __name__ == "__main__":
    main()
