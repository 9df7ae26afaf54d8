"""`init_params_from` (config.init_from): a converted detector's leaves taken, resized or kept fresh; a backbone
of another width refused with every mismatch listed; with the ViT-detection options a plain ViT backbone initialises
windowed/rel-pos, ConvStem and adapter models (option-only parameters start fresh, the patchify stem is dropped for
ConvStem)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference_models as ref
from yolos_jax import convert, init_from, weights
from yolos_jax.config import model_config
from yolos_jax.yolos import YOLOS


@pytest.fixture(scope="module")
def hf_s():
    return ref.hf_yolos(ref.CFG_S, 1)


def _leaves(tree):
    return weights.flatten_params(tree)


def test_init_params_from_detector_and_resizing(hf_s, tmp_path):
    hf_s.save_pretrained(tmp_path / "hf")
    conv = convert.convert_state(str(tmp_path / "hf"))
    # A model on another dataset (9 classes) with other PE grids (80x112 -> 5x7 patches).
    cfg = dict(conv.model_cfg, num_classes=9, init_pe_size=(80, 112), mid_pe_size=(80, 112))
    shapes = weights.expected_param_shapes(cfg)
    fresh = weights.unflatten_params({k: np.full(s, 0.5, np.float32) for k, s in shapes.items()})
    params, report = init_from.init_params_from(fresh, conv.params, cfg)
    assert report.kind == "detector"
    flat, src = _leaves(params), _leaves(conv.params)
    assert [f.split(" ")[0] for f in report.fresh] == ["class_head/layers_2/bias", "class_head/layers_2/kernel"]
    np.testing.assert_array_equal(flat["class_head/layers_2/kernel"], 0.5)
    for k in ("class_head/layers_0/kernel", "box_head/layers_2/bias", "det_tokens", "pos_embed_det",
              "block_2/attn/qkv/kernel"):
        np.testing.assert_array_equal(flat[k], src[k])
    assert sorted(r.split(" ")[0] for r in report.resized) == ["mid_pos_embed_patches", "pos_embed_patches"]
    mid = torch.from_numpy(src["mid_pos_embed_patches"]).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(mid, size=(5, 7), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).numpy()
    assert ref.max_abs(flat["mid_pos_embed_patches"], want) <= 1e-5
    assert "resized 2" in str(report)
    # a backbone of another width is refused with every mismatch listed
    small = dict(cfg, hidden_size=24, num_heads=2)
    small_shapes = weights.expected_param_shapes(small)
    fresh_small = weights.unflatten_params({k: np.zeros(s, np.float32) for k, s in small_shapes.items()})
    with pytest.raises(ValueError, match=r"problems\):") as e:
        init_from.init_params_from(fresh_small, conv.params, small)
    assert "patch_embed/proj/kernel" in str(e.value) and "block_2/mlp/fc2/kernel" in str(e.value)
    # kind 'backbone' keeps every detector-only leaf fresh even when it fits
    _, report = init_from.init_params_from(fresh, conv.params, cfg, kind="backbone")
    assert not any(t.startswith(("det_tokens", "class_head", "mid_")) for t in report.taken)


def _params(seed=0, **options):
    cfg = model_config("ti", hidden_size=32, depth=4, num_heads=2, init_pe_size=(64, 64), **options)
    return jax.device_get(YOLOS(**cfg.to_dict()).init(jax.random.PRNGKey(seed), jnp.zeros((1, 64, 64, 3)))["params"])


@pytest.fixture(scope="module")
def backbone():
    plain = _params(seed=1)
    return {k: v for k, v in plain.items() if k not in ("class_head", "box_head", "det_tokens", "pos_embed_det")}


@pytest.mark.parametrize("options", [dict(window_size=2, rel_pos=True), dict(patch_embed="conv_stem"), dict(adapter=True)])
def test_backbone_initialises_option_models(backbone, options):
    fresh = _params(**options)
    out, report = init_from.init_params_from(fresh, backbone, None, kind="backbone")
    np.testing.assert_array_equal(out["block_1"]["mlp"]["fc1"]["kernel"], backbone["block_1"]["mlp"]["fc1"]["kernel"])
    if options.get("rel_pos"):
        table = out["block_0"]["attn"]["rel_pos_h"]
        np.testing.assert_array_equal(table, np.zeros_like(table))  # zero-initialised, not from the checkpoint
    if options.get("patch_embed") == "conv_stem":
        assert "patch_embed" not in out and any("patch_embed/" in d for d in report.dropped)
    if options.get("adapter"):
        np.testing.assert_array_equal(out["adapter"]["query_pos"], fresh["adapter"]["query_pos"])


def test_rel_pos_tables_of_another_length_are_resized():
    # block_0 is windowed (only block 3 is global): tables of length 2r - 1 = 3 vs 7.
    src = _params(window_size=2, rel_pos=True, global_blocks=(3,))
    dst = _params(window_size=4, rel_pos=True, global_blocks=(3,))
    src["block_0"]["attn"]["rel_pos_h"] = np.random.default_rng(0).normal(size=src["block_0"]["attn"]["rel_pos_h"].shape)
    out, report = init_from.init_params_from(dst, src, None, kind="backbone")
    assert out["block_0"]["attn"]["rel_pos_h"].shape == dst["block_0"]["attn"]["rel_pos_h"].shape
    assert src["block_0"]["attn"]["rel_pos_h"].shape != dst["block_0"]["attn"]["rel_pos_h"].shape
    assert any(r.startswith("block_0/attn/rel_pos_h") for r in report.resized)
