"""Starting training from a converted checkpoint (`config.init_from`): which parameters are taken, resized,
grown or kept fresh.

The checkpoint is a converted-checkpoint directory (`weights`): a 'backbone' (a DeiT/DINO/MoCo/MAE ViT) or a
'detector' (a trained YOLOS). `init_from_converted` (the trainer's entry) loads it with
`weights.load_params_dir`, merges it into the model's fresh initialisation with `init_params_from`, and logs
the `InitReport`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from yolos_jax import attention_windowed, sharding, vit, weights
from yolos_jax.errors import ConfigError
from yolos_jax.weights import flatten_params, is_backbone_leaf, unflatten_params

log = logging.getLogger("yolos_jax")


def _is_rel_pos_leaf(path: str) -> bool:
    """True for the windowed attention's relative-position tables (`rel_pos_h`, `rel_pos_w`)."""
    return path.rsplit("/", 1)[-1] in ("rel_pos_h", "rel_pos_w")


def _is_option_leaf(path: str) -> bool:
    """Parameters that only the ViT-detection options add (issue 7): absent from a plain ViT checkpoint,
    so they start fresh (rel-pos tables are zero-initialised; ConvStem and adapter are random)."""
    return _is_rel_pos_leaf(path) or path.startswith(("conv_stem/", "adapter/"))


@dataclasses.dataclass
class InitReport:
    """What `init_params_from` did with each parameter (paths are '/'-joined)."""

    kind: str
    taken: list[str] = dataclasses.field(default_factory=list)  # copied as they are
    resized: list[str] = dataclasses.field(default_factory=list)  # PE grids resized to the model's
    fresh: list[str] = dataclasses.field(default_factory=list)  # kept from the fresh initialisation (with why)
    dropped: list[str] = dataclasses.field(default_factory=list)  # in the checkpoint, not in the model
    grown: list[str] = dataclasses.field(default_factory=list)  # per-[DET]-token leaves grown to more tokens

    def __str__(self) -> str:
        def short(items: list[str]) -> str:
            groups: dict[str, int] = {}
            for s in items:
                top = re.sub(r"^block_\d+", "block_*", s.split(" ")[0].split("/")[0])
                groups[top] = groups.get(top, 0) + 1
            return ", ".join(f"{k}" + (f" x{v}" if v > 1 else "") for k, v in groups.items()) or "-"

        return (
            f"converted kind {self.kind!r}: taken {len(self.taken)} ({short(self.taken)}); "
            f"resized {len(self.resized)} ({'; '.join(self.resized) or '-'}); "
            f"fresh {len(self.fresh)} ({short(self.fresh)}); "
            f"dropped {len(self.dropped)} ({short(self.dropped)})"
            + (f"; grown {len(self.grown)} ({'; '.join(self.grown)})" if self.grown else "")
        )


# Leaves with one entry per [DET] token on axis 1 ([n, Q, D]): what grows when model.num_det_tokens exceeds a
# detector checkpoint's. Only det_tokens is perturbed (see `grow_det_leaf`).
DET_TOKEN_LEAVES = ("det_tokens", "pos_embed_det", "mid_pos_embed_det", "adapter/query_pos")
# Std of the perturbation of each copied [DET] token, relative to the std of the checkpoint's det_tokens.
DET_COPY_NOISE = 0.01


def grow_det_leaf(path: str, value: np.ndarray, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """A per-[DET]-token leaf [n, Q_old, D] grown to [n, num_tokens, D] (num_tokens > Q_old).

    Tokens 0..Q_old-1 are the checkpoint's, exactly; new token j copies token j mod Q_old (cycling), with its
    position embeddings (`pos_embed_det`, `mid_pos_embed_det`) and FP-DETR query prompt (`adapter/query_pos`)
    copied exactly, so each copy starts with the learned prior (where it looks, what it predicts) of the token
    it copies (DETR practice for adding queries). A copy identical to its source would give identical
    predictions, and the matcher would settle which of the two gets an object by its tie-break (index order)
    rather than by the data; so each copy's `det_tokens` row gets independent Gaussian noise of std
    DET_COPY_NOISE x (std of the checkpoint's det_tokens), drawn from `rng` (seeded by config.seed): small enough
    to keep the prior, enough for the two to differ from the first step and specialise.
    """
    q_old = value.shape[1]
    out = value[:, np.arange(num_tokens) % q_old].copy()
    if path == "det_tokens":
        scale = DET_COPY_NOISE * float(np.std(value))
        out[:, q_old:] += (scale * rng.standard_normal(out[:, q_old:].shape)).astype(out.dtype)
    return out


def _resize_like(value: np.ndarray, target_shape: Sequence[int]) -> Optional[np.ndarray]:
    """Grid position embeddings [..., gh, gw, D] resized to target [..., gh', gw', D] if the rest matches."""
    if value.ndim != len(target_shape) or value.ndim < 3:
        return None
    if tuple(value.shape[:-3]) != tuple(target_shape[:-3]) or value.shape[-1] != target_shape[-1]:
        return None
    return vit.resize_posemb_grid_np(np.asarray(value, np.float32), target_shape[-3:-1])


def init_params_from(
    fresh_params: Mapping[str, Any],
    converted_params: Mapping[str, Any],
    model_cfg: Optional[Mapping[str, Any]] = None,
    *,
    kind: Optional[str] = None,
    seed: int = 0,
) -> tuple[dict[str, Any], InitReport]:
    """Initial parameters for training from a converted checkpoint.

    Backbone parameters (patch_embed, cls_token, pos_embed_cls, pos_embed_patches, block_*, encoder_norm)
    are always taken from `converted_params`; position-embedding grids are resized (PyTorch-exact
    bicubic) to the model's grid when they differ. [DET] tokens, det position embeddings, mid position
    embeddings and heads stay as in `fresh_params`, unless the checkpoint is a detector (`kind`
    'detector', inferred from the presence of heads when None) and a leaf fits the model (same shape, or
    a position-embedding grid that resizes to it): fine-tuning a detector on a dataset with other classes
    keeps the fresh class head's last layer, for example.

    More [DET] tokens than the checkpoint's (model.num_det_tokens > its Q, e.g. a 100-token COCO detector
    fine-tuned for 300 objects per image): the per-token leaves (`DET_TOKEN_LEAVES`) keep the checkpoint's Q
    tokens exactly and the new ones copy them cyclically, the copies' det_tokens slightly perturbed
    (`grow_det_leaf`); reported as `grown`. With det_reference_grid the copies follow the token index, not
    the new grid's reference points. Fewer tokens than the checkpoint's start fresh (reported).

    Args:
      fresh_params: the model's freshly initialised 'params' tree (numpy or jax arrays).
      converted_params: the tree from `weights.load_params_dir`.
      model_cfg: the model's config (for the error messages; may be None).
      kind: 'backbone' | 'detector' | None (infer).
      seed: seeds the perturbation of grown [DET] tokens (the trainer passes config.seed).
    Returns:
      (params, report): a host numpy tree shaped exactly like `fresh_params`, and an `InitReport`.
    Raises:
      ValueError listing every backbone parameter that is missing from the checkpoint or does not fit.
    """
    fresh = {k: np.asarray(v) for k, v in flatten_params(fresh_params).items()}
    conv = flatten_params(converted_params)
    if kind is None:
        kind = "detector" if any(not is_backbone_leaf(k) for k in conv) else "backbone"
    if kind not in ("backbone", "detector"):
        raise ValueError(f"kind must be 'backbone' or 'detector', got {kind!r}")
    report = InitReport(kind=kind)
    out: dict[str, np.ndarray] = {}
    errors = []
    grow_rng = np.random.default_rng(seed)
    for path, init in fresh.items():
        backbone = is_backbone_leaf(path)
        value = conv.get(path)
        if value is None:
            if backbone and not _is_option_leaf(path):
                errors.append(f"{path}: missing from the checkpoint")
            else:
                report.fresh.append(f"{path} (not in checkpoint)")
            out[path] = init
            continue
        value = np.asarray(value)
        if not backbone and kind != "detector":
            report.fresh.append(path)
            out[path] = init
            continue
        if value.shape == init.shape:
            out[path] = value.astype(init.dtype)
            report.taken.append(path)
            continue
        if (path in DET_TOKEN_LEAVES and value.ndim == init.ndim == 3 and value.shape[::2] == init.shape[::2]
                and init.shape[1] > value.shape[1]):
            out[path] = grow_det_leaf(path, value, int(init.shape[1]), grow_rng).astype(init.dtype)
            report.grown.append(f"{path} {value.shape[1]} -> {init.shape[1]} tokens")
            continue
        resized = _resize_like(value, init.shape) if "pos_embed_patches" in path else None
        if _is_rel_pos_leaf(path) and value.ndim == 2 and value.shape[1] == init.shape[1]:
            # tables trained with another window/grid: resize along their length
            resized = attention_windowed.resize_rel_pos_np(value, int(init.shape[0]))
        if resized is not None:
            out[path] = resized.astype(init.dtype)
            report.resized.append(f"{path} {list(value.shape[-3:-1])} -> {list(init.shape[-3:-1])}")
        elif backbone:
            errors.append(f"{path}: checkpoint {list(value.shape)} vs model {list(init.shape)}")
            out[path] = init
        else:
            report.fresh.append(f"{path} (checkpoint {list(value.shape)} vs model {list(init.shape)})")
            out[path] = init
    uses_conv_stem = any(p.startswith("conv_stem/") for p in fresh)
    for path in conv:
        if path not in fresh:
            if uses_conv_stem and path.startswith("patch_embed/"):
                report.dropped.append(f"{path} (the model uses a ConvStem; MIMDet discards the patchify stem)")
            elif is_backbone_leaf(path):
                errors.append(f"{path}: in the checkpoint but not in the model")
            else:
                report.dropped.append(path)
    if errors:
        what = (" (" + ", ".join(f"{k}={model_cfg[k]}" for k in ("hidden_size", "depth", "num_heads", "patch_size")
                                 if k in model_cfg) + ")") if model_cfg is not None else ""
        shown = "; ".join(errors[:8]) + (f"; and {len(errors) - 8} more" if len(errors) > 8 else "")
        raise ConfigError(
            f"config.init_from: the checkpoint does not fit the model{what} ({len(errors)} problems): {shown}. "
            "Check that config.model matches the checkpoint's variant (hidden_size, depth, qkv_bias, patch_size)."
        )
    return unflatten_params(out), report


def init_from_converted(path: str, model: Any, model_cfg: Any, seed: int, image_hw: Sequence[int],
                        shardings: Any) -> Any:
    """The params a run starts from with `config.init_from=path`: a fresh init of `model` (PRNGKey(seed), an
    input of image_hw = (height, width) pixels; shapes do not depend on it) overwritten by the checkpoint at
    `path` (a converted directory, or a training workdir, its checkpoints/ or one step: `weights.load_any`; a
    training run's weights are the ones eval reads, its EMA when it kept one) through `init_params_from`, placed
    on `shardings` (the params' NamedShardings). The init runs the forward: it is traced under the shardings' mesh
    (`sharding.mesh_jit`), so that splash attention runs its kernel per device there rather than warning and
    taking its no-mesh fallback."""
    mesh = jax.tree.leaves(shardings)[0].mesh
    init = sharding.mesh_jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, *image_hw, 3))), mesh,
                             out_shardings=sharding.replicated(mesh))  # replicated: every process reads it whole
    fresh = jax.device_get(init())
    converted, _, _ = weights.load_any(path)  # a converted directory, or a training run's newest weights
    params, report = init_params_from(fresh["params"], converted, model_cfg.to_dict(), seed=seed)
    if jax.process_index() == 0:
        log.info("init_from %s: %s", path, report)
    return sharding.place_host(params, shardings)
