"""runtime.keep_freed_memory: large freed blocks stay mapped, so re-allocating them costs no page faults; and
runtime.maybe_initialize_distributed starts jax.distributed only for a multi-process launch."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import numpy as np
from yolos_jax import runtime
applied = runtime.keep_freed_memory() if sys.argv[1] == "1" else False
faults = []
for _ in range(3):  # like XLA:CPU's per-step temp buffer: allocate, touch every page, free
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.empty(256 * 2**20, np.uint8)
    a[::4096] = 1
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(int(applied), faults[1], faults[2])
"""


def _run(apply: str) -> tuple[int, int, int]:
    env = dict(os.environ)
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "YOLOS_JAX_KEEP_FREED_MEMORY"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", PROBE, apply], capture_output=True, text=True, env=env, check=True)
    return tuple(int(v) for v in out.stdout.split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_refaulting():
    applied, *faults_kept = _run("1")
    if not applied:
        pytest.skip("not glibc")
    _, *faults_default = _run("0")
    # Default glibc: a 256 MB block is mmapped and returned on free, so each re-allocation faults its
    # pages in again (>= 64 faults even with 2 MB transparent huge pages, 65536 with 4 KB pages).
    assert min(faults_default) >= 64, faults_default
    assert max(faults_kept) <= 8, faults_kept


AFTER_TF_PROBE = r"""
import resource, sys, threading
import numpy as np
from yolos_jax import runtime
runtime.keep_freed_memory()
if sys.argv[1] == "no_reapply":  # the control: TF's mallopt stays in force
    runtime._FREED_MEMORY_KEPT = False
from yolos_jax.data import tf_setup
tf = tf_setup.get_tf()
for _ in tf.data.Dataset.from_generator(lambda: iter((1,)), output_signature=tf.TensorSpec([], tf.int32)):
    pass  # the input pipeline's source: TF's GeneratorDatasetOp, whose first construction calls mallopt


def churn(size, counts):  # like XLA:CPU's per-step temporaries: allocate, touch every page, free
    for _ in range(4):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.empty(size, np.uint8)
        a[::4096] = 1
        del a
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


main, worker = [], []
churn(256 * 2**20, main)  # larger than the heap's free top: a block the mmap threshold decides about
thread = threading.Thread(target=churn, args=(96 * 2**20, worker))  # 96 MB in a worker: over a 64 MiB arena heap
thread.start(); thread.join()
print(max(main[1:]), max(worker[1:]))
"""


def _after_tf(mode: str) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                        "YOLOS_JAX_KEEP_FREED_MEMORY")}
    out = subprocess.run([sys.executable, "-c", AFTER_TF_PROBE, mode], capture_output=True, text=True, env=env,
                         check=True)
    main_faults, worker_faults = (int(v) for v in out.stdout.split()[-2:])
    return main_faults, worker_faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_stays_kept_after_tensorflow_and_in_worker_threads():
    """Issue 19 item 4, both causes of 40% of the demo's CPU time in the kernel:

    * TF's GeneratorDatasetOp (the input pipeline's source) calls mallopt(M_MMAP_THRESHOLD, 128 KiB) the first
      time a process builds one (TF 2.21 with Python 3.11), replacing ours; `tf_setup.get_tf` sets it off and
      re-applies ours. Without that re-application a 256 MB block is mmapped and faulted in again every round
      (the control below: ~640 faults a round with 2 MB huge pages; 0 with it).
    * A worker thread's own glibc arena mmaps any block over 64 MiB whatever the threshold, and XLA:CPU
      allocates its per-step temporaries on its worker threads; with one arena (M_ARENA_MAX=1) a re-allocated
      block costs no faults (~49 a round without the limit)."""
    main_faults, worker_faults = _after_tf("reapply")
    assert main_faults <= 8 and worker_faults <= 8, (main_faults, worker_faults)
    control_main, _ = _after_tf("no_reapply")
    if control_main <= 8:
        pytest.skip("this TensorFlow does not lower glibc's mmap threshold: the re-application is not exercised")
    assert control_main >= 64, control_main


def test_keep_freed_memory_opt_out(monkeypatch):
    from yolos_jax import runtime

    monkeypatch.setenv("YOLOS_JAX_KEEP_FREED_MEMORY", "0")
    assert runtime.keep_freed_memory() is False


@pytest.mark.parametrize("env,expect", [({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
                                        ({"TPU_WORKER_HOSTNAMES": "a"}, False), ({"TPU_WORKER_HOSTNAMES": "a,b"}, True),
                                        ({"OMPI_COMM_WORLD_SIZE": "2"}, True), ({"JAX_COORDINATOR_ADDRESS": "h:1"}, True)])
def test_maybe_initialize_distributed_only_for_several_processes(monkeypatch, env, expect):
    import jax

    from yolos_jax import run_config, runtime

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in runtime.MULTIPROCESS_ENV:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runtime.maybe_initialize_distributed(run_config.default_distributed_config())
    # The heartbeat bound (config.distributed.heartbeat_timeout_s) is passed on: a dead peer ends the run.
    assert calls == ([{"heartbeat_timeout_seconds": 60}] if expect else [])
