"""yolos_jax/malloc.py: glibc's settings (`keep_freed_memory`: large freed blocks stay mapped, so re-allocating
them costs no page faults) and oneTBB's scalable malloc (`use_scalable_malloc`: the entry scripts re-run
themselves on it once)."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import numpy as np
from yolos_jax import malloc
applied = malloc.keep_freed_memory() if sys.argv[1] == "1" else False
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
from yolos_jax import malloc
malloc.keep_freed_memory()
if sys.argv[1] == "no_reapply":  # the control: TF's mallopt stays in force
    malloc._FREED_MEMORY_KEPT = False
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
    from yolos_jax import malloc

    monkeypatch.setenv("YOLOS_JAX_KEEP_FREED_MEMORY", "0")
    assert malloc.keep_freed_memory() is False


SCALABLE_MALLOC_PROBE = r"""
import json, os, resource, subprocess, sys, threading
from yolos_jax import malloc
print("started", os.getpid(), flush=True)
mode = sys.argv[1]
if mode == "vanished":  # the libraries vanish between finding and loading them
    malloc.scalable_malloc_libraries = lambda: ("/nonexistent/libtbbmalloc.so.2",) * 2
elif mode == "dependency":  # the proxy alone: the loader cannot find the allocator it needs, and ends the process
    proxy = malloc.scalable_malloc_libraries()[1]
    malloc.scalable_malloc_libraries = lambda: (proxy, proxy)
elif mode == "absent":
    malloc.scalable_malloc_libraries = lambda: None
elif mode == "accelerator":
    malloc.accelerator_plugins_installed = lambda: ["jax-cuda13-plugin"]
elif mode.startswith("cache="):
    malloc.tbb_cache_limit_bytes = lambda: int(mode[6:])
elif mode == "keep":  # whatever this machine's memory: the soft limit out of reach
    malloc.tbb_cache_limit_bytes = lambda: 1 << 40
malloc.use_scalable_malloc()
malloc.use_scalable_malloc()  # a second call (a benchmark importing another) does nothing more
import numpy as np


def churn(sizes, counts):  # like XLA:CPU's per-step temporaries on its worker threads: allocate, touch, free
    for size in sizes:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.empty(size, np.uint8)
        a[::4096] = 1
        del a
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


faults = []
sizes = [(64 + 3 * i) * 2**20 for i in range(12)] * 2 if mode.startswith("cache") else [256 * 2**20] * 4
thread = threading.Thread(target=churn, args=(sizes, faults))
thread.start(); thread.join()
rss_mb = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
child = subprocess.run(["cat", "/proc/self/maps"], capture_output=True, text=True).stdout
print("result", json.dumps({"pid": os.getpid(), "tbb": malloc.scalable_malloc_active(),
                            "glibc_settings": malloc.keep_freed_memory(), "faults": max(faults[len(faults) // 2:]),
                            "rss_mb": rss_mb, "child_tbb": "libtbbmalloc" in child,
                            "LD_PRELOAD": os.environ.get("LD_PRELOAD")}), flush=True)
"""


def _scalable_malloc_probe(tmp_path, mode: str = "default", how: str = "file", **env_overrides: str):
    """Runs the probe as a program file (as train.py runs), or with -m or -c (`how`); returns (pids of each start,
    the result dict, proc)."""
    import json

    from yolos_jax import malloc

    script = tmp_path / "probe.py"
    script.write_text(SCALABLE_MALLOC_PROBE)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", malloc.MALLOC_ENV, "YOLOS_JAX_MALLOC_REEXEC", "JAX_PLATFORMS",
                        "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD", "YOLOS_JAX_KEEP_FREED_MEMORY")}
    env.update(env_overrides)
    command = {"file": [str(script)], "module": ["-m", "probe"], "code": ["-c", SCALABLE_MALLOC_PROBE]}[how]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, *command, mode], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    starts = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("started")]
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("result")]
    return starts, (results[0] if results else {}), proc


needs_tbb = pytest.mark.skipif(
    not sys.platform.startswith("linux") or __import__("yolos_jax.malloc").malloc.scalable_malloc_libraries() is None,
    reason="oneTBB's wheel (a dependency on Linux x86-64) is not installed")


@needs_tbb
def test_python_dash_m_reexecutes_and_dash_c_does_not(tmp_path):
    """`python -m MODULE` is run again like a script; `python -c CODE` is not (an interactive use), and with
    $YOLOS_JAX_MALLOC=tbb it ends in one `error:` line."""
    starts, result, proc = _scalable_malloc_probe(tmp_path, "keep", how="module")
    assert proc.returncode == 0 and len(starts) == 2 and result["tbb"], proc.stdout + proc.stderr
    starts, result, proc = _scalable_malloc_probe(tmp_path, "keep", how="code")
    assert proc.returncode == 0 and len(starts) == 1 and not result["tbb"], proc.stdout + proc.stderr
    starts, _, proc = _scalable_malloc_probe(tmp_path, "keep", how="code", YOLOS_JAX_MALLOC="tbb")
    assert proc.returncode == 1 and "needs a command that can be run again" in proc.stderr, proc.stderr


@needs_tbb
def test_use_scalable_malloc_reexecutes_once_with_tbbmalloc_keeping_large_blocks(tmp_path):
    """Issue 19 item 4: the command runs again, same process id, with oneTBB's malloc replacing glibc's; a worker
    thread's re-allocated 256 MB block costs no page faults (glibc's settings in `keep_freed_memory` are then not
    applied); the re-executed process does not re-execute again, and processes it starts do not inherit the
    preload."""
    starts, result, proc = _scalable_malloc_probe(tmp_path, "keep")
    assert proc.returncode == 0, proc.stderr
    assert len(starts) == 2 and starts[0] == starts[1] == str(result["pid"]), proc.stdout
    assert result["tbb"] and not result["glibc_settings"], proc.stdout
    assert result["faults"] <= 8, proc.stdout
    assert not result["child_tbb"] and result["LD_PRELOAD"] is None, proc.stdout


@needs_tbb
def test_scalable_malloc_without_the_huge_block_threshold_refaults(tmp_path):
    """The control for `TBB_HUGE_BLOCK_BYTES`: with tbbmalloc's own default (the threshold out of reach), freed
    blocks this large go back to the kernel and are faulted in again (37M faults in 600 demo steps)."""
    starts, result, proc = _scalable_malloc_probe(tmp_path, "keep", TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD=str(2**40))
    assert proc.returncode == 0 and len(starts) == 2 and result["tbb"], proc.stdout + proc.stderr
    assert result["faults"] >= 64, proc.stdout


@needs_tbb
def test_the_soft_heap_limit_bounds_blocks_kept_for_many_sizes(tmp_path):
    """Blocks over the threshold are reused only for about their size: 12 sizes of 64-97 MB, twice, keep one of
    each without a limit; `tbb_cache_limit_bytes` hands them back past it (here 256 MB)."""
    _, limited, proc = _scalable_malloc_probe(tmp_path, f"cache={256 << 20}")
    assert proc.returncode == 0 and limited["tbb"], proc.stdout + proc.stderr
    _, unlimited, proc = _scalable_malloc_probe(tmp_path, f"cache={1 << 40}")
    assert proc.returncode == 0 and unlimited["tbb"], proc.stdout + proc.stderr
    assert limited["rss_mb"] <= 256 + 160, (limited, unlimited)
    assert unlimited["rss_mb"] >= limited["rss_mb"] + 120, (limited, unlimited)


@needs_tbb
@pytest.mark.parametrize("mode,env", [("default", {"YOLOS_JAX_MALLOC": "system"}),
                                      ("default", {"LD_PRELOAD": "/nonexistent/libpreloaded_by_the_user.so"}),
                                      ("accelerator", {})])
def test_auto_leaves_glibc_for_the_users_choice_and_accelerator_hosts(tmp_path, mode, env):
    """$YOLOS_JAX_MALLOC=system keeps glibc's malloc (with `keep_freed_memory`'s settings); so do a library the
    user preloads (any) and an installed accelerator plugin under the default 'auto'."""
    starts, result, proc = _scalable_malloc_probe(tmp_path, mode, **env)
    assert proc.returncode == 0, proc.stderr
    assert len(starts) == 1 and not result["tbb"] and result["glibc_settings"], proc.stdout


@needs_tbb
def test_explicit_tbb_and_cpu_platforms_override_the_accelerator_rule(tmp_path):
    for env in ({"YOLOS_JAX_MALLOC": "tbb"}, {"JAX_PLATFORMS": "cpu"}):
        starts, result, proc = _scalable_malloc_probe(tmp_path, "accelerator", **env)
        assert proc.returncode == 0 and len(starts) == 2 and result["tbb"], (env, proc.stdout, proc.stderr)


def _system_tbbmalloc() -> bool:
    """A tbbmalloc the dynamic loader finds by itself (e.g. Debian's libtbbmalloc2): then the proxy alone loads."""
    import ctypes.util

    return ctypes.util.find_library("tbbmalloc") is not None


@needs_tbb
@pytest.mark.parametrize("mode", ["vanished", pytest.param("dependency", marks=pytest.mark.skipif(
    _system_tbbmalloc(), reason="a system libtbbmalloc satisfies the proxy's dependency"))])
def test_an_allocator_the_loader_refuses_leaves_glibc_in_one_line(tmp_path, mode):
    """The dynamic loader skips a preload it cannot open, and ends a process whose preload lacks a dependency
    (exit 127): tried in a child first, so the command goes on with glibc's malloc and its settings, saying so in
    one line; with $YOLOS_JAX_MALLOC=tbb it stops in one `error:` line instead."""
    starts, result, proc = _scalable_malloc_probe(tmp_path, mode)
    assert proc.returncode == 0, proc.stderr
    assert len(starts) == 1 and not result["tbb"] and result["glibc_settings"], proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "oneTBB" in line]
    assert len(lines) == 1 and "running on glibc's malloc" in lines[0], proc.stderr
    starts, _, proc = _scalable_malloc_probe(tmp_path, mode, YOLOS_JAX_MALLOC="tbb")
    assert proc.returncode == 1 and len(starts) == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: $YOLOS_JAX_MALLOC=tbb, but"), proc.stderr


def test_explicit_tbb_without_the_library_and_an_unknown_choice_end_in_one_line(tmp_path):
    starts, _, proc = _scalable_malloc_probe(tmp_path, "absent", YOLOS_JAX_MALLOC="tbb")
    assert proc.returncode == 1 and len(starts) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "oneTBB's malloc is not installed here" in proc.stderr, proc.stderr
    starts, _, proc = _scalable_malloc_probe(tmp_path, YOLOS_JAX_MALLOC="jemalloc")
    assert proc.returncode == 1 and len(starts) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: $YOLOS_JAX_MALLOC='jemalloc': use 'auto'" in proc.stderr, proc.stderr


@needs_tbb
def test_a_benchmark_choosing_malloc_twice_runs_once():
    """benchmarks/bench_export.py prepares the process (`cpu_setup.prepare`: malloc) and then imports
    bench_forward, which prepares it again: the re-executed command must not re-execute once more (it did, without
    end, before `use_scalable_malloc` ran once per process). Without oneTBB nothing re-executes: skipped. How many
    times a command starts is counted by the probe tests above."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "YOLOS_JAX_MALLOC", "YOLOS_JAX_MALLOC_REEXEC")}
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_export.py"), "--help"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "--threads" in proc.stdout, proc.stdout + proc.stderr


def test_the_malloc_module_imports_neither_jax_nor_tensorflow():
    """The entry scripts re-execute before anything allocates: `from yolos_jax import malloc` must stay light
    (the package's own names are imported lazily)."""
    code = "import sys; from yolos_jax import malloc; print(sorted({'jax', 'tensorflow', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
