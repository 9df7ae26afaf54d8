"""COCO-C corruptions: each changes the image, keeps its size and dtype, is reproducible, and hurts more
at higher severity; the vectorised glass shuffle and zoom blur equal their reference loops."""

import numpy as np
import pytest
from scipy import ndimage

from yolos_jax import corruptions

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"}


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


@pytest.mark.parametrize("name", sorted(corruptions.CORRUPTIONS))
def test_corruption_changes_image_keeps_shape_and_grows_with_severity(name, image):
    before = image.copy()
    outs = [corruptions.corrupt(image, name, s, seed=3) for s in corruptions.SEVERITIES]
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
    np.testing.assert_array_equal(corruptions.corrupt(image, name, 3, seed=3), outs[2])
    if name in RANDOM:
        assert not np.array_equal(corruptions.corrupt(image, name, 3, seed=4), outs[2])


def test_corrupt_keeps_odd_and_large_sizes():
    rng = np.random.default_rng(1)
    for h, w in [(17, 33), (33, 17), (40, 56), (130, 70)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for name in corruptions.CORRUPTIONS:
            out = corruptions.corrupt(img, name, 5, seed=0)
            assert out.shape == (h, w, 3) and out.dtype == np.uint8, (name, h, w)
    # The two blurs added for the benchmark set, also at tiny (no pixel is shuffled when H or W <= 2d) and
    # large odd sizes, at every severity.
    for h, w in [(3, 5), (9, 8), (301, 451)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for name in ("glass_blur", "zoom_blur"):
            for sev in corruptions.SEVERITIES:
                out = corruptions.corrupt(img, name, sev, seed=0)
                assert out.shape == (h, w, 3) and out.dtype == np.uint8, (name, sev, h, w)


def test_plasma_fractal_and_motion_kernel_properties():
    p = corruptions.plasma_fractal(64, 2.0, np.random.default_rng(0))
    assert p.shape == (64, 64) and p.min() == 0.0 and p.max() == 1.0
    k = corruptions._motion_kernel(5, 2.0, 0.0)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    c = k.shape[0] // 2
    # Angle 0: all weight on the centre row, at and to the left of the centre (one-sided, trailing).
    assert np.all(k[np.arange(k.shape[0]) != c] == 0) and np.all(k[c, c + 1 :] == 0) and k[c, c] == k.max()


def test_benchmark_set_is_coco_c():
    """The 15 COCO-C benchmark corruptions (Michaelis et al. 2019), in imagecorruptions' order; the extras
    are the held-out ones; the groups partition the benchmark set."""
    assert corruptions.BENCHMARK_CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
    assert set(corruptions.EXTRA_CORRUPTIONS) <= {"speckle_noise", "gaussian_blur", "spatter", "saturate"}
    assert set(corruptions.CORRUPTIONS) == set(corruptions.BENCHMARK_CORRUPTIONS) | set(corruptions.EXTRA_CORRUPTIONS)
    grouped = [n for g in corruptions.GROUPS.values() for n in g]
    assert sorted(grouped) == sorted(corruptions.BENCHMARK_CORRUPTIONS)


def _reference_glass_shuffle(x, d, dy, dx):
    """imagecorruptions' glass-blur loop verbatim (one pass), with given offsets instead of np.random."""
    x = np.array(x, copy=True)
    for i, h in enumerate(range(x.shape[0] - d, d, -1)):
        for j, w in enumerate(range(x.shape[1] - d, d, -1)):
            h_prime, w_prime = h + dy[i, j], w + dx[i, j]
            # swap (on an RGB array this copies x[h', w'] into x[h, w]: the right side holds views)
            x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
    return x


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_glass_shuffle_matches_reference_loop(d):
    rng = np.random.default_rng(d)
    for h, w in [(23, 31), (12, 9)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        n_rows, n_cols = max(0, h - 2 * d), max(0, w - 2 * d)
        for _ in range(3):
            dy = rng.integers(-d, d, size=(n_rows, n_cols))
            dx = rng.integers(-d, d, size=(n_rows, n_cols))
            got = corruptions._glass_shuffle_pass(img, d, dy, dx)
            np.testing.assert_array_equal(got, _reference_glass_shuffle(img, d, dy, dx))
            img = got


def test_glass_blur_properties(image):
    """Brightness is kept (up to the reference's truncation to uint8), fine structure is blurred, and the
    shuffle scrambles it: the result differs from the two Gaussian blurs alone."""
    def lap(a):  # mean |spatial Laplacian| over the channels
        return np.mean([np.abs(ndimage.laplace(a[..., c].astype(np.float64), mode="nearest")).mean() for c in range(3)])

    noisy = np.random.default_rng(0).integers(0, 256, image.shape, dtype=np.uint8)
    for sev in corruptions.SEVERITIES:
        sigma = (0.7, 0.9, 1, 1.1, 1.5)[sev - 1]
        for img in (image, noisy):
            out = corruptions.corrupt(img, "glass_blur", sev, seed=0)
            assert abs(out.astype(float).mean() - img.mean()) < 1.5, sev
            assert lap(out) < 0.6 * lap(img), sev
            twice = ndimage.gaussian_filter(
                np.clip(ndimage.gaussian_filter(img / 255.0, (sigma, sigma, 0), mode="nearest") * 255, 0, 255)
                .astype(np.uint8) / 255.0, (sigma, sigma, 0), mode="nearest")
            assert np.abs(out / 255.0 - twice).mean() > 0.01, sev


def _reference_zoom_blur(img, zooms):
    """float64 numpy: mean of the image and, per factor z, the centre crop of ceil(size / z) zoomed to
    round(crop * z) by corner-aligned bilinear interpolation (scipy.ndimage.zoom, order 1) and cut to the
    image's size from the top left, as imagecorruptions' clipped_zoom."""
    x = img.astype(np.float64) / 255.0
    h, w = x.shape[:2]
    acc = x.copy()

    def taps(n, z):
        c = int(np.ceil(n / z))
        start, out = (n - c) // 2, int(round(c * z))
        pos = start + np.arange(n) * (c - 1) / (out - 1)
        i0 = np.floor(pos).astype(int)
        return i0, np.minimum(i0 + 1, start + c - 1), pos - i0

    for z in zooms:
        y0, y1, fy = taps(h, z)
        x0, x1, fx = taps(w, z)
        fy, fx = fy[:, None, None], fx[None, :, None]
        top = (1 - fx) * x[y0][:, x0] + fx * x[y0][:, x1]
        bottom = (1 - fx) * x[y1][:, x0] + fx * x[y1][:, x1]
        acc += (1 - fy) * top + fy * bottom
    return acc / (len(zooms) + 1)


def test_zoom_blur_matches_reference(image):
    counts = [len(z) for z in corruptions.ZOOM_BLUR_FACTORS]
    assert counts == [12, 16, 11, 13, 11]  # np.arange's float end points, as in imagecorruptions
    assert [round(z[-1], 2) for z in corruptions.ZOOM_BLUR_FACTORS] == [1.11, 1.15, 1.2, 1.24, 1.3]
    rng = np.random.default_rng(5)
    for img in (image, rng.integers(0, 256, (41, 57, 3), dtype=np.uint8)):
        for sev in corruptions.SEVERITIES:
            got = corruptions.corrupt(img, "zoom_blur", sev, seed=0).astype(int)
            want = np.round(_reference_zoom_blur(img, corruptions.ZOOM_BLUR_FACTORS[sev - 1]) * 255).astype(int)
            assert np.abs(got - want).max() <= 1, sev  # float32 vs float64 rounding
            assert (got != want).mean() < 0.01, sev
