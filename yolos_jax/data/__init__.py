"""Input pipeline: COCO-format data -> tfds -> planned, transformed, static-shape batches.

Modules (imports point one way: labels, transforms, batching <- coco_builder <- pipeline):
  labels.py        LabelMap: dataset category ids <-> model label indices (the one place)
  synthetic.py     seeded synthetic COCO-format dataset (shapes on textures); CLI
  coco_builder.py  tfds builder for COCO-format folders (and tfds coco/2017); bad-data policy
  transforms.py    YOLOS/DETR train and eval transforms (numpy geometry + TF image ops); LSJ
  batching.py      canvas sets, epoch plans, padding statistics
  pipeline.py      config, iterators, the BATCH SCHEMA, to_global_batch
  device_resize.py the final resize on the accelerator (input.resize_on_device)
  prepare.py       CLI: one-time preparation
  show_batch.py    CLI / function: a batch's images with boxes as PNGs

The public names below are imported lazily, so `from yolos_jax.data.labels import LabelMap` does not
import TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LabelMap": "yolos_jax.data.labels",
    "default_input_config": "yolos_jax.data.pipeline",
    "synthetic_input_config": "yolos_jax.data.pipeline",
    "make_train_iterator": "yolos_jax.data.pipeline",
    "make_eval_iterator": "yolos_jax.data.pipeline",
    "dataset_info": "yolos_jax.data.pipeline",
    "DatasetInfo": "yolos_jax.data.pipeline",
    "to_global_batch": "yolos_jax.data.pipeline",
    "with_host_image": "yolos_jax.data.pipeline",
    "coco_ground_truth": "yolos_jax.data.pipeline",
    "BATCH_KEYS": "yolos_jax.data.pipeline",
    "save_batch_pngs": "yolos_jax.data.show_batch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'yolos_jax.data' has no attribute {name!r}")
