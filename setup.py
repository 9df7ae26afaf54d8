"""yolos_jax: YOLOS object detection in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7.1",  # jax.set_mesh (sharding.mesh_jit)
    "flax>=0.10",
    "optax",
    "orbax-checkpoint",
    "ml_collections",
    "tensorflow-cpu",
    "tensorflow-datasets>=4.9.10",  # as_data_source(deserialize_method=RAW_BYTES): data/example_reader.py
    "importlib_resources",  # tfds 4.9.10 imports it without declaring it
    "scipy",
    "pycocotools",
    "numpy",
    "pillow",
    "safetensors",
    "absl-py",
    "matplotlib",
    "tensorboard",
    # oneTBB's scalable malloc, which train.py, eval.py and infer.py preload on Linux x86-64: XLA:CPU's allocations
    # without glibc's arena lock or page faults (`malloc.use_scalable_malloc`). Intel's binary wheel (and its
    # dependency tcmlib), under the Intel Simplified Software License: README, "Third-party software".
    'tbb>=2021.1; platform_system == "Linux" and platform_machine == "x86_64"',
]

# export.py --format=onnx. jax2onnx 0.13 and later pin orbax-checkpoint<0.11.37, below ours (0.12 here); 0.12.x
# converts our model (jax 0.10, flax 0.12) and leaves jax, flax and orbax as they are. onnxruntime runs and
# verifies the artifact.
EXPORT = ["jax2onnx>=0.12.5,<0.13", "onnxruntime>=1.20"]

EXTRAS = {
    # Reference implementations for the numerical tests (and the export runtimes they compare). torch is pinned
    # so pip picks the CPU wheel.
    "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers"] + EXPORT,
    "export": EXPORT,
    # .pth conversion needs torch at conversion time only.
    "torch": ["torch"],
    # Accelerators: jax's own extras of the same name (jaxlib with the CUDA 12 or 13 plugin and NVIDIA's wheels,
    # or with libtpu; all three defined by jax 0.10.2's metadata), so jax picks the matching versions.
    # tests/test_launch.py checks the names against the installed jax.
    "cuda12": ["jax[cuda12]"],
    "cuda13": ["jax[cuda13]"],
    "tpu": ["jax[tpu]"],
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
