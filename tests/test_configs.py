"""Every config file loads as `train.py` loads it (absl flag `--config=FILE[:arg]`, locked), passes the
project's own validation, builds its model (parameter shapes only, `jax.eval_shape`), and the paper models
have the paper's parameter counts (YOLOS Table 6)."""

import glob
import math
import os
import runpy
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from yolos_jax import config as config_lib
from yolos_jax import convert, losses, matcher, run_config, variants, windowed
from yolos_jax.data import input_config
from yolos_jax.yolos import YOLOS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every config file with the `:arg` variants its docstring or the README documents (None: no argument).
DOCUMENTED = {
    "demo.py": [None, "smoke"],
    "vitdet_b.py": [None, "window=14,rel_pos=False", "window=24"],
    "yolos_b.py": [None],
    "yolos_b_windowed.py": [None, "window=7,rel_pos", "window=14,rel_pos,global=2.5.8.11", "window=24"],
    "yolos_s.py": [None, "dWr", "dwr"],
    "yolos_s_fpdetr.py": [None, "insert=6,aux=5", "insert=0,aux=3"],
    "yolos_s_mimdet.py": [None, "0.25"],
    "yolos_s_windowed.py": [None, "window=7,rel_pos", "window=14,rel_pos,global=2.5.8.11"],
    "yolos_ti.py": [None],
    "yolos_ti_windowed.py": [None, "window=7,rel_pos", "global=5.11", "window=14,rel_pos,global=2.5.8.11"],
}
CASES = [(name, arg) for name, args in sorted(DOCUMENTED.items()) for arg in args]


def load(name, arg=None, overrides=()):
    """The config as train.py sees it: through `config_flags.DEFINE_config_file` and the command line."""
    spec = os.path.join(ROOT, "configs", name) + (f":{arg}" if arg is not None else "")
    argv = ["train.py", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    saved = sys.argv
    sys.argv = argv  # config_flags finds the override flags in sys.argv when the flag is defined
    try:
        config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True)
        fv(argv)
    finally:
        sys.argv = saved
    return fv.config


def param_count(model_cfg) -> int:
    return sum(math.prod(s) for s in convert.expected_param_shapes(model_cfg).values())


def test_every_config_file_is_covered():
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
    assert files == sorted(DOCUMENTED), "a config file was added or removed: list it (and its :args) in DOCUMENTED"


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_config_loads_validates_and_builds(name, arg):
    config = load(name, arg)
    # The project's own checks, as train.py / the stages run them (device count: any divisor of the batch).
    run_config.validate_config(config, num_devices=1)
    matcher.validate_matcher_config(config.matcher)
    losses.validate_loss_config(config.loss)
    input_config.validate_input_config(config.input, 1)
    variants.validate_options(config.model)
    windowed.validate_window_options(config.model.window_size, config.model.global_blocks, config.model.rel_pos,
                                     config.model.depth)
    assert config.eval.eval_size == config.input.eval_size
    if config.loss.aux_loss:
        assert config.model.aux_layers > 0
    # The model is constructible: parameter shapes by jax.eval_shape (no initialiser runs).
    shapes = convert.expected_param_shapes(config.model)
    assert {"class_head/layers_2/kernel", "box_head/layers_2/bias", "det_tokens"} <= set(shapes)
    assert shapes["class_head/layers_2/kernel"][-1] == config.model.num_classes + 1
    assert shapes["det_tokens"] == (1, config.model.num_det_tokens, config.model.hidden_size)


def _none_fields(config, prefix=""):
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _none_fields(value, f"{prefix}{key}.")
        elif value is None:
            yield f"{prefix}{key}"


# A value of the right type for every field that may be None (the README documents overriding them).
NONE_FIELD_OVERRIDES = {"model.attention_impl": "cudnn", "model.det_reference_grid": "(2,4)",
                        "model.global_blocks": "(5,11)", "model.mid_pe_size": "(512,864)", "model.mlp_dim": "512"}


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" if a else n for n, a in CASES])
def test_fields_that_are_none_take_command_line_overrides(name, arg):
    """`--config.model.attention_impl=cudnn` failed with "Type NoneType ... is not supported for overriding"."""
    config = load(name, arg)
    nones = sorted(_none_fields(config))
    assert set(nones) <= set(NONE_FIELD_OVERRIDES), "a new None field: give it a typed placeholder and list it"
    for path in nones:
        overridden = load(name, arg, [f"--config.{path}={NONE_FIELD_OVERRIDES[path]}"])
        value = overridden.model[path.split(".")[1]]
        assert value is not None and str(value).replace(" ", "") == NONE_FIELD_OVERRIDES[path], (path, value)


def test_config_argument_errors():
    with pytest.raises(flags.IllegalFlagValueError, match="unknown variant"):
        load("yolos_s.py", "dWR")
    with pytest.raises(flags.IllegalFlagValueError, match="window=R"):
        load("yolos_ti_windowed.py", "windows=7")
    with pytest.raises(flags.IllegalFlagValueError, match="insert=6,aux=5"):
        load("yolos_s_fpdetr.py", "insert=six")
    # A file without arguments, or with one, refuses a stray or misspelt one rather than ignoring it (the demo's
    # ':smok' trained the full demo).
    for name in ("yolos_ti.py", "yolos_b.py", "demo.py"):
        with pytest.raises(flags.IllegalFlagValueError, match=f"configs/{name}: cannot read config argument 'smok'"):
            load(name, "smok")


def test_validation_rejects_a_bad_override():
    """The validation the config test relies on does reject bad values (so passing it means something)."""
    config = load("yolos_ti.py")
    config.unlock()
    config.model.num_heads = 5  # does not divide 192
    with pytest.raises(ValueError, match="model.num_heads"):
        run_config.validate_config(config, num_devices=1)
    for field, value, match in (("eval_size", 0, "config.input.eval_size"), ("scales", (0, 480), "config.input.scales")):
        config = load("yolos_ti.py")
        config.unlock()
        config.input[field] = value  # failed only at the end-of-training eval
        with pytest.raises(ValueError, match=match):
            run_config.validate_config(config, num_devices=1)


# --------------------------------------------------------------------------------------------------
# Parameter counts of the paper models, from the config files themselves
# --------------------------------------------------------------------------------------------------

# YOLOS paper Table 6 (Params. (M)): Ti 6.5, S 31 (30.7 in the README/tests at 0.1M), S (dWr, fast
# scaling, the 784-pixel 37.6 AP row) 28, B 127. A figure printed with d decimals is taken to match when
# our count rounds OR truncates to it at d decimals (127.8M prints as 127 in the paper: truncation).
# `variant` is the MODEL_VARIANTS entry that tests/test_yolos.py::test_param_counts checks against HF.
PAPER = {
    ("yolos_ti.py", None): ("ti", 6.5, 1),
    ("yolos_s.py", None): ("s", 30.7, 1),  # README's 0.1M figure; Table 6 prints 31
    ("yolos_s.py", "dWr"): ("s_dWr", 28, 0),
    ("yolos_b.py", None): ("b", 127, 0),
    ("yolos_s.py", "dwr"): ("s_dwr", None, 0),  # not in Table 6: only the HF-checked count
}
TABLE6_INTEGER = {("yolos_s.py", None): 31}
# README "Configs": "Ti 6.5M, S 30.7M, B 127.8M, S-dWr 27.6M".
README_FIGURES = {("yolos_ti.py", None): 6.5, ("yolos_s.py", None): 30.7, ("yolos_b.py", None): 127.8,
                  ("yolos_s.py", "dWr"): 27.6}


def _matches(count, figure, decimals):
    value = count / 1e6
    scale = 10**decimals
    return round(value, decimals) == figure or math.floor(value * scale) / scale == figure


@pytest.mark.parametrize("name,arg", sorted(PAPER, key=str), ids=lambda v: str(v))
def test_paper_param_counts(name, arg):
    variant, figure, decimals = PAPER[(name, arg)]
    config = load(name, arg)
    ours = param_count(config.model)
    # the same count test_yolos.py's test_param_counts proves equal to HF's YolosForObjectDetection
    assert ours == param_count(config_lib.model_config(variant)), (name, arg, ours)
    if figure is not None:
        assert _matches(ours, figure, decimals), (name, arg, ours / 1e6, figure)
    if (name, arg) in TABLE6_INTEGER:
        assert _matches(ours, TABLE6_INTEGER[(name, arg)], 0), (name, arg, ours / 1e6)
    if (name, arg) in README_FIGURES:
        assert round(ours / 1e6, 1) == README_FIGURES[(name, arg)], (name, arg, ours / 1e6)


def test_windowed_configs_keep_the_parameter_tree():
    """Global-attention-everywhere and windowed configs share parameters (so DeiT/YOLOS checkpoints load);
    rel_pos adds only the zero-initialised tables."""
    for size in ("ti", "s", "b"):
        plain = convert.expected_param_shapes(load(f"yolos_{size}.py").model)
        win = convert.expected_param_shapes(load(f"yolos_{size}_windowed.py").model)
        assert win == plain, size
        rel = convert.expected_param_shapes(load(f"yolos_{size}_windowed.py", "window=7,rel_pos").model)
        extra = set(rel) - set(plain)
        assert extra and all(k.rsplit("/", 1)[-1] in ("rel_pos_h", "rel_pos_w") for k in extra), size
        assert {k: rel[k] for k in plain} == plain


# --------------------------------------------------------------------------------------------------
# The variant config files (moved from test_variants.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expect", [
    ("yolos_s_mimdet.py", dict(token_keep_ratio=0.5, patch_embed="conv_stem")),
    ("yolos_s_fpdetr.py", dict(adapter=True, adapter_insert_det_at=6, aux_layers=5)),  # FP-DETR §4.1
])
def test_configs(name, expect):
    module = runpy.run_path(os.path.join(ROOT, "configs", name))
    config = module["get_config"]()
    for k, v in expect.items():
        assert config.model[k] == v, k
    variants.validate_options(config.model)
    run_config.validate_config(config, num_devices=1)
    if config.model.aux_layers:
        assert config.loss.aux_loss
    shapes = jax.eval_shape(lambda: YOLOS(**config.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert "params" in shapes
