"""Train/eval transforms: DETR's size rule and box arithmetic against independent references, the
random geometry's invariants, and (through the TF image ops) boxes that stay on their objects.

The one eval transform (transforms.eval_resize_hw + transforms.resize_image): its sizes against the original's
rule (tests/reference_models.py), its resampler against PIL through the tf.data path, and the crop branch's
floored intermediate sizes. (`Detector.preprocess` and the eval iterator sharing it: tests/test_inference.py;
canvases that hold any aspect ratio: tests/test_data_canvases.py.)"""

import io

import numpy as np
import pytest
from PIL import Image

from reference_models import detr_get_size, original_eval_size
from yolos_jax.data import transforms as T


def test_detr_resize_rule_matches_original():
    rng = np.random.default_rng(0)
    h = rng.integers(16, 2000, 3000)
    w = rng.integers(16, 2000, 3000)
    h[:300] = 480  # COCO-like sizes, including the "already that size" branch
    w[:300] = rng.choice([640, 480, 427], 300)
    s = rng.choice(np.arange(256, 801, 16), 3000)
    for max_size in (None, 1333, 1013):
        oh, ow = T.detr_resize_hw(h, w, s, max_size)
        ref = np.asarray([detr_get_size((int(b), int(a)), int(c), max_size) for a, b, c in zip(h, w, s)])
        np.testing.assert_array_equal(np.stack([oh, ow], 1), ref)


SETTINGS = [(800, 1333), (512, 853), (1024, 1024), (64, 106)]  # S/B, Ti, ViTDet-B, the tests' tiny model
TABLE = [
    (480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (333, 500), (612, 612),  # COCO-like
    (800, 1328), (800, 800), (512, 768), (1024, 1024), (64, 96), (96, 64), (1600, 2400),  # exact multiples
    (1000, 200), (200, 1000), (256, 640), (640, 256), (300, 1000), (1, 1333),  # the cap binds
    (41, 1150), (1150, 41), (100, 2000), (2000, 100), (17, 1055), (19, 2198),  # very wide / tall
    (5, 7), (10, 12), (16, 16), (15, 17), (33, 20), (1, 1),  # tiny
    (1500, 1500), (3000, 4000),  # large
]


def test_eval_sizes_are_the_originals():
    """Equal to the original's rule wherever it gives a usable image inside its own cap; elsewhere (aspect
    ratios beyond ~1:8 only) the documented departures: a side floored to 0 keeps one patch, a long side over
    the cap is clamped to the cap floored to 16 (at 64/106 a short side below 16 px starts at 1:6.8)."""
    rng = np.random.default_rng(0)
    rand = [tuple(int(v) for v in rng.integers(16, 3000, 2)) for _ in range(1500)]
    departures = 0
    for size, max_size in SETTINGS:
        hs, ws = zip(*(TABLE + rand))
        oh, ow = T.eval_resize_hw(np.asarray(hs), np.asarray(ws), size, max_size)  # vectorised
        cap = max_size // 16 * 16
        for i, (h, w) in enumerate(TABLE + rand):
            want = original_eval_size(h, w, size, max_size)
            got = (int(oh[i]), int(ow[i]))
            assert tuple(int(v) for v in T.eval_resize_hw(h, w, size, max_size)) == got  # scalar == vectorised
            if min(want) > 0 and max(want) <= max_size:
                assert got == want, (h, w, size, max_size)
            else:
                departures += 1
                assert max(h, w) > 6 * min(h, w), (h, w, size, max_size)
                assert got == tuple(min(max(16, v), cap) for v in want), (h, w, size, max_size)
            assert got[0] % 16 == 0 and got[1] % 16 == 0 and min(got) >= 16 and max(got) <= max(16, cap)
            assert min(got) <= size
    assert departures > 0  # the table does reach them
    # Known values: DETR's 640 x 256 at 1024/1024 is 1025 long (from the rounded short side 410): floored 1024.
    assert T.eval_resize_hw(256, 640, 1024, 1024) == (400, 1024)
    assert T.eval_resize_hw(41, 1150, 800, 1333) == (48, 1328)  # the original: 48 x 1344, over its own cap
    assert T.eval_resize_hw(480, 640, 800, 1333) == (800, 1056)
    assert T.eval_resize_hw(800, 1201, 800, 1333) == (800, 1200)  # "already that size" is floored too


def _coco_like_sizes(n, rng):
    short = rng.choice([480, 427, 360, 640, 424, 500], n)
    land = rng.random(n) < 0.7
    return np.where(land, short, 640), np.where(land, 640, short)


@pytest.mark.parametrize("crop_in_original", [True, False])
def test_train_geometry_invariants_at_s_scales(crop_in_original):
    rng = np.random.default_rng(1)
    h, w = _coco_like_sizes(4000, rng)
    cfg = T.TrainTransformConfig(scales=T.SCALES_S, max_size=1333, crop_in_original=crop_in_original)
    g = T.sample_train_geometry(np.random.default_rng(2), h, w, cfg)
    flip, h1, w1, cy, cx, ch, cw, h2, w2 = g.T
    crop = (h1 != h) | (w1 != w) | (ch != h1) | (cw != w1)
    # Flip and branch choice are fair coins.
    assert abs(flip.mean() - 0.5) < 0.04 and abs(crop.mean() - 0.5) < 0.04
    # No-crop branch: the final size is DETR's resize of the original to one of the scales, floored to 16.
    cand = {s: T.detr_resize_hw(h, w, s, 1333) for s in T.SCALES_S}
    nc = ~crop
    ok = np.zeros(len(h), bool)
    for oh, ow in cand.values():
        ok |= (h2 == oh // 16 * 16) & (w2 == ow // 16 * 16)
    assert ok[nc].all()
    # Crop branch: resize to 400/500/600, a crop of 384..min(side, 600) inside it, then a scale. With
    # crop_in_original the window is cut from the original instead (sizes scaled back, +-1 px rounding).
    inter_ok = np.zeros(len(h), bool)
    for s1 in (400, 500, 600):
        a, b = (v // 16 * 16 for v in T.detr_resize_hw(h, w, s1, None))  # floored to 16, as the original
        if crop_in_original:
            ry, rx = a / h, b / w
            inter_ok |= ((h1 == h) & (w1 == w) & (ch * ry >= 384 - 1.5) & (ch * ry <= np.minimum(a, 600) + 1.5)
                         & (cw * rx >= 384 - 1.5) & (cw * rx <= np.minimum(b, 600) + 1.5))
        else:
            inter_ok |= ((h1 == a) & (w1 == b) & (cw >= 384) & (cw <= np.minimum(b, 600)) & (ch >= 384)
                         & (ch <= np.minimum(a, 600)))
    assert inter_ok[crop].all()
    assert ((cx >= 0) & (cx + cw <= w1) & (cy >= 0) & (cy + ch <= h1)).all()
    ok = np.zeros(len(h), bool)
    for s in T.SCALES_S:
        oh, ow = T.detr_resize_hw(ch, cw, s, 1333)
        ok |= (h2 == oh // 16 * 16) & (w2 == ow // 16 * 16)
    assert ok[crop].all()
    assert (h2 % 16 == 0).all() and (w2 % 16 == 0).all()
    assert (np.minimum(h2, w2) <= 800).all() and (np.maximum(h2, w2) <= 1333).all()
    # Every scale is used (the multi-scale set, not a subset).
    assert len({int(min(a, b)) for a, b in zip(h2[nc], w2[nc])} & set(T.SCALES_S)) >= 15


def test_lsj_and_eval_geometry():
    rng = np.random.default_rng(3)
    h, w = _coco_like_sizes(2000, rng)
    cfg = T.TrainTransformConfig(scales=T.SCALES_S, max_size=1333, large_scale_jitter=True)
    g = T.sample_train_geometry(np.random.default_rng(4), h, w, cfg)
    flip, h1, w1, cy, cx, ch, cw, h2, w2 = g.T
    scale = np.maximum(h1 / h, w1 / w)
    assert scale.min() > 0.1 * 1024 / 640 * 0.98 and scale.max() < 2.0 * 1024 / 480 * 1.02
    assert ((ch == np.minimum(h1, 1024)) & (cw == np.minimum(w1, 1024)) & (h2 == ch) & (w2 == cw)).all()
    assert ((cy >= 0) & (cy + ch <= h1) & (cx >= 0) & (cx + cw <= w1)).all()
    assert ((h1 > 1024) | (w1 > 1024)).any() and ((h1 < 1024) & (w1 < 1024)).any()
    ge = T.eval_geometry(h, w, 800, 1333)
    oh, ow = T.detr_resize_hw(h, w, 800, 1333)
    np.testing.assert_array_equal(ge[:, 7:], np.stack([oh, ow], 1) // 16 * 16)
    assert (ge[:, 0] == 0).all() and (ge[:, 1] == h).all() and (ge[:, 6] == w).all()


@pytest.mark.parametrize("crop_in_original", [True, False])
def test_crop_branch_intermediate_sizes_are_floored(crop_in_original):
    """The crop branch's RandomResize([400, 500, 600]) is floored to 16 as in the original: the window is
    drawn inside the floored image (cut from it, or mapped back to the original's pixels)."""
    rng = np.random.default_rng(3)
    h = rng.integers(200, 1000, 3000)
    w = rng.integers(200, 1000, 3000)
    cfg = T.TrainTransformConfig(scales=T.SCALES_S, max_size=1333, crop_prob=1.0, crop_in_original=crop_in_original)
    g = T.sample_train_geometry(np.random.default_rng(4), h, w, cfg)
    _, h1, w1, cy, cx, ch, cw, _, _ = g.T
    inter = {s: [original_eval_size(int(a), int(b), s, None) for a, b in zip(h, w)] for s in (400, 500, 600)}
    if not crop_in_original:
        ok = np.zeros(len(h), bool)
        for s, sizes in inter.items():
            ok |= (h1 == np.asarray(sizes)[:, 0]) & (w1 == np.asarray(sizes)[:, 1])
        assert ok.all() and (h1 % 16 == 0).all() and (w1 % 16 == 0).all()
        assert ((cy + ch <= h1) & (cx + cw <= w1) & (np.minimum(ch, cw) >= 384)).all()
    else:  # the window, mapped back, lies within the original and scales to >= 384 px of a floored size
        assert ((h1 == h) & (w1 == w) & (cy + ch <= h) & (cx + cw <= w)).all()
        assert (np.minimum(h, w) > 0).all()
    with pytest.raises(ValueError, match="crop_min_size"):
        T.TrainTransformConfig(scales=T.SCALES_S, max_size=1333, crop_resize_sizes=(395, 500), crop_min_size=390)


def reference_boxes(boxes, hw, geom):
    """Independent float64 reference: map corners into the crop frame, clip, normalise by the crop
    (the last resize is a pure scale, so it cancels in normalised coordinates)."""
    flip, h1, w1, cy, cx, ch, cw, h2, w2 = (int(v) for v in geom)
    h, w = hw
    out, keep = [], []
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64):
        if flip:
            x0, x1 = w - x1, w - x0
        x0, x1 = x0 * w1 / w - cx, x1 * w1 / w - cx
        y0, y1 = y0 * h1 / h - cy, y1 * h1 / h - cy
        x0, x1 = np.clip([x0, x1], 0, cw)
        y0, y1 = np.clip([y0, y1], 0, ch)
        k = x1 > x0 and y1 > y0
        keep.append(k)
        if k:
            out.append([(x0 + x1) / 2 / cw, (y0 + y1) / 2 / ch, (x1 - x0) / cw, (y1 - y0) / ch])
    return np.asarray(out).reshape(-1, 4), np.asarray(keep, bool)


def test_box_transform_matches_reference():
    rng = np.random.default_rng(5)
    for lsj in (False, True):
        cfg = T.TrainTransformConfig(scales=T.SCALES_S, max_size=1333, large_scale_jitter=lsj)
        h, w = _coco_like_sizes(300, rng)
        g = T.sample_train_geometry(rng, h, w, cfg)
        n_dropped = 0
        for i in range(300):
            x0 = rng.uniform(0, w[i] - 2, 8)
            y0 = rng.uniform(0, h[i] - 2, 8)
            boxes = np.stack([x0, y0, rng.uniform(x0 + 1, w[i]), rng.uniform(y0 + 1, h[i])], 1).astype(np.float32)
            got, keep = T.transform_boxes(boxes, (h[i], w[i]), g[i])
            ref, ref_keep = reference_boxes(boxes, (h[i], w[i]), g[i])
            np.testing.assert_array_equal(keep, ref_keep)
            np.testing.assert_allclose(got, ref, atol=2e-6)
            n_dropped += (~keep).sum()
        assert n_dropped > 0  # the crops did remove boxes


def test_pad_targets_truncates_and_masks():
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    out_b, out_l, m, cut = T.pad_targets(b, np.asarray([5, 6, 7]), 2)
    np.testing.assert_array_equal(out_b, b[:2]) and np.testing.assert_array_equal(out_l, [5, 6])
    assert m.all() and cut == 1
    out_b, out_l, m, cut = T.pad_targets(b, np.asarray([5, 6, 7]), 5)
    assert m.tolist() == [True] * 3 + [False] * 2 and cut == 0 and not out_b[3:].any() and not out_l[3:].any()


# ---------------------------------------------------------------------------------------------------
# Through the TF image ops: after any transform, the pixels inside each box are its object's colour.

COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 20), (200, 40, 220), (20, 210, 220)]


def _test_image(fmt="PNG"):
    """A 120x160 gray image with 6 solid rectangles of known colour (PNG or JPEG), boxes xyxy pixels."""
    img = np.full((120, 160, 3), 128, np.uint8)
    boxes = np.asarray([[5, 5, 45, 35], [60, 10, 150, 40], [10, 50, 40, 110], [50, 55, 100, 115],
                        [110, 50, 155, 80], [115, 88, 158, 117]], np.float32)
    for (x0, y0, x1, y1), c in zip(boxes.astype(int), COLOURS):
        img[y0:y1, x0:x1] = c
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue(), boxes


def _check_boxes_on_objects(out_img, boxes_cxcywh, labels):
    h, w = out_img.shape[:2]
    checked = 0
    for (cx, cy, bw, bh), lab in zip(boxes_cxcywh, labels):
        x0, x1 = (cx - bw / 2) * w, (cx + bw / 2) * w
        y0, y1 = (cy - bh / 2) * h, (cy + bh / 2) * h
        if x1 - x0 < 6 or y1 - y0 < 6:
            continue  # too small to judge after resampling
        # Inside (1 px in from each edge, where resampling blurs): the object's colour.
        inner = out_img[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1].astype(int)
        near = np.abs(inner - np.asarray(COLOURS[lab])).max(-1) < 40
        assert near.mean() > 0.9, (lab, near.mean())
        # A 2 px ring outside the box: mostly not that colour (the box is tight, not just large).
        ring = np.zeros((h, w), bool)
        ring[max(0, int(y0) - 3):int(np.ceil(y1)) + 3, max(0, int(x0) - 3):int(np.ceil(x1)) + 3] = True
        ring[max(0, int(y0) - 1):int(np.ceil(y1)) + 1, max(0, int(x0) - 1):int(np.ceil(x1)) + 1] = False
        if ring.sum() > 10:
            outer = np.abs(out_img[ring].astype(int) - np.asarray(COLOURS[lab])).max(-1) < 40
            assert outer.mean() < 0.3, (lab, outer.mean())
        checked += 1
    return checked


def _geometries():
    h, w = 120, 160
    small = dict(scales=(96, 112, 128), max_size=200, crop_resize_sizes=(100, 120), crop_min_size=64,
                 crop_max_size=110, lsj_size=128)
    yield "flip", np.asarray([1, h, w, 0, 0, h, w, h, w])
    yield "upscale", np.asarray([0, h, w, 0, 0, h, w, 192, 256])
    yield "downscale", np.asarray([0, h, w, 0, 0, h, w, 64, 80])
    yield "crop", np.asarray([0, h, w, 20, 30, 80, 100, 80, 100])
    yield "flip+resize+crop+resize", np.asarray([1, 150, 200, 25, 40, 100, 120, 112, 128])
    for lsj, name in ((False, "random train"), (True, "large-scale jitter")):
        cfg = T.TrainTransformConfig(large_scale_jitter=lsj, **small)
        for k, g in enumerate(T.sample_train_geometry(np.random.default_rng(6), [h] * 6, [w] * 6, cfg)):
            yield f"{name} {k}", g


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])  # JPEG crops decode only the window
def test_image_and_boxes_stay_together(fmt):
    data, boxes = _test_image(fmt)
    labels = np.arange(len(boxes))
    checked = {}
    for name, g in _geometries():
        out = T.tf_apply_geometry(data, g, "uint8").numpy()
        assert out.shape == (g[7], g[8], 3), name
        b, keep = T.transform_boxes(boxes, (120, 160), g)
        checked[name] = _check_boxes_on_objects(out, b, labels[keep])
    assert checked["flip"] == checked["upscale"] == 6 and checked["crop"] >= 2
    assert sum(v for k, v in checked.items() if k.startswith("large-scale")) >= 6
    assert sum(v for k, v in checked.items() if k.startswith("random")) >= 12


def test_jpeg_window_decode_equals_decode_then_crop():
    from yolos_jax.data.tf_setup import get_tf

    tf = get_tf()
    data, _ = _test_image("JPEG")
    full = tf.io.decode_jpeg(data, channels=3, dct_method=T.JPEG_DCT).numpy()  # as the pipeline (and PIL)
    for flip in (0, 1):
        g = np.asarray([flip, 120, 160, 17, 33, 70, 90, 70, 90])  # crop of the original, no resize
        got = T.tf_apply_geometry(data, g, "uint8").numpy()
        ref = (full[:, ::-1] if flip else full)[17:87, 33:123]
        assert np.abs(got.astype(int) - ref).max() <= 2  # libjpeg's cropped decode: same pixels up to rounding


def _png(im):
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    return buf.getvalue()


def _images(rng):
    """Noise (the worst case for a resampler) and a smooth scene with hard edges."""
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    y, x = np.mgrid[0:48, 0:40]
    smooth = 127 + 90 * np.sin(x / 5.0)[..., None] * np.cos(y / 4.0)[..., None] + rng.normal(0, 15, (48, 40, 3))
    smooth[10:30, 5:20] = 250
    return [noise, np.clip(smooth, 0, 255).astype(np.uint8)]


def test_tf_eval_path_resamples_as_pil():
    """The tf.data eval transform (PNG decode -> resize to the eval GEOM) gives PIL's bilinear pixels, at
    scale factors from 0.1x to 3x, with and without an image hook (COCO-C)."""
    from yolos_jax.data.tf_setup import get_tf

    tf = get_tf()
    rng = np.random.default_rng(1)
    for im in _images(rng):
        h, w = im.shape[:2]
        for sy, sx in [(0.1, 0.12), (0.5, 0.47), (0.74, 1.3), (0.9, 0.97), (1.0, 1.6), (1.7, 1.66), (3.0, 0.4)]:
            oh, ow = max(1, round(h * sy)), max(1, round(w * sx))
            geom = np.asarray([0, h, w, 0, 0, h, w, oh, ow], np.int32)
            want = np.asarray(Image.fromarray(im).resize((ow, oh), Image.BILINEAR))
            got = T.tf_apply_geometry(tf.constant(_png(im)), geom, "uint8", eval_transform=True).numpy()
            np.testing.assert_array_equal(got, want)
        inverted = T.tf_apply_geometry(tf.constant(_png(im)), geom, "uint8", image_fn=lambda a, i: 255 - a,
                                       image_id=tf.constant(0, tf.int64), eval_transform=True).numpy()
        np.testing.assert_array_equal(inverted, T.resize_image(255 - im, (oh, ow)))


def test_float_output_is_normalised_uint8():
    data, _ = _test_image()
    g = np.asarray([1, 120, 160, 10, 20, 90, 120, 136, 176])
    u8 = T.tf_apply_geometry(data, g, "uint8").numpy()
    f32 = T.tf_apply_geometry(data, g, "float32").numpy()
    assert f32.dtype == np.float32
    # The uint8 output is the float one rounded: equal up to half a grey level.
    np.testing.assert_allclose(f32, T.normalize_np(u8), atol=0.5 / 255 / min(T.IMAGENET_STD) + 1e-5)
    with pytest.raises(ValueError, match="image_format"):
        T.tf_apply_geometry(data, g, "bfloat16")


def test_bad_transform_configs_raise():
    with pytest.raises(ValueError, match="crop_min_size"):
        T.TrainTransformConfig(scales=(480,), max_size=1333, crop_min_size=450, crop_resize_sizes=(400,))
    with pytest.raises(ValueError, match="max_size"):
        T.TrainTransformConfig(scales=(480, 800), max_size=700)
    with pytest.raises(ValueError, match="scale set"):
        T.scales_for("xl")
