"""The run config: `default_config(variant)` (one sub-config per stage), the config files' `:arg` parser and the
run's validation.

Every `configs/*.py` starts from `default_config` and reads its `--config=FILE:ARG` argument with
`parse_config_arg`. Each sub-config is owned, defaulted and validated by its stage: `config.model` by
`config.model_config` / `yolos.validate_model_config`, `config.input` by `data.input_config`, `config.matcher`,
`config.loss`, `config.optim`, `config.checkpoint`, `config.mesh`, `config.eval` by their modules; `config.train`
and `config.distributed` (the loop's and the start-up's settings) by this module. `validate_config` runs each
stage's own check and then the checks that relate two sub-configs.

The eval size has one owner, `config.input.eval_size` (the eval transform). `config.eval.eval_size` is kept as
an alias of it (the same field: reading it reads input.eval_size, `--config.eval.eval_size=N` sets input.eval_size)
so that older command lines and code that read it keep working.

Run metadata (the dataset's label map and class names) is not part of the config: the trainer stores it with
each checkpoint (`checkpointing.Checkpointer.save(..., meta=...)`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections

from yolos_jax import checkpointing, evaluation, losses, matcher, optim, sharding, windowed, yolos
from yolos_jax import config as config_lib
from yolos_jax.data import input_config
from yolos_jax.errors import ConfigError


def default_train_config() -> ml_collections.ConfigDict:
    """`config.train`: the loop's length, logging, non-finite policy and evaluation schedule (in steps)."""
    return ml_collections.ConfigDict(
        dict(
            num_epochs=150,  # used when num_steps <= 0
            num_steps=0,  # total optimiser steps; > 0 overrides num_epochs
            log_every=50,  # steps between logged (host-synced) metrics
            nonfinite_policy="stop",  # 'stop': raise naming the step and terms; 'skip': drop the update
            eval_every=0,  # steps between evaluations on the val split (0: only at the end if eval_at_end)
            eval_at_end=True,
            inject_nan_at_step=-1,  # fault injection for tests: poison this step's images with NaN
            # k micro-batches per optimiser update: input.batch_size stays the effective batch (the learning rate
            # follows it); memory follows batch_size / k. One accumulated step equals the whole-batch step.
            grad_accum_steps=1,
            profile_steps="",  # 'A:B': a jax.profiler trace of steps A..B into WORKDIR/profile ('' = off)
        )
    )


def default_distributed_config() -> ml_collections.ConfigDict:
    """`config.distributed`: how `runtime.maybe_initialize_distributed` joins a multi-process run."""
    return ml_collections.ConfigDict(
        dict(
            # Leave empty on TPU pods / SLURM / Open MPI: jax.distributed.initialize() detects them.
            coordinator_address="",
            num_processes=0,
            process_id=-1,
            # A process that stops answering (died, or its host did) for this long ends the run on every other
            # process with a message naming it, instead of a hang; re-running the command resumes. (jax's own
            # heartbeat timeout is set to twice this: a backstop that aborts with a stack dump.)
            heartbeat_timeout_s=60,
        )
    )


def link_eval_size(config: ml_collections.ConfigDict) -> None:
    """Makes `config.eval.eval_size` the same field as `config.input.eval_size` (the one owner). Call again after
    replacing `config.input` as a whole."""
    config.eval.eval_size = config.input.get_ref("eval_size")


def default_config(variant: str = "s") -> ml_collections.ConfigDict:
    """The full run config: one sub-config per stage. `configs/*.py` start from this.

    variant: a `config.MODEL_VARIANTS` name; 'ti' also selects YOLOS-Ti's train scales, eval size and lr.
    """
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.init_from = ""  # converted checkpoint directory (convert_torch_weights.py --output)
    cfg.model = config_lib.model_config(variant)
    cfg.input = input_config.default_input_config(scales="ti" if variant == "ti" else "s")
    # uint8 host batches, normalised on device: ~1.4x faster host pipeline and 4x fewer bytes to move.
    cfg.input.image_format = "uint8"
    cfg.input.resize_on_device = "auto"  # on GPU/TPU the host only decodes (data.device_resize)
    cfg.matcher = matcher.default_matcher_config()
    cfg.loss = losses.default_loss_config()
    cfg.optim = optim.default_optim_config()
    if variant == "ti":
        cfg.optim.base_lr, cfg.optim.base_batch_size = 5e-5, 16
    cfg.train = default_train_config()
    cfg.checkpoint = checkpointing.default_checkpoint_config()
    cfg.mesh = sharding.default_mesh_config()
    cfg.eval = evaluation.default_eval_config()
    link_eval_size(cfg)
    cfg.distributed = default_distributed_config()
    return cfg


# --------------------------------------------------------------------------------------------------
# The config files' argument: `--config=configs/FILE.py:ARG`
# --------------------------------------------------------------------------------------------------


def flag(value: str) -> bool:
    """A boolean option's value: '' (the bare name), 'True'/'1' or 'False'/'0'; ValueError otherwise."""
    if value not in ("", "True", "False", "1", "0"):
        raise ValueError(value)
    return value in ("", "True", "1")


def int_list(value: str) -> tuple[int, ...]:
    """Integers separated by dots ('2.5.8.11' -> (2, 5, 8, 11)): a list inside the comma-separated argument."""
    return tuple(int(v) for v in value.split(".") if v)


def parse_config_arg(arg: Optional[str], source: str, options: Mapping[str, tuple[str, Callable[[str], Any]]],
                     usage: str, positional: Optional[tuple[str, Callable[[str], Any]]] = None) -> dict[str, Any]:
    """Reads a config file's argument: comma-separated `key=value` items (or a bare `key` for flags).

    options: {key in the argument: (name in the result, converter of the value string)}; a converter raises
      ValueError (or KeyError) on a bad value.
    positional: (name in the result, converter) for one item without '=' that is not a key (e.g. a variant
      name or a ratio); the converter's error is reported as 'unknown <name>'.
    usage: what to write instead, named in the error, e.g. "comma-separated window=R, rel_pos[=True|False]".
    Returns {result name: converted value} for the items given. Raises ValueError naming `source` and the item.
    """
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        try:
            if key in options:
                name, convert = options[key]
                out[name] = convert(value)
            elif positional is not None and not eq:
                try:
                    out[positional[0]] = positional[1](item)
                except (KeyError, ValueError):
                    raise ValueError(f"unknown {positional[0]}") from None
            else:
                raise KeyError(key)
        except (KeyError, ValueError) as e:
            why = f" ({e})" if isinstance(e, ValueError) and str(e).startswith("unknown ") else ""
            raise ValueError(f"{source}: cannot read config argument {item!r}{why}; use {usage}") from None
    return out


WINDOW_ARG_OPTIONS = {"window": ("window_size", int), "rel_pos": ("rel_pos", flag),
                      "global": ("global_blocks", int_list)}
WINDOW_ARG_USAGE = "comma-separated window=R, rel_pos[=True|False], global=I.J.K (e.g. ':window=14,rel_pos')"


def apply_window_options(model_cfg: Any, arg: Optional[str], source: str, **defaults: Any) -> None:
    """Sets window_size / global_blocks / rel_pos on `config.model` (an unlocked ConfigDict) in place from a windowed
    config file's argument, e.g. `configs/yolos_s_windowed.py:window=7,rel_pos` (`WINDOW_ARG_OPTIONS`: `window=R`
    int >= 0, `rel_pos` / `rel_pos=True|False`, `global=2.5.8.11` block indices separated by dots).

    defaults: the file's own values (window_size, rel_pos, global_blocks); `arg` overrides them. The global blocks
    are written out (not None) so that `--config.model.global_blocks=...` type-checks.
    """
    options = dict(window_size=windowed.VITDET_WINDOW, rel_pos=False, global_blocks=None)
    options.update(defaults)
    options.update(parse_config_arg(arg, source, WINDOW_ARG_OPTIONS, WINDOW_ARG_USAGE))
    if options["global_blocks"] is None:
        options["global_blocks"] = windowed.default_global_blocks(int(model_cfg.depth))
    windowed.validate_window_options(options["window_size"], options["global_blocks"], options["rel_pos"],
                                     int(model_cfg.depth))
    model_cfg.window_size = int(options["window_size"])
    model_cfg.global_blocks = tuple(options["global_blocks"])
    model_cfg.rel_pos = bool(options["rel_pos"])


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"config.{field}: {message}")


def validate_train_config(train_cfg: ml_collections.ConfigDict) -> None:
    """Checks `config.train`; raises ValueError naming the field."""
    if train_cfg.nonfinite_policy not in ("stop", "skip"):
        _fail("train.nonfinite_policy", f"must be 'stop' or 'skip', got {train_cfg.nonfinite_policy!r}")
    if train_cfg.num_steps <= 0 and train_cfg.num_epochs <= 0:
        _fail("train.num_steps", "set num_steps > 0 or num_epochs > 0")
    if train_cfg.log_every <= 0:
        _fail("train.log_every", f"must be > 0, got {train_cfg.log_every}")
    if int(train_cfg.get("grad_accum_steps", 1)) < 1:
        _fail("train.grad_accum_steps", f"must be >= 1, got {train_cfg.grad_accum_steps}")
    profile_range(train_cfg)


def profile_range(train_cfg: ml_collections.ConfigDict) -> Optional[tuple[int, int]]:
    """(A, B) of `train.profile_steps='A:B'` (1 <= A <= B, steps counted from 1), None when off; raises naming
    the field when malformed."""
    text = str(train_cfg.get("profile_steps", "") or "").strip()
    if not text:
        return None
    try:
        first, last = (int(v) for v in text.split(":"))
    except ValueError:
        first = last = -1
    if not 1 <= first <= last:
        _fail("train.profile_steps", f"expected 'A:B' with 1 <= A <= B (e.g. '10:15'), got {text!r}")
    return first, last


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
    """Checks values that would otherwise fail deep inside tracing or after training; raises `ConfigError` naming
    the field (the entry scripts print it in one line).

    Runs each sub-config's own check, then those between sub-configs: input.max_boxes against the model's [DET]
    tokens, the global batch against the device count (`num_devices`, default `jax.device_count()`).
    """
    try:
        _check_config(config, num_devices)
    except ConfigError:
        raise
    except ValueError as e:  # a sub-config's own check: its message names the field ('config.model.depth: ...')
        raise ConfigError(str(e)) from None


def validate_data_configs(config: ml_collections.ConfigDict) -> None:
    """`config.input` and `config.eval` alone, what eval.py and infer.py read (batch sizes against this run's
    process count); raises ConfigError naming the field."""
    try:
        input_config.validate_input_config(config.input, jax.process_count())
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    try:
        evaluation.validate_eval_config(config.eval)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_config(config: ml_collections.ConfigDict, num_devices: Optional[int]) -> None:
    yolos.validate_model_config(config.model)
    m = config.model
    if int(config.input.max_boxes) > m.num_det_tokens:  # a target slot beyond the queries is never matched
        _fail("input.max_boxes", f"{config.input.max_boxes} > model.num_det_tokens={m.num_det_tokens}: each target "
                                 "box needs its own [DET] token. Lower input.max_boxes, or raise model.num_det_tokens "
                                 "(with init_from, a converted checkpoint's [DET] tokens are grown to it)")
    validate_data_configs(config)  # before any step: an eval size of 0 would fail after training
    losses.validate_loss_config(config.loss)  # else found only when the step is traced, after the data is read
    matcher.validate_matcher_config(config.matcher)
    batch = config.input.batch_size
    num_devices = num_devices or jax.device_count()
    fsdp = int(config.mesh.get("fsdp", 1))
    if fsdp < 1 or num_devices % fsdp:
        _fail("mesh.fsdp", f"{fsdp} must be >= 1 and divide the device count {num_devices}")
    if batch % num_devices:
        _fail("input.batch_size", f"global batch {batch} must be a multiple of the device count {num_devices}")
    accum = int(config.train.get("grad_accum_steps", 1))
    if (batch // num_devices) % max(accum, 1):
        _fail("train.grad_accum_steps", f"{accum} must divide each device's share of input.batch_size ({batch} "
                                        f"over {num_devices} devices: {batch // num_devices} each)")
    optim.validate_optim_config(config.optim)
    validate_train_config(config.train)
    checkpointing.validate_checkpoint_config(config.checkpoint)
    if config.init_from and not os.path.isdir(config.init_from):
        _fail("init_from", f"{config.init_from!r} is not a directory (expected a convert_torch_weights.py output "
                           "directory or a training workdir)")
