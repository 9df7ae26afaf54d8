"""yolos_jax: YOLOS object detection in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.6",
    "flax>=0.10",
    "optax",
    "orbax-checkpoint",
    "ml_collections",
    "tensorflow-cpu",
    "tensorflow-datasets",
    "importlib_resources",  # tfds 4.9.10 imports it without declaring it
    "scipy",
    "pycocotools",
    "numpy",
    "pillow",
    "safetensors",
    "absl-py",
    "matplotlib",
    "tensorboard",
]

EXTRAS = {
    # Reference implementations for the numerical tests. torch is pinned so pip picks the CPU wheel.
    "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers"],
    # .pth conversion needs torch at conversion time only.
    "torch": ["torch"],
}

setup(
    name="yolos_jax",
    version="0.1.0",
    description="YOLOS (You Only Look at One Sequence) object detection in JAX/Flax",
    packages=find_packages(include=["yolos_jax", "yolos_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
