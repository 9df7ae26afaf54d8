"""The speed/cost protocol (papers' Tables 4-6, following DETR).

Batch 1 over the first `config.eval.speed_images` val images at their own (un-padded) eval sizes; FPS =
images / forward seconds after compilation; FLOPs from XLA's cost analysis of the compiled forward (with
explicit-matmul attention, which the analysis counts fully). XLA counts a multiply-add as 2 FLOPs; the papers'
FLOPs (fvcore, as DETR) count it as 1, so tables report `xla_flops / 2` as "FLOPs (G)" and keep the raw XLA
count too.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from yolos_jax import data, sharding
from yolos_jax.data import transforms


def count_params(params: Any) -> int:
    """Number of parameters (scalars) in a pytree."""
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params)))


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled executable (`jax.jit(f).lower(...).compile()`), from XLA's cost analysis
    (2 per multiply-add). Count on explicit-matmul attention (`attention_impl='einsum'`): the analysis counts a
    loop body once and a fused custom call not at all."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    if flops is None or flops < 0:
        raise RuntimeError("XLA's cost analysis reported no 'flops' for the forward on this backend")
    return float(flops)


def measure_speed(model: Any, params: Any, images: Iterable[np.ndarray], *, warmup: int = 1,
                  repeats: int = 1) -> dict:
    """FPS and FLOPs of the forward at batch 1 (DETR/YOLOS protocol).

    Args:
      model: the `YOLOS` module.
      params: its params.
      images: [1, H, W, 3] float32 normalised images, each at its own un-padded eval size.
      warmup: untimed passes over `images` before timing (caches, allocator, clocks warm up).
      repeats: timed passes.
    Returns:
      {'num_images', 'fps', 'seconds_per_image', 'xla_gflops' (mean per image, XLA's count: 2 per
       multiply-add), 'gflops' (= xla_gflops / 2, the papers' convention), 'params', 'num_shapes'}.
    """
    imgs = [np.asarray(x, np.float32) for x in images]
    if not imgs:
        raise ValueError("measure_speed: no images")
    for x in imgs:
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[-1] != 3:
            raise ValueError(f"measure_speed: need [1, H, W, 3] images, got {x.shape}")
    # Batch 1 on one device, under a mesh of it (`sharding.mesh_jit`): splash attention runs its kernel there
    # rather than its no-mesh fallback when several devices are visible.
    mesh = sharding.single_device_mesh()
    fwd = sharding.mesh_jit(lambda p, x: model.apply({"params": p}, x), mesh)
    # In a multi-process `eval.py --speed`, `Evaluator.place` replicated the params over every process's devices.
    params = sharding.on_single_device(params, mesh)
    # FLOPs are counted on the same model with explicit-matmul attention: XLA's cost analysis counts a
    # loop body once and a fused-attention custom call not at all, so the fused/chunked attention paths
    # would under-report the attention FLOPs (which dominate at detection resolutions).
    count_model = model.clone(attention_impl="einsum") if hasattr(model, "attention_impl") else model
    count_fwd = jax.jit(lambda p, x: count_model.apply({"params": p}, x))
    compiled: dict[tuple, Any] = {}
    flops_by_shape: dict[tuple, float] = {}
    for x in imgs:
        if x.shape not in compiled:
            spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
            compiled[x.shape] = fwd.lower(params, spec).compile()  # the timed executable (no compile in the loop)
            flops_by_shape[x.shape] = compiled_flops(count_fwd.lower(params, spec).compile())
    device_imgs = sharding.on_single_device(imgs, mesh)
    for _ in range(int(warmup)):
        for x in device_imgs:
            jax.block_until_ready(compiled[x.shape](params, x))
    start = time.perf_counter()
    for _ in range(max(int(repeats), 1)):
        for x in device_imgs:
            jax.block_until_ready(compiled[x.shape](params, x))
    seconds = time.perf_counter() - start
    n = len(imgs) * max(int(repeats), 1)
    xla = float(np.mean([flops_by_shape[x.shape] for x in imgs])) / 1e9
    return {
        "num_images": len(imgs),
        "fps": n / seconds,
        "seconds_per_image": seconds / n,
        "xla_gflops": xla,
        "gflops": xla / 2.0,
        "params": count_params(params),
        "num_shapes": len(flops_by_shape),
    }


def normalized(image: np.ndarray) -> np.ndarray:
    """A batch image as the model reads it: float32 ImageNet-normalised (uint8 host images, from
    input.image_format='uint8', are normalised as the pipeline does on device)."""
    x = np.asarray(image)
    if x.dtype == np.uint8:
        return transforms.normalize_np(x)
    return x.astype(np.float32)


def unpadded_images(batches: Iterable[Mapping[str, np.ndarray]], num_images: int,
                    image_ids: Optional[Sequence[int]] = None) -> list[np.ndarray]:
    """Valid images of host batches, each cropped to its un-padded `size`: [1, h, w, 3] (at batch 1 the
    padding would otherwise count as work; uint8 images are normalised as the pipeline does).

    image_ids: take exactly these images, in this order (the iterator groups images by canvas, so the
      split's first images are not the first ones it yields); None: the first `num_images` yielded.
    """
    wanted = None if image_ids is None else [int(i) for i in image_ids][:num_images]
    found: dict[int, np.ndarray] = {}
    order: list[int] = []
    for batch in batches:
        batch = data.with_host_image(batch)
        for i in range(len(batch["valid"])):
            iid = int(batch["image_id"][i])
            if not batch["valid"][i] or (wanted is not None and (iid not in wanted or iid in found)):
                continue
            h, w = (int(v) for v in batch["size"][i])
            found[iid] = normalized(batch["image"][i : i + 1, :h, :w])
            order.append(iid)
            if len(found) >= (num_images if wanted is None else len(wanted)):
                return [found[k] for k in (order if wanted is None else wanted)]
    return [found[k] for k in (order if wanted is None else wanted) if k in found]


def speed_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows like the papers' Tables 4-6: Method, Size, AP, Params. (M), FLOPs (G), FPS (+ XLA GFLOPs).

    Each row: {'model', 'size' (shortest side), 'AP' (0-1 or None), 'params', 'gflops', 'xla_gflops', 'fps'}.
    """
    head = f"{'Method':<16}{'Size':>10}{'AP':>7}{'Params. (M)':>13}{'FLOPs (G)':>11}{'FPS':>8}{'XLA GFLOPs':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ap = r.get("AP")
        ap_s = "-" if ap is None else f"{100.0 * ap:.1f}"
        def g(v):  # the papers' one decimal; tiny test models need more
            return f"{v:.1f}" if v >= 1 else f"{v:.4f}"

        lines.append(
            f"{r['model']:<16}{str(r['size']) + ' x *':>10}{ap_s:>7}{r['params'] / 1e6:>13.1f}"
            f"{g(r['gflops']):>11}{r['fps']:>8.1f}{g(r['xla_gflops']):>12}"
        )
    lines.append("FLOPs (G): multiply-adds / 1e9 (the papers' fvcore convention = XLA flops / 2); "
                 "FPS at batch 1 on " + jax.devices()[0].device_kind)
    return "\n".join(lines)


def run_speed(evaluator: Any, params: Any, *, model_name: str, ap: Optional[float] = None) -> dict:
    """The speed/cost protocol on the val split of `evaluator` (an `evaluation.Evaluator`); returns the table row
    (also printed on process 0)."""
    cfg = evaluator.eval_cfg
    n = int(cfg.speed_images)
    it = evaluator.batches(batch_size=1)
    index = getattr(it, "index", None)  # the split's examples in dataset order
    first = None if index is None else index.image_id[:n]
    imgs = unpadded_images(it, n, first)
    result = measure_speed(evaluator.model, params, imgs, warmup=int(cfg.speed_warmup), repeats=int(cfg.speed_repeats))
    row = {"model": model_name, "size": int(evaluator.input_cfg.eval_size), "AP": ap, **result}
    if jax.process_index() == 0:
        print(speed_table([row]), flush=True)
    return row
