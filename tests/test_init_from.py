"""`init_params_from` (config.init_from): a converted detector's leaves taken, resized or kept fresh; a backbone
of another width refused with every mismatch listed."""

import numpy as np
import pytest
import torch

import reference_models as ref
from yolos_jax import convert, init_from, weights


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
