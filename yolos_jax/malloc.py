"""Which malloc a process runs on, and glibc's settings: the host memory of XLA:CPU's steps (issue 19 item 4).

* `use_scalable_malloc`: entry scripts re-execute themselves once on oneTBB's scalable malloc (`tbb` wheel).
* `keep_freed_memory`: with glibc's malloc, keep freed memory in the process (one arena, no mmap, no trim).
* `describe`: the allocator in use, in words (`runtime.setup_host` logs it).

Imports only the standard library: entry scripts call this before jax, TensorFlow or numpy is imported.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from typing import Optional


def describe() -> str:
    """The malloc this process runs on, in words (e.g. for the log)."""
    other = _replacement()
    if other is not None:
        return other
    return "glibc's" + (" (one arena, freed memory kept)" if freed_memory_kept() else "")


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory in the process rather than hand it back to the kernel.

    Why: XLA:CPU allocates a step's temporaries afresh on every step (the demo: one ~240 MB block, YOLOS-Ti at
    the train benchmark's shape: ~800 MB). Memory glibc gives back to the kernel must be page-faulted in again
    on the next step, one fault per 4 KiB page: 0.35-1.4 s of system time on a 2.5 s step. Three settings
    (mallopt), equivalent to starting the process with MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ and
    MALLOC_ARENA_MAX=1 set, serve those blocks from the heap and keep their pages:

    * M_MMAP_THRESHOLD, M_TRIM_THRESHOLD at their maximum: no block is mmapped (and unmapped on free), and
      the heap's top is never trimmed.
    * M_ARENA_MAX=1: every thread allocates from the main heap. XLA:CPU runs each step on its own worker
      threads, and glibc gives a thread other than the main one its own arena, made of 64 MiB heaps: a block
      larger than that is always mmapped there, whatever the threshold, and unmapped on free (the demo:
      60k faults a step). One arena costs a lock shared by the threads; the training threads allocate few,
      large blocks, and small ones come from glibc's per-thread cache. An explicit $MALLOC_ARENA_MAX wins.

    The process's resident memory stays at its peak instead of dropping between steps. GPU and TPU memory are
    not affected.

    The settings are process-wide and the last mallopt call wins: TensorFlow's tf.data lowers the mmap
    threshold again to 128 KiB the first time a process builds a `Dataset.from_generator` (its mitigation of a
    Python 3.11 leak), which silently undid this one for the whole run — every XLA:CPU temporary of 128 KiB or
    more was mmapped and unmapped again (issue 19: 40% of the demo's CPU time in the kernel).
    `data.tf_setup.get_tf` therefore sets TF off that once-per-process call and then calls this again
    (`freed_memory_kept` says whether it should).

    Applies only with glibc's malloc (Linux, without `use_scalable_malloc`'s allocator or one named *malloc* in
    $LD_PRELOAD); a no-op elsewhere or with YOLOS_JAX_KEEP_FREED_MEMORY=0. Call first thing
    in the process, before any thread allocates (the arena limit binds only threads without an arena yet).
    Returns whether the settings were applied.
    """
    global _FREED_MEMORY_KEPT
    if os.environ.get("YOLOS_JAX_KEEP_FREED_MEMORY", "1") == "0" or _replacement() is not None:
        return False  # opted out, or glibc's malloc is not the one in use (`use_scalable_malloc`, or the user's)
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's malloc.h
    limit = ctypes.c_int(2**31 - 1)  # mallopt takes an int
    applied = bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))
    if applied and not os.environ.get("MALLOC_ARENA_MAX"):
        applied = bool(mallopt(m_arena_max, ctypes.c_int(1)))
    _FREED_MEMORY_KEPT = _FREED_MEMORY_KEPT or applied
    return applied


_FREED_MEMORY_KEPT = False  # set by the first successful keep_freed_memory() of this process


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` took effect in this process (an entry script's `setup_host` called it): a
    library that overrides glibc's malloc settings must then be followed by another `keep_freed_memory()`."""
    return _FREED_MEMORY_KEPT


MALLOC_ENV = "YOLOS_JAX_MALLOC"  # "auto" (the default), "tbb" or "system"
_REEXEC_ENV = "YOLOS_JAX_MALLOC_REEXEC"  # JSON, set for the re-executed command: its pid and what to restore
TBB_MALLOC_LIBRARIES = ("libtbbmalloc.so.2", "libtbbmalloc_proxy.so.2")  # the allocator, then its malloc proxy
# tbbmalloc keeps freed blocks of at least this many bytes for reuse, outside its regular cleanup. By default it
# caches none over 64 MiB (the demo's ~240 MB step temporaries) and hands idle large ones back: 37M faults in 600
# demo steps. 8 MiB is the smallest value it accepts (smaller values are raised to it).
TBB_HUGE_BLOCK_BYTES = 8 << 20
# Blocks kept that way are reused only for requests of about their size: a run with many shapes (multi-scale
# training, evaluation at other sizes) would keep one set per shape. tbbmalloc's soft heap limit bounds that: when
# all it holds from the kernel (in use and cached) passes the limit, it hands cached blocks back (to be faulted in
# again when needed). The limit is this share of the memory the process may use (`memory_limit_bytes`): below it
# nothing changes, and the cache gives way before the memory runs out.
TBB_CACHE_MEMORY_SHARE = 0.75
# jax plugins for accelerators: with one installed (and $JAX_PLATFORMS not "cpu") "auto" keeps glibc's malloc,
# as the gain is XLA:CPU's and was not measured on accelerator hosts.
ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm60-plugin", "jax-rocm7-plugin", "libtpu",
                       "libtpu-nightly")


def scalable_malloc_libraries() -> Optional[tuple[str, ...]]:
    """Absolute paths of oneTBB's `TBB_MALLOC_LIBRARIES` from the installed `tbb` wheel (a dependency on Linux
    x86-64), or None where it is not installed (or its file list cannot be read)."""
    from importlib import metadata

    try:
        files = metadata.distribution("tbb").files or []
        found = {f.name: os.path.abspath(str(f.locate())) for f in files if f.name in TBB_MALLOC_LIBRARIES}
    except Exception:  # noqa: BLE001 - not installed, or a broken RECORD: glibc's malloc then
        return None
    paths = tuple(found.get(name, "") for name in TBB_MALLOC_LIBRARIES)
    return paths if all(p and os.path.isfile(p) for p in paths) else None


def _replacement() -> Optional[str]:
    """What replaced glibc's malloc in this process, in words, or None."""
    if scalable_malloc_active():
        return "oneTBB's scalable malloc ($YOLOS_JAX_MALLOC=system for glibc's)"
    preload = os.environ.get("LD_PRELOAD", "")
    return f"preloaded ({preload})" if "malloc" in preload else None


def scalable_malloc_active() -> bool:
    """Whether oneTBB's malloc proxy replaced malloc in this process (its library is mapped)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libtbbmalloc_proxy" in line for line in maps)
    except OSError:  # no /proc: not Linux
        return False


def accelerator_plugins_installed() -> list[str]:
    """The `ACCELERATOR_PLUGINS` installed in this environment."""
    from importlib import metadata

    found = []
    for name in ACCELERATOR_PLUGINS:
        try:
            metadata.distribution(name)
            found.append(name)
        except Exception:  # noqa: BLE001 - not installed
            pass
    return found


def memory_limit_bytes() -> int:
    """The memory this process may use: the smallest limit of its cgroup and the cgroups above it (v2's
    memory.max and memory.high, v1's memory.limit_in_bytes; a SLURM job's, a container's), else the machine's RAM."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return limit
    for _, controllers, path in entries:
        if controllers == "":
            root, files = "/sys/fs/cgroup", ("memory.max", "memory.high")
        elif "memory" in controllers.split(","):
            root, files = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes",)
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # this cgroup, then each one above it
            for name in files:
                try:
                    with open(os.path.join(root, *parts[:depth], name)) as f:
                        value = f.read().strip()
                except OSError:
                    continue
                if value.isdigit() and int(value) > 0:
                    limit = min(limit, int(value))
    return limit


def use_scalable_malloc() -> None:
    """Re-executes this command once, same process id, with oneTBB's scalable malloc preloaded. Call first thing
    in an entry script, before jax or TensorFlow is imported; returns where there is nothing to do.

    Why: XLA:CPU's worker threads allocate and free thousands of scratch blocks a step (YNNPACK's, oneDNN's,
    Eigen's), most above glibc's 1 KiB per-thread cache, and each step's temporaries afresh (the demo: ~240 MB).
    glibc serves them either from one arena whose lock the threads queue on (futex: `keep_freed_memory`'s
    setting) or from per-thread arenas that unmap every block over 64 MiB on free (page faults). tbbmalloc keeps
    per-thread caches, and with `TBB_HUGE_BLOCK_BYTES` keeps large freed blocks mapped, up to a soft limit of
    `TBB_CACHE_MEMORY_SHARE` of `memory_limit_bytes()`: the whole demo took 416-429 s instead of 580 s, its system
    time 3.1% of the CPU time instead of 6.8% (BENCHMARKS.md, issue 19 item 4). Results do not change.

    $YOLOS_JAX_MALLOC: "auto" (default) re-executes on Linux where the `tbb` wheel is installed, unless $LD_PRELOAD
    is already set (the user's choice wins), an accelerator plugin is installed (`ACCELERATOR_PLUGINS`; not with
    $JAX_PLATFORMS=cpu), a debugger is attached or the program is not a file (stdin, -c); "tbb" re-executes
    also under $LD_PRELOAD, a plugin or a debugger (not for stdin or -c), and ends in one `error:` line where the
    libraries are missing or refused; "system" keeps glibc's malloc (with
    `keep_freed_memory`). Before re-executing, a child process tries the preload: where the dynamic loader
    refuses the libraries, one line says why and the command goes on with glibc's malloc. The re-executed
    process restores $LD_PRELOAD, so processes it starts run on their own choice.
    """
    global _MALLOC_CHOSEN
    choice = os.environ.get(MALLOC_ENV, "auto").strip().lower()
    if choice not in ("auto", "tbb", "system"):
        raise SystemExit(f"error: ${MALLOC_ENV}={os.environ[MALLOC_ENV]!r}: use 'auto' (oneTBB's scalable malloc "
                         "where it helps, the default), 'tbb' (always) or 'system' (glibc's malloc)")
    if _MALLOC_CHOSEN or _settle_reexecuted() or scalable_malloc_active():
        _MALLOC_CHOSEN = True  # once per process: the re-executed command calls this again, and may twice
        return
    _MALLOC_CHOSEN = True
    if choice == "system":
        return
    explicit = choice == "tbb"
    libraries = scalable_malloc_libraries() if sys.platform.startswith("linux") else None
    if libraries is None:
        if explicit:
            raise SystemExit(f"error: ${MALLOC_ENV}=tbb, but oneTBB's malloc is not installed here (Linux x86-64: "
                             f"pip install tbb); unset ${MALLOC_ENV} to run on glibc's malloc")
        return
    if not _rerunnable_command():  # stdin, -c, IPython's %run, an embedded interpreter
        if explicit:
            raise SystemExit(f"error: ${MALLOC_ENV}=tbb needs a command that can be run again (python SCRIPT or "
                             f"python -m MODULE); unset ${MALLOC_ENV} to run on glibc's malloc")
        return
    preload = os.environ.get("LD_PRELOAD", "").strip()
    if not explicit and (preload or _debugger_attached() or (
            accelerator_plugins_installed() and os.environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu")):
        return
    env = dict(os.environ)
    env[_REEXEC_ENV] = json.dumps({"pid": os.getpid(), "LD_PRELOAD": os.environ.get("LD_PRELOAD"),
                                   "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD":
                                       os.environ.get("TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"),
                                   "library": libraries[0]})
    env["LD_PRELOAD"] = ":".join(libraries + ((preload,) if preload else ()))
    env.setdefault("TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD", str(TBB_HUGE_BLOCK_BYTES))
    # The dynamic loader ends a process whose preload lacks a dependency (exit 127) and skips one it cannot open:
    # find out in a child first, which says whether the proxy is mapped (-I: no $PYTHON* settings, no site).
    check = "import sys; sys.exit(0 if 'libtbbmalloc_proxy' in open('/proc/self/maps').read() else 3)"
    try:
        probe = subprocess.run([sys.executable, "-I", "-S", "-c", check], env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, errors="replace", timeout=60)
        refusal = "" if probe.returncode == 0 else (probe.stderr.strip() or f"exit code {probe.returncode}")
    except (OSError, subprocess.SubprocessError) as e:
        refusal = str(e) or type(e).__name__
    if not refusal:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, list(sys.orig_argv), env)
        except OSError as e:
            refusal = str(e)
    if explicit:
        raise SystemExit(f"error: ${MALLOC_ENV}=tbb, but oneTBB's malloc cannot be preloaded: "
                         f"{refusal.splitlines()[0]}")
    print(f"yolos_jax: oneTBB's malloc cannot be preloaded ({refusal.splitlines()[0]}); running on glibc's malloc "
          f"(${MALLOC_ENV}=system skips the attempt)", file=sys.stderr, flush=True)


_MALLOC_CHOSEN = False  # set by this process's first use_scalable_malloc()


def _rerunnable_command() -> bool:
    """Whether `sys.orig_argv` runs this program: `python SCRIPT ...` with SCRIPT this `sys.argv[0]`, or
    `python -m MODULE ...` with MODULE this `__main__`'s."""
    argv = list(getattr(sys, "orig_argv", []))
    if not sys.executable or not sys.argv or not argv:
        return False
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is not None and "-m" in argv[1:]:
        i = argv.index("-m", 1)
        return i + 1 < len(argv) and argv[i + 1] == main_spec.name.removesuffix(".__main__")
    if not os.path.isfile(sys.argv[0]):
        return False
    target = os.path.realpath(sys.argv[0])
    return any(os.path.realpath(a) == target for a in argv[1:] if not a.startswith("-"))


def _debugger_attached() -> bool:
    """A tracing debugger (pdb, or coverage) or one on Python 3.12's sys.monitoring (debugpy, pydevd)."""
    monitoring = getattr(sys, "monitoring", None)
    on_monitoring = monitoring is not None and monitoring.get_tool(monitoring.DEBUGGER_ID) is not None
    return sys.gettrace() is not None or on_monitoring or bool({"pydevd", "debugpy"} & set(sys.modules))


def _settle_reexecuted() -> bool:
    """In the command `use_scalable_malloc` re-executed: restores the environment its processes inherit, sets
    tbbmalloc's soft heap limit, and returns True. False in any other process."""
    try:
        state = json.loads(os.environ.get(_REEXEC_ENV, "null"))
    except ValueError:
        state = None
    if not isinstance(state, dict) or state.get("pid") != os.getpid():
        return False
    for var in ("LD_PRELOAD", "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"):
        if state.get(var) is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = state[var]
    os.environ.pop(_REEXEC_ENV, None)
    if scalable_malloc_active():
        try:
            tbbmalloc = ctypes.CDLL(state["library"])
            tbbmalloc.scalable_allocation_mode(1, ctypes.c_size_t(tbb_cache_limit_bytes()))  # SOFT_HEAP_LIMIT
        except (OSError, AttributeError, KeyError, TypeError):  # an older tbbmalloc: no limit
            pass
    return True


def tbb_cache_limit_bytes() -> int:
    """tbbmalloc's soft heap limit: `TBB_CACHE_MEMORY_SHARE` of `memory_limit_bytes()`."""
    return int(TBB_CACHE_MEMORY_SHARE * memory_limit_bytes())
