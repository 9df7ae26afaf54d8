"""benchmarks/cpu_setup.py's `describe_cpu`: the line naming the machine a CPU benchmark figure comes from."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import cpu_setup  # noqa: E402


def _cpuinfo(tmp_path, *blocks: dict) -> str:
    """A /proc/cpuinfo with one block of 'key : value' lines per processor."""
    path = tmp_path / "cpuinfo"
    path.write_text("".join("".join(f"{k}\t: {v}\n" for k, v in block.items()) + "\n" for block in blocks))
    return str(path)


def _caches(tmp_path, caches: dict) -> str:
    """A sysfs cache folder: {indexN: (level, type, size, shared_cpu_list or None)}."""
    sysfs = tmp_path / "cache"
    sysfs.mkdir()
    (sysfs / "uevent").write_text("")
    for index, (level, kind, size, shared) in caches.items():
        folder = sysfs / index
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
        if shared is not None:
            (folder / "shared_cpu_list").write_text(f"{shared}\n")
    return str(sysfs)


X86 = {"processor": 0, "vendor_id": "X", "cpu family": 6, "model": 143, "model name": "Some CPU 9000"}
# The second processor differs: only the first block may be read.
OTHER = {"processor": 1, "vendor_id": "X", "cpu family": 6, "model": 1, "model name": "Other CPU 1",
         "flags": "fpu sse sse2 avx avx2 avx512f"}
CACHES = {"index0": (1, "Data", "48K", "0"), "index1": (1, "Instruction", "32K", "0"),
          "index2": (2, "Unified", "2048K", "0"), "index3": (3, "Unified", "105M", "0-55")}


@pytest.mark.parametrize(
    "flags, isa",
    [
        ("fpu sse sse2 avx avx2 fma avx512f avx512bw amx_bf16 amx_tile", "AVX-512 + AMX"),
        ("fpu sse sse2 avx avx2 fma avx512f avx512bw", "AVX-512"),
        ("fpu sse sse2 ssse3 fma avx sse4a avx2 bmi2", "AVX2"),
        ("fpu sse sse2", "SSE"),
    ],
)
def test_names_the_first_processors_model_and_widest_vector_isa_and_the_l2(tmp_path, flags, isa):
    cpuinfo = _cpuinfo(tmp_path, X86 | {"flags": flags}, OTHER)
    assert cpu_setup.describe_cpu(cpuinfo, _caches(tmp_path, CACHES)) == (
        f"CPU Some CPU 9000, {isa}, L2 2048K per core")


def test_a_model_name_without_a_generation_gets_its_family_and_model(tmp_path):
    cpuinfo = _cpuinfo(tmp_path, X86 | {"model name": "AMD EPYC", "cpu family": 25, "model": 1, "flags": "avx2"})
    assert cpu_setup.describe_cpu(cpuinfo, _caches(tmp_path, CACHES)).startswith(
        "CPU AMD EPYC (family 25 model 1), AVX2,")


def test_aarch64_cpuinfo_names_the_part_and_the_vector_extension(tmp_path):
    arm = {"processor": 0, "BogoMIPS": "243.75", "Features": "fp asimd evtstrm aes sve sve2",
           "CPU implementer": "0x41", "CPU part": "0xd4f"}
    cpuinfo = _cpuinfo(tmp_path, arm, arm | {"processor": 1})
    assert cpu_setup.describe_cpu(cpuinfo, _caches(tmp_path, CACHES)) == (
        "CPU implementer 0x41 part 0xd4f, SVE2, L2 2048K per core")


def test_missing_files_give_unknown_fields_not_an_error(tmp_path):
    missing = str(tmp_path / "absent")
    assert cpu_setup.describe_cpu(missing, missing) == "CPU unknown, unknown, L2 unknown"


def test_the_l2_is_the_first_level_2_data_or_unified_cache_and_says_who_shares_it(tmp_path):
    # An unreadable index0, then index2 (data, shared by 4 logical CPUs) listed before index10 (an L2 instruction
    # cache, which must not win): numeric order, not string order.
    caches = {"index1": (1, "Data", "32K", "0"), "index2": (2, "Data", "4096K", "0-1,4-5"),
              "index10": (2, "Instruction", "64K", "0")}
    sysfs = _caches(tmp_path, caches)
    os.mkdir(os.path.join(sysfs, "index0"))  # no files in it
    cpuinfo = _cpuinfo(tmp_path, X86 | {"flags": "avx2"})
    assert cpu_setup.describe_cpu(cpuinfo, sysfs).endswith("L2 4096K per 4 logical CPUs")


def test_an_instruction_only_l2_is_not_reported(tmp_path):
    caches = {"index0": (1, "Data", "32K", "0"), "index1": (2, "Instruction", "64K", "0")}
    cpuinfo = _cpuinfo(tmp_path, X86 | {"flags": "avx2"})
    assert cpu_setup.describe_cpu(cpuinfo, _caches(tmp_path, caches)).endswith("L2 unknown")


def test_by_default_it_reads_this_machine():
    line = cpu_setup.describe_cpu()
    assert line.startswith("CPU ") and ", L2 " in line
