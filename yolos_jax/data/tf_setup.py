"""Importing TensorFlow for the input pipeline: CPU only, few threads, quiet.

TensorFlow only decodes and resamples images here. It must never grab an accelerator (JAX owns them)
nor spread over all cores (the training process needs them), so every module of `yolos_jax.data`
imports TF through `get_tf()`.
"""

from __future__ import annotations

import os
from typing import Any

_CONFIGURED = False


def get_tf(intra_op_threads: int = 1, inter_op_threads: int = 2) -> Any:
    """Returns the `tensorflow` module, configured on first call: no GPUs/TPUs visible to TF, and the
    given thread counts for TF's own op pools (the tf.data map parallelism is set per pipeline).
    Later calls return the module unchanged (TF's threading can only be set before it starts)."""
    global _CONFIGURED
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # heavy: only when the input pipeline first needs it

    if not _CONFIGURED:
        _CONFIGURED = True
        for kind in ("GPU", "TPU"):
            try:
                tf.config.set_visible_devices([], kind)
            except (RuntimeError, ValueError):  # already initialised, or no such device type
                pass
        try:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
        except RuntimeError:  # TF already ran an op in this process; keep its settings
            pass
    return tf


def get_tfds() -> Any:
    """`tensorflow_datasets`, imported after `get_tf()` has configured TF."""
    get_tf()
    import tensorflow_datasets as tfds  # heavy, and only after TF is configured

    return tfds
