"""The COCO-C robustness protocol (fp_detr_paper.md Table 4): which corruptions to run, the runner, the summary.

Robustness of detectors is measured as in Michaelis et al. 2019, "Benchmarking Robustness in Object
Detection" (COCO-C), and as reported in fp_detr_paper.md Table 4: the val images are corrupted *before* any
resizing, at five severities per corruption (`corruptions`); the detector is evaluated on each (corruption,
severity) pair and the results are reported per corruption (mean over severities) and as mPC, the mean over
the 15 benchmark corruptions of their per-corruption means (= the mean over all 75 (corruption, severity)
pairs), with rPC = mPC / clean AP. `summarize` only ever averages benchmark corruptions into mPC and says
whether the full 15 x 5 grid was evaluated (`complete`); held-out extras are reported separately
(`extra_mean`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from yolos_jax import atomic
from yolos_jax.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS, GROUPS, SEVERITIES, SUBSETS, corrupt


def parse_corruptions(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated (or a sequence of) items -> corruption names, in order, without duplicates.

    Items: 'all' (= 'benchmark', 'common': the 15 COCO-C benchmark corruptions, not the extras), 'extra'
    (= 'validation': the held-out extras), a group of benchmark corruptions ('noise', 'blur', 'weather',
    'digital'), or any name of `CORRUPTIONS` (extras included), e.g. 'all,gaussian_blur'.
    """
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    names: list[str] = []
    for item in items:
        if item in SUBSETS:
            names.extend(SUBSETS[item])
        elif item in GROUPS:
            names.extend(GROUPS[item])
        elif item in CORRUPTIONS:
            names.append(item)
        else:
            raise ValueError(
                f"unknown corruption {item!r} in {spec!r}: use {sorted(SUBSETS)}, a group {sorted(GROUPS)} or "
                f"names {sorted(CORRUPTIONS)}"
            )
    return list(dict.fromkeys(names))


def parse_severities(spec: str | Sequence[int]) -> list[int]:
    """'1,2,3,4,5' (or a sequence of ints) -> sorted unique severities, each in 1..5."""
    vals = [int(s) for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    bad = [v for v in vals if v not in SEVERITIES]
    if bad or not vals:
        raise ValueError(f"severities must be a non-empty subset of {SEVERITIES}, got {spec!r}")
    return sorted(set(vals))


def make_image_fn(name: str, severity: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """A per-image hook `fn(image_uint8 [H, W, 3], image_id) -> uint8 [H, W, 3]` for the eval pipeline,
    seeded by the image id so every run corrupts each image identically."""
    parse_corruptions([name])
    parse_severities([severity])

    def fn(image: np.ndarray, image_id: int = 0) -> np.ndarray:
        return corrupt(image, name, severity, seed=int(image_id))

    fn.__name__ = f"{name}_{severity}"
    return fn


def summarize(clean: Optional[Mapping[str, float]], results: Mapping[str, Mapping[int, Mapping[str, float]]],
              metric: str = "AP") -> dict:
    """Aggregates per-(corruption, severity) metrics.

    mPC is the mean over the evaluated *benchmark* corruptions of their mean over severities (on the full
    15 x 5 grid, the mean over all 75 pairs, as in Michaelis et al. 2019); extras never enter it and are
    averaged separately. `complete` says whether mPC is the full COCO-C mPC (all 15 benchmark corruptions
    at all 5 severities) rather than a partial mean.

    Args:
      clean: metrics on the clean images (or None).
      results: {corruption: {severity: metrics dict}}.
      metric: the metric aggregated ('AP').
    Returns:
      {'metric', 'clean': float|None, 'per_corruption': {name: mean over severities}, 'per_severity':
       {name: {severity: value}}, 'mPC': float|None (None without benchmark corruptions), 'rPC': mPC / clean
       (None when undefined), 'mPC_corruptions': the benchmark corruptions averaged into mPC, 'complete':
       bool, 'extra_corruptions': the others, 'extra_mean': their mean (None without any)}.
    """
    per_sev = {n: {int(s): float(m[metric]) for s, m in sorted(r.items())} for n, r in results.items()}
    per_corr = {n: float(np.mean(list(v.values()))) for n, v in per_sev.items() if v}
    bench = [n for n in BENCHMARK_CORRUPTIONS if n in per_corr]
    extra = [n for n in per_corr if n not in BENCHMARK_CORRUPTIONS]
    mpc = float(np.mean([per_corr[n] for n in bench])) if bench else None
    extra_mean = float(np.mean([per_corr[n] for n in extra])) if extra else None
    complete = len(bench) == len(BENCHMARK_CORRUPTIONS) and all(set(per_sev[n]) == set(SEVERITIES) for n in bench)
    clean_v = None if clean is None else float(clean[metric])
    # None where undefined (strict JSON has no NaN).
    rpc = mpc / clean_v if (mpc is not None and clean_v is not None and clean_v > 0) else None
    return {"metric": metric, "clean": clean_v, "per_corruption": per_corr, "per_severity": per_sev,
            "mPC": mpc, "rPC": rpc, "mPC_corruptions": bench, "complete": complete,
            "extra_corruptions": extra, "extra_mean": extra_mean}


def format_table(summary: Mapping) -> str:
    """A plain-text table: one row per corruption with its value at each severity and the mean; benchmark
    corruptions first, then the extras (not in mPC), then clean, mPC (marked partial unless complete), rPC."""
    per_sev = summary["per_severity"]
    sevs = sorted({s for d in per_sev.values() for s in d})
    head = f"{'corruption':<20}" + "".join(f"{'s' + str(s):>8}" for s in sevs) + f"{'mean':>8}"
    lines = [f"COCO-C robustness ({summary['metric']})", head, "-" * len(head)]

    def row(name: str) -> str:
        d = per_sev[name]
        cells = "".join(f"{d[s]:8.3f}" if s in d else f"{'':>8}" for s in sevs)
        return f"{name:<20}{cells}{summary['per_corruption'][name]:8.3f}"

    bench = [n for n in per_sev if n in BENCHMARK_CORRUPTIONS and n in summary["per_corruption"]]
    extra = [n for n in per_sev if n not in BENCHMARK_CORRUPTIONS and n in summary["per_corruption"]]
    lines.extend(row(n) for n in bench)
    if extra:
        lines.append(f"{'-- extra (not in mPC)':<20}")
        lines.extend(row(n) for n in extra)
    lines.append("-" * len(head))
    if summary["clean"] is not None:
        lines.append(f"{'clean':<20}{summary['clean']:8.3f}")
    if summary["mPC"] is not None:
        n_bench = len(summary.get("mPC_corruptions", bench))
        bench_sevs = sorted({s for n in bench for s in per_sev[n]})
        if summary.get("complete"):
            note = f"all {len(BENCHMARK_CORRUPTIONS)} benchmark corruptions x {len(SEVERITIES)} severities"
        else:
            note = f"PARTIAL: {n_bench}/{len(BENCHMARK_CORRUPTIONS)} benchmark corruptions"
            note += "" if bench_sevs == list(SEVERITIES) else f", severities {bench_sevs}"
        lines.append(f"{'mPC':<20}{summary['mPC']:8.3f}  ({note})")
    if summary["rPC"] is not None:
        lines.append(f"{'rPC':<20}{summary['rPC']:8.3f}")
    if summary.get("extra_mean") is not None:
        lines.append(f"{'extra mean':<20}{summary['extra_mean']:8.3f}  (not in mPC)")
    return "\n".join(lines)


def run_robustness(evaluator: Any, params: Any, out_dir: str, *, clean: Optional[Mapping] = None) -> dict:
    """Evaluates on corrupted val images for every (corruption, severity) of `evaluator.eval_cfg`.

    evaluator: an `evaluation.Evaluator`; params: its model's params, placed (`Evaluator.place`).
    Writes out_dir/<corruption>/s<severity>/metrics.json (and detections.json) and out_dir/robustness.json
    with the per-corruption means, mPC and rPC over the benchmark corruptions evaluated (`complete` when all
    15 x 5 were), and the extras' mean apart (process 0). Returns the summary dict (`summarize`).
    """
    cfg = evaluator.eval_cfg
    names = parse_corruptions(cfg.corruptions)
    sevs = parse_severities(cfg.severities)
    max_images = int(cfg.robustness_max_images) or int(cfg.max_images)
    results: dict[str, dict[int, dict]] = {}
    for name in names:
        for sev in sevs:
            sub = os.path.join(out_dir, name, f"s{sev}")
            m = evaluator.run(params, sub, image_fn=make_image_fn(name, sev), max_images=max_images, verbose=False)
            results.setdefault(name, {})[sev] = m
            if jax.process_index() == 0:
                print(f"{name} severity {sev}: AP {m['AP']:.4f} AP50 {m['AP50']:.4f}", flush=True)
    summary = summarize(clean, results)
    if jax.process_index() == 0:
        print(format_table(summary), flush=True)
        atomic.write_json_atomic(os.path.join(out_dir, "robustness.json"), summary, indent=2)
    return summary
