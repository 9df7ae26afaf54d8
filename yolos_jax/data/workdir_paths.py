"""'{workdir}' in `config.input`'s paths and the synthetic dataset a config asks for (configs/demo.py).

`resolve_input_config(input_cfg, workdir)` is what training, evaluation and the figures call before reading
data: it substitutes the run's workdir into `data_dir` / `source_dir` and, when `input.synthetic` is set and
`source_dir` does not exist yet, writes the seeded synthetic COCO-format dataset there (process 0; the others
wait). Only into a '{workdir}' path (the config's own): a path the user gave is their data, and one that does not
exist is a mistake to report, not a place to generate shapes into and train on. The training workdir of a
checkpoint is `weights.workdir_of`'s to find (`weights.input_config_for_checkpoint`).
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from yolos_jax.data import synthetic
from yolos_jax.errors import ConfigError

log = logging.getLogger("yolos_jax")

WORKDIR_PATH_FIELDS = ("data_dir", "source_dir")  # the input fields in which '{workdir}' is substituted


def uses_workdir(input_cfg: ml_collections.ConfigDict) -> bool:
    """Whether a data path of `input_cfg` refers to '{workdir}'."""
    return any("{workdir}" in str(input_cfg.get(k) or "") for k in WORKDIR_PATH_FIELDS)


def resolve_input_config(input_cfg: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Resolves '{workdir}' in the input paths and generates the synthetic dataset when asked to.

    A config with `input.synthetic` (num_train, num_val, image_size, num_classes, seed; optional
    max_objects, classes, min_size_frac, max_size_frac, background: see `synthetic.generate`) and a
    `source_dir` that does not exist yet gets the seeded synthetic COCO-format dataset written there —
    the embedded default that needs no download; only when the configured `source_dir` is a '{workdir}' path
    (else ConfigError: a folder of the user's that does not exist). Returns a resolved copy; `input_cfg` is not
    modified.
    """
    cfg = ml_collections.ConfigDict(input_cfg.to_dict())
    for key in WORKDIR_PATH_FIELDS:
        if isinstance(cfg.get(key), str):
            cfg[key] = cfg[key].replace("{workdir}", workdir)
    synth = cfg.get("synthetic")
    if synth and cfg.source_dir and not os.path.isdir(cfg.source_dir):
        if "{workdir}" not in str(input_cfg.source_dir):
            raise ConfigError(
                f"config.input.source_dir={cfg.source_dir}: no such directory. Give an existing COCO-format folder "
                "(annotations/instances_<split>.json and the images); the synthetic dataset of config.input.synthetic "
                "is generated only into the run's workdir ('{workdir}/...', the config's default)")
        if jax.process_index() == 0:
            log.info("generating the synthetic dataset into %s", cfg.source_dir)
            try:
                options = {k: synth[k] for k in ("classes", "min_size_frac", "max_size_frac", "background")
                           if synth.get(k) is not None}
                synthetic.generate(cfg.source_dir, int(synth.num_train), int(synth.num_val), int(synth.seed),
                                   tuple(synth.image_size), num_classes=int(synth.num_classes),
                                   max_objects=int(synth.get("max_objects", 6)), **options)
            except FileExistsError:  # another process finished it meanwhile
                pass
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("synthetic dataset generated")
    return cfg
