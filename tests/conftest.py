"""Shared test setup.

8 simulated CPU devices so that sharding tests run anywhere; must be set before jax is imported.
TensorFlow (used only by the input pipeline) is kept to one thread and off accelerators.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # for TensorFlow only; jax here runs on CPU anyway
os.environ.setdefault("JAX_PLATFORMS", "cpu")
