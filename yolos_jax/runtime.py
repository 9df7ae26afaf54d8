"""Process set-up shared by the entry scripts: logging, TensorFlow kept off accelerators, caches."""

from __future__ import annotations

import logging
import os


def setup_host(compilation_cache: bool = True) -> None:
    """Call first thing in an entry script (before TensorFlow or jax are used).

    * TensorFlow (the input pipeline) must not grab GPU/TPU memory or all CPU cores: it sees no
      accelerators and few threads, so it does not fight XLA.
    * jax's persistent compilation cache makes re-runs (resume, eval) skip recompilation.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # orbax and absl log every checkpoint file operation at INFO: keep our own INFO lines only.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("yolos_jax").setLevel(logging.INFO)
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except Exception:  # noqa: BLE001 - TF absent or already initialised: nothing to hide
        pass
    if compilation_cache:
        import jax

        cache = os.environ.get("YOLOS_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/yolos_jax/xla"))
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
