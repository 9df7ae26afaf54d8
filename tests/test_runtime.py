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
