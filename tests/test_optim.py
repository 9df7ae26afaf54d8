"""Optimiser: AdamW + decay mask + clipping + cosine schedule against torch.optim.AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from yolos_jax import optim
from yolos_jax.config import model_config
from yolos_jax.yolos import YOLOS

torch = pytest.importorskip("torch")


def _tiny_params():
    model = YOLOS(**model_config("s", hidden_size=16, depth=2, num_heads=2, num_det_tokens=3, num_classes=4,
                                 init_pe_size=(32, 48), mid_pe_size=(32, 48)).to_dict())
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 48, 3)))["params"]


def _original_decays(name: str, shape) -> bool:
    """hustvl/YOLOS main.py build_optimizer, written out independently on flat names."""
    if name.startswith(("class_head", "box_head")):
        return True  # the head group uses the default weight decay for all its parameters
    skip = {"pos_embed_cls", "pos_embed_patches", "pos_embed_det", "cls_token", "det_tokens"}
    last = name.split("/")[-1]
    return not (len(shape) == 1 or last == "bias" or last in skip)


def test_decay_mask_follows_the_original_groups():
    params = _tiny_params()
    mask = traverse_util.flatten_dict(optim.weight_decay_mask(params), sep="/")
    flat = traverse_util.flatten_dict(params, sep="/")
    for name, leaf in flat.items():
        assert mask[name] == _original_decays(name, leaf.shape), name
    # Spot checks a reader can verify by eye.
    assert not mask["block_0/attn/qkv/bias"] and mask["block_0/attn/qkv/kernel"]
    assert not mask["block_0/norm1/scale"] and not mask["det_tokens"] and not mask["pos_embed_patches"]
    assert mask["class_head/layers_0/bias"] and mask["mid_pos_embed_patches"]
    no_mid = traverse_util.flatten_dict(optim.weight_decay_mask(params, decay_mid_pos_embed=False), sep="/")
    assert not no_mid["mid_pos_embed_patches"]


@pytest.mark.parametrize("warmup", [0, 2])
def test_adamw_chain_matches_torch(warmup):
    cfg = optim.default_optim_config()
    cfg.base_lr, cfg.base_batch_size, cfg.warmup_steps, cfg.min_lr = 1e-3, 8, warmup, 1e-5
    cfg.backbone_lr_mult = 0.5
    total, batch = 6, 16  # linear rule: peak lr = 2e-3
    params = _tiny_params()
    tx, schedule = optim.make_optimizer(cfg, params, batch, total)
    assert math.isclose(optim.peak_learning_rate(cfg, batch), 2e-3)

    flat = traverse_util.flatten_dict(params, sep="/")
    names = sorted(flat)
    tparams = {n: torch.nn.Parameter(torch.tensor(np.asarray(flat[n]), dtype=torch.float64)) for n in names}
    groups = {}
    for n in names:
        decay = _original_decays(n, flat[n].shape)
        head = n.startswith(("class_head", "box_head"))
        groups.setdefault((decay, head), []).append(tparams[n])
    tgroups = [
        {"params": ps, "weight_decay": 1e-4 if decay else 0.0, "lr_mult": 1.0 if head else 0.5}
        for (decay, head), ps in groups.items()
    ]
    topt = torch.optim.AdamW(tgroups, lr=1.0, betas=(0.9, 0.999), eps=1e-8)

    def torch_lr(step):  # warm-up then torch-style cosine annealing to eta_min, in float64
        if step < warmup:
            return 2e-3 * step / warmup
        t, T = step - warmup, total - warmup
        return 1e-5 + (2e-3 - 1e-5) * (1 + math.cos(math.pi * t / T)) / 2

    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for step in range(total):
        grads_np = {n: rng.normal(size=flat[n].shape).astype(np.float32) for n in names}
        grads = traverse_util.unflatten_dict({tuple(n.split("/")): jnp.asarray(g) for n, g in grads_np.items()})
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        assert math.isclose(float(schedule(step)), torch_lr(step), rel_tol=1e-5, abs_tol=1e-12)

        for n in names:
            tparams[n].grad = torch.tensor(grads_np[n], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), 0.1)
        for g in topt.param_groups:
            g["lr"] = torch_lr(step) * g["lr_mult"]
        topt.step()

    ours = traverse_util.flatten_dict(params, sep="/")
    for n in names:
        np.testing.assert_allclose(np.asarray(ours[n]), tparams[n].detach().numpy(), rtol=0, atol=2e-6, err_msg=n)


def test_lr_scaling_rules_and_bad_values():
    cfg = optim.default_optim_config()
    assert math.isclose(optim.peak_learning_rate(cfg, 16), 5e-5)
    cfg.lr_scaling = "sqrt"
    assert math.isclose(optim.peak_learning_rate(cfg, 32), 2.5e-5 * 2)
    cfg.lr_scaling = "none"
    assert optim.peak_learning_rate(cfg, 64) == 2.5e-5
    cfg.lr_scaling = "cubic"
    with pytest.raises(ValueError, match="lr_scaling"):
        optim.peak_learning_rate(cfg, 8)


def test_a_batch_other_than_the_recipes_is_said_with_its_learning_rate_and_the_way_to_keep_the_recipe():
    cfg = optim.default_optim_config()  # S/B: base_lr 2.5e-5 at 8
    assert optim.recipe_batch_note(cfg, 8) is None
    assert optim.recipe_batch_note(cfg, 2) == (
        "global batch 2 is not the recipe's 8 (optim.base_batch_size): peak lr 6.25e-06 by "
        "optim.lr_scaling='linear' (base_lr 2.5e-05 at 8). To train the recipe's batch on less memory keep "
        "--config.input.batch_size=8 and set --config.train.grad_accum_steps=k")
