"""The HF PyTorch side shared by the train-step benchmarks (bench_train_step.py on CPU, bench_gpu.py): imports
only torch, so either may use it without the other's process set-up."""

from __future__ import annotations

import numpy as np
import torch


def redraw_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draws an HF YOLOS's weights as a training start would (in place; returns it in train mode):
    trunc-normal(0.02) weights, tokens and position embeddings, zero biases, unit LayerNorm scales. HF's own init
    leaves tokens and position embeddings near constant, which would make every [DET] token predict the same
    box and the matching degenerate. Seed torch first for the same draw."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                torch.nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
    return model.train()


def hf_adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch AdamW with the original's groups: no decay on 1-D params, position embeddings, [CLS], [DET]."""
    no_decay_names = ("position_embeddings", "cls_token", "detection_tokens")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.startswith("vit.") and (p.ndim <= 1 or any(n in name for n in no_decay_names)):
            no_decay.append(p)
        else:
            decay.append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def hf_inputs(batch: dict, device: str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """Our host batch (image [B, H, W, 3] float32 normalised, boxes [B, M, 4] cxcywh normalised, labels [B, M],
    box_mask [B, M]) -> HF's (pixel_values [B, 3, H, W], labels: one {"class_labels", "boxes"} per image, the
    valid boxes only) on `device`."""
    pixel_values = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2))).to(device)
    labels = [{"class_labels": torch.from_numpy(batch["labels"][i][m].astype(np.int64)).to(device),
               "boxes": torch.from_numpy(batch["boxes"][i][m]).to(device)}
              for i, m in enumerate(batch["box_mask"])]
    return pixel_values, labels
