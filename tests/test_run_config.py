"""The run config (`yolos_jax.run_config`): the defaults' one eval size, the config files' one `:arg` parser, and the
run validation (each sub-config's own check and the checks between sub-configs)."""

import ml_collections
import pytest

from yolos_jax import run_config


def test_max_boxes_above_num_det_tokens_is_refused():
    config = run_config.default_config("ti")
    config.input.max_boxes = 101
    with pytest.raises(ValueError, match=r"config.input.max_boxes: 101 > model.num_det_tokens=100"):
        run_config.validate_config(config, num_devices=1)
    config.model.num_det_tokens = 300
    config.input.max_boxes = 300
    run_config.validate_config(config, num_devices=1)


def test_eval_size_has_one_owner_and_eval_eval_size_is_its_alias():
    """input.eval_size is the eval size; eval.eval_size reads and writes the same field (old command lines)."""
    config = run_config.default_config("ti")
    assert config.input.eval_size == config.eval.eval_size == 512
    config.input.eval_size = 640
    assert config.eval.eval_size == 640
    config.eval.eval_size = 800  # as --config.eval.eval_size=800 does
    assert config.input.eval_size == 800
    config.input = ml_collections.ConfigDict(config.input.to_dict())  # a config file replacing config.input
    run_config.link_eval_size(config)
    config.input.eval_size = 96
    assert config.eval.eval_size == 96
    copied = ml_collections.ConfigDict(config.to_dict())  # what the trainer stores: plain values
    assert copied.eval.eval_size == copied.input.eval_size == 96


def test_parse_config_arg_reads_options_flags_lists_and_a_positional():
    options = {"window": ("window_size", int), "rel_pos": ("rel_pos", run_config.flag),
               "global": ("global_blocks", run_config.int_list)}
    got = run_config.parse_config_arg("window=7, rel_pos,global=2.5.8.11", "f.py", options, "window=R")
    assert got == {"window_size": 7, "rel_pos": True, "global_blocks": (2, 5, 8, 11)}
    assert run_config.parse_config_arg("rel_pos=False", "f.py", options, "window=R") == {"rel_pos": False}
    assert run_config.parse_config_arg(None, "f.py", options, "window=R") == {}
    assert run_config.parse_config_arg("", "f.py", options, "window=R") == {}
    for bad in ("windows=7", "window=x", "rel_pos=yes", "global=a.b"):
        with pytest.raises(ValueError, match=rf"f.py: cannot read config argument '{bad}'; use window=R"):
            run_config.parse_config_arg(bad, "f.py", options, "window=R")
    pick = ("variant", {"dWr": "s_dWr"}.__getitem__)
    assert run_config.parse_config_arg("dWr", "s.py", {}, "dWr", positional=pick) == {"variant": "s_dWr"}
    with pytest.raises(ValueError, match=r"s.py: cannot read config argument 'dWR' \(unknown variant\); use dWr"):
        run_config.parse_config_arg("dWR", "s.py", {}, "dWr", positional=pick)


def test_apply_window_options_writes_the_global_blocks_out():
    config = run_config.default_config("ti")
    run_config.apply_window_options(config.model, "window=7,rel_pos", "f.py")
    assert (config.model.window_size, config.model.rel_pos, config.model.global_blocks) == (7, True, (2, 5, 8, 11))
    run_config.apply_window_options(config.model, "global=5.11", "f.py", rel_pos=True)
    assert (config.model.window_size, config.model.rel_pos, config.model.global_blocks) == (14, True, (5, 11))


@pytest.mark.parametrize("field,value,match", [
    ("model.num_heads", 5, "config.model.num_heads: 5 does not divide"),
    ("model.dtype", "int8", "config.model.dtype"),
    ("input.batch_size", 6, "config.input.batch_size: global batch 6 must be a multiple of the device count 4"),
    ("optim.base_lr", 0.0, "config.optim.base_lr: must be > 0"),
    ("optim.schedule", "step", "config.optim.schedule"),
    ("train.nonfinite_policy", "ignore", "config.train.nonfinite_policy"),
    ("train.log_every", 0, "config.train.log_every"),
    ("checkpoint.keep", 0, "config.checkpoint.every_steps"),
    ("init_from", "/no/such/dir", "config.init_from"),
])
def test_each_sub_config_is_checked_naming_the_field(field, value, match):
    config = run_config.default_config("ti")
    run_config.validate_config(config, num_devices=4)
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(ValueError, match=match):
        run_config.validate_config(config, num_devices=4)
