"""The one eval transform (transforms.eval_resize_hw + transforms.resize_image): its sizes against the original's
rule written out independently here, its resampler against PIL through the tf.data path, the same sizes and
pixels from `Detector.preprocess` and the eval iterator, canvases that hold any aspect ratio (ViTDet-B's fixed
1024 x 1024 one included), and the crop branch's floored intermediate sizes."""

import io

import numpy as np
import pytest
from PIL import Image

from yolos_jax.data import transforms as T


def original_eval_size(h, w, size, max_size):
    """The original's eval size (hustvl/YOLOS datasets/transforms.py resize: DETR's get_size_with_aspect_ratio,
    then both sides floored to multiples of 16), in plain Python, (w, h) unpacked as there."""
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        oh, ow = h, w
    elif w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return oh - oh % 16, ow - ow % 16


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


def test_detector_and_eval_iterator_share_the_transform(tmp_path):
    """Same JPEG, same sizes and pixels from Detector.preprocess (PIL decode) and the eval iterator (TF decode)."""
    import jax
    import jax.numpy as jnp

    from yolos_jax import Detector, convert, data
    from yolos_jax.config import model_config
    from yolos_jax.data import prepared_dataset
    from yolos_jax.inference import read_image_rgb
    from yolos_jax.yolos import YOLOS

    cfg = data.synthetic_input_config(str(tmp_path), num_train=2, num_val=3, image_size=(60, 150),
                                      eval_size=48, eval_max_size=80)
    it = data.make_eval_iterator(cfg, batch_size=3, process_index=0, process_count=1)
    batches = list(it)
    ds = prepared_dataset.load(cfg.data_dir, cfg.dataset_name)
    index = ds.index(cfg.val_split)
    source = ds.source_for(cfg.val_split)
    mcfg = model_config("s", hidden_size=16, depth=1, num_heads=2, num_det_tokens=3, num_classes=4,
                        init_pe_size=(48, 80), mid_pe_size=None).to_dict()
    shapes = jax.eval_shape(lambda: YOLOS(**mcfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    det = Detector(params, mcfg, eval_size=48, max_size=80)
    checked = 0
    for b in batches:
        for j in np.nonzero(b["valid"])[0]:
            i = int(np.nonzero(index.image_id == b["image_id"][j])[0][0])
            im = read_image_rgb(bytes(source[i]["image"]))
            pv, mask, sizes = det.preprocess([im])
            h, w = (int(v) for v in b["size"][j])
            assert tuple(sizes[0]) == (h, w) == tuple(int(v) for v in T.eval_resize_hw(*im.shape[:2], 48, 80))
            # Bit-exact (float rounding of the normalisation aside): PIL's decode (TF with the accurate DCT)
            # and PIL's resize on both paths; the brief allowed one grey level, 0.0175 here.
            assert np.abs(pv[0] - b["image"][j, :h, :w]).max() <= 1e-5
            checked += 1
    assert checked == 3


def test_vitdet_b_eval_fits_its_canvas_at_any_aspect_ratio():
    """configs/vitdet_b.py evaluates on one fixed 1024 x 1024 canvas: every eval size fits it (640 x 256 used
    to become 410 x 1025), and a fixed canvas set too small for the rule fails early, naming the field."""
    import sys
    import os

    from yolos_jax.data import batching
    from yolos_jax.data.canvases import eval_canvases, eval_geometry

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
    import vitdet_b

    cfg = vitdet_b.get_config().input
    rng = np.random.default_rng(2)
    h = np.concatenate([[256, 640, 41, 1150, 17, 1055, 1, 3000, 480, 427], rng.integers(1, 4000, 3000)])
    w = np.concatenate([[640, 256, 1150, 41, 1055, 17, 3000, 1, 640, 640], rng.integers(1, 4000, 3000)])

    class Index:
        height, width = h, w

    canvases = eval_canvases(cfg, Index)
    assert canvases == [(1024, 1024)]
    plan = batching.eval_plan(eval_geometry(cfg, Index), canvases, 8)  # raises if one fits no canvas
    assert sorted(plan.example[plan.valid].tolist()) == list(range(len(h)))
    small = cfg.copy_and_resolve_references()
    small.eval_canvases = ((1024, 1008),)
    with pytest.raises(ValueError, match="input.eval_canvases"):
        eval_canvases(small, Index)


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
