"""yolos_jax: YOLOS object detection in JAX/Flax."""

from yolos_jax.inference import Detector
from yolos_jax.yolos import YOLOS

__all__ = ["Detector", "YOLOS"]
