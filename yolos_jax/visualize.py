r"""The paper's [DET]-token visualisations (yolos_paper.md Sec. 3.5, the original README) and annotated images.

  python -m yolos_jax.visualize --config=configs/yolos_s.py --checkpoint=WORKDIR_OR_CONVERTED_DIR --out=DIR

writes into DIR:
  det_token_centers.png   Fig. 2: for the first `--num_tokens` [DET] tokens, the centres of all their box
                          predictions over the val images, normalised by each image's size, coloured by the
                          predicted box's area in original pixels: blue small (<= 32^2), green medium,
                          red large (>= 96^2), the COCO size ranges the original script uses;
  det_token_categories.png  Fig. 3: per category, the ground-truth count (red) against the number of
                          predictions of that category per [DET] token (blue: mean over tokens, error bar =
                          std across tokens), log scale with +1 as the original; plus the numbers as
                          det_token_categories.json;
  attention/img<id>_tok<k>.png  the last layer's self-attention of [DET] token k over the patches, one
                          panel per head and their mean, for the top-scoring tokens of the first val images.

Every prediction of every token is used for Figs. 2 and 3 (no score threshold), as the original.

The attention maps are recomputed outside the model: flax `capture_intermediates` records the input of the
last block's attention (the output of its first LayerNorm), and the softmax(q k^T / sqrt(d)) weights are
recomputed from the block's fused qkv parameters with the same key mask. No change to the model is
needed; `attention_weights` is tested against HF's `output_attentions`.

Also here: `write_annotated_val_images`, the predictions drawn on val images at the end of training (readable
size, threshold, faint top-k: `run_plots`, which also owns the contact sheet and the learning curve). The logic
of `infer.py` (image files in -> annotated PNGs + detections JSON) is `inference.run_inference`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from yolos_jax import atomic, coco_eval, data, draw, evaluation, run_plots, runtime, sharding, speed, weights
from yolos_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from yolos_jax.errors import UserError
from yolos_jax.yolos import patch_key_mask

# COCO's object size ranges (pixels^2), as the original visualisation script.
SMALL_AREA = 32 * 32
LARGE_AREA = 96 * 96
SIZE_COLORS = ("tab:blue", "tab:green", "tab:red")  # small, medium, large


# --------------------------------------------------------------------------------------------------
# Fig. 2: box centres per [DET] token
# --------------------------------------------------------------------------------------------------


def size_class(area_pixels: np.ndarray) -> np.ndarray:
    """0 small (area <= 32^2), 1 medium, 2 large (area >= 96^2); as the original script."""
    a = np.asarray(area_pixels, np.float64)
    return np.where(a <= SMALL_AREA, 0, np.where(a < LARGE_AREA, 1, 2))


def token_centers(rel_boxes: np.ndarray, orig_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token, the normalised centres and size classes of its predictions.

    Args:
      rel_boxes: [N, Q, 4] (cx, cy, w, h) in [0, 1] (the model's output) for N images.
      orig_size: [N, 2] (h, w) original image sizes.
    Returns:
      centers [Q, N, 2] (cx, cy) in [0, 1]; size classes [Q, N] from the area in original pixels.
    """
    rel = np.asarray(rel_boxes, np.float64)
    hw = np.asarray(orig_size, np.float64)
    area = rel[..., 2] * hw[:, None, 1] * rel[..., 3] * hw[:, None, 0]
    return np.transpose(rel[..., :2], (1, 0, 2)), size_class(area).T


def plot_token_centers(rel_boxes: np.ndarray, orig_size: np.ndarray, path: str, num_tokens: int = 10) -> None:
    """Fig. 2 as a PNG: one square panel per [DET] token (the first `num_tokens`)."""
    plt = draw.pyplot()
    centers, classes = token_centers(rel_boxes, orig_size)
    k = min(int(num_tokens), centers.shape[0])
    fig, axes = plt.subplots(1, k, figsize=(2.2 * k, 2.6), squeeze=False)
    for t, ax in enumerate(axes[0]):
        colors = np.asarray(SIZE_COLORS)[classes[t]]
        ax.scatter(centers[t, :, 0], centers[t, :, 1], c=list(colors), s=5, alpha=0.3, linewidths=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)  # image coordinates: y grows downwards
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"[DET] #{t}", fontsize=9)
    fig.suptitle("box centres per [DET] token (blue small, green medium, red large)", fontsize=9)
    fig.tight_layout()
    draw.save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Fig. 3: category distribution of ground truth vs. predictions per token
# --------------------------------------------------------------------------------------------------


def category_distribution(labels: np.ndarray, gt_category_ids: Sequence[int], label_map: Any) -> dict:
    """Counts behind Fig. 3.

    Args:
      labels: [N, Q] predicted label indices (every token of every image).
      gt_category_ids: category id of every (non-crowd) ground-truth object of the same images.
      label_map: the dataset's LabelMap.
    Returns:
      {'categories': [{'id', 'name'}], 'gt': [C] counts, 'per_token': [Q][C] counts,
       'token_mean': [C], 'token_std': [C]} over the dataset's categories (sorted ids).
    """
    labels = np.asarray(labels)
    cat_ids = list(label_map.category_ids)
    col = {c: i for i, c in enumerate(cat_ids)}
    q = labels.shape[1]
    per_token = np.zeros((q, len(cat_ids)), np.int64)
    for t in range(q):
        for lab, n in zip(*np.unique(labels[:, t], return_counts=True)):
            lab = int(lab)
            if lab < label_map.num_classes and label_map.is_used(lab):
                per_token[t, col[label_map.to_category(lab)]] += int(n)
    gt = np.zeros((len(cat_ids),), np.int64)
    for c in gt_category_ids:
        gt[col[int(c)]] += 1
    names = [label_map.names[label_map.to_label(c)] for c in cat_ids]
    return {
        "categories": [{"id": int(c), "name": n} for c, n in zip(cat_ids, names)],
        "gt": gt.tolist(),
        "per_token": per_token.tolist(),
        "token_mean": per_token.mean(axis=0).tolist(),
        "token_std": per_token.std(axis=0).tolist(),
    }


def plot_category_distribution(dist: Mapping[str, Any], path: str) -> None:
    """Fig. 3 as a PNG (counts + 1 on a log axis, as the original)."""
    plt = draw.pyplot()
    names = [c["name"] for c in dist["categories"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.5))
    mean = np.asarray(dist["token_mean"]) + 1
    ax.errorbar(x, mean, yerr=np.asarray(dist["token_std"]), color="tab:blue", marker=".", capsize=2,
                label="[DET] tokens: mean count per token (bar: std across tokens)")
    ax.plot(x, np.asarray(dist["gt"]) + 1, color="tab:red", marker="+", label="ground truth")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=-90, fontsize=7)
    ax.set_ylabel("#objects + 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    draw.save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Attention of the [DET] tokens in the last layer
# --------------------------------------------------------------------------------------------------


def attention_weights(model: Any, params: Any, images: np.ndarray, pixel_mask: Optional[np.ndarray] = None,
                      layer: int = -1) -> dict[str, np.ndarray]:
    """Self-attention probabilities of one encoder block, recomputed from its captured input.

    Args:
      model: the `YOLOS` module; params: its params.
      images: [B, H, W, 3] normalised images; pixel_mask: [B, H, W] bool or None.
      layer: block index (default: the last).
    Returns:
      {'attention': [B, heads, T, T] float32 (rows: queries, over [CLS] + gh*gw patches + Q [DET]),
       'grid': (gh, gw), 'logits', 'boxes' (the model outputs of the same forward)}.
    """
    images = np.asarray(images, np.float32)
    mask = None if pixel_mask is None else np.asarray(pixel_mask, bool)
    mesh = sharding.single_device_mesh()
    # In a multi-process run, `Evaluator.place` replicated the params over every process's devices.
    params = sharding.on_single_device(params, mesh)
    attn, logits, boxes = _attention_fn(model, int(layer) % int(model.depth), mesh)(params, images, mask)
    grid = (images.shape[1] // model.patch_size, images.shape[2] // model.patch_size)
    return {"attention": np.asarray(attn), "grid": grid, "logits": np.asarray(logits), "boxes": np.asarray(boxes)}


@functools.lru_cache(maxsize=8)
def _attention_fn(model: Any, layer: int, mesh: Any):
    """The jitted recomputation for (model, layer), built once (XLA then caches per input shape)."""
    block = f"block_{layer}"

    def capture(mdl, _method):
        return mdl.scope is not None and tuple(mdl.scope.path) == (block, "norm1")

    def run(p, x, m):
        out, state = model.apply({"params": p}, x, m, capture_intermediates=capture, mutable=["intermediates"])
        y = state["intermediates"][block]["norm1"]["__call__"][0].astype(jnp.float32)  # [B, T, D]
        attn_p = p[block]["attn"]["qkv"]
        qkv = y @ attn_p["kernel"].astype(jnp.float32)
        if "bias" in attn_p:
            qkv = qkv + attn_p["bias"].astype(jnp.float32)
        b, t, d = y.shape
        heads = int(model.num_heads)
        qkv = qkv.reshape(b, t, 3, heads, d // heads)  # fused kernel columns: (q | k | v), head-major
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        logits = jnp.einsum("bthd,bshd->bhts", q, k, precision=jax.lax.Precision.HIGHEST) * (d // heads) ** -0.5
        if m is not None:  # the model's key mask: padded patches are never attended to
            grid = (x.shape[1] // model.patch_size, x.shape[2] // model.patch_size)
            keys = jnp.concatenate(
                [jnp.ones((b, 1), bool), patch_key_mask(m, model.patch_size, grid),
                 jnp.ones((b, model.num_det_tokens), bool)], axis=1)
            logits = jnp.where(keys[:, None, None, :], logits, -jnp.inf)
        return jax.nn.softmax(logits, axis=-1), out["logits"], out["boxes"]

    # Under a mesh of the first device (`sharding.mesh_jit`): splash attention runs its kernel there rather
    # than its no-mesh fallback when several devices are visible.
    return sharding.mesh_jit(run, mesh)


def det_token_maps(attention: np.ndarray, grid: Sequence[int], num_det_tokens: int) -> np.ndarray:
    """[B, heads, T, T] attention -> [B, heads, Q, gh, gw]: each [DET] token's weights on the patches."""
    gh, gw = int(grid[0]), int(grid[1])
    att = np.asarray(attention)[:, :, -num_det_tokens:, 1 : 1 + gh * gw]
    return att.reshape(att.shape[0], att.shape[1], num_det_tokens, gh, gw)


def plot_token_attention(image_uint8: np.ndarray, maps: np.ndarray, box_xyxy: Optional[np.ndarray], title: str,
                         path: str) -> None:
    """One [DET] token: the image with its box, then its attention over the image for each head and
    their mean. maps: [heads, gh, gw] (over the un-padded grid); image: [h, w, 3] uint8."""
    plt = draw.pyplot()
    heads = maps.shape[0]
    h, w = image_uint8.shape[:2]
    panels = heads + 2
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 2.6 * h / max(w, 1) + 0.5), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image_uint8)
    if box_xyxy is not None:
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", linewidth=2))
    axes[0].set_title(title, fontsize=8)
    for k in range(heads + 1):
        m = maps[k] if k < heads else maps.mean(axis=0)
        ax = axes[k + 1]
        ax.imshow(image_uint8, alpha=0.35)
        ax.imshow(m, cmap="inferno", alpha=0.75, extent=(0, w, h, 0), interpolation="nearest")
        ax.set_title(f"head {k}" if k < heads else "mean", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    draw.save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# Annotated val images (the end of training)
# --------------------------------------------------------------------------------------------------


def write_annotated_val_images(params: Any, model_cfg: dict, input_cfg: Any, out_dir: str,
                               num_images: int = 8, threshold: float = 0.5, top_k: int = 5) -> list[str]:
    """Draws the detector's predictions on the first `num_images` val images of `input_cfg` (a resolved
    `config.input`) as out_dir/<image id>.png at a readable size (short side >= 480 px): score > threshold solid,
    the next `top_k` faint, tags that never cover each other. Returns the PNG paths.

    The same as `run_plots.write_annotated_images(run_plots.val_rows(...))`; `run_plots.write_eval_pictures`
    also writes the contact sheet from the same predictions.
    """
    rows = run_plots.val_rows(params, model_cfg, input_cfg, num_images)
    return run_plots.write_annotated_images(rows, out_dir, threshold=threshold, top_k=top_k)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def make_figures(config: Any, checkpoint: str, out_dir: str, *, max_images: int = 0, num_tokens: int = 10,
                 attention_images: int = 2, attention_tokens: int = 2) -> dict[str, list[str]]:
    """Writes the three figures for `checkpoint` on the val split of `config.input` into `out_dir`.

    Returns {'centers': [path], 'categories': [path, json], 'attention': [paths]}.
    """
    input_cfg = weights.input_config_for_checkpoint(config.input, checkpoint)
    params, model, meta = weights.load_model(checkpoint)
    evaluator = evaluation.Evaluator(config.eval, input_cfg, model)
    evaluation.check_label_map(evaluator.label_map, model.num_classes, meta)
    params = evaluator.place(params)
    pred = evaluator.predict(params, max_images=max_images)
    written: dict[str, list[str]] = {"centers": [], "categories": [], "attention": []}
    if jax.process_index() != 0:
        return written
    path = os.path.join(out_dir, "det_token_centers.png")
    plot_token_centers(pred["rel_boxes"], pred["orig_size"], path, num_tokens)
    written["centers"].append(path)

    gt = evaluator.coco_gt
    ids = {int(i) for i in pred["image_id"]}
    gt_cats = [a["category_id"] for a in gt.dataset["annotations"] if a["image_id"] in ids and not a.get("iscrowd", 0)]
    dist = category_distribution(pred["labels"], gt_cats, evaluator.label_map)
    path = os.path.join(out_dir, "det_token_categories.png")
    plot_category_distribution(dist, path)
    atomic.write_json_atomic(os.path.join(out_dir, "det_token_categories.json"), dist, indent=1)
    written["categories"] += [path, os.path.join(out_dir, "det_token_categories.json")]

    done = 0
    for batch in evaluator.batches(batch_size=1):
        if done >= attention_images:
            break
        if not batch["valid"][0]:
            continue
        batch = data.with_host_image(batch)
        h, w = (int(v) for v in batch["size"][0])
        image = speed.normalized(batch["image"][:1, :h, :w])  # un-padded: the grid is the image's
        res = attention_weights(model, params, image)
        maps = det_token_maps(res["attention"], res["grid"], model.num_det_tokens)[0]  # [heads, Q, gh, gw]
        scores, labels, boxes = (np.asarray(v)[0] for v in coco_eval.postprocess(
            res["logits"], res["boxes"], np.asarray([[h, w]])))
        rgb = draw.to_uint8(image[0], IMAGENET_MEAN, IMAGENET_STD)
        image_id = int(batch["image_id"][0])
        for tok in np.argsort(-scores, kind="stable")[: int(attention_tokens)]:
            lab = int(labels[tok])
            name = evaluator.label_map.names[lab] if lab < evaluator.label_map.num_classes else str(lab)
            path = os.path.join(out_dir, "attention", f"img{image_id}_tok{int(tok)}.png")
            plot_token_attention(rgb, maps[:, tok], boxes[tok],
                                 f"[DET] #{int(tok)}: {name} {scores[tok]:.2f}", path)
            written["attention"].append(path)
        done += 1
    return written


def main(argv: Sequence[str]) -> None:
    flags_ = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    runtime.setup_host()
    try:
        written = make_figures(
            flags_.config, flags_.checkpoint, flags_.out, max_images=flags_.max_images, num_tokens=flags_.num_tokens,
            attention_images=flags_.attention_images, attention_tokens=flags_.attention_tokens,
        )
    except UserError as e:  # e.g. a checkpoint that does not restore: one line, no traceback
        runtime.exit_with_error(e)
    for kind, paths in written.items():
        for p in paths:
            print(f"{kind}: {p}")


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Config file (its input and eval sub-configs are used).",
                                    lock_config=True)
    flags.DEFINE_string("checkpoint", None, "Converted checkpoint dir, training workdir or checkpoint step dir.")
    flags.DEFINE_string("out", None, "Output directory for the PNGs.")
    flags.DEFINE_integer("max_images", 0, "Use only the first N val images for Figs. 2 and 3 (0: all).")
    flags.DEFINE_integer("num_tokens", 10, "[DET] tokens shown in Fig. 2 (the paper: the first 10).")
    flags.DEFINE_integer("attention_images", 2, "Val images for the attention maps.")
    flags.DEFINE_integer("attention_tokens", 2, "Top-scoring [DET] tokens per image for the attention maps.")
    flags.mark_flags_as_required(["config", "checkpoint", "out"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
