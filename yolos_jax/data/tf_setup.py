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
        _keep_freed_memory_past_tf(tf)
    return tf


def _keep_freed_memory_past_tf(tf: Any) -> None:
    """TF's GeneratorDatasetOp, the first time a process builds one (`Dataset.from_generator`, the input
    pipeline's source), calls mallopt(M_MMAP_THRESHOLD, 128 KiB) — TF's mitigation of a Python 3.11 leak
    (tensorflow issue 65675). That replaces `malloc.keep_freed_memory`'s threshold for the rest of the process:
    XLA:CPU's per-step temporaries of 128 KiB and more then come from mmap and go back on free, ~300 mmap/munmap
    and ~90k page faults per demo step, 40% of the demo's CPU time in the kernel (issue 19). So when the entry
    script kept freed memory, a one-element from_generator runs here, TF makes its one call now, and ours is
    applied again after it. A no-op without `keep_freed_memory` (libraries and tests keep glibc's defaults)."""
    from yolos_jax import malloc

    if not malloc.freed_memory_kept():
        return
    ds = tf.data.Dataset.from_generator(lambda: iter((0,)), output_signature=tf.TensorSpec([], tf.int32))
    for _ in ds:  # building the iterator constructs TF's GeneratorDatasetOp (and its mallopt)
        pass
    malloc.keep_freed_memory()


def get_tfds() -> Any:
    """`tensorflow_datasets`, imported after `get_tf()` has configured TF."""
    get_tf()
    import tensorflow_datasets as tfds  # heavy, and only after TF is configured

    return tfds
