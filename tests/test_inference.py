"""Detector: pre-processing, batching and post-processing against HF's YolosImageProcessor(Pil) and
YolosForObjectDetection; the same eval transform (sizes and pixels) as the eval iterator."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.yolos.image_processing_pil_yolos import (
    YolosImageProcessorPil,
    get_size_with_aspect_ratio_yolos,
)
from transformers.models.yolos.modeling_yolos import YolosObjectDetectionOutput

import reference_models as ref
from eval_fixtures import random_params
from yolos_jax import Detector, convert, data, draw, inference
from yolos_jax.config import model_config
from yolos_jax.data import prepared_dataset
from yolos_jax.data import transforms as T
from yolos_jax.errors import UnusableInputError
from yolos_jax.data.transforms import eval_resize_hw
from yolos_jax.inference import read_image_rgb
from yolos_jax.yolos import YOLOS

EVAL_SIZE = 64  # tiny model: shortest side 64, longest capped at 64 * 1333 // 800 = 106
# originals -> resized: (50, 77) -> 64x96; (90, 40) -> 96x32 (the longest-side cap binds); (37, 120) -> 32x96
IMAGE_SIZES = [(50, 77), (90, 40), (37, 120)]


def test_eval_sizes_match_hf_for_coco_like_aspect_ratios():
    """Detector's sizes (the one eval rule, transforms.eval_resize_hw; tests/test_data_transforms.py checks it
    against the original's) equal HF's YolosImageProcessorPil's for aspect ratios up to 1:6; HF's long side,
    computed from the unrounded short side, departs from the original's only beyond."""
    rng = np.random.RandomState(0)
    sizes = [(h, w) for h in (17, 100, 480, 481, 640, 800, 1333) for w in (99, 480, 640, 801, 1600)]
    sizes += [tuple(int(v) for v in rng.randint(16, 3000, 2)) for _ in range(300)]
    sizes = [(h, w) for h, w in sizes if max(h, w) <= 6 * min(h, w)]
    for eval_size in (64, 512, 800):
        max_size = eval_size * 1333 // 800
        for h, w in sizes:
            want = get_size_with_aspect_ratio_yolos((h, w), eval_size, max_size)
            if min(want) <= 0:
                continue
            assert tuple(int(v) for v in eval_resize_hw(h, w, eval_size, max_size)) == tuple(want), (h, w, eval_size)
    assert eval_resize_hw(480, 640, 800, 1333) == (800, 1056)  # 800 x 1066 floored to multiples of 16
    assert eval_resize_hw(1000, 200, 800, 1333) == (1328, 256)  # cap binds: round(1333 * 200 / 1000) = 267


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = ref.hf_yolos(ref.CFG_TI, 0)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    out = tmp_path_factory.mktemp("conv") / "ti"
    convert.convert(str(folder), str(out))
    det = Detector.from_checkpoint(str(out), eval_size=EVAL_SIZE)
    proc = YolosImageProcessorPil(size={"shortest_edge": EVAL_SIZE, "longest_edge": EVAL_SIZE * 1333 // 800})
    rng = np.random.RandomState(1)
    images = [rng.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in IMAGE_SIZES]
    # noise on a horizontal ramp: structure that resizing must carry over
    ramp = [np.linspace(0, 190, im.shape[1])[None, :, None] for im in images]
    images = [np.clip(im.astype(np.int32) // 4 + r, 0, 255).astype(np.uint8) for im, r in zip(images, ramp)]
    return model, det, proc, images


def _hf_post(proc, logits, boxes, sizes, threshold):
    out = YolosObjectDetectionOutput(
        logits=torch.tensor(np.asarray(logits)), pred_boxes=torch.tensor(np.asarray(boxes))
    )
    res = proc.post_process_object_detection(out, threshold=threshold, target_sizes=[tuple(s) for s in sizes])
    sorted_res = []
    for r in res:
        order = np.argsort(-r["scores"].numpy(), kind="stable")
        sorted_res.append({k: r[k].numpy()[order] for k in ("scores", "labels", "boxes")})
    return sorted_res


def _mid_threshold(scores):
    """A threshold halfway between two neighbouring scores, keeping about half (no borderline cases)."""
    s = np.sort(np.asarray(scores).ravel())
    k = len(s) // 2
    return float(s[k] + s[k + 1]) / 2


def _assert_same(ours, theirs):
    assert len(ours["scores"]) == len(theirs["scores"])
    if not len(ours["scores"]):
        return
    assert ref.max_abs(ours["scores"], theirs["scores"]) <= 1e-4
    np.testing.assert_array_equal(ours["labels"], theirs["labels"])
    assert ref.max_abs(ours["boxes"], theirs["boxes"]) <= 1e-3  # pixels (images ~100 px; measured ~2e-5)


def test_predict_matches_hf_single_images(setup):
    model, det, proc, images = setup
    assert det.label_names == [f"LABEL_{i}" for i in range(7)] and det.max_size == 106
    for im in images[:2]:  # a wide image and a tall one whose longest side hits the cap
        enc = proc(images=[im], return_tensors="pt")
        assert enc["pixel_mask"].all()
        with torch.no_grad():
            out = model(pixel_values=enc["pixel_values"])
        # our pre-processing gives HF's pixels
        pv, mask, sizes = det.preprocess([im])
        assert pv.shape[1:3] == tuple(enc["pixel_values"].shape[-2:]) and mask.all()
        assert ref.max_abs(pv, enc["pixel_values"].numpy().transpose(0, 2, 3, 1)) <= 1e-5
        mid = _mid_threshold(_hf_post(proc, out.logits, out.pred_boxes, [im.shape[:2]], 0.0)[0]["scores"])
        for threshold in (0.0, mid):
            theirs = _hf_post(proc, out.logits, out.pred_boxes, [im.shape[:2]], threshold)[0]
            ours = det.predict([im], threshold=threshold)[0]
            _assert_same(ours, theirs)
            assert ours["names"] == [f"LABEL_{i}" for i in ours["labels"]]
        assert len(det.predict([im], threshold=mid)[0]["scores"]) == 2  # the threshold keeps 2 of 5
        top = det.predict(im, threshold=0.0, top_k=2)[0]
        assert len(top["scores"]) == 2 and top["scores"][0] >= top["scores"][1]


def test_batched_predict_pads_like_hf(setup):
    """Different sizes in one batch: HF's processor pads to the largest with a pixel mask; our forward on
    HF's padded batch and mask, post-processed by HF, equals our predict."""
    _, det, proc, images = setup
    enc = proc(images=images, return_tensors="np")
    pv_hf = enc["pixel_values"].transpose(0, 2, 3, 1)
    pv, mask, sizes = det.preprocess(images)
    assert pv.shape == pv_hf.shape == (3, 96, 96, 3)
    np.testing.assert_array_equal(mask, enc["pixel_mask"].astype(bool))
    assert ref.max_abs(pv, pv_hf) <= 1e-5
    assert sizes.tolist() == [[64, 96], [96, 32], [32, 96]]
    raw = det.forward(pv_hf, enc["pixel_mask"].astype(bool))
    threshold = _mid_threshold(raw["scores"])
    theirs = _hf_post(proc, raw["logits"], raw["boxes"], [im.shape[:2] for im in images], threshold)
    ours = det.predict(images, threshold=threshold)
    assert 0 < sum(len(o["scores"]) for o in ours) < 15
    for o, t in zip(ours, theirs):
        _assert_same(o, t)


def test_detector_errors(setup, tmp_path):
    _, det, _, images = setup
    with pytest.raises(ValueError, match="uint8 RGB"):
        det.predict([images[0].astype(np.float32)])
    with pytest.raises(ValueError, match="uint8 RGB"):
        det.predict([images[0][..., :2]])
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        det.forward(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"float32 .*\(scale floats in \[0, 1\] with \(x \* 255\)"):
        det.predict([images[0].astype(np.float32) / 255])
    with pytest.raises(ValueError, match="the path 'photo.jpg'; read a file with yolos_jax.inference.read_rgb"):
        det.predict("photo.jpg")
    with pytest.raises(ValueError, match="image 0: pixels are expected, got the path 'photo.jpg'"):
        det.predict(["photo.jpg"])
    with pytest.raises(ValueError, match=r"threshold=1.5: scores are at most 1, so it would keep nothing"):
        det.predict([images[0]], threshold=1.5)
    assert len(det.predict([images[0]], threshold=-1.0)[0]["scores"]) == det.model_cfg["num_det_tokens"]
    with pytest.raises(ValueError, match="top_k=0 keeps no detection"):
        det.predict([images[0]], top_k=0)
    # A PIL image (alone or in a list, grey or RGB) is what its convert('RGB') array is.
    grey = Image.fromarray(images[0][..., 0])
    want = det.predict([np.asarray(grey.convert("RGB"))], threshold=0.0)[0]
    for got in (det.predict(grey, threshold=0.0)[0], det.predict([grey], threshold=0.0)[0]):
        np.testing.assert_array_equal(got["boxes"], want["boxes"])
        np.testing.assert_array_equal(got["labels"], want["labels"])
    timm_sd = ref.timm_vit_state(hidden=32, depth=2, mlp=64, grid=4, distilled=False, seed=3)
    torch.save({"model": timm_sd}, tmp_path / "vit.pth")
    convert.convert(str(tmp_path / "vit.pth"), str(tmp_path / "backbone"), variant="ti",
                    model_overrides=dict(hidden_size=32, depth=2, num_heads=2, mlp_dim=64))
    with pytest.raises(ValueError, match="'backbone' checkpoint"):
        Detector.from_checkpoint(str(tmp_path / "backbone"))
    with pytest.raises(FileNotFoundError, match="convert_torch_weights"):
        Detector.from_checkpoint(str(tmp_path))
    n = det.model_cfg["num_classes"]
    with pytest.raises(ValueError, match=f"label_names has {n + 1} names for {n} classes"):
        Detector(det.params, det.model_cfg, label_names=["x"] * (n + 1))
    # Fewer names than logits (a 91-way head fine-tuned on fewer classes, older checkpoints): the rest 'N/A'.
    few = Detector(det.params, det.model_cfg, label_names=["a", "b"])
    assert few.label_names == ["a", "b"] + ["N/A"] * (n - 2)


# --------------------------------------------------------------------------------------------------
# Inference on image files: infer.py's logic (moved from test_visualize.py)
# --------------------------------------------------------------------------------------------------


class GroundTruthDetector:
    """A stand-in detector whose predictions are the ground truth of the images it was built for: it tests
    the file -> predict -> draw -> PNG/JSON path, not the model."""

    def __init__(self, truth):
        self.truth = truth  # list of (boxes xyxy, labels), in the order predict() is called

    def predict(self, images, threshold=0.5, top_k=None):
        boxes, labels = self.truth.pop(0)
        return [{"boxes": boxes, "scores": np.full(len(boxes), 0.9, np.float32), "labels": labels}]


def test_infer_images_draws_boxes_on_the_objects(tmp_path):
    from yolos_jax.data import synthetic

    names = list(synthetic.SHAPES[:3])
    truth, objects = [], []
    for i in range(2):
        rng = np.random.default_rng(i)
        img, objs = synthetic.render_image(rng, 120, 160, num_classes=3, max_objects=3)
        Image.fromarray(img).save(tmp_path / f"img{i}.png")  # lossless: colours are exact
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in objs)], np.float32)
        truth.append((boxes, np.asarray([o["shape"] for o in objs], np.int32)))
        objects.append((img, objs))
    out = tmp_path / "out"
    records = inference.infer_images(GroundTruthDetector(list(truth)), inference.list_images([str(tmp_path)]),
                                     str(out), threshold=0.5, names=names)
    saved = json.loads((out / "detections.json").read_text())
    checked = 0
    assert saved == json.loads(json.dumps(records)) and len(saved) == 2
    for (img, objs), rec, (boxes, labels) in zip(objects, saved, truth):
        drawn = np.asarray(Image.open(rec["output"]).convert("RGB"))
        assert drawn.shape == img.shape
        assert [d["name"] for d in rec["detections"]] == [names[k] for k in labels]
        for o, det in zip(objs, rec["detections"]):
            x0, y0, x1, y1 = (int(round(v)) for v in det["box_xyxy"])
            np.testing.assert_allclose(det["box_xyxy"], [o["bbox"][0], o["bbox"][1], o["bbox"][0] + o["bbox"][2],
                                                         o["bbox"][1] + o["bbox"][3]], atol=1e-3)
            # The object (its own colour) fills its box: the box sits on the object ...
            inside = img[y0:y1, x0:x1].reshape(-1, 3)
            assert np.mean(np.all(inside == o["color"], axis=1)) > 0.2
            # ... and the PNG has the outline drawn exactly there: the box's left and bottom edges (never
            # covered by the text tag, which sits at the top) in the class colour.
            color = draw.color_for(names[o["shape"]])
            h, w = img.shape[:2]
            if x0 < w:  # an edge on the image border itself is clipped away
                frac = np.mean(np.all(drawn[y0 + 1 : min(y1, h), x0] == color, axis=1))
                assert frac > 0.6, (frac, det)  # a later box may cross it; most of the edge is this colour
                assert np.mean(np.all(img[y0 + 1 : min(y1, h), x0] == color, axis=1)) < 0.2  # not there before
                checked += 1
            if y1 < h:
                frac = np.mean(np.all(drawn[y1, x0:min(x1, w)] == color, axis=1))
                assert frac > 0.6, (frac, det)
                checked += 1
    assert checked >= 6

    # A truncated file among them: the others are still drawn and saved; then one error names the file left out.
    good = (tmp_path / "img1.png").read_bytes()
    (tmp_path / "img0.png").rename(tmp_path / "a_first.png")
    (tmp_path / "img1.png").write_bytes(good[: len(good) // 2])
    out2 = tmp_path / "out2"
    with pytest.raises(UnusableInputError,
                       match=r"^1 of 2 images could not be read and were left out \(the other 1 are in .*out2/"
                             r"detections.json\): cannot read image .*img1.png"):
        inference.infer_images(GroundTruthDetector(list(truth)), inference.list_images([str(tmp_path)]),
                               str(out2), threshold=0.5, names=names)
    kept = json.loads((out2 / "detections.json").read_text())
    assert [os.path.basename(r["file"]) for r in kept] == ["a_first.png"] and (out2 / "a_first.png").exists()
    assert kept[0]["detections"] == saved[0]["detections"]


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        inference.list_images([str(tmp_path / "nope.jpg")])
    with pytest.raises(FileNotFoundError, match="holds no images"):
        inference.list_images([str(tmp_path)])
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        inference.read_rgb(str(tmp_path / "bad.jpg"))


def test_run_inference_with_a_converted_tiny_checkpoint(tmp_path):
    """infer.py's logic with the real Detector on a tiny random model: files come out, limits hold."""
    from yolos_jax import weights

    cfg = model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=6, num_classes=3,
                       init_pe_size=(64, 96), mid_pe_size=None).to_dict()
    params = jax.tree.map(np.asarray, random_params(YOLOS(**cfg), (64, 96)))
    ckpt = tmp_path / "ckpt"
    weights.save_params_dir(str(ckpt), params, cfg, {"label_names": ["a", "b", "c"], "eval_size": 64})
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, (h, w) in enumerate([(60, 90), (80, 120)]):  # both resize to 64x96: one compilation
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{i}.jpg")
    records = inference.run_inference(str(ckpt), [str(img_dir)], str(tmp_path / "out"), threshold=0.0, top_k=4)
    assert len(records) == 2
    for rec, (h, w) in zip(records, [(60, 90), (80, 120)]):
        assert (rec["height"], rec["width"]) == (h, w)
        assert np.asarray(Image.open(rec["output"])).shape == (h, w, 3)
        assert len(rec["detections"]) == 4 and {d["name"] for d in rec["detections"]} <= {"a", "b", "c"}
        scores = [d["score"] for d in rec["detections"]]
        assert scores == sorted(scores, reverse=True)




def test_images_are_read_as_the_training_pipeline_decodes_them(tmp_path):
    """Inference and the trainer's drawings read files with PIL; training decodes with TF. They must agree:
    PIL's convert('RGB') clipped 16-bit grey PNGs to white."""
    import io

    import tensorflow as tf

    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (9, 13)).astype(np.uint16)
    grey16[0, :4] = [0, 129, 255, 65535]  # 129: the high byte (0) and rounding (1) differ here
    rgba = rng.integers(0, 256, (9, 13, 4)).astype(np.uint8)
    cases = {"grey16.png": Image.fromarray(grey16), "grey.png": Image.fromarray(grey16.astype(np.uint8)),
             "rgba.png": Image.fromarray(rgba, "RGBA"), "palette.png": Image.fromarray(rgba[..., :3]).convert("P")}
    for name, im in cases.items():
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        (tmp_path / name).write_bytes(buf.getvalue())
        want = tf.io.decode_image(buf.getvalue(), channels=3, expand_animations=False).numpy()
        np.testing.assert_array_equal(inference.read_image_rgb(buf.getvalue()), want, err_msg=name)
        np.testing.assert_array_equal(inference.read_rgb(str(tmp_path / name)), want, err_msg=name)


def test_detector_and_eval_iterator_share_the_transform(tmp_path):
    """Same JPEG, same sizes and pixels from Detector.preprocess (PIL decode) and the eval iterator (TF decode)."""
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


def test_forward_refuses_masks_the_model_cannot_read():
    """The model reads each image's real height and width only (padding bottom/right): a mask padded at the
    top/left, with holes, or under one patch is refused with a clear error instead of silently misread."""
    from yolos_jax import inference

    ok = np.zeros((2, 64, 96), bool)
    ok[0, :48, :80] = True
    ok[1] = True
    inference.check_top_left_mask(ok, 16)
    padded_top = np.roll(ok, 8, axis=1)
    with_hole = ok.copy()
    with_hole[1, 10, 10] = False
    under_a_patch = ok.copy()
    under_a_patch[0] = False
    under_a_patch[0, :8, :40] = True
    for bad, message in [(padded_top, "top-left"), (with_hole, "top-left"), (under_a_patch, "less than one")]:
        with pytest.raises(ValueError, match=message):
            inference.check_top_left_mask(bad, 16)


def test_splash_forward_runs_the_kernel_under_a_one_device_mesh(monkeypatch, splash_calls):
    """attention_impl='splash' (Pallas interpret mode on CPU) with several devices visible: the Detector's forward
    runs under a mesh of the first device (`sharding.single_device_mesh`), so the kernel takes the whole padded
    batch there, inside the mesh's shard_map (on a multi-chip TPU: not the no-mesh fallback, which would warn),
    and gives 'einsum''s outputs. The real kernel's TPU lowering of the same forward has no fallback either."""
    from yolos_jax import attention_tpu

    if jax.device_count() < 2:
        pytest.skip("needs several devices (tests/conftest.py simulates them on CPU)")
    cfg = model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=6, num_classes=4,
                       init_pe_size=(64, 96), mid_pe_size=None).to_dict()
    params = random_params(YOLOS(**cfg), (64, 96), scale=0.3)
    calls = splash_calls  # (images, the mesh axes manual there) of each kernel call traced
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in IMAGE_SIZES]
    einsum = Detector(params, cfg, eval_size=EVAL_SIZE)
    pixel_values, pixel_mask, _ = einsum.preprocess(images)  # a padded batch of 3
    want = einsum.forward(pixel_values, pixel_mask)
    assert not calls
    splash = Detector(params, dict(cfg, attention_impl="splash"), eval_size=EVAL_SIZE)
    with warnings.catch_warnings():
        # the no-mesh fallback's warning would fail the test (only it: a compilation cache that another test
        # process is writing may warn too)
        warnings.filterwarnings("error", message=".*without a mesh in context")
        got = splash.forward(pixel_values, pixel_mask)
    assert calls and set(calls) == {(3, ("data", "fsdp"))}, calls
    for name in ("logits", "boxes", "scores"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(got["labels"], want["labels"])
    # The real kernel (no interpretation): lowered for TPU from this host (no compile) without the fallback.
    monkeypatch.setattr(attention_tpu, "INTERPRET", False)
    bf16 = Detector(params, dict(cfg, attention_impl="splash", dtype="bfloat16"), eval_size=EVAL_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = bf16._forward.trace(bf16.params, pixel_values, pixel_mask).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1  # the two blocks' identical calls share one lowered kernel
