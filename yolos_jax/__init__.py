"""yolos_jax: YOLOS object detection in JAX/Flax."""

from typing import Any

__all__ = ["Detector", "YOLOS"]


def __getattr__(name: str) -> Any:
    # Imported on first use, not with the package: `yolos_jax.runtime` must be importable before jax, TensorFlow
    # or anything that allocates (entry scripts re-execute themselves there: `malloc.use_scalable_malloc`).
    if name == "Detector":
        from yolos_jax.inference import Detector

        return Detector
    if name == "YOLOS":
        from yolos_jax.yolos import YOLOS

        return YOLOS
    raise AttributeError(f"module 'yolos_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
