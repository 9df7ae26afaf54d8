"""COCO-C style image corruptions (numpy / scipy / PIL): `corrupt(image, name, severity, seed)`.

The evaluation protocol that runs them (COCO-C, mPC, rPC) is `robustness`'s.

The corruptions follow the parameters of `imagecorruptions` (Hendrycks & Dietterich's ImageNet-C code,
adapted to arbitrary image sizes) but are re-implemented here with numpy, scipy and PIL only (no OpenCV,
scikit-image or ImageMagick). The 15 benchmark corruptions (`BENCHMARK_CORRUPTIONS`, what 'all' selects):

  noise:    gaussian_noise, shot_noise, impulse_noise
  blur:     defocus_blur, glass_blur, motion_blur, zoom_blur
  weather:  snow, frost, fog
  digital:  brightness, contrast, elastic_transform, pixelate, jpeg_compression

and, outside mPC, the held-out extra (`EXTRA_CORRUPTIONS`, selected by name or 'extra'): gaussian_blur
(imagecorruptions' other held-out extras, speckle_noise, spatter and saturate, are not implemented).

Approximations (documented so that numbers are not mistaken for the official COCO-C ones):
  * motion_blur and the snow streaks use a one-sided Gaussian line kernel (ImageMagick's motion blur) with
    bilinear sub-pixel taps instead of rounded pixel shifts;
  * frost has no photographs of frost to blend in: the frost layer is a procedural ridged-noise texture
    with a cold tint, blended with the original's weights;
  * defocus_blur's anti-aliasing of the disk uses scipy's Gaussian filter instead of OpenCV's;
  * glass_blur's pixel shuffle is vectorised but reproduces the reference loop exactly for given offsets
    (same visiting order, offsets in [-d, d), and the reference's effective semantics: its statement
    `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on an RGB array assigns through numpy views, so it *copies*
    x[h', w'] into x[h, w] instead of swapping, and later pixels copy already-updated ones); only the
    random offsets differ (drawn from `rng`, not numpy's global stream);
  * float results are rounded to uint8 (`imagecorruptions` truncates with np.uint8), < 1 grey level apart.

Every corruption maps uint8 [H, W, 3] RGB to uint8 [H, W, 3] of the same size, is deterministic given its
`rng`, and its change to the image grows with the severity (tested).
"""

from __future__ import annotations

import io
import zlib
from typing import Callable, Mapping

import matplotlib.colors
import numpy as np
from PIL import Image
from scipy import ndimage, signal

SEVERITIES = (1, 2, 3, 4, 5)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _to_float(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) / 255.0


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x01, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _per_channel(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.stack([fn(x[..., c]) for c in range(x.shape[-1])], axis=-1)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """A normalised disk of `radius` pixels, slightly Gaussian-blurred against aliasing (ImageNet-C)."""
    half = 8 if radius <= 8 else int(radius)
    coords = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(coords, coords)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    # ImageNet-C blurs with a 3x3 (radius <= 8) or 5x5 window: truncate the Gaussian accordingly.
    window = 1 if radius <= 8 else 2
    blurred = ndimage.gaussian_filter(disk, sigma=alias_blur, truncate=window / max(alias_blur, 1e-6), mode="constant")
    return (blurred / blurred.sum()).astype(np.float32)


def _motion_kernel(radius: int, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick-style motion-blur kernel: Gaussian weights along a one-sided ray at `angle_deg`.

    Returns a normalised 2-D kernel of side 2 * width + 1 (width = 2 * radius + 1) whose taps sit at
    integer offsets i * (cos, sin), i = 0..width-1, spread bilinearly onto the pixel grid.
    """
    width = 2 * radius + 1
    weights = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2.0 * sigma**2))
    weights /= weights.sum()
    size = 2 * width + 1
    kernel = np.zeros((size, size), np.float64)
    c = width
    dy, dx = np.sin(np.deg2rad(angle_deg)), np.cos(np.deg2rad(angle_deg))
    for i, w in enumerate(weights):
        # The blurred pixel averages pixels *behind* it along the motion direction.
        y, x = c - i * dy, c - i * dx
        y0, x0 = int(np.floor(y)), int(np.floor(x))
        fy, fx = y - y0, x - x0
        for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
            for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                if 0 <= yy < size and 0 <= xx < size:
                    kernel[yy, xx] += w * wy * wx
    return (kernel / kernel.sum()).astype(np.float32)


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of each channel of [H, W, C] (or [H, W]) with `kernel`, reflect borders."""
    ky, kx = kernel.shape
    py, px = ky // 2, kx // 2

    def one(ch: np.ndarray) -> np.ndarray:
        padded = np.pad(ch, ((py, py), (px, px)), mode="reflect" if min(ch.shape) > max(py, px) else "edge")
        return signal.fftconvolve(padded, kernel, mode="valid").astype(np.float32)

    return one(x) if x.ndim == 2 else _per_channel(one, x)


def _clipped_zoom(img: np.ndarray, zoom: float) -> np.ndarray:
    """Zooms the centre of a [H, W] array by `zoom` (bilinear) and crops back to [H, W]."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom)), int(np.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = ndimage.zoom(img[top : top + ch, left : left + cw], zoom, order=1)
    if out.shape[0] < h or out.shape[1] < w:  # rounding in ndimage.zoom can lose a row or column
        out = np.pad(out, ((0, max(0, h - out.shape[0])), (0, max(0, w - out.shape[1]))), mode="edge")
    return out[:h, :w]


def _glass_shuffle_pass(img: np.ndarray, d: int, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """One pass of ImageNet-C's glass-blur pixel shuffle, vectorised; returns a new array.

    The reference visits h = H-d .. d+1 (descending), and within each row w = W-d .. d+1 (descending),
    and executes `x[h, w], x[h+dy, w+dx] = x[h+dy, w+dx], x[h, w]` with dy, dx drawn from [-d, d). On an
    [H, W, C] array both right-hand sides are views, so the statement copies x[h+dy, w+dx] into x[h, w]
    and leaves the source unchanged. Only x[h, w] is written at its step, so the final value of a visited
    pixel is the *final* value of its source when the source was visited earlier in the pass, and the
    source's value at the start of the pass otherwise; these chains are resolved by pointer jumping.

    Args:
      img: [H, W, ...] array.
      d: the maximal displacement (c[1]).
      dy, dx: int offsets in [-d, d), [len(rows), len(cols)] in the visiting order (rows[i] = H-d-i,
        cols[j] = W-d-j); empty when H <= 2d or W <= 2d (nothing is visited).
    """
    h, w = img.shape[:2]
    rows, cols = np.arange(h - d, d, -1), np.arange(w - d, d, -1)
    if rows.size == 0 or cols.size == 0:
        return np.array(img, copy=True)
    hh, ww = np.meshgrid(rows, cols, indexing="ij")
    sh, sw = hh + dy, ww + dx
    in_region = (sh > d) & (sh <= h - d) & (sw > d) & (sw <= w - d)
    earlier = (sh > hh) | ((sh == hh) & (sw > ww))  # descending order: visited before (hh, ww)
    chained = in_region & earlier
    tgt, src = (hh * w + ww).ravel(), (sh * w + sw).ravel()
    chained = chained.ravel()
    ptr = np.arange(h * w)  # roots point to themselves
    ptr[tgt[chained]] = src[chained]
    value_of_root = np.arange(h * w)  # a root takes the start-of-pass value of this pixel
    value_of_root[tgt[~chained]] = src[~chained]
    while True:  # chains strictly decrease in visiting order, so this ends (after ~log2(longest chain))
        nxt = ptr[ptr]
        if np.array_equal(nxt, ptr):
            break
        ptr = nxt
    flat = np.asarray(img).reshape(h * w, *img.shape[2:])
    return flat[value_of_root[ptr]].reshape(img.shape)


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1], [mapsize, mapsize] (mapsize a power of two), as ImageNet-C."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"plasma_fractal: mapsize must be a power of two, got {mapsize}")
    grid = np.zeros((mapsize, mapsize), np.float64)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=0)
        sq = sq + np.roll(sq, -1, axis=1)
        grid[half:mapsize:step, half:mapsize:step] = wibbled_mean(sq)
        dr = grid[half:mapsize:step, half:mapsize:step]
        ul = grid[0:mapsize:step, 0:mapsize:step]
        grid[0:mapsize:step, half:mapsize:step] = wibbled_mean(
            dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        )
        grid[half:mapsize:step, 0:mapsize:step] = wibbled_mean(
            dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        )
        step //= 2
        wibble /= wibbledecay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 2 ** (int(n) - 1).bit_length()


def _gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of [H, W, 3] in [0, 1] -> [H, W, 1]."""
    return (x @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]


# --------------------------------------------------------------------------------------------------
# Corruptions: uint8 [H, W, 3] -> uint8 [H, W, 3]; `s` is the severity index 0..4.
# --------------------------------------------------------------------------------------------------


def gaussian_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[s]
    x = _to_float(x)
    return _to_uint8(x + rng.normal(size=x.shape, scale=c))


def shot_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c = (60, 25, 12, 5, 3)[s]  # photons per unit intensity
    return _to_uint8(rng.poisson(_to_float(x) * c) / float(c))


def impulse_noise(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper on a fraction `c` of the values (each channel independently), half salt."""
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[s]
    out = np.array(x, np.uint8)
    hit = rng.random(out.shape) < c
    salt = rng.random(out.shape) < 0.5
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def gaussian_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    c = (1, 2, 3, 4, 6)[s]
    return _to_uint8(ndimage.gaussian_filter(_to_float(x), sigma=(c, c, 0), mode="nearest"))


def defocus_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[s]
    return _to_uint8(_convolve(_to_float(x), _disk_kernel(radius, alias)))


def glass_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur, local pixel shuffle (`iterations` passes, displacements in [-d, d)), Gaussian blur."""
    sigma, d, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[s]

    def blur(a: np.ndarray) -> np.ndarray:  # skimage.filters.gaussian: mode 'nearest', truncate 4
        return ndimage.gaussian_filter(a, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0)

    h, w = x.shape[:2]
    # The reference quantises the first blur with np.uint8, i.e. truncation.
    out = np.clip(blur(np.asarray(x, np.float64) / 255.0) * 255.0, 0, 255).astype(np.uint8)
    n_rows, n_cols = max(0, h - 2 * d), max(0, w - 2 * d)
    for _ in range(iterations):
        dy = rng.integers(-d, d, size=(n_rows, n_cols))
        dx = rng.integers(-d, d, size=(n_rows, n_cols))
        out = _glass_shuffle_pass(out, d, dy, dx)
    return _to_uint8(blur(out.astype(np.float64) / 255.0))


def motion_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[s]
    angle = rng.uniform(-45, 45)
    return _to_uint8(_convolve(_to_float(x), _motion_kernel(radius, sigma, angle)))


ZOOM_BLUR_FACTORS = (
    np.arange(1, 1.11, 0.01),  # 12 factors 1.00 .. 1.11 (np.arange's float end point, as the reference)
    np.arange(1, 1.16, 0.01),
    np.arange(1, 1.21, 0.02),
    np.arange(1, 1.26, 0.02),
    np.arange(1, 1.31, 0.03),
)


def zoom_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Mean of the image and its centre crops zoomed back up (bilinear) by each factor of the severity."""
    del rng
    zooms = ZOOM_BLUR_FACTORS[s]
    xf = _to_float(x)
    acc = xf.copy()  # the reference averages the image with all zoomed layers (factor 1.0 included)
    for z in zooms:
        acc += _per_channel(lambda ch: _clipped_zoom(ch, float(z)), xf)
    return _to_uint8(acc / (len(zooms) + 1))


def snow(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, thresh, radius, sigma, blend = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[s]
    x = _to_float(x)
    h, w = x.shape[:2]
    layer = rng.normal(size=(h, w), loc=loc, scale=scale).astype(np.float32)
    layer = _clipped_zoom(layer, zoom)  # big flakes
    layer[layer < thresh] = 0
    layer = np.clip(layer, 0, 1)
    layer = _convolve(layer, _motion_kernel(radius, sigma, rng.uniform(-135, -45)))  # falling streaks
    layer = (np.round(layer * 255) / 255.0)[..., None]
    x = blend * x + (1 - blend) * np.maximum(x, _gray(x) * 1.5 + 0.5)  # whitened, low-contrast scene
    return _to_uint8(x + layer + np.rot90(layer, k=2))


def _frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural frost: ridged multi-octave noise (thin bright crystal edges), [H, W] in [0, 1]."""
    tex = np.zeros((h, w), np.float32)
    amp_sum = 0.0
    for octave, amp in enumerate((1.0, 0.6, 0.35, 0.2)):
        sigma = max(1.0, min(h, w) / (12.0 * 2**octave))
        n = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma, mode="wrap")
        n /= max(float(n.std()), 1e-6)
        tex += amp * (1.0 - np.tanh(np.abs(n) * 2.0))  # ridges where the band-passed noise crosses 0
        amp_sum += amp
    tex /= amp_sum
    tex = (tex - tex.min()) / max(float(tex.max() - tex.min()), 1e-6)
    return tex**1.5


def frost(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    c_img, c_frost = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[s]
    xf = _to_float(x)
    tex = _frost_texture(xf.shape[0], xf.shape[1], rng)
    tint = np.asarray([0.85, 0.92, 1.0], np.float32)  # ice is slightly blue
    layer = 0.25 + 0.75 * tex  # frost photographs are bright everywhere, brightest on the crystals
    return _to_uint8(c_img * xf + c_frost * layer[..., None] * tint)


def fog(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[s]
    xf = _to_float(x)
    h, w = xf.shape[:2]
    max_val = float(xf.max())
    plasma = plasma_fractal(_next_pow2(max(h, w)), decay, rng)[:h, :w]
    xf = xf + strength * plasma[..., None].astype(np.float32)
    return _to_uint8(xf * max_val / (max_val + strength))


def brightness(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[s]
    hsv = matplotlib.colors.rgb_to_hsv(_to_float(x))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _to_uint8(matplotlib.colors.hsv_to_rgb(hsv))


def contrast(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s]
    xf = _to_float(x)
    means = xf.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((xf - means) * c + means)


def elastic_transform(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random displacement field (imagecorruptions' COCO version: scales with the image)."""
    alpha = 250.0 * (0.05, 0.065, 0.085, 0.1, 0.12)[s]
    xf = _to_float(x)
    h, w = xf.shape[:2]
    sigma = (h * 0.01, w * 0.01)
    max_d = h * 0.005
    dx = ndimage.gaussian_filter(rng.uniform(-max_d, max_d, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-max_d, max_d, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    out = _per_channel(lambda ch: ndimage.map_coordinates(ch, coords, order=1, mode="reflect"), xf)
    return _to_uint8(out)


def pixelate(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[s]
    h, w = x.shape[:2]
    img = Image.fromarray(np.asarray(x, np.uint8), "RGB")
    small = img.resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST), np.uint8).copy()


def jpeg_compression(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    del rng
    quality = (25, 18, 15, 10, 7)[s]
    buf = io.BytesIO()
    Image.fromarray(np.asarray(x, np.uint8), "RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), np.uint8).copy()


# The 15 COCO-C benchmark corruptions (imagecorruptions' get_corruption_names('common')), in its order.
BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
# Held-out extras implemented here (imagecorruptions' 'validation' set also has speckle_noise, spatter,
# saturate); never averaged into mPC.
EXTRA_CORRUPTIONS: tuple[str, ...] = ("gaussian_blur",)

CORRUPTIONS: Mapping[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    # extras
    "gaussian_blur": gaussian_blur,
}
assert tuple(CORRUPTIONS) == BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
# Categories of the benchmark corruptions (Michaelis et al. 2019 / imagecorruptions).
GROUPS: Mapping[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
# Names of whole sets for `robustness.parse_corruptions` ('common' and 'validation' are imagecorruptions' names).
SUBSETS: Mapping[str, tuple[str, ...]] = {
    "all": BENCHMARK_CORRUPTIONS,
    "benchmark": BENCHMARK_CORRUPTIONS,
    "common": BENCHMARK_CORRUPTIONS,
    "extra": EXTRA_CORRUPTIONS,
    "validation": EXTRA_CORRUPTIONS,
}


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Applies corruption `name` at `severity` (1..5) to an RGB uint8 image.

    Args:
      image: uint8 [H, W, 3] RGB (the original, un-resized image).
      name: a key of `CORRUPTIONS`.
      severity: 1 (mild) .. 5 (strong).
      seed: makes the random corruptions reproducible (use e.g. the image id).
    Returns:
      uint8 [H, W, 3], a new array.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be one of {SEVERITIES}, got {severity!r}")
    x = np.asarray(image)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"corrupt({name}): need an RGB uint8 [H, W, 3] image, got {x.dtype} {x.shape}")
    # One random stream per (seed, corruption), the same at every severity ("common random numbers"):
    # severities then differ only by their parameters, so the damage grows with the severity.
    key = zlib.crc32(name.encode())
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, key])
    out = CORRUPTIONS[name](x, severity - 1, rng)
    assert out.shape == x.shape and out.dtype == np.uint8, (name, out.shape, out.dtype)
    return out
