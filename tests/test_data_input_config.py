"""`config.input`: validation errors name the field (before any data is read); the one batch-size check."""

import pytest

from yolos_jax import data
from yolos_jax.data import coco_json, input_config


@pytest.fixture
def cfg(tmp_path):
    """A synthetic input config whose dataset is never prepared: every error here comes first."""
    return input_config.synthetic_input_config(str(tmp_path / "unused"), num_train=1, num_val=1)


def test_config_errors_are_clear(cfg, tmp_path):
    with pytest.raises(ValueError, match="input.batch_size=4 must be a positive multiple of the process count 3"):
        data.make_train_iterator(cfg, seed=0, process_index=0, process_count=3)
    missing = cfg.copy_and_resolve_references()
    missing.data_dir, missing.auto_prepare = str(tmp_path), False
    with pytest.raises(coco_json.DataError, match="python -m yolos_jax.data.prepare"):
        data.dataset_info(missing)
    bad = cfg.copy_and_resolve_references()
    bad.image_format = "float16"
    with pytest.raises(ValueError, match="input.image_format"):
        data.make_train_iterator(bad, seed=0, process_index=0, process_count=1)



def test_validate_input_config_names_each_bad_field():
    good = input_config.default_input_config("s")
    input_config.validate_input_config(good, 4)
    for field, value, match in (
        ("eval_batch_size", 6, r"input.eval_batch_size=6 must be a positive multiple of the process count 4"),
        ("batch_size", 0, r"input.batch_size=0 must be a positive multiple"),
        ("max_boxes", 0, "input.max_boxes must be positive"),
        ("eval_size", 0, "input.eval_size"),
        ("scales", (0, 480), "input.scales"),
        ("label_mode", "sorted", "input.label_mode"),
        ("canvas_multiple", 0, "input.canvas_multiple"),
    ):
        bad = good.copy_and_resolve_references()
        bad[field] = value
        with pytest.raises(ValueError, match=match):
            input_config.validate_input_config(bad, 4)


def test_check_batch_size_is_the_one_divisibility_check():
    input_config.check_batch_size(8, 4, "input.batch_size")
    input_config.check_batch_size(3, 1, "input.batch_size")
    for batch, processes in ((6, 4), (0, 1), (-2, 2)):
        with pytest.raises(ValueError, match=rf"^config.input.eval_batch_size={batch} must be a positive multiple of "
                                             rf"the process count {processes}$"):
            input_config.check_batch_size(batch, processes, "config.input.eval_batch_size")


def test_derived_sizes_follow_the_original_rule():
    c = input_config.default_input_config("s")
    assert input_config.train_max_size(c) == 800 * 1333 // 800 and input_config.eval_max_size(c) == 1333
    c.max_size, c.eval_max_size = 1000, 900
    assert input_config.train_max_size(c) == 1000 and input_config.eval_max_size(c) == 900
    tcfg = input_config.train_transform_config(c)
    assert tcfg.max_size == 1000 and tcfg.scales == tuple(c.scales)
