"""Drawing boxes and labels onto images, and writing PNGs (numpy + PIL only; no TF, no JAX).

Used to look at input batches (`yolos_jax.data.show_batch`) and at predictions (the evaluator).
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from yolos_jax import atomic

# 20 well-separated RGB colours (the "tab20" order, darkest first), so neighbouring classes differ.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)
_TRAILING_NUMBER = re.compile(r"[\s:]*[-+]?\d*\.?\d+%?$")


def color_for(text: str) -> tuple[int, int, int]:
    """A colour that depends only on the class name in `text` (a trailing score like ' 0.93' is ignored),
    so a class keeps its colour across images and between ground truth and predictions."""
    key = _TRAILING_NUMBER.sub("", text).strip() or text
    return PALETTE[zlib.crc32(key.encode("utf-8")) % len(PALETTE)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def draw_boxes(
    image_uint8: np.ndarray,
    boxes_xyxy_pixels: np.ndarray,
    texts: Optional[Sequence[str]] = None,
    colors: Optional[Sequence[tuple[int, int, int]]] = None,
    *,
    width: Optional[int] = None,
) -> np.ndarray:
    """Draws rectangles with a text tag at each box's top-left corner.

    Args:
      image_uint8: [H, W, 3] uint8 RGB (also accepted: [H, W] gray, [H, W, 1]).
      boxes_xyxy_pixels: [N, 4] float (x0, y0, x1, y1) in pixels of this image; boxes partly outside
        the image are drawn clipped.
      texts: N strings (e.g. 'cat 0.93'), or None for no text.
      colors: N RGB tuples, or None to colour each box by its text's class name (`color_for`).
      width: line width in pixels; default scales with the image (>= 1).
    Returns:
      A new [H, W, 3] uint8 array; the input is not modified.
    """
    img = np.asarray(image_uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"draw_boxes: image must be [H, W, 3] (or gray), got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"draw_boxes: image must be uint8, got {img.dtype} (convert with to_uint8 first)")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    boxes = np.asarray(boxes_xyxy_pixels, np.float64).reshape(-1, 4)
    n = len(boxes)
    if texts is not None and len(texts) != n:
        raise ValueError(f"draw_boxes: {n} boxes but {len(texts)} texts")
    if colors is not None and len(colors) != n:
        raise ValueError(f"draw_boxes: {n} boxes but {len(colors)} colors")
    h, w = img.shape[:2]
    lw = width if width is not None else max(1, round(min(h, w) / 200))
    font = _font(max(8, min(h, w) // 40))
    pil = Image.fromarray(img, "RGB")
    draw = ImageDraw.Draw(pil)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not np.all(np.isfinite([x0, y0, x1, y1])):
            continue
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        text = texts[i] if texts is not None else ""
        color = tuple(int(c) for c in colors[i]) if colors is not None else color_for(text or "box")
        draw.rectangle([x0, y0, x1, y1], outline=color, width=lw)
        if text:
            tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
            tw, th = tx1 - tx0, ty1 - ty0
            # Put the tag above the box; inside it when the box touches the top edge.
            ty = y0 - th - 2 if y0 - th - 2 >= 0 else y0
            tx = min(max(x0, 0), max(w - tw - 2, 0))
            draw.rectangle([tx, ty, tx + tw + 2, ty + th + 2], fill=color)
            fg = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
            draw.text((tx + 1 - tx0, ty + 1 - ty0), text, fill=fg, font=font)
    return np.asarray(pil, np.uint8).copy()


def to_uint8(image: np.ndarray, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """[H, W, 3] float image -> uint8. With mean/std (e.g. ImageNet's), undoes `(x/255 - mean) / std`;
    without, expects values in [0, 1]."""
    x = np.asarray(image, np.float32)
    if mean is not None and std is not None:
        x = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike, image_uint8: np.ndarray) -> None:
    """Writes [H, W, 3] (or [H, W]) uint8 as PNG atomically: a temp file next to `path`, then rename,
    so a crash never leaves a partial PNG. Creates the parent directory."""
    img = np.asarray(image_uint8)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"save_png({path}): need uint8 [H, W] or [H, W, 3], got {img.dtype} {img.shape}")
    with atomic.atomic_file(path, suffix=".png") as tmp:
        Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img).save(tmp, format="PNG")
