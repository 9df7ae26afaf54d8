"""yolos_jax.draw: boxes and tags drawn where the boxes are, colours by class name, the inverse of the input
normalisation, and atomic PNG writes."""

import os
import zlib

import numpy as np
import pytest
from PIL import Image

from yolos_jax import draw
from yolos_jax.data import transforms as T


def test_draw_boxes_outlines_the_box_and_writes_text():
    img = np.zeros((60, 80, 3), np.uint8)
    out = draw.draw_boxes(img, np.asarray([[10, 20, 50, 40]]), None, [(255, 0, 0)], width=1)
    assert out.dtype == np.uint8 and out.shape == img.shape and not img.any()  # input untouched
    red = np.all(out == [255, 0, 0], axis=-1)
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (10, 20, 50, 40)  # PIL draws x1/y1 inclusive
    assert red[20, 10:51].all() and red[40, 10:51].all() and red[20:41, 10].all() and red[20:41, 50].all()
    assert not red[21:40, 11:50].any()  # outline only
    tagged = draw.draw_boxes(img, np.asarray([[10, 30, 50, 55]]), ["cat 0.93"])
    assert tagged[:30].any()  # the tag sits above the box
    assert draw.color_for("cat 0.93") == draw.color_for("cat 0.41") == draw.color_for("cat")


def test_draw_boxes_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        draw.draw_boxes(np.zeros((4, 4, 3), np.float32), np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match="2 boxes but 1 texts"):
        draw.draw_boxes(np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4)), ["a"])


def test_save_png_round_trip_is_atomic(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (17, 23, 3)).astype(np.uint8)
    path = tmp_path / "sub" / "x.png"
    draw.save_png(path, img)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
    assert os.listdir(tmp_path / "sub") == ["x.png"]  # no temp file left behind
    with pytest.raises(ValueError):
        draw.save_png(tmp_path / "y.png", img.astype(np.float32))
    assert os.listdir(tmp_path / "sub") == ["x.png"] and not (tmp_path / "y.png").exists()


def test_color_for_depends_only_on_the_class_name():
    """A class keeps its colour with any trailing score (ground truth 'cat', predictions 'cat 0.93', 'cat: 93%'),
    and every colour is one of the palette's."""
    for text in ("cat 0.93", "cat 0.41", "cat 1", "cat: 0.5", "cat 93%", "cat -0.2", " cat ", "cat .5"):
        assert draw.color_for(text) == draw.color_for("cat"), text
    names = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "bench", "bird",
             "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
             "0.93", "", "traffic light 0.7"]
    colours = [draw.color_for(n) for n in names]
    assert all(c in draw.PALETTE for c in colours)
    assert len(set(colours)) >= 10  # spread over the palette, not one colour for all
    assert draw.color_for("traffic light 0.7") == draw.color_for("traffic light") != draw.color_for("traffic")
    assert draw.color_for("cat") == draw.PALETTE[zlib.crc32(b"cat") % len(draw.PALETTE)]  # every process: not hash()


def test_draw_boxes_clips_skips_non_finite_and_reads_gray():
    gray = np.full((30, 40), 50, np.uint8)
    out = draw.draw_boxes(gray, np.asarray([[-10, 5, 20, 25], [np.nan, 0, 5, 5], [30, 12, 22, 2]]), None,
                          [(0, 255, 0), (255, 0, 0), (0, 0, 255)], width=1)
    assert out.shape == (30, 40, 3) and (out[..., 0] != 255).all()  # the NaN box draws nothing
    green = np.all(out == [0, 255, 0], axis=-1)
    ys, xs = np.nonzero(green)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (0, 5, 20, 25)  # clipped at the left edge
    assert green[5, :21].all() and green[25, :21].all() and green[5:26, 20].all()
    blue = np.all(out == [0, 0, 255], axis=-1)
    ys, xs = np.nonzero(blue)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (22, 2, 30, 12)  # corners given in any order
    assert (out[~(green | blue)] == 50).all()  # nothing else drawn


def test_to_uint8_undoes_the_imagenet_normalisation():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
    np.testing.assert_array_equal(draw.to_uint8(T.normalize_np(u8), T.IMAGENET_MEAN, T.IMAGENET_STD), u8)
    np.testing.assert_array_equal(draw.to_uint8(u8 / 255.0), u8)
    assert draw.to_uint8(np.asarray([[[-0.5, 0.5, 1.5]]])).tolist() == [[[0, 128, 255]]]  # clipped to 0..255
