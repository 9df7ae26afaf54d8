"""COCO-C corruptions: each changes the image, keeps its size and dtype, is reproducible, and hurts more
at higher severity; the summary arithmetic (per-corruption means, mPC, rPC)."""

import numpy as np
import pytest
from scipy import ndimage

from yolos_jax import robustness


@pytest.fixture(scope="module")
def image():
    """A 64x96 textured RGB image with two coloured objects (odd structure on purpose)."""
    rng = np.random.default_rng(0)
    h, w = 64, 96
    img = np.empty((h, w, 3), np.float32)
    img[:] = (90, 140, 60)
    img[10:42, 19:57] = (220, 30, 30)
    img[32:60, 48:90] = (30, 30, 200)
    img += ndimage.gaussian_filter(rng.normal(0, 40, img.shape), (2, 2, 0))
    return np.clip(img, 0, 255).astype(np.uint8)


def damage(name, out, img):
    """How much a corruption changed the image.

    Mean absolute difference for most. Frost and fog blend in a bright layer of about the image's own
    brightness, so their pixel difference barely moves with severity while the image fades: measure the lost
    correlation with the clean image instead. Pixelate's pixel error depends on how the blocks align with
    the image grid; measure the lost resolution (fraction of columns merged into blocks) instead.
    """
    o, i = out.astype(np.float64), img.astype(np.float64)
    if name in ("frost", "fog"):
        return 1.0 - np.corrcoef(o.ravel(), i.ravel())[0, 1]
    if name == "pixelate":
        distinct = 1 + np.count_nonzero(np.any(o[:, 1:] != o[:, :-1], axis=(0, 2)))
        return 1.0 - distinct / o.shape[1]
    return np.abs(o - i).mean() / 255.0


@pytest.mark.parametrize("name", sorted(robustness.CORRUPTIONS))
def test_corruption_changes_image_keeps_shape_and_grows_with_severity(name, image):
    before = image.copy()
    outs = [robustness.corrupt(image, name, s, seed=3) for s in robustness.SEVERITIES]
    np.testing.assert_array_equal(image, before)  # the input is not modified
    for out in outs:
        assert out.shape == image.shape and out.dtype == np.uint8
        assert np.abs(out.astype(int) - image).mean() > 1.0  # really changed
    d = [damage(name, out, image) for out in outs]
    assert d[-1] > 1.2 * d[0], d  # severity 5 clearly worse than severity 1
    # Non-decreasing between neighbours up to 15%: the reference parameters of snow's severities 2 and 3
    # cover about the same fraction of the image with snow (bigger flakes, not more snow).
    assert all(b >= 0.85 * a for a, b in zip(d, d[1:])), d
    # Reproducible from the seed; another seed gives another draw for the random ones.
    np.testing.assert_array_equal(robustness.corrupt(image, name, 3, seed=3), outs[2])
    if name in RANDOM:
        assert not np.array_equal(robustness.corrupt(image, name, 3, seed=4), outs[2])


RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "snow", "frost", "fog", "elastic_transform"}


def test_corrupt_keeps_odd_and_large_sizes():
    rng = np.random.default_rng(1)
    for h, w in [(17, 33), (33, 17), (130, 70)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for name in robustness.CORRUPTIONS:
            out = robustness.corrupt(img, name, 5, seed=0)
            assert out.shape == (h, w, 3) and out.dtype == np.uint8, (name, h, w)


def test_bad_arguments_are_named():
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        robustness.corrupt(img, "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        robustness.corrupt(img, "fog", 6)
    with pytest.raises(ValueError, match="RGB uint8"):
        robustness.corrupt(img.astype(np.float32), "fog", 1)
    assert robustness.parse_corruptions("noise,fog") == ["gaussian_noise", "shot_noise", "impulse_noise", "fog"]
    assert robustness.parse_corruptions("all") == list(robustness.CORRUPTIONS)
    assert robustness.parse_severities("5,1,1") == [1, 5]
    with pytest.raises(ValueError, match="severities"):
        robustness.parse_severities("0,2")


def test_plasma_fractal_and_motion_kernel_properties():
    p = robustness.plasma_fractal(64, 2.0, np.random.default_rng(0))
    assert p.shape == (64, 64) and p.min() == 0.0 and p.max() == 1.0
    k = robustness._motion_kernel(5, 2.0, 0.0)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    c = k.shape[0] // 2
    # Angle 0: all weight on the centre row, at and to the left of the centre (one-sided, trailing).
    assert np.all(k[np.arange(k.shape[0]) != c] == 0) and np.all(k[c, c + 1 :] == 0) and k[c, c] == k.max()


def test_summary_means():
    results = {"fog": {1: {"AP": 0.4}, 2: {"AP": 0.2}}, "snow": {1: {"AP": 0.3}, 2: {"AP": 0.1}}}
    s = robustness.summarize({"AP": 0.5}, results)
    assert s["per_corruption"] == {"fog": pytest.approx(0.3), "snow": pytest.approx(0.2)}
    assert s["mPC"] == pytest.approx(0.25) and s["rPC"] == pytest.approx(0.5)
    table = robustness.format_table(s)
    assert "fog" in table and "mPC" in table and "0.250" in table
