"""Process set-up shared by the CPU benchmarks; import it before jax, torch or TensorFlow.

    import cpu_setup  # (the benchmarks' folder is the script's, so it is on sys.path)
    THREADS = cpu_setup.prepare(sys.argv[1:], pin=True)

* pin=True: the process is pinned to the first `--threads` cores (default: all it may use) before jax
  and torch create their thread pools (XLA sizes its pool from the affinity mask), so both libraries
  see the same cores;
* JAX_PLATFORMS=cpu unless set: a CPU benchmark, also on machines with accelerators;
* the repository root goes on sys.path (benchmarks run from a checkout), XLA's CPU flags are set
  (`yolos_jax.xla_flags`), and malloc is chosen as train.py chooses it: a benchmark run as a script re-executes
  itself once on oneTBB's scalable malloc (`malloc.use_scalable_malloc`, $YOLOS_JAX_MALLOC), else glibc keeps
  freed memory (`malloc.keep_freed_memory`), so XLA:CPU steps do not page-fault their temporaries back in.
  One process per benchmark, so a PyTorch reference measured in the same run gets the same allocator.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def threads_from_argv(argv: Sequence[str]) -> int:
    """--threads=N / --threads N from argv (before argparse runs), default: every core allowed."""
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
        if a == "--threads":
            return int(argv[i + 1])
    return len(os.sched_getaffinity(0))


def describe_cpu(cpuinfo: str = "/proc/cpuinfo", sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> str:
    """One line naming the CPU a figure was measured on: model, widest vector ISA, L2 cache per core.

    The ratios against PyTorch depend on it: both libraries' matmuls run near the same limit, but that limit
    and the cache a block of attention logits must fit in differ between machines (an AVX-512 host with 2 MB
    of L2 per core against an AVX2 one with 512 KB changed ours/HF from 0.55 to 1.08; BENCHMARKS.md).
    Linux only; elsewhere, or where a file is missing, the fields say "unknown".
    """
    model, flags = "unknown", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = next((name for name, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx")) if flag in flags),
               "unknown" if not flags else "SSE")
    if "amx_bf16" in flags:
        isa += " + AMX"
    l2 = "unknown"
    try:
        for index in sorted(os.listdir(sysfs)):
            with open(os.path.join(sysfs, index, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(sysfs, index, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(sysfs, index, "size")) as f:
                    l2 = f.read().strip()
    except OSError:
        pass
    return f"CPU {model}, {isa}, L2 {l2} per core"


def prepare(argv: Optional[Sequence[str]] = None, pin: bool = False) -> int:
    """Does the above; returns the thread count (cores pinned to when pin=True)."""
    threads = threads_from_argv(sys.argv[1:] if argv is None else argv)
    if pin:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.join(here, "..")
    if root not in sys.path:
        sys.path.insert(0, root)
    from yolos_jax import malloc, xla_flags  # neither imports jax

    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    if os.path.dirname(os.path.realpath(main_file)) == os.path.realpath(here):  # a benchmark script, not an importer
        malloc.use_scalable_malloc()

    xla_flags.set_cpu_flags()
    malloc.keep_freed_memory()
    return threads
