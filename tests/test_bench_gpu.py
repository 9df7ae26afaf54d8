"""benchmarks/bench_gpu.py (issue 19's GPU benchmark) end to end on tiny shapes on the CPU, so that the
script a GPU run depends on cannot rot unnoticed: every case gives a table row with positive images/s and
FLOP counts, HF runs beside ours from the same weights, and the input-resize figure comes out."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


# The GPU machines have no TensorFlow, tfds or pycocotools: nothing the run imports may need them (a fresh
# process, so whatever of them is in sys.modules at the end, the run imported).
RUNNER = """
import sys
sys.path.insert(0, sys.argv[1])
import bench_gpu
bench_gpu.main(sys.argv[2:])
print("IMPORTED", sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "tensorflow_datasets", "pycocotools"}))
"""


def table_rows(table: str) -> dict:
    """{variant: cells} of the train-step table's body rows."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("ti", "s", "b"):
            rows[cells[0]] = cells
    return rows


def number(cell: str) -> float:
    return float(re.match(r"[-+0-9.e]+", cell).group(0))


def test_tiny_run_has_a_row_per_case(tmp_path):
    out = tmp_path / "bench_gpu.json"
    # One device is all it uses: without the suite's 8 simulated ones it compiles faster.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-c", RUNNER, BENCHMARKS, "--tiny", "--variants=ti,s", "--batch=ti=3",
                           f"--json-out={out}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout
    assert printed.strip().splitlines()[-1] == "IMPORTED []"
    results = json.loads(out.read_text())
    table = printed[printed.index("Device: "):]
    rows = table_rows(table)
    assert sorted(rows) == ["s", "ti"]  # (B is S with more width and depth: not worth its compile here)
    for variant, cells in rows.items():
        assert cells[1] == "64x96" and cells[2] == ("3" if variant == "ti" else "2"), cells
        ours_ips, hf_ips, ratio, tflop_step, tflops = (number(c) for c in cells[3:8])
        assert ours_ips > 0 and hf_ips > 0 and tflop_step > 0 and tflops > 0, cells
        assert ratio == pytest.approx(ours_ips / hf_ips, rel=0.02, abs=0.006)  # the cell is rounded to 0.01
        assert number(cells[8]) > 0  # MFU %

    by_variant = {r["variant"]: r for r in results["cases"]}
    for r in by_variant.values():
        assert "error" not in r and "hf_error" not in r and "latency_error" not in r, r
        # Same weights and targets on both sides: the first step's losses agree (ours bf16, HF float32 here).
        assert r["ours_first_loss"]["loss"] == pytest.approx(r["hf_first_loss"]["loss"], rel=0.02)
        # The explicit-attention count is the model's; the CPU's blocked attention (a loop) counts less.
        assert r["flops_model"] > 0 and np.isfinite(r["flops_compiled"])
        assert r["ours_b1_ms"] > 0 and r["hf_b1_ms"] > 0 and r["step_mem_bytes"] > 0
    # Wider models cost more per step.
    assert by_variant["ti"]["flops_model"] < by_variant["s"]["flops_model"]

    resize = results["resize"]
    assert resize["to_device_ms_per_image"] > 0 and resize["decode_ms_per_image"] > 0
    assert resize["vs_s_step"] > 0
    assert "input resize on the device" in table
