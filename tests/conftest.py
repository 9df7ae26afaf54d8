"""Shared test setup.

8 simulated CPU devices so that sharding tests run anywhere; must be set before jax is imported.
TensorFlow (used only by the input pipeline) is kept to one thread and off accelerators.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # for TensorFlow only; jax here runs on CPU anyway
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's LLVM back end at its lowest optimisation level (what jax's own test suite does): on this 2-core machine
# compilation dominates the suite, and this took it from 878 s to 594 s (user time 1541 s -> 869 s) with the same
# 529 tests passing. HLO passes (fusion, layout) still run, so the numerics tested are XLA's; the suite under full
# optimisation is `JAX_DISABLE_MOST_OPTIMIZATIONS=0 python -m pytest ...`, and test_train_e2e's main run and the
# benchmarks (which compare with HF in every run) always compile fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One persistent compilation cache for the session, shared by pytest-xdist's workers (they inherit this process's
# environment; the entry scripts the tests run choose their own, `runtime.setup_host`): the same program compiled in several tests (a tiny model's
# initialisers cost 4-5 s to compile, on every mesh they are traced for) is compiled once. Programs with host
# callbacks (the train step's scipy matching) are never cached by jax. Created by the controlling process, removed
# at its end (`pytest_unconfigure`).
import shutil  # noqa: E402
import tempfile  # noqa: E402

if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE = tempfile.mkdtemp(prefix="yolos_jax_tests_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
else:
    _SESSION_CACHE = None

import pytest  # noqa: E402  (after the environment above)


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """(input config, tiny YOLOS, random params) over a prepared synthetic set of 10 val images (the Evaluator's and
    eval.py's tests)."""
    from eval_fixtures import random_params
    from yolos_jax import data
    from yolos_jax.config import model_config
    from yolos_jax.yolos import YOLOS

    # The same root as test_visualize's fixture: one preparation per session.
    cfg = data.synthetic_input_config(str(tmp_path_factory.getbasetemp() / "synth_eval"), num_train=4, num_val=10)
    label_map = data.dataset_info(cfg).label_map
    model = YOLOS(**model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=6,
                                 num_classes=label_map.num_classes, init_pe_size=(64, 96), mid_pe_size=None).to_dict())
    return cfg, model, random_params(model, (64, 96), scale=0.3)


@pytest.fixture(scope="module")
def dense_dataset(tmp_path_factory):
    """(root, the prepare command's module) with a dense-scene COCO folder (eval_fixtures.write_dense_coco_folder)
    in root/'src' (the prepare and trainer dense-scene tests)."""
    from eval_fixtures import write_dense_coco_folder
    from yolos_jax.data import prepare as prepare_cli

    root = tmp_path_factory.mktemp("dense")
    write_dense_coco_folder(root / "src")
    return root, prepare_cli


@pytest.fixture
def file_size_limit():
    """`with file_size_limit(n_bytes): ...` makes the kernel refuse to grow any file of this process past n_bytes:
    write() fails with EFBIG ('File too large') once a file reaches the limit, as it fails with ENOSPC on a full disk
    (the bytes before the limit are written, so the failure happens in the middle of the output). The limit applies
    to every file the process writes in the block (pytest's capture files too: keep the block short and quiet)."""
    import contextlib

    resource = pytest.importorskip("resource")
    import signal

    @contextlib.contextmanager
    def limit(n_bytes: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes if hard == resource.RLIM_INFINITY else min(n_bytes, hard), hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)

    return limit


@pytest.fixture
def splash_calls(monkeypatch):
    """[(images, the mesh axes manual there)] of every splash attention kernel call traced during the test
    (`attention_tpu.splash_attention_local` wrapped): says whether the kernel ran, per device or whole."""
    import jax

    from yolos_jax import attention_tpu

    calls = []
    local = attention_tpu.splash_attention_local

    def recording(q, *args, **kwargs):
        calls.append((q.shape[0], tuple(sorted(jax.sharding.get_abstract_mesh().manual_axes))))
        return local(q, *args, **kwargs)

    monkeypatch.setattr(attention_tpu, "splash_attention_local", recording)
    return calls
