"""COCO-C style image corruptions (numpy / scipy / PIL) and the corrupted-val evaluation protocol.

Robustness of detectors is measured as in Michaelis et al., "Benchmarking Robustness in Object Detection"
(COCO-C), and as reported in fp_detr_paper.md Table 4: the val images are corrupted *before* any resizing,
at five severities per corruption; the detector is evaluated on each (corruption, severity) pair and the
results are reported per corruption (mean over severities) and as the mean over all corruptions and
severities (mPC), with rPC = mPC / clean AP.

The corruptions follow the parameters of `imagecorruptions` (Hendrycks & Dietterich's ImageNet-C code,
adapted to arbitrary image sizes) but are re-implemented here with numpy, scipy and PIL only (no OpenCV,
scikit-image or ImageMagick):

  noise:    gaussian_noise, shot_noise, impulse_noise
  blur:     gaussian_blur, defocus_blur, motion_blur
  weather:  snow, frost, fog
  digital:  brightness, contrast, elastic_transform, pixelate, jpeg_compression

Approximations (documented so that numbers are not mistaken for the official COCO-C ones):
  * motion_blur and the snow streaks use a one-sided Gaussian line kernel (ImageMagick's motion blur) with
    bilinear sub-pixel taps instead of rounded pixel shifts;
  * frost has no photographs of frost to blend in: the frost layer is a procedural ridged-noise texture
    with a cold tint, blended with the original's weights;
  * defocus_blur's anti-aliasing of the disk uses scipy's Gaussian filter instead of OpenCV's.

Every corruption maps uint8 [H, W, 3] RGB to uint8 [H, W, 3] of the same size, is deterministic given its
`rng`, and its change to the image grows with the severity (tested).
"""

from __future__ import annotations

import io
import zlib
from typing import Callable, Mapping, Optional, Sequence

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


def motion_blur(x: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[s]
    angle = rng.uniform(-45, 45)
    return _to_uint8(_convolve(_to_float(x), _motion_kernel(radius, sigma, angle)))


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


CORRUPTIONS: Mapping[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}
GROUPS: Mapping[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("gaussian_blur", "defocus_blur", "motion_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
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


def parse_corruptions(spec: str | Sequence[str]) -> list[str]:
    """'all' | a group ('noise', 'blur', 'weather', 'digital') | names, comma-separated -> names."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    names: list[str] = []
    for item in items:
        if item == "all":
            names.extend(CORRUPTIONS)
        elif item in GROUPS:
            names.extend(GROUPS[item])
        elif item in CORRUPTIONS:
            names.append(item)
        else:
            raise ValueError(
                f"unknown corruption {item!r} in {spec!r}: use 'all', a group {sorted(GROUPS)} or names "
                f"{sorted(CORRUPTIONS)}"
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

    Args:
      clean: metrics on the clean images (or None).
      results: {corruption: {severity: metrics dict}}.
      metric: the metric aggregated ('AP').
    Returns:
      {'clean': float|None, 'per_corruption': {name: mean over severities}, 'per_severity':
       {name: {severity: value}}, 'mPC': mean over all (corruption, severity) pairs, 'rPC': mPC / clean
       (None when undefined)}.
    """
    per_sev = {n: {int(s): float(m[metric]) for s, m in sorted(r.items())} for n, r in results.items()}
    per_corr = {n: float(np.mean(list(v.values()))) for n, v in per_sev.items() if v}
    values = [v for d in per_sev.values() for v in d.values()]
    mpc = float(np.mean(values)) if values else None
    clean_v = None if clean is None else float(clean[metric])
    # None where undefined (strict JSON has no NaN).
    rpc = mpc / clean_v if (mpc is not None and clean_v is not None and clean_v > 0) else None
    return {"metric": metric, "clean": clean_v, "per_corruption": per_corr, "per_severity": per_sev,
            "mPC": mpc, "rPC": rpc}


def format_table(summary: Mapping) -> str:
    """A plain-text table: one row per corruption with its value at each severity and the mean."""
    per_sev = summary["per_severity"]
    sevs = sorted({s for d in per_sev.values() for s in d})
    head = f"{'corruption':<20}" + "".join(f"{'s' + str(s):>8}" for s in sevs) + f"{'mean':>8}"
    lines = [f"COCO-C robustness ({summary['metric']})", head, "-" * len(head)]
    for name, d in per_sev.items():
        cells = "".join(f"{d[s]:8.3f}" if s in d else f"{'':>8}" for s in sevs)
        lines.append(f"{name:<20}{cells}{summary['per_corruption'][name]:8.3f}")
    lines.append("-" * len(head))
    for key in ("clean", "mPC", "rPC"):
        if summary[key] is not None:
            lines.append(f"{key:<20}{summary[key]:8.3f}")
    return "\n".join(lines)
