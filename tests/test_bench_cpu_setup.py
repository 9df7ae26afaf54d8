"""benchmarks/cpu_setup.py's `describe_cpu`: the line naming the machine a CPU benchmark figure comes from."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import cpu_setup  # noqa: E402


def _fake_machine(tmp_path, model: str, flags: str, caches: dict) -> tuple[str, str]:
    """A /proc/cpuinfo with two processors and a sysfs cache folder: {indexN: (level, type, size)}."""
    cpuinfo = tmp_path / "cpuinfo"
    block = f"processor\t: {{n}}\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
    cpuinfo.write_text(block.format(n=0) + block.format(n=1))
    sysfs = tmp_path / "cache"
    for index, (level, kind, size) in caches.items():
        folder = sysfs / index
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    return str(cpuinfo), str(sysfs)


CACHES = {"index0": (1, "Data", "48K"), "index1": (1, "Instruction", "32K"), "index2": (2, "Unified", "2048K"),
          "index3": (3, "Unified", "105M")}


@pytest.mark.parametrize(
    "flags, isa",
    [
        ("fpu sse sse2 avx avx2 fma avx512f avx512bw amx_bf16 amx_tile", "AVX-512 + AMX"),
        ("fpu sse sse2 avx avx2 fma avx512f avx512bw", "AVX-512"),
        ("fpu sse sse2 ssse3 fma avx sse4a avx2 bmi2", "AVX2"),
        ("fpu sse sse2", "SSE"),
    ],
)
def test_names_the_model_the_widest_vector_isa_and_the_l2_per_core(tmp_path, flags, isa):
    cpuinfo, sysfs = _fake_machine(tmp_path, "Some CPU 9000", flags, CACHES)
    assert cpu_setup.describe_cpu(cpuinfo, sysfs) == f"CPU Some CPU 9000, {isa}, L2 2048K per core"


def test_missing_files_give_unknown_fields_not_an_error(tmp_path):
    missing = str(tmp_path / "absent")
    assert cpu_setup.describe_cpu(missing, missing) == "CPU unknown, unknown, L2 unknown per core"


def test_the_l2_is_the_level_2_data_or_unified_cache(tmp_path):
    caches = {"index0": (2, "Instruction", "64K"), "index1": (2, "Data", "512K"), "index2": (3, "Unified", "32M")}
    cpuinfo, sysfs = _fake_machine(tmp_path, "M", "avx2", caches)
    assert cpu_setup.describe_cpu(cpuinfo, sysfs).endswith("L2 512K per core")
