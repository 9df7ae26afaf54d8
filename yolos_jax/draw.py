"""Drawing boxes and labels onto images, and writing PNGs (numpy + PIL only; no TF, no JAX).

Two ways to draw boxes:
  `draw_boxes`       at the image's own size, each tag at its box's top-left corner (tags may cover each other):
                     input batches (`yolos_jax.data.show_batch`) and `infer.py`'s outputs, whose pixels must
                     match the input's;
  `draw_detections`  at a readable size (short side >= 480 px by default), with a score threshold, the next
                     top-k predictions drawn faintly, and tags laid out by `place_labels` so that no two cover
                     each other: the annotated val images and contact sheets of a run (`run_plots`).
Also: `tile_grid` and `add_caption` (contact sheets), `pyplot` / `save_figure` (matplotlib, lazily imported),
`save_png` (atomic).
"""

from __future__ import annotations

import math
import os
import re
import zlib
from typing import Any, NamedTuple, Optional, Sequence

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
MIN_SHORT_SIDE = 480  # px: the short side of a readable annotated image
FAINT_ALPHA = 110  # of 255: opacity of the below-threshold predictions (boxes and their tags)
LABEL_PAD = 2  # px of tag colour around the text


def color_for(text: str) -> tuple[int, int, int]:
    """A colour that depends only on the class name in `text` (a trailing score like ' 0.93' is ignored),
    so a class keeps its colour across images and between ground truth and predictions."""
    key = _TRAILING_NUMBER.sub("", text).strip() or text
    return PALETTE[zlib.crc32(key.encode("utf-8")) % len(PALETTE)]


def font(size: int) -> Any:
    """PIL's built-in font at `size` px (Pillow >= 10.1 ships a scalable one; older Pillow: its fixed bitmap
    font, whose real size `label_size` measures, so layouts stay correct)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def readable_style(h: int, w: int) -> tuple[int, int]:
    """(line width, font size) in px for an image drawn at h x w px: 2 px lines and 15 px text at a 480 px short
    side, growing with it, never under 2 px / 12 px (the smallest text a person reads without zooming)."""
    short = min(h, w)
    return max(2, round(short / 240)), max(12, round(short / 32))


def label_size(text: str, fnt: Any) -> tuple[int, int]:
    """(width, height) in px of the tag drawn for `text`: the text plus LABEL_PAD on each side. The height is
    the font's line height (`_line_span`), the same for every text, so tags of one image line up."""
    x0, _, x1, _ = fnt.getbbox(text)
    top, bottom = _line_span(fnt)
    return int(math.ceil(x1 - min(x0, 0))) + 2 * LABEL_PAD, bottom - top + 2 * LABEL_PAD


def _line_span(fnt: Any) -> tuple[int, int]:
    """(top, bottom) of a line of text below the drawing origin, px: the extent of the tallest and deepest
    letters, digits and brackets (class names and scores); any other glyph is cut at the tag's edge."""
    _, top, _, bottom = fnt.getbbox("Ahbdfjklgy()|/")
    return int(top), int(bottom)


# --------------------------------------------------------------------------------------------------
# Tag layout
# --------------------------------------------------------------------------------------------------


def _candidates(box: np.ndarray, tw: int, th: int, w: int) -> np.ndarray:
    """[K, 2] top-left corners to try for a tw x th tag of `box` (xyxy px), best first: above the box, inside
    its top, below it, inside its bottom (each at the box's left edge); then those rows shifted sideways in
    half-tag-height steps, nearest first, as far as the box's width plus two tags; then rows further above
    and below (up to three tag heights)."""
    x0, y0, x1, y1 = box
    left = min(max(int(round(x0)), 0), max(w - tw, 0))
    top, bottom = int(math.floor(y0)), int(math.ceil(y1))
    rows = [top - th, top, bottom, bottom - th]
    step = max(2, th // 2)
    reach = int(x1 - x0) + 2 * tw
    shifts = [0] + [s * k * step for k in range(1, reach // step + 1) for s in (1, -1)]
    xs = [left + s for s in shifts]
    out = [(x, y) for x in xs for y in rows]
    for j in range(1, 4):
        out += [(x, y) for x in xs for y in (top - th - j * th, bottom + j * th)]
    return np.asarray(out, np.int64)


def place_labels(boxes_xyxy_pixels: np.ndarray, sizes: Sequence[tuple[int, int]], image_hw: Sequence[int],
                 occupied: Optional[np.ndarray] = None) -> list[Optional[tuple[int, int, int, int]]]:
    """Greedy tag layout: no two tags cover each other and every tag lies inside the image.

    Tags are placed in the order given (put the most important first: the highest scores). For each one the
    positions of `_candidates` are tried in turn (above the box, inside its top, below, inside its bottom, then
    shifted sideways, then further above / below) and the first that stays inside the image and intersects
    no tag already placed (nor `occupied`) is taken. When none is free the tag gets None: the caller draws
    the box without its text rather than text on top of another's.

    Args:
      boxes_xyxy_pixels: [N, 4] (x0, y0, x1, y1) in px of the drawn image; non-finite boxes get None.
      sizes: N (width, height) of the tags in px (`label_size`); a zero size gets None.
      image_hw: (height, width) of the drawn image in px.
      occupied: [K, 4] rectangles (x0, y0, x1, y1), x1/y1 exclusive, that tags must not cover.
    Returns:
      N rectangles (x0, y0, x1, y1) in integer px, x1/y1 exclusive (pairwise disjoint), or None.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    boxes = np.asarray(boxes_xyxy_pixels, np.float64).reshape(-1, 4)
    if len(sizes) != len(boxes):
        raise ValueError(f"place_labels: {len(boxes)} boxes but {len(sizes)} sizes")
    placed = np.asarray(occupied, np.int64).reshape(-1, 4) if occupied is not None else np.zeros((0, 4), np.int64)
    out: list[Optional[tuple[int, int, int, int]]] = []
    for box, (tw, th) in zip(boxes, sizes):
        tw, th = int(tw), int(th)
        if not np.all(np.isfinite(box)) or tw <= 0 or th <= 0 or tw > w or th > h:
            out.append(None)
            continue
        b = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
        c = _candidates(np.clip(b, 0, [w, h, w, h]), tw, th, w)
        c = c[(c[:, 0] >= 0) & (c[:, 1] >= 0) & (c[:, 0] + tw <= w) & (c[:, 1] + th <= h)]
        # Half-open rectangles intersect iff they overlap on both axes (touching edges do not count).
        hit = ((c[:, None, 0] < placed[None, :, 2]) & (placed[None, :, 0] < c[:, None, 0] + tw)
               & (c[:, None, 1] < placed[None, :, 3]) & (placed[None, :, 1] < c[:, None, 1] + th)).any(axis=1)
        free = np.flatnonzero(~hit)
        if not len(free):
            out.append(None)
            continue
        x, y = (int(v) for v in c[free[0]])
        rect = (x, y, x + tw, y + th)
        placed = np.concatenate([placed, np.asarray([rect], np.int64)])
        out.append(rect)
    return out


# --------------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------------


def _as_rgb(image_uint8: np.ndarray, who: str) -> np.ndarray:
    img = np.asarray(image_uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"{who}: image must be [H, W, 3] (or gray), got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{who}: image must be uint8, got {img.dtype} (convert with to_uint8 first)")
    return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def _text_color(color: Sequence[int]) -> tuple[int, int, int]:
    return (0, 0, 0) if sum(color) > 382 else (255, 255, 255)  # black on light tags, white on dark ones


def _tag(text: str, color: Sequence[int], fnt: Any, alpha: int = 255) -> Image.Image:
    """The tag of `text` as an RGBA image of `label_size`: the tag colour with the text in black or white, all at
    opacity `alpha`. Drawn on its own image, so no glyph can reach outside the tag."""
    tw, th = label_size(text, fnt)
    tag = Image.new("RGBA", (tw, th), (*color, alpha))
    ImageDraw.Draw(tag).text((LABEL_PAD - min(fnt.getbbox(text)[0], 0), LABEL_PAD - _line_span(fnt)[0]), text,
                             fill=(*_text_color(color), alpha), font=fnt)
    return tag


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], color: Sequence[int], width: int) -> None:
    """The outline of `box` as dashes (on 3, off 2, in units of width + 1 px), so a faint box reads as tentative."""
    x0, y0, x1, y1 = box
    on, period = 3 * width + 3, 5 * width + 5
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = math.hypot(bx - ax, by - ay)
        for s in np.arange(0.0, length, period):
            e = min(s + on, length)
            t0, t1 = s / max(length, 1e-9), e / max(length, 1e-9)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=color, width=width)


def draw_boxes(
    image_uint8: np.ndarray,
    boxes_xyxy_pixels: np.ndarray,
    texts: Optional[Sequence[str]] = None,
    colors: Optional[Sequence[tuple[int, int, int]]] = None,
    *,
    width: Optional[int] = None,
) -> np.ndarray:
    """Draws rectangles with a text tag at each box's top-left corner, at the image's own size.

    Tags go above the box (inside it when the box touches the top edge) and may cover each other: for a
    readable picture of many boxes use `draw_detections`.

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
    img = _as_rgb(image_uint8, "draw_boxes")
    boxes = np.asarray(boxes_xyxy_pixels, np.float64).reshape(-1, 4)
    n = len(boxes)
    if texts is not None and len(texts) != n:
        raise ValueError(f"draw_boxes: {n} boxes but {len(texts)} texts")
    if colors is not None and len(colors) != n:
        raise ValueError(f"draw_boxes: {n} boxes but {len(colors)} colors")
    h, w = img.shape[:2]
    lw = width if width is not None else max(1, round(min(h, w) / 200))
    fnt = font(max(8, min(h, w) // 40))
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
            tw, th = label_size(text, fnt)
            ty = int(y0) - th if int(y0) - th >= 0 else int(max(y0, 0))
            tx = int(min(max(x0, 0), max(w - tw, 0)))
            pil.paste(_tag(text, color, fnt).convert("RGB"), (tx, ty))
    return np.asarray(pil, np.uint8).copy()


# --------------------------------------------------------------------------------------------------
# Readable pictures of detections
# --------------------------------------------------------------------------------------------------


def readable_scale(h: int, w: int, min_short_side: int = MIN_SHORT_SIDE) -> int:
    """The smallest whole factor k >= 1 with k * min(h, w) >= min_short_side (1 for images already that big)."""
    return max(1, math.ceil(min_short_side / max(1, min(h, w))))


def resize(image_uint8: np.ndarray, scale: float) -> np.ndarray:
    """[H, W, 3] uint8 -> [round(H * scale), round(W * scale), 3] uint8 (each side at least 1 px).

    Enlarging is nearest-neighbour: each pixel becomes a block, so the picture shows exactly the pixels the
    model read (bicubic would invent smooth edges and ring around the thumbnails' sharp shapes) and box edges
    can be judged against real pixel boundaries; with a whole `readable_scale` the blocks are all k x k.
    Shrinking averages each block (PIL's BOX filter), which does not alias.
    """
    img = _as_rgb(image_uint8, "resize")
    h, w = img.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    if size == (w, h):
        return img.copy()
    method = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX
    return np.asarray(Image.fromarray(img, "RGB").resize(size, method), np.uint8)


class Mark(NamedTuple):
    """One box of `draw_detections`, in px of the drawn (resized) image."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), x0 <= x1, y0 <= y1, px of the drawn image
    text: str  # 'cat 0.93' (predictions) or 'cat' (ground truth)
    color: tuple[int, int, int]
    faint: bool  # a prediction below the threshold: dashed, semi-transparent
    label: Optional[tuple[int, int, int, int]]  # its tag (x1/y1 exclusive), None: no room, text not drawn


def plan_detections(image_hw: Sequence[int], boxes_xyxy_pixels: np.ndarray, names: Sequence[str],
                    scores: Optional[np.ndarray] = None, *, scale: float = 1.0, threshold: float = 0.5,
                    top_k: int = 5, faint_labels: bool = True) -> list[Mark]:
    """What `draw_detections` draws, without drawing it: which boxes, solid or faint, and where the tags go.

    Args:
      image_hw: (H, W) of the original image in px.
      boxes_xyxy_pixels: [N, 4] (x0, y0, x1, y1) in px of the original image; non-finite boxes are dropped.
      names: N class names.
      scores: [N] scores in [0, 1], or None for ground truth (every box solid, tagged with its name).
      scale: the drawn image is the original resized by `scale` (`resize`).
      threshold: predictions with score > threshold are solid (the `Detector.predict` convention).
      top_k: at most this many of the other predictions, the highest-scoring, are faint.
      faint_labels: tag the faint boxes too (placed after every solid tag, so they never push one away).
    Returns:
      The marks, solid ones first, each group by descending score (that is also the tag priority).
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    boxes = np.asarray(boxes_xyxy_pixels, np.float64).reshape(-1, 4)
    if len(names) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"plan_detections: {len(boxes)} boxes, {len(names)} names, "
                         f"{None if scores is None else len(scores)} scores")
    out_h, out_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    # The same factors as `resize`: boxes land on the pixels they covered.
    drawn = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], axis=1)
    drawn = drawn * np.array([out_w / w, out_h / h, out_w / w, out_h / h])  # corners in any order -> x0 <= x1
    finite = np.all(np.isfinite(drawn), axis=1)
    if scores is None:
        solid, faint = [int(i) for i in np.flatnonzero(finite)], []
    else:
        s = np.asarray(scores, np.float64).reshape(-1)
        order = [int(i) for i in np.argsort(-s, kind="stable") if finite[i]]
        solid = [i for i in order if s[i] > threshold]
        faint = [i for i in order if s[i] <= threshold][: max(int(top_k), 0)]
    fnt = font(readable_style(out_h, out_w)[1])

    def text(i: int) -> str:
        return str(names[i]) if scores is None else f"{names[i]} {float(scores[i]):.2f}"

    solid_rects = place_labels(drawn[solid], [label_size(text(i), fnt) for i in solid], (out_h, out_w))
    faint_rects: list = [None] * len(faint)
    if faint_labels and faint:
        taken = np.asarray([r for r in solid_rects if r is not None], np.int64).reshape(-1, 4)
        faint_rects = place_labels(drawn[faint], [label_size(text(i), fnt) for i in faint], (out_h, out_w), taken)
    marks = []
    for group, rects, is_faint in ((solid, solid_rects, False), (faint, faint_rects, True)):
        for i, rect in zip(group, rects):
            marks.append(Mark(tuple(float(v) for v in drawn[i]), text(i), color_for(str(names[i])), is_faint, rect))
    return marks


def draw_detections(image_uint8: np.ndarray, boxes_xyxy_pixels: np.ndarray, names: Sequence[str],
                    scores: Optional[np.ndarray] = None, *, threshold: float = 0.5, top_k: int = 5,
                    min_short_side: int = MIN_SHORT_SIDE, scale: Optional[float] = None,
                    faint_labels: bool = True) -> np.ndarray:
    """Predictions (or ground truth) drawn on an image enlarged to a readable size.

    The image is enlarged by `readable_scale` (a whole factor: short side >= min_short_side, aspect kept
    exactly) unless `scale` is given (e.g. a contact sheet's common height). Predictions scoring above
    `threshold` get a solid outline and a 'name score' tag; the `top_k` best of the rest a thin dashed
    semi-transparent outline (and a semi-transparent tag where there is room). Tags never cover each other
    (`place_labels`); a box whose tag fits nowhere is drawn without it. Line width and text size follow
    `readable_style` of the drawn size.

    Args:
      image_uint8: [H, W, 3] uint8 RGB (or gray) original image.
      boxes_xyxy_pixels: [N, 4] (x0, y0, x1, y1) in px of the original image.
      names: N class names (the colour is the name's, `color_for`).
      scores: [N] scores, or None for ground truth (all boxes solid, tagged with the name).
    Returns:
      [H', W', 3] uint8, (H', W') = round((H, W) * scale).
    """
    img = _as_rgb(image_uint8, "draw_detections")
    h, w = img.shape[:2]
    s = float(scale) if scale is not None else float(readable_scale(h, w, min_short_side))
    big = resize(img, s)
    out_h, out_w = big.shape[:2]
    marks = plan_detections((h, w), boxes_xyxy_pixels, names, scores, scale=s, threshold=threshold, top_k=top_k,
                            faint_labels=faint_labels)
    lw, size = readable_style(out_h, out_w)
    fnt = font(size)
    pil = Image.fromarray(big, "RGB").convert("RGBA")
    # Bottom to top: faint boxes, solid boxes, faint tags, solid tags (tags last: no line crosses a tag). Each
    # stage is painted on a transparent layer and blended over the picture, which is what makes faint faint.
    for stage in range(4):
        layer = Image.new("RGBA", pil.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        for m in marks:
            if stage == 0 and m.faint:
                _dashed_rectangle(d, m.box, (*m.color, FAINT_ALPHA), max(1, lw // 2))
            elif stage == 1 and not m.faint:
                d.rectangle(m.box, outline=(*m.color, 255), width=lw)
            elif stage == 2 and m.faint and m.label is not None:
                layer.paste(_tag(m.text, m.color, fnt, FAINT_ALPHA), m.label[:2])
            elif stage == 3 and not m.faint and m.label is not None:
                layer.paste(_tag(m.text, m.color, fnt), m.label[:2])
        pil = Image.alpha_composite(pil, layer)
    return np.asarray(pil.convert("RGB"), np.uint8).copy()


# --------------------------------------------------------------------------------------------------
# Sheets, figures and files
# --------------------------------------------------------------------------------------------------


def add_caption(image_uint8: np.ndarray, text: str, font_size: int = 14) -> np.ndarray:
    """The image with a white strip above it holding `text` (black, left-aligned); [H + strip, W, 3] uint8."""
    img = _as_rgb(image_uint8, "add_caption")
    fnt = font(font_size)
    tw, th = label_size(text, fnt)
    strip = Image.new("RGB", (img.shape[1], th + 2 * LABEL_PAD), (255, 255, 255))
    ImageDraw.Draw(strip).text((LABEL_PAD, 2 * LABEL_PAD - _line_span(fnt)[0]), text, fill=(0, 0, 0), font=fnt)
    return np.concatenate([np.asarray(strip, np.uint8), img], axis=0)


def tile_grid(images: Sequence[np.ndarray], columns: int, gap: int = 8,
              background: tuple[int, int, int] = (255, 255, 255)) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Lays uint8 [h, w, 3] images out row by row, `columns` per row, `gap` px apart and around.

    Each column is as wide as its widest image and each row as tall as its tallest; an image sits at its cell's
    top-left. Returns the sheet [H, W, 3] uint8 and each image's rectangle (x0, y0, x1, y1), x1/y1 exclusive.
    """
    if not images:
        raise ValueError("tile_grid: no images")
    columns = max(1, min(int(columns), len(images)))
    rows = math.ceil(len(images) / columns)
    col_w = [max(im.shape[1] for im in images[c::columns]) for c in range(columns)]
    row_h = [max(im.shape[0] for im in images[r * columns:(r + 1) * columns]) for r in range(rows)]
    xs = np.cumsum([gap] + [cw + gap for cw in col_w])
    ys = np.cumsum([gap] + [rh + gap for rh in row_h])
    sheet = np.empty((int(ys[-1]), int(xs[-1]), 3), np.uint8)
    sheet[:] = background
    rects = []
    for k, im in enumerate(images):
        im = _as_rgb(im, "tile_grid")
        x, y = int(xs[k % columns]), int(ys[k // columns])
        sheet[y:y + im.shape[0], x:x + im.shape[1]] = im
        rects.append((x, y, x + im.shape[1], y + im.shape[0]))
    return sheet, rects


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


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend. Imported on first use: matplotlib is heavy and only figures need it
    (the data pipeline imports this module), and the backend must be chosen before pyplot is first imported."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    """Saves a matplotlib figure as PNG atomically (temp file next to `path`, then rename) and closes it."""
    try:
        with atomic.atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    finally:
        pyplot().close(fig)
