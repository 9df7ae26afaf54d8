"""Independent references for the numerical tests (no yolos_jax code here).

* tiny HF `YolosForObjectDetection` models with random O(1) weights (so that mapping mistakes show up as
  large differences rather than hiding under 0.02-std initialisations);
* renamings of HF state dicts into the hustvl/YOLOS and timm (DeiT/DINO/MoCo/MAE) naming, written from
  those projects' module definitions;
* the original YOLOS `finetune_det` position-embedding surgery, in torch, as hustvl/YOLOS
  models/backbone.py does it;
* a float64 numpy YOLOS forward with key masking, the reference for padding-awareness;
* DETR's resize rule (`detr_get_size`, verbatim) and the original YOLOS eval size built on it
  (`original_eval_size`: both sides floored to multiples of 16), the references of the transforms' sizes.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F
from transformers import YolosConfig, YolosForObjectDetection

# Ti-like: no mid position embeddings, HF's LayerNorm eps.
CFG_TI = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=[64, 96],
    num_detection_tokens=5, num_labels=7, use_mid_position_embeddings=False, layer_norm_eps=1e-12,
)
# S-like: mid position embeddings, timm's eps (so that hustvl-format and DeiT-format tests share it).
CFG_S = dict(
    hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=192, image_size=[64, 96],
    num_detection_tokens=4, num_labels=5, use_mid_position_embeddings=True, layer_norm_eps=1e-6,
)
# Two non-square input sizes; for the 64x96 (4x6) stored grid, 48x128 (3x8) has the same token count
# (24) on a different grid, so a resize "by token count" would skip it and fail.
INPUT_SIZES = [(80, 112), (48, 128)]


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draws every parameter with O(1) activations in mind."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.2 * r)
            elif name.endswith("weight") and p.ndim >= 2:
                p.copy_(r / math.sqrt(p[0].numel()))
            else:  # tokens and position embeddings
                p.copy_(0.5 * r)
    return model


def hf_yolos(cfg: dict, seed: int = 0) -> YolosForObjectDetection:
    model = YolosForObjectDetection(YolosConfig(**cfg)).eval()
    return randomize_(model, seed)


def hf_outputs(model: YolosForObjectDetection, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
    return {"logits": out.logits.numpy(), "boxes": out.pred_boxes.numpy()}


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with the on-disk names (transformers >= 5 keeps mid PEs under encoder.interpolation)."""
    return {
        k.replace("encoder.interpolation.mid_position_embeddings", "encoder.mid_position_embeddings"): v.clone()
        for k, v in model.state_dict().items()
    }


def _fuse_qkv(sd: dict, prefix: str, what: str) -> torch.Tensor:
    return torch.cat([sd[f"{prefix}attention.attention.{n}.{what}"] for n in ("query", "key", "value")], 0)


def hf_blocks_to_timm(sd: dict, depth: int, out_prefix: str) -> dict[str, torch.Tensor]:
    """HF ViT/YOLOS layers -> timm `blocks.{i}` names (timm Block: norm1, attn.qkv, attn.proj, norm2, mlp)."""
    out = {}
    for i in range(depth):
        h, t = f"vit.encoder.layer.{i}.", f"{out_prefix}blocks.{i}."
        out[t + "norm1.weight"] = sd[h + "layernorm_before.weight"]
        out[t + "norm1.bias"] = sd[h + "layernorm_before.bias"]
        out[t + "attn.qkv.weight"] = _fuse_qkv(sd, h, "weight")
        out[t + "attn.qkv.bias"] = _fuse_qkv(sd, h, "bias")
        out[t + "attn.proj.weight"] = sd[h + "attention.output.dense.weight"]
        out[t + "attn.proj.bias"] = sd[h + "attention.output.dense.bias"]
        out[t + "norm2.weight"] = sd[h + "layernorm_after.weight"]
        out[t + "norm2.bias"] = sd[h + "layernorm_after.bias"]
        out[t + "mlp.fc1.weight"] = sd[h + "intermediate.dense.weight"]
        out[t + "mlp.fc1.bias"] = sd[h + "intermediate.dense.bias"]
        out[t + "mlp.fc2.weight"] = sd[h + "output.dense.weight"]
        out[t + "mlp.fc2.bias"] = sd[h + "output.dense.bias"]
    return out


def hf_to_original(sd: dict, depth: int) -> dict[str, torch.Tensor]:
    """HF YolosForObjectDetection state -> hustvl/YOLOS `Detector` state (models/detector.py names)."""
    out = {
        "backbone.cls_token": sd["vit.embeddings.cls_token"],
        "backbone.det_token": sd["vit.embeddings.detection_tokens"],
        "backbone.pos_embed": sd["vit.embeddings.position_embeddings"],
        "backbone.patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "backbone.patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "backbone.norm.weight": sd["vit.layernorm.weight"],
        "backbone.norm.bias": sd["vit.layernorm.bias"],
    }
    if "vit.encoder.mid_position_embeddings" in sd:
        out["backbone.mid_pos_embed"] = sd["vit.encoder.mid_position_embeddings"]
    out.update(hf_blocks_to_timm(sd, depth, "backbone."))
    for j in range(3):
        for w in ("weight", "bias"):
            out[f"class_embed.layers.{j}.{w}"] = sd[f"class_labels_classifier.layers.{j}.{w}"]
            out[f"bbox_embed.layers.{j}.{w}"] = sd[f"bbox_predictor.layers.{j}.{w}"]
    return out


def timm_vit_state(
    hidden: int, depth: int, mlp: int, grid: int, *, distilled: bool, seed: int, num_classes: int = 10
) -> dict[str, torch.Tensor]:
    """A random ViT/DeiT state dict with timm's names (DeiT `VisionTransformer` / `DistilledVisionTransformer`).

    Blocks come from a randomised HF YOLOS of the same width/depth, renamed with `hf_blocks_to_timm`.
    """
    g = torch.Generator().manual_seed(seed)
    n_tok = grid * grid + (2 if distilled else 1)
    hf = hf_yolos(
        dict(CFG_S, hidden_size=hidden, num_hidden_layers=depth, intermediate_size=mlp, num_attention_heads=1,
             use_mid_position_embeddings=False),
        seed,
    )
    sd = hf_state(hf)
    out = {
        "cls_token": 0.5 * torch.randn(1, 1, hidden, generator=g),
        "pos_embed": 0.5 * torch.randn(1, n_tok, hidden, generator=g),
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": torch.randn(num_classes, hidden, generator=g),
        "head.bias": torch.randn(num_classes, generator=g),
    }
    if distilled:
        out["dist_token"] = 0.5 * torch.randn(1, 1, hidden, generator=g)
        out["head_dist.weight"] = torch.randn(num_classes, hidden, generator=g)
        out["head_dist.bias"] = torch.randn(num_classes, generator=g)
    out.update(hf_blocks_to_timm(sd, depth, ""))
    return out


def original_finetune_det(pos_embed: torch.Tensor, backbone_img_size: int, init_pe_size, patch: int = 16):
    """hustvl/YOLOS `VisionTransformer.finetune_det` on the backbone's pos_embed (models/backbone.py).

    Returns (cls_pos_embed [1, 1, D], patch_pos_embed [1, gh * gw, D]) at the init_pe_size grid.
    """
    g = math.pow(pos_embed.size(1) - 1, 0.5)
    if int(g) - g != 0:
        pos_embed = pos_embed[:, 1:, :]
    cls_pos_embed = pos_embed[:, 0, :][:, None]
    patch_pos_embed = pos_embed[:, 1:, :].transpose(1, 2)
    b, e, q = patch_pos_embed.shape
    p_h = p_w = backbone_img_size // patch
    patch_pos_embed = patch_pos_embed.reshape(b, e, p_h, p_w)
    h, w = init_pe_size
    patch_pos_embed = F.interpolate(patch_pos_embed, size=(h // patch, w // patch), mode="bicubic", align_corners=False)
    return cls_pos_embed, patch_pos_embed.flatten(2).transpose(1, 2)


def load_timm_backbone_into_hf(model: YolosForObjectDetection, timm_sd: dict, backbone_img_size: int) -> None:
    """Puts a timm backbone into a HF YOLOS as the original's Detector(pre_trained=...) would
    (load_state_dict(strict=False) + finetune_det); det tokens, det PEs, mid PEs and heads stay."""
    cfg = model.config
    depth = cfg.num_hidden_layers
    cls_pe, patch_pe = original_finetune_det(timm_sd["pos_embed"], backbone_img_size, cfg.image_size)
    sd = model.state_dict()
    det_pe = sd["vit.embeddings.position_embeddings"][:, -cfg.num_detection_tokens :]
    new = {
        "vit.embeddings.cls_token": timm_sd["cls_token"],
        "vit.embeddings.position_embeddings": torch.cat([cls_pe, patch_pe, det_pe], 1),
        "vit.embeddings.patch_embeddings.projection.weight": timm_sd["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": timm_sd["patch_embed.proj.bias"],
        "vit.layernorm.weight": timm_sd["norm.weight"],
        "vit.layernorm.bias": timm_sd["norm.bias"],
    }
    d = cfg.hidden_size
    for i in range(depth):
        h, t = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        qkv_w, qkv_b = timm_sd[t + "attn.qkv.weight"], timm_sd[t + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            new[f"{h}attention.attention.{n}.weight"] = qkv_w[j * d : (j + 1) * d]
            new[f"{h}attention.attention.{n}.bias"] = qkv_b[j * d : (j + 1) * d]
        for hn, tn in (
            ("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"), ("layernorm_after", "norm2"),
            ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"),
        ):
            new[f"{h}{hn}.weight"] = timm_sd[f"{t}{tn}.weight"]
            new[f"{h}{hn}.bias"] = timm_sd[f"{t}{tn}.bias"]
    missing = set(new) - set(sd)
    assert not missing, missing
    with torch.no_grad():
        for k, v in new.items():
            sd[k].copy_(v)


# --------------------------------------------------------------------------------------------------
# float64 numpy YOLOS with key masking
# --------------------------------------------------------------------------------------------------


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _resize_grid64(grid: np.ndarray, new_hw) -> np.ndarray:
    """[N, gh, gw, D] -> [N, h, w, D] with torch's bicubic in float64."""
    t = torch.from_numpy(grid.transpose(0, 3, 1, 2).astype(np.float64))
    t = F.interpolate(t, size=tuple(new_hw), mode="bicubic", align_corners=False)
    return t.numpy().transpose(0, 2, 3, 1)


def numpy_yolos(
    model: YolosForObjectDetection, images_nhwc: np.ndarray, pixel_mask: Optional[np.ndarray] = None
) -> dict[str, np.ndarray]:
    """YOLOS forward in float64 from a HF model's weights; padded patches (no real pixel) are excluded
    as attention keys when pixel_mask [B, H, W] is given."""
    cfg = model.config
    sd = {k: v.detach().double().numpy() for k, v in hf_state(model).items()}
    p, d, q, nh = cfg.patch_size, cfg.hidden_size, cfg.num_detection_tokens, cfg.num_attention_heads
    x = images_nhwc.astype(np.float64)
    b, hh, ww, _ = x.shape
    gh, gw = hh // p, ww // p
    patches = x[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, gh * gw, -1)
    w_pe = sd["vit.embeddings.patch_embeddings.projection.weight"].reshape(d, -1)
    tok = patches @ w_pe.T + sd["vit.embeddings.patch_embeddings.projection.bias"]
    sgh, sgw = cfg.image_size[0] // p, cfg.image_size[1] // p

    def full_pe(pe):  # [L, T, D] stored -> [L, 1 + gh*gw + q, D]
        grid = pe[:, 1:-q].reshape(pe.shape[0], sgh, sgw, d)
        return np.concatenate([pe[:, :1], _resize_grid64(grid, (gh, gw)).reshape(pe.shape[0], -1, d), pe[:, -q:]], 1)

    cls = np.broadcast_to(sd["vit.embeddings.cls_token"], (b, 1, d))
    det = np.broadcast_to(sd["vit.embeddings.detection_tokens"], (b, q, d))
    h = np.concatenate([cls, tok, det], 1) + full_pe(sd["vit.embeddings.position_embeddings"])
    mid = full_pe(sd["vit.encoder.mid_position_embeddings"][:, 0]) if cfg.use_mid_position_embeddings else None
    keys = np.ones((b, h.shape[1]), bool)
    if pixel_mask is not None:
        valid = pixel_mask[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p).any(axis=(2, 4)).reshape(b, -1)
        keys[:, 1 : 1 + gh * gw] = valid
    eps = cfg.layer_norm_eps
    hd = d // nh
    for i in range(cfg.num_hidden_layers):
        pre = f"vit.encoder.layer.{i}."
        lin = lambda v, n: v @ sd[pre + n + ".weight"].T + sd[pre + n + ".bias"]  # noqa: E731
        y = _ln(h, sd[pre + "layernorm_before.weight"], sd[pre + "layernorm_before.bias"], eps)
        qh, kh, vh = (lin(y, f"attention.attention.{n}").reshape(b, -1, nh, hd) for n in ("query", "key", "value"))
        logits = np.einsum("bthd,bshd->bhts", qh, kh) / math.sqrt(hd)
        logits = np.where(keys[:, None, None, :], logits, -np.inf)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshd->bthd", att, vh).reshape(b, -1, d)
        h = h + lin(o, "attention.output.dense")
        y = _ln(h, sd[pre + "layernorm_after.weight"], sd[pre + "layernorm_after.bias"], eps)
        y = lin(y, "intermediate.dense")
        y = 0.5 * y * (1.0 + scipy.special.erf(y / math.sqrt(2.0)))
        h = h + lin(y, "output.dense")
        if mid is not None and i < cfg.num_hidden_layers - 1:
            h = h + mid[i][None]
    out = _ln(h[:, -q:], sd["vit.layernorm.weight"], sd["vit.layernorm.bias"], eps)

    def mlp(v, name):
        for j in range(3):
            v = v @ sd[f"{name}.layers.{j}.weight"].T + sd[f"{name}.layers.{j}.bias"]
            if j < 2:
                v = np.maximum(v, 0)
        return v

    return {"logits": mlp(out, "class_labels_classifier"), "boxes": scipy.special.expit(mlp(out, "bbox_predictor"))}


def torch_linear_resize(table: np.ndarray, length: int) -> np.ndarray:
    """[L, C] -> [length, C] with F.interpolate(mode='linear', align_corners=False), float64."""
    if table.shape[0] == length:
        return table.astype(np.float64)
    t = torch.from_numpy(table.astype(np.float64)).T[None]  # [1, C, L]
    return F.interpolate(t, size=length, mode="linear", align_corners=False)[0].T.numpy()


def detr_get_size(image_size, size, max_size=None):
    """DETR datasets/transforms.py resize.get_size_with_aspect_ratio, verbatim (image_size = (w, h))."""
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


def original_eval_size(h, w, size, max_size):
    """The original's eval size (hustvl/YOLOS datasets/transforms.py resize: DETR's get_size_with_aspect_ratio,
    then both sides floored to multiples of 16), in plain Python."""
    oh, ow = detr_get_size((w, h), size, max_size)
    return oh - oh % 16, ow - ow % 16


def max_abs(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
