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

import glob
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


def describe_cpu(cpuinfo: str = "/proc/cpuinfo", sysfs: Optional[str] = None) -> str:
    """One line naming the CPU a figure was measured on: model, widest vector ISA, L2 cache size and sharing.

    The ratios against PyTorch depend on it: the matmul rate and the cache a block of attention logits must fit
    in differ between machines (an AVX-512 host with 2 MB of L2 per core against an AVX2 one with 512 KB moved
    ours/HF from 0.55 to about 1.0 at one thread; BENCHMARKS.md). Read from the first processor's block of
    `cpuinfo` (x86 "model name"/"flags"/"cpu family"/"model", or aarch64 "CPU part"/"Features") and the sysfs
    cache folder of the first core this process may run on (`sysfs`: that folder, for tests), which is the one a
    pinned benchmark uses. Linux only; elsewhere, or where a file is missing, the fields say "unknown".
    """
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    if "flags" in fields or "Features" in fields:
                        break  # the first processor's block is enough
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    if "model name" in fields:
        model = fields["model name"]
        if "cpu family" in fields and not any(ch.isdigit() for ch in model):  # "AMD EPYC" says no generation
            model += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    elif "CPU part" in fields:
        model = f"implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    else:
        model = "unknown"
    widest = (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"), ("SVE2", "sve2"), ("SVE", "sve"),
              ("NEON", "asimd"))
    isa = next((name for name, flag in widest if flag in flags), "unknown" if not flags else "SSE")
    if "amx_bf16" in flags:
        isa += " + AMX"
    if sysfs is None:
        first = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        sysfs = f"/sys/devices/system/cpu/cpu{first}/cache"
    return f"CPU {model}, {isa}, L2 {_l2_cache(sysfs)}"


def _l2_cache(sysfs: str) -> str:
    """'512K per core', '2048K per 4 logical CPUs' or '512K (sharing unknown)' from a sysfs cache folder (index0,
    index1, ...), else 'unknown'."""
    numbered = [p for p in glob.glob(os.path.join(sysfs, "index*")) if p.rsplit("index", 1)[1].isdigit()]
    for index in sorted(numbered, key=lambda p: int(p.rsplit("index", 1)[1])):  # index2 before index10
        try:
            with open(os.path.join(index, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            if level != "2" or kind not in ("Unified", "Data"):
                continue
            with open(os.path.join(index, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            continue  # an unreadable entry: try the others
        try:
            with open(os.path.join(index, "shared_cpu_list")) as f:
                cpus = _count_cpus(f.read().strip())
            sharing = f"{cpus} logical CPUs" if cpus > 1 else "core"
        except (OSError, ValueError):
            return f"{size} (sharing unknown)"
        return f"{size} per {sharing}"
    return "unknown"


def _count_cpus(cpu_list: str) -> int:
    """Number of CPUs in a sysfs list such as '0-3,8,10-11'."""
    count = 0
    for part in cpu_list.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


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
