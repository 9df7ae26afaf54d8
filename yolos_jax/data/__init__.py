"""Input pipeline: COCO-format data -> tfds -> planned, transformed, static-shape batches.

Modules, in the order the data flows (each imports only modules above it):
  labels.py             LabelMap: dataset category ids <-> model label indices (the one place)
  tf_setup.py           importing TensorFlow for the pipeline (CPU only, few threads, quiet)
  transforms.py         YOLOS/DETR train and eval transforms (numpy geometry + TF image ops); LSJ;
                        ImageNet mean/std (the one place)
  batching.py           canvas design, epoch plans, padding statistics
  synthetic.py          seeded synthetic COCO-format dataset (shapes on textures); CLI
  input_config.py       `config.input`: defaults, validation (the one batch-size check), derived values
  coco_json.py          reading a COCO instances JSON; DataError, Report and the bad-data policy
  coco_source.py        a COCO-format folder (or tfds coco/2017) as a stream of examples; image probing
  source_fingerprint.py what a change to a source folder shows up in
  tfds_builder.py       the tfds builder `CocoFolder` and the prepared files on disk
  example_reader.py     prepared records -> numpy (their tf.Example wire format, without Python protobuf)
  prepared_dataset.py   prepare once, load, random-access reads; DatasetInfo of an input config
  canvases.py           a split's train/eval canvas sets (and resize_on_device's source canvas)
  stream.py             planned examples -> targets (numpy) and decoded, resampled images (tf.data)
  assembly.py           the BATCH SCHEMA; padding examples into canvas batches
  iterators.py          train/eval iterators (background thread, exact resume)
  device_resize.py      the final resize on the accelerator (input.resize_on_device)
  host_to_device.py     host batches -> global jax.Arrays (to_global_batch)
  workdir_paths.py      '{workdir}' in the data paths; the synthetic dataset a config asks for
  prepare.py            CLI: one-time preparation
  show_batch.py         CLI / function: a batch's images with boxes as PNGs

The public names below are imported lazily, so neither `from yolos_jax.data.labels import LabelMap` nor
`from yolos_jax.data import default_input_config` (config files) imports TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LabelMap": "yolos_jax.data.labels",
    "default_input_config": "yolos_jax.data.input_config",
    "synthetic_input_config": "yolos_jax.data.input_config",
    "validate_input_config": "yolos_jax.data.input_config",
    "check_batch_size": "yolos_jax.data.input_config",
    "make_train_iterator": "yolos_jax.data.iterators",
    "make_eval_iterator": "yolos_jax.data.iterators",
    "dataset_info": "yolos_jax.data.prepared_dataset",
    "DatasetInfo": "yolos_jax.data.prepared_dataset",
    "coco_ground_truth": "yolos_jax.data.prepared_dataset",
    "DataError": "yolos_jax.data.coco_json",
    "to_global_batch": "yolos_jax.data.host_to_device",
    "with_host_image": "yolos_jax.data.host_to_device",
    "BATCH_KEYS": "yolos_jax.data.assembly",
    "save_batch_pngs": "yolos_jax.data.show_batch",
    "resolve_input_config": "yolos_jax.data.workdir_paths",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'yolos_jax.data' has no attribute {name!r}")
