"""yolos_jax/config.py: the papers' model variants (YOLOS Table 1 and the original README, written out again
here), `model_config` giving exactly YOLOS's keyword arguments, its typed None placeholders, and the sequence
fields turned back into tuples after JSON. (The configs/*.py files: tests/test_configs.py.)"""

import dataclasses
import json

import pytest

from yolos_jax import config as config_lib
from yolos_jax.yolos import YOLOS

# YOLOS Table 1 (width, depth, heads of the DeiT backbone; the S-dWr / S-dwr rows of the model scaling study)
# and the original README's input sizes of the position embeddings: init_pe_size, mid_pe_size (None: none).
TABLE_1 = {
    "ti": (192, 12, 3, (800, 1333), None),
    "s": (384, 12, 6, (512, 864), (512, 864)),
    "b": (768, 12, 12, (800, 1344), (800, 1344)),
    "s_dWr": (330, 14, 6, (512, 864), (512, 864)),
    "s_dwr": (240, 19, 6, (512, 864), (512, 864)),
}


@pytest.mark.parametrize("variant", sorted(TABLE_1))
def test_variants_are_the_papers(variant):
    cfg = config_lib.model_config(variant)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.init_pe_size, cfg.mid_pe_size) == TABLE_1[variant]
    # What every variant shares: 16x16 patches, 100 [DET] tokens, COCO's 91 classes, MLP ratio 4 (mlp_dim None).
    assert (cfg.patch_size, cfg.num_det_tokens, cfg.num_classes, cfg.mlp_dim) == (16, 100, 91, None)
    assert cfg.hidden_size % cfg.num_heads == 0


def test_model_config_is_yolos_keyword_arguments():
    fields = {f.name for f in dataclasses.fields(YOLOS)} - {"parent", "name"}
    assert set(config_lib.model_config("s").keys()) == fields
    assert sorted(config_lib.MODEL_VARIANTS) == sorted(TABLE_1)


def test_overrides_and_unknown_variants():
    cfg = config_lib.model_config("ti", depth=2, num_classes=7, mid_pe_size=(64, 96))
    assert (cfg.hidden_size, cfg.depth, cfg.num_classes, cfg.mid_pe_size) == (192, 2, 7, (64, 96))
    assert config_lib.model_config("ti").depth == 12  # the table itself is not modified
    with pytest.raises(ValueError, match=r"unknown model variant 'xl'; choose one of \['b', 's', 's_dWr'"):
        config_lib.model_config("xl")


@pytest.mark.parametrize("field", sorted(config_lib.NULLABLE_MODEL_FIELDS))
def test_fields_that_default_to_none_take_a_value_of_their_type(field):
    """A plain None would refuse `--config.model.<field>=...`: each is a typed placeholder, still None."""
    cfg = config_lib.model_config("ti", global_blocks=None, det_reference_grid=None)
    assert cfg[field] is None
    value = {int: 512, tuple: (2, 4), str: "cudnn"}[config_lib.NULLABLE_MODEL_FIELDS[field]]
    cfg[field] = value
    assert cfg[field] == value
    with pytest.raises(TypeError):
        cfg[field] = [] if isinstance(value, str) else "x"


def test_sequence_fields_back_to_tuples_after_json():
    cfg = config_lib.model_config("s", global_blocks=(2, 5), det_reference_grid=(2, 4), det_attention_sigma=(1, 2.5))
    stored = json.loads(json.dumps(cfg.to_dict()))  # as a checkpoint or converted directory keeps it
    assert stored["init_pe_size"] == [512, 864]
    restored = config_lib.sequence_fields_as_tuples(stored)
    assert restored == cfg.to_dict() and stored["init_pe_size"] == [512, 864]  # a copy; the input is kept
    assert restored["global_blocks"] == (2, 5) and all(type(v) is int for v in restored["global_blocks"])
    sigma = restored["det_attention_sigma"]
    assert sigma == (1.0, 2.5) and all(type(v) is float for v in sigma)
    assert config_lib.sequence_fields_as_tuples({"mid_pe_size": None, "depth": 3}) == {"mid_pe_size": None, "depth": 3}
    assert set(config_lib.SEQUENCE_FIELDS) <= set(cfg.keys())
    hash(YOLOS(**restored))  # module fields must be hashable (the stored lists are not)
