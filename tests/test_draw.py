"""yolos_jax.draw: boxes and tags drawn where the boxes are, colours by class name, the inverse of the input
normalisation, atomic PNG writes; readable pictures (enlarged to a short side >= 480 px with the aspect kept, tags
that never cover each other on a crowded image, checked on the rectangles and on the pixels, faint vs solid
predictions), grids and captions."""

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


# --------------------------------------------------------------------------------------------------
# Readable pictures: size, tag layout, solid vs faint
# --------------------------------------------------------------------------------------------------


def crowded(n=30, seed=0, hw=(128, 160)):
    """n boxes piled on the image's centre region (each overlaps many others), scores spread over [0.5, 1)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    xy = rng.uniform([0.2 * w, 0.2 * h], [0.6 * w, 0.6 * h], (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1 * min(h, w), 0.35 * min(h, w), (n, 2))], axis=1)
    names = [["cat", "dog", "person", "car", "traffic light", "bird"][i % 6] for i in range(n)]
    return boxes, names, np.linspace(0.99, 0.51, n)


def overlaps(a, b):
    """Half-open rectangles a, b (x1/y1 exclusive) share a pixel: the reference the layout is checked against."""
    ax = set(range(a[0], a[2])) & set(range(b[0], b[2]))
    ay = set(range(a[1], a[3])) & set(range(b[1], b[3]))
    return bool(ax and ay)


@pytest.mark.parametrize("hw", [(128, 160), (160, 128), (37, 501), (480, 640), (600, 800), (479, 479)])
def test_draw_detections_enlarges_to_a_readable_size_keeping_the_aspect(hw):
    h, w = hw
    img = np.full((h, w, 3), 90, np.uint8)
    out = draw.draw_detections(img, np.asarray([[2, 3, w / 2, h / 2]]), ["cat"], np.asarray([0.9]))
    oh, ow = out.shape[:2]
    k = oh // h
    assert out.dtype == np.uint8 and out.shape[2] == 3
    assert min(oh, ow) >= 480 and (oh, ow) == (k * h, k * w)  # a whole factor: the aspect exactly
    assert k == 1 or (k - 1) * min(h, w) < 480  # the smallest such factor (big images stay as they are)
    # Nearest-neighbour: every source pixel becomes a k x k block, no new colours on the background.
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)
    np.testing.assert_array_equal(draw.resize(rgb, k), np.repeat(np.repeat(rgb, k, 0), k, 1))
    # Line width and text grow with the picture, never below 2 px / 12 px.
    assert draw.readable_style(480, 640) == (2, 15) and draw.readable_style(128, 160) == (2, 12)
    assert draw.readable_style(1200, 1600) == (5, 38)


def test_draw_detections_puts_the_boxes_where_the_objects_are_after_enlarging():
    img = np.full((128, 160, 3), 40, np.uint8)
    out = draw.draw_detections(img, np.asarray([[20, 30, 60, 90]]), ["cat"], np.asarray([0.9]))
    assert out.shape == (512, 640, 3)  # x4
    cat = np.all(out == draw.color_for("cat"), axis=-1)
    assert cat[30 * 4 + 10 : 90 * 4 - 10, 20 * 4].all() and cat[90 * 4, 20 * 4 + 10 : 60 * 4 - 10].all()
    assert not cat[:, 62 * 4 :].any() and not cat[92 * 4 :].any()  # nothing right of / below the box
    assert cat[30 * 4 - 5, 20 * 4 : 20 * 4 + 20].all()  # its tag just above it, from its left edge


def test_place_labels_never_overlap_on_a_crowded_image():
    boxes, names, _ = crowded(30)
    boxes = boxes * 4  # at the readable size
    fnt = draw.font(15)
    sizes = [draw.label_size(f"{n} 0.99", fnt) for n in names]
    rects = draw.place_labels(boxes, sizes, (512, 640))
    placed = [r for r in rects if r is not None]
    assert len(placed) >= 25  # the crowd still gets (nearly) all its tags ...
    for i, a in enumerate(placed):  # ... and no two share a pixel, all inside the image
        assert 0 <= a[0] < a[2] <= 640 and 0 <= a[1] < a[3] <= 512
        for b in placed[i + 1 :]:
            assert not overlaps(a, b), (a, b)
    for r, s in zip(rects, sizes):
        assert r is None or (r[2] - r[0], r[3] - r[1]) == tuple(s)
    # The first tag gets the best spot: just above its box, at its left edge.
    assert rects[0] == (int(round(boxes[0, 0])), int(np.floor(boxes[0, 1])) - sizes[0][1],
                        int(round(boxes[0, 0])) + sizes[0][0], int(np.floor(boxes[0, 1])))
    # `occupied` rectangles are avoided as tags are.
    again = draw.place_labels(boxes[:5], sizes[:5], (512, 640), occupied=np.asarray(placed))
    assert all(r is None or not any(overlaps(r, p) for p in placed) for r in again)


def test_place_labels_leaves_out_a_tag_with_no_room():
    # A 40 x 20 image: one 30 x 15 tag fits, a second cannot without covering the first; a tag wider than the
    # image never fits; a non-finite box gets none.
    rects = draw.place_labels(np.asarray([[5, 5, 35, 18], [6, 4, 30, 17], [0, 0, 10, 10], [np.nan, 0, 1, 1]]),
                              [(30, 15), (30, 15), (41, 5), (5, 5)], (20, 40))
    assert rects[0] is not None and rects[1] is None and rects[2] is None and rects[3] is None
    with pytest.raises(ValueError, match="2 boxes but 1 sizes"):
        draw.place_labels(np.zeros((2, 4)), [(1, 1)], (10, 10))


def test_drawn_tags_do_not_cover_each_other_on_the_pixels():
    """Each tag's rectangle in the crowded picture shows exactly that tag as it looks drawn alone: had another
    tag been painted over it (or it over another), that rectangle (or the other's) would differ."""
    boxes, names, scores = crowded(30, seed=1)
    img = np.full((128, 160, 3), 200, np.uint8)
    out = draw.draw_detections(img, boxes, names, scores, threshold=0.5, top_k=0)
    marks = draw.plan_detections(img.shape[:2], boxes, names, scores, scale=4, threshold=0.5, top_k=0)
    assert len(marks) == 30 and not any(m.faint for m in marks)
    tagged = [m for m in marks if m.label is not None]
    assert len(tagged) >= 25
    for m in tagged:
        # Alone, in the middle of a blank image, the tag goes just above its box.
        solo_box = np.asarray([[60, 60, 90, 90]], np.float64)
        name, score = m.text.rsplit(" ", 1)
        solo = draw.draw_detections(np.zeros((128, 160, 3), np.uint8), solo_box, [name], np.asarray([float(score)]),
                                    threshold=0.5, top_k=0)
        (alone,) = draw.plan_detections((128, 160), solo_box, [name], np.asarray([float(score)]), scale=4)
        x0, y0, x1, y1 = m.label
        a0, b0, a1, b1 = alone.label
        np.testing.assert_array_equal(out[y0:y1, x0:x1], solo[b0:b1, a0:a1], err_msg=m.text)
        assert np.all(out[y0, x0:x1] == m.color)  # the tag's top padding row: its own colour, untouched


def test_faint_predictions_differ_from_solid_ones():
    img = np.full((128, 160, 3), 100, np.uint8)
    box = np.asarray([[20, 30, 100, 100]])
    solid = draw.draw_detections(img, box, ["cat"], np.asarray([0.9]), threshold=0.5, top_k=5)
    faint = draw.draw_detections(img, box, ["cat"], np.asarray([0.3]), threshold=0.5, top_k=5)
    hidden = draw.draw_detections(img, box, ["cat"], np.asarray([0.3]), threshold=0.5, top_k=0)
    plain = draw.resize(img, 4)
    np.testing.assert_array_equal(hidden, plain)  # below the threshold and outside the top-k: not drawn
    color = np.asarray(draw.color_for("cat"))
    edge = (slice(30 * 4 + 20, 100 * 4 - 20), 20 * 4)  # the left edge, away from the tag
    assert np.all(solid[edge] == color)  # solid: the whole edge in the class colour
    changed = np.any(faint[edge] != 100, axis=-1)
    assert 0.3 < changed.mean() < 0.9  # faint: dashed ...
    assert not np.any(np.all(faint[edge] == color, axis=-1))  # ... and see-through: never the full colour
    between = (faint[edge][changed].astype(int) - 100) * (color - 100)  # each channel moved towards the colour
    assert np.all(between >= 0)
    assert faint.sum() != solid.sum() and "cat 0.30" == draw.plan_detections((128, 160), box, ["cat"], [0.3])[0].text


def test_plan_detections_threshold_top_k_and_ground_truth():
    boxes = np.tile(np.asarray([[10.0, 10, 50, 50]]), (8, 1)) + np.arange(8)[:, None] * 5
    scores = np.asarray([0.2, 0.9, 0.6, 0.5, 0.1, 0.45, 0.3, np.float32(0.7)])
    marks = draw.plan_detections((128, 160), boxes, ["cat"] * 8, scores, threshold=0.5, top_k=2, scale=2)
    assert [m.text for m in marks] == ["cat 0.90", "cat 0.70", "cat 0.60", "cat 0.50", "cat 0.45"]
    assert [m.faint for m in marks] == [False, False, False, True, True]  # 0.5 is not above the threshold
    np.testing.assert_allclose(marks[0].box, boxes[1] * 2)
    gt = draw.plan_detections((128, 160), boxes[:3], ["cat", "dog", "cat"], None, scale=2)
    assert [m.text for m in gt] == ["cat", "dog", "cat"] and not any(m.faint for m in gt)
    assert draw.plan_detections((128, 160), np.asarray([[50, 60, 10, 20]]), ["cat"])[0].box == (10, 20, 50, 60)


def test_tile_grid_and_caption():
    a, b, c = (np.full((h, w, 3), v, np.uint8) for h, w, v in ((10, 20, 1), (12, 5, 2), (7, 9, 3)))
    sheet, rects = draw.tile_grid([a, b, c], columns=2, gap=3)
    assert rects == [(3, 3, 23, 13), (26, 3, 31, 15), (3, 18, 12, 25)]
    assert sheet.shape == (28, 34, 3)  # 3 + 12 + 3 + 7 + 3 high; 3 + 20 + 3 + 5 + 3 wide
    for im, (x0, y0, x1, y1) in zip((a, b, c), rects):
        np.testing.assert_array_equal(sheet[y0:y1, x0:x1], im)
    assert (sheet == 255).sum() == sheet.size - 3 * (200 + 60 + 63)  # the rest is background
    captioned = draw.add_caption(a, "hello", font_size=14)
    assert captioned.shape[1] == 20 and captioned.shape[0] > 10 + 14
    np.testing.assert_array_equal(captioned[-10:], a)
    assert (captioned[:-10] < 128).any()  # the text
