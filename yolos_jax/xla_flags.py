"""XLA:CPU flags for yolos_jax, and the helper that applies them (before jax starts its backend).

Measured with benchmarks/bench_forward.py (YOLOS-Ti 1x512x688 and -S 1x800x1066, float32, jax 0.10.2,
AMD EPYC with AVX-512, 1 core). The first four were compiled in one process next to the default
(`.compile(compiler_options)`) and timed interleaved with it; the last two ran as separate processes
(`XLA_FLAGS=...`), each normalised by the HF timings interleaved with it:

  --xla_cpu_prefer_vector_width=512                     within noise (+-5%) of the default (256)
  --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY
                                                        within noise; bit-identical outputs
  --xla_cpu_use_onednn=true                             within noise; bit-identical outputs (also
                                                        as $XLA_FLAGS in a separate run)
  --xla_cpu_enable_fast_math=true                       within noise, and changes results: not used
  --xla_cpu_use_xnnpack=false                           ~10% slower
  --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce   ~2x slower (Ti)

So no flag is recommended today: `RECOMMENDED_CPU_FLAGS` is empty and the defaults are what the
benchmark figures use. What did matter is the program, not the flags: the head-major, query-chunked
attention of `attention.attention_heads_major` (see benchmarks/RESULTS_forward.md). The list and the helper stay
so that benchmarks and entry scripts have one place to set flags when a jax release changes the picture.

Usage (in an entry script, before anything imports jax):

    from yolos_jax import xla_flags
    xla_flags.set_cpu_flags()            # or set_cpu_flags(['--xla_cpu_prefer_vector_width=512'])
    import jax
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

RECOMMENDED_CPU_FLAGS: tuple[str, ...] = ()


def set_cpu_flags(flags: Sequence[str] = RECOMMENDED_CPU_FLAGS) -> str:
    """Appends `flags` to $XLA_FLAGS (a flag the user already set there wins) and returns the new value.

    XLA reads $XLA_FLAGS once, when jax initialises its first backend; call this before that (best:
    before importing jax). If jax is already imported a warning says the flags may be ignored.
    """
    current = os.environ.get("XLA_FLAGS", "")
    present = {f.split("=", 1)[0] for f in current.split()}
    added = [f for f in flags if f.split("=", 1)[0] not in present]
    if added and "jax" in sys.modules:
        warnings.warn(
            f"xla_flags.set_cpu_flags({added}) called after jax was imported: if a jax backend is already "
            "initialised these flags are ignored. Call it before importing jax.",
            stacklevel=2,
        )
    value = " ".join([current, *added]).strip()
    os.environ["XLA_FLAGS"] = value
    return value
