"""Optimiser: AdamW with the original YOLOS parameter groups, global-norm clipping and cosine decay.

The original (hustvl/YOLOS `main.py`) builds three torch AdamW parameter groups:
  * head: every parameter outside the backbone (class/box MLP heads), weight decay on all of them;
  * backbone, no decay: 1-D parameters (biases, LayerNorm scales), and the parameters named in the
    backbone's `no_weight_decay()` = {pos_embed, cls_token, det_token};
  * backbone, decay: everything else.
Here the backbone is every parameter outside `class_head` / `box_head`. The no-decay set also covers
the mid position embeddings when `optim.decay_mid_pos_embed` is False (the original decays them, because
`mid_pos_embed` is not in its skip list; the default keeps the original).

Learning rates (original README): Ti 5e-5 at total batch 16, S and B 2.5e-5 at total batch 8. For other
global batch sizes the rule is linear scaling (`lr = base_lr * batch / base_batch_size`), the rule DETR-style
recipes follow; `optim.lr_scaling='none'` uses `base_lr` as is, 'sqrt' scales with the square root.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

HEAD_MODULES = ("class_head", "box_head")
NO_DECAY_NAMES = ("pos_embed_cls", "pos_embed_patches", "pos_embed_det", "cls_token", "det_tokens",
                  "query_pos")  # query_pos: the task adapter's prompts, position embeddings too
MID_POS_EMBED_NAMES = ("mid_pos_embed_cls", "mid_pos_embed_patches", "mid_pos_embed_det")


def default_optim_config() -> ml_collections.ConfigDict:
    """`config.optim`: AdamW, clipping, schedule."""
    return ml_collections.ConfigDict(
        dict(
            base_lr=2.5e-5,  # at base_batch_size; S/B recipe of the original README
            base_batch_size=8,
            lr_scaling="linear",  # 'linear' | 'sqrt' | 'none': how lr follows the global batch size
            weight_decay=1e-4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            clip_grad_norm=0.1,  # global-norm clipping as DETR/YOLOS; <= 0 disables
            schedule="cosine",  # 'cosine' | 'constant'
            warmup_steps=0,  # linear warm-up from 0 to the peak lr
            min_lr=1e-7,  # cosine floor (the original timm "warmupcos" schedule's min_lr)
            backbone_lr_mult=1.0,  # lr multiplier for everything outside the heads
            decay_mid_pos_embed=True,  # the original decays mid_pos_embed (not in its skip list)
            # Exponential moving average of the parameters (0 = off): kept in the train state, saved with each
            # checkpoint, and what evaluation, eval.py and Detector use for such a run. See `ema_decay_at`.
            ema_decay=0.0,
        )
    )


def validate_optim_config(optim_cfg: ml_collections.ConfigDict) -> None:
    """Checks `config.optim` before any step (the schedule and scaling rule would fail only when built)."""
    if optim_cfg.base_lr <= 0:
        raise ValueError(f"config.optim.base_lr: must be > 0, got {optim_cfg.base_lr}")
    if optim_cfg.lr_scaling not in ("linear", "sqrt", "none"):
        raise ValueError(f"config.optim.lr_scaling: must be 'linear', 'sqrt' or 'none', got {optim_cfg.lr_scaling!r}")
    if optim_cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"config.optim.schedule: must be 'cosine' or 'constant', got {optim_cfg.schedule!r}")
    if not 0.0 <= float(optim_cfg.get("ema_decay", 0.0)) < 1.0:
        raise ValueError(f"config.optim.ema_decay: 0 (off) or in (0, 1), e.g. 0.9998; got {optim_cfg.ema_decay}")


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The EMA decay used after `step` updates (int32 []; the first update is step 1): min(decay,
    (1 + step) / (10 + step)), the warm-up of TF's ExponentialMovingAverage(num_updates) and timm's ModelEmaV2,
    so that the average is not dominated by the random initialisation in the first thousands of steps."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """ema <- d * ema + (1 - d) * params with d = `ema_decay_at(step, decay)`, in each leaf's dtype (float32
    params keep a float32 average)."""
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema_params, params)


def recipe_batch_note(optim_cfg: ml_collections.ConfigDict, global_batch_size: int) -> Optional[str]:
    """One line when the global batch is not the recipe's (`optim.base_batch_size`): the learning rate it gets by
    `optim.lr_scaling`, and how to keep the recipe's batch when memory is short; None at the recipe's batch."""
    base = int(optim_cfg.base_batch_size)
    if int(global_batch_size) == base:
        return None
    return (f"global batch {global_batch_size} is not the recipe's {base} (optim.base_batch_size): peak lr "
            f"{peak_learning_rate(optim_cfg, global_batch_size):.3g} by optim.lr_scaling={optim_cfg.lr_scaling!r} "
            f"(base_lr {optim_cfg.base_lr:.3g} at {base}). To train the recipe's batch on less memory keep "
            f"--config.input.batch_size={base} and set --config.train.grad_accum_steps=k")


def peak_learning_rate(optim_cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
    """Learning rate for `global_batch_size` by the documented scaling rule."""
    ratio = global_batch_size / optim_cfg.base_batch_size
    if optim_cfg.lr_scaling == "linear":
        return optim_cfg.base_lr * ratio
    if optim_cfg.lr_scaling == "sqrt":
        return optim_cfg.base_lr * math.sqrt(ratio)
    if optim_cfg.lr_scaling == "none":
        return optim_cfg.base_lr
    raise ValueError(f"config.optim.lr_scaling must be 'linear', 'sqrt' or 'none', got {optim_cfg.lr_scaling!r}")


def learning_rate_schedule(
    optim_cfg: ml_collections.ConfigDict, global_batch_size: int, total_steps: int
) -> optax.Schedule:
    """Step -> learning rate: linear warm-up, then cosine decay to `min_lr` at `total_steps` (or constant)."""
    peak = peak_learning_rate(optim_cfg, global_batch_size)
    warmup = int(optim_cfg.warmup_steps)
    if optim_cfg.schedule == "cosine":
        decay_steps = max(total_steps - warmup, 1)
        alpha = min(optim_cfg.min_lr / peak, 1.0) if peak > 0 else 0.0
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=alpha)
    elif optim_cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        raise ValueError(f"config.optim.schedule must be 'cosine' or 'constant', got {optim_cfg.schedule!r}")
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_head_param(names: tuple[str, ...]) -> bool:
    return bool(names) and names[0] in HEAD_MODULES


def weight_decay_mask(params: Any, decay_mid_pos_embed: bool = True) -> Any:
    """Pytree of bools like `params`: True where weight decay applies (the original's groups)."""
    no_decay = set(NO_DECAY_NAMES)
    if not decay_mid_pos_embed:
        no_decay |= set(MID_POS_EMBED_NAMES)

    def decide(path, leaf):
        names = _path_names(path)
        if is_head_param(names):
            return True
        if leaf.ndim <= 1 or names[-1] == "bias" or names[-1] in no_decay:
            return False
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def backbone_mask(params: Any) -> Any:
    """Pytree of bools: True for backbone parameters (everything but the heads)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not is_head_param(_path_names(p)), params)


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, params: Any, global_batch_size: int, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain (clip -> Adam -> decoupled weight decay -> -lr, backbone lr multiplier).

    `params` may be shape structs (`jax.eval_shape` output); only the tree structure and ndim are read.
    Returns (transformation, schedule) — the schedule is exposed for logging.
    """
    schedule = learning_rate_schedule(optim_cfg, global_batch_size, total_steps)
    parts = []
    if optim_cfg.clip_grad_norm and optim_cfg.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_grad_norm))
    parts += [
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
        optax.add_decayed_weights(
            optim_cfg.weight_decay, mask=weight_decay_mask(params, optim_cfg.decay_mid_pos_embed)
        ),
        optax.scale_by_learning_rate(schedule),
    ]
    if optim_cfg.backbone_lr_mult != 1.0:
        parts.append(optax.masked(optax.scale(optim_cfg.backbone_lr_mult), backbone_mask(params)))
    return optax.chain(*parts), schedule
