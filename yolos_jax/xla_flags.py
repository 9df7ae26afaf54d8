"""XLA CPU flags (placeholder while benchmarking)."""
import os

CPU_FLAGS = []


def set_cpu_flags(flags=None):
    flags = CPU_FLAGS if flags is None else flags
    cur = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join([cur] + [f for f in flags if f.split("=")[0] not in cur]).strip()
