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


SCALABLE_MALLOC_PROBE = r"""
import os, resource, sys, threading
from yolos_jax import runtime
print("started", os.getpid(), flush=True)
if len(sys.argv) > 1:  # the libraries vanish between finding and loading them
    runtime.scalable_malloc_libraries = lambda: ("/nonexistent/libtbbmalloc.so.2",) * 2
runtime.use_scalable_malloc()
import numpy as np


def churn(counts):  # like XLA:CPU's per-step temporaries on its worker threads: allocate, touch, free
    for _ in range(4):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.empty(96 * 2**20, np.uint8)
        a[::4096] = 1
        del a
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


faults = []
thread = threading.Thread(target=churn, args=(faults,))
thread.start(); thread.join()
print("active", int(runtime.scalable_malloc_active()), int(runtime.keep_freed_memory()), max(faults[1:]), os.getpid())
"""


def _scalable_malloc_probe(*args: str, **env_overrides: str) -> tuple[list[str], list[int], subprocess.CompletedProcess]:
    from yolos_jax import runtime

    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", runtime.MALLOC_ENV, "YOLOS_JAX_MALLOC_PRELOADED",
                        "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD", "YOLOS_JAX_KEEP_FREED_MEMORY")}
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", SCALABLE_MALLOC_PROBE, *args], capture_output=True, text=True, env=env)
    lines = proc.stdout.split("\n")
    starts = [line.split()[1] for line in lines if line.startswith("started")]
    active = [int(v) for line in lines if line.startswith("active") for v in line.split()[1:]]
    return starts, active, proc


needs_tbb = pytest.mark.skipif(
    not sys.platform.startswith("linux") or __import__("yolos_jax.runtime").runtime.scalable_malloc_libraries() is None,
    reason="oneTBB's wheel (a dependency on Linux x86-64) is not installed")


@needs_tbb
def test_use_scalable_malloc_reexecutes_once_with_tbbmalloc_keeping_large_blocks():
    """Issue 19 item 4: the command is run again, same process id, with oneTBB's malloc replacing glibc's; a worker
    thread's re-allocated 96 MB block costs no page faults (glibc's settings in `keep_freed_memory` are then not
    applied), and the re-executed process does not re-execute again."""
    starts, active, proc = _scalable_malloc_probe()
    assert proc.returncode == 0, proc.stderr
    assert len(starts) == 2 and starts[0] == starts[1] == str(active[3]), proc.stdout
    is_active, glibc_settings, faults, _ = active
    assert (is_active, glibc_settings) == (1, 0), proc.stdout
    assert faults <= 8, proc.stdout


@needs_tbb
def test_scalable_malloc_without_the_huge_block_threshold_refaults():
    """The control for `TBB_HUGE_BLOCK_BYTES`: with tbbmalloc's own default (the threshold out of reach), freed
    blocks this large go back to the kernel and are faulted in again (37M faults in 600 demo steps)."""
    starts, active, proc = _scalable_malloc_probe(TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD=str(2**40))
    assert proc.returncode == 0 and len(starts) == 2 and active[0] == 1, proc.stdout + proc.stderr
    assert active[2] >= 64, proc.stdout


@pytest.mark.parametrize("env", [{"YOLOS_JAX_MALLOC": "system"}, {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}])
def test_use_scalable_malloc_leaves_the_users_choice(env):
    """$YOLOS_JAX_MALLOC=system keeps glibc's malloc (with `keep_freed_memory`'s settings), and an allocator the
    user preloads wins: no re-execution."""
    starts, active, proc = _scalable_malloc_probe(**env)
    assert proc.returncode == 0, proc.stderr
    assert len(starts) == 1 and active[0] == 0, proc.stdout
    assert active[1] == int(sys.platform.startswith("linux")), proc.stdout


def test_use_scalable_malloc_refuses_an_unknown_choice():
    starts, _, proc = _scalable_malloc_probe(YOLOS_JAX_MALLOC="jemalloc")
    assert proc.returncode != 0 and len(starts) == 1
    assert "$YOLOS_JAX_MALLOC='jemalloc': use 'tbb'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD: Linux only")
def test_an_allocator_that_fails_to_load_leaves_glibc_with_its_settings():
    """The dynamic loader ignores a preload it cannot open (one line on stderr): the re-executed command runs on
    glibc's malloc, `keep_freed_memory` applies, and nothing re-executes again."""
    starts, active, proc = _scalable_malloc_probe("vanish")
    assert proc.returncode == 0, proc.stderr
    assert len(starts) == 2 and active[:2] == [0, 1], proc.stdout
    assert "cannot be preloaded" in proc.stderr, proc.stderr
