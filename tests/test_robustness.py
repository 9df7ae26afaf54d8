"""The COCO-C protocol: corruption/severity specs, the summary arithmetic (per-corruption means, mPC, rPC)."""

import numpy as np
import pytest

from yolos_jax import corruptions, robustness


def test_bad_arguments_are_named():
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corruptions.corrupt(img, "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(img, "fog", 6)
    with pytest.raises(ValueError, match="RGB uint8"):
        corruptions.corrupt(img.astype(np.float32), "fog", 1)
    assert robustness.parse_corruptions("noise,fog") == ["gaussian_noise", "shot_noise", "impulse_noise", "fog"]
    assert robustness.parse_corruptions("all") == list(corruptions.BENCHMARK_CORRUPTIONS)
    assert robustness.parse_corruptions("benchmark") == list(corruptions.BENCHMARK_CORRUPTIONS)
    assert robustness.parse_corruptions("extra") == ["gaussian_blur"]
    assert robustness.parse_corruptions("all,gaussian_blur") == list(corruptions.CORRUPTIONS)
    assert robustness.parse_corruptions("blur") == ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"]
    assert robustness.parse_severities("5,1,1") == [1, 5]
    with pytest.raises(ValueError, match="severities"):
        robustness.parse_severities("0,2")


def test_summary_means():
    results = {"fog": {1: {"AP": 0.4}, 2: {"AP": 0.2}}, "snow": {1: {"AP": 0.3}, 2: {"AP": 0.1}}}
    s = robustness.summarize({"AP": 0.5}, results)
    assert s["per_corruption"] == {"fog": pytest.approx(0.3), "snow": pytest.approx(0.2)}
    assert s["mPC"] == pytest.approx(0.25) and s["rPC"] == pytest.approx(0.5)
    assert s["complete"] is False and s["mPC_corruptions"] == ["snow", "fog"] and s["extra_mean"] is None
    table = robustness.format_table(s)
    assert "fog" in table and "mPC" in table and "0.250" in table and "PARTIAL: 2/15" in table


def test_summary_mpc_is_over_the_benchmark_set():
    """All 15 benchmark corruptions x 5 severities: mPC over them only (the extra is reported apart)."""
    results = {n: {s: {"AP": 0.1 * s} for s in corruptions.SEVERITIES} for n in corruptions.BENCHMARK_CORRUPTIONS}
    results["gaussian_blur"] = {s: {"AP": 0.9} for s in corruptions.SEVERITIES}
    s = robustness.summarize({"AP": 0.6}, results)
    assert s["complete"] is True and s["mPC_corruptions"] == list(corruptions.BENCHMARK_CORRUPTIONS)
    assert s["mPC"] == pytest.approx(0.3) and s["rPC"] == pytest.approx(0.5)
    assert s["extra_corruptions"] == ["gaussian_blur"] and s["extra_mean"] == pytest.approx(0.9)
    table = robustness.format_table(s)
    assert "all 15 benchmark corruptions x 5 severities" in table and "PARTIAL" not in table
    assert table.index("jpeg_compression") < table.index("not in mPC") < table.index("gaussian_blur")
    # One severity missing: still the benchmark mean, but marked partial.
    del results["fog"][5]
    s = robustness.summarize(None, results)
    assert s["complete"] is False and s["rPC"] is None and "PARTIAL: 15/15" in robustness.format_table(s)
    # Only extras: no mPC.
    s = robustness.summarize({"AP": 0.5}, {"gaussian_blur": {1: {"AP": 0.2}}})
    assert s["mPC"] is None and s["rPC"] is None and s["extra_mean"] == pytest.approx(0.2)
    assert "mPC" not in robustness.format_table(s).split("---")[-1].replace("not in mPC", "")
