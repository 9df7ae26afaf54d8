"""config.init_from with the ViT-detection options: a plain ViT backbone initialises windowed/rel-pos,
ConvStem and adapter models; option-only parameters start fresh, the patchify stem is dropped for ConvStem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yolos_jax import init_from
from yolos_jax.config import model_config
from yolos_jax.yolos import YOLOS


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
