"""eval.py's logic (`evaluate_checkpoint`): metrics, speed row and COCO-C files of a converted checkpoint; the
runtime fields taken from config.model; on a converted HF checkpoint it equals HF run on each image alone."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from yolos_jax import coco_eval, eval_checkpoint, evaluation, weights
from yolos_jax.config import model_config


def test_eval_command_with_speed_and_robustness(synth, tmp_path):
    """eval.py's logic on a converted tiny checkpoint: metrics, the speed row, COCO-C files."""
    cfg, model, params = synth
    ckpt = tmp_path / "ckpt"
    model_cfg = {f: getattr(model, f) for f in model_config("s").keys()}
    weights.save_params_dir(str(ckpt), jax.tree.map(np.asarray, params), model_cfg, {"variant": "tiny"})
    config = ml_collections.ConfigDict({"input": cfg.to_dict(), "eval": evaluation.default_eval_config().to_dict()})
    config.eval.speed_images = 3
    config.eval.corruptions = "gaussian_noise"
    config.eval.severities = "1,5"
    config.eval.robustness_max_images = 4
    out = tmp_path / "out"
    res = eval_checkpoint.evaluate_checkpoint(config, str(ckpt), str(out), speed=True, robustness=True)
    metrics = json.load(open(out / "metrics.json"))
    assert set(metrics) >= set(coco_eval.METRIC_NAMES)
    assert (metrics["eval_size"], metrics["eval_max_size"]) == (cfg.eval_size, cfg.eval_max_size)  # as scored
    speed = json.load(open(out / "speed.json"))
    assert speed["num_images"] == 3 and speed["model"] == "tiny" and speed["AP"] == res["metrics"]["AP"]
    assert speed["params"] == sum(x.size for x in jax.tree.leaves(params)) and speed["gflops"] > 0
    rob = json.load(open(out / "robustness" / "robustness.json"))
    assert set(rob["per_corruption"]) == {"gaussian_noise"}
    for name in ("gaussian_noise",):
        for sev in (1, 5):
            m = json.load(open(out / "robustness" / name / f"s{sev}" / "metrics.json"))
            assert m["num_images"] == 4
    # The corruption reached the model: heavy noise changes the detections of the same images.
    clean = {(d["image_id"], round(d["score"], 6)) for d in json.load(open(out / "detections.json"))}
    noisy = {(d["image_id"], round(d["score"], 6)) for d in
             json.load(open(out / "robustness" / "gaussian_noise" / "s5" / "detections.json"))}
    assert noisy - clean
    assert rob["mPC"] == pytest.approx(np.mean(list(rob["per_severity"]["gaussian_noise"].values())))


def test_eval_takes_runtime_fields_from_config_model_and_names_the_ignored_ones():
    ckpt = dict(model_config("s", hidden_size=16, depth=1, num_heads=2).to_dict())
    ckpt = {**ckpt, "init_pe_size": (512, 864), "mid_pe_size": (512, 864)}
    cfg = model_config("s", hidden_size=999, depth=1, num_heads=2, dtype="bfloat16", attention_impl="xla")
    overrides, ignored = eval_checkpoint.runtime_overrides(cfg, ckpt)
    assert overrides == {"dtype": "bfloat16", "attention_impl": "xla", "remat": False}
    assert ignored == ["hidden_size"]  # sequence fields compare as tuples (JSON lists do not count as changes)
    assert eval_checkpoint.runtime_overrides(None, ckpt) == ({}, [])


def test_a_checkpoint_made_for_another_eval_size_is_noted_with_the_overrides_that_match_it():
    """A converted YOLOS-Ti records 512 (max 853); scored with yolos_s.py's 800 the note names the fix."""
    from yolos_jax import data

    ti = data.default_input_config("ti")
    s = data.default_input_config("s")
    converted_ti = {"eval_size": 512, "max_size": 853}
    assert eval_checkpoint.eval_size_note(ti, converted_ti) is None
    assert eval_checkpoint.eval_size_note(s, {}) is None  # nothing recorded: nothing to compare
    assert eval_checkpoint.eval_size_note(s, converted_ti) == (
        "note: evaluating at config.input's eval size 800 (max 1333); the checkpoint was made for 512 (max 853): "
        "--config.input.eval_size=512 --config.input.eval_max_size=853 scores it as made")
    assert eval_checkpoint.eval_size_note(ti, {"eval_size": 512, "max_size": None}) is None  # the original's rule


# A tiny HF YOLOS with mid position embeddings on a 4x6 stored grid (64x96 px), 10 [DET] tokens.
_HF_EVAL_CFG = dict(
    hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96, image_size=[64, 96],
    patch_size=16, num_detection_tokens=10, num_labels=3, use_mid_position_embeddings=True,
)


# (h, w, format) of the originals. At eval_size 64 (longest side <= 64 * 1333 // 800 = 106, floored to 16)
# they become 64x64, 64x80, 64x96, 32x96, 80x64, 96x64, 96x48, 80x64; the pipeline designs two canvases for
# them (96x64 and 96x96): one image fills its canvas, the others are smaller in height only (five), in width
# only (96x48) or in both (64x80). The test checks these placements on the batches themselves.
_REAL_LOOKING = [(128, 128, "jpg"), (120, 160, "png"), (100, 150, "jpg"), (90, 240, "png"),
                 (160, 120, "jpg"), (150, 100, "png"), (200, 100, "jpg"), (190, 140, "png")]


_EVAL_SIZE = 64


def _real_looking_image(h, w, rng):
    """Smooth two-colour gradient + a few filled shapes + mild noise, slightly blurred (JPEG-friendly):
    returns (uint8 [h, w, 3], [(x, y, bw, bh), ...] boxes of the shapes)."""
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(rng.uniform(0, np.pi)) * xx / w + np.sin(rng.uniform(0, np.pi)) * yy / h)[..., None]
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    img = Image.fromarray(np.clip(c0 + (c1 - c0) * t, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes = []
    for k in range(int(rng.integers(2, 4))):
        bw, bh = rng.uniform(0.2, 0.5) * w, rng.uniform(0.2, 0.5) * h
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        xy = [int(x), int(y), int(x + bw), int(y + bh)]
        fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
        (draw.ellipse if k % 2 else draw.rectangle)(xy, fill=fill)
        boxes.append((xy[0], xy[1], xy[2] - xy[0], xy[3] - xy[1]))
    img = np.asarray(img.filter(ImageFilter.GaussianBlur(0.8)), np.float32)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return img, boxes


def _detr_eval_hw(h, w, size, max_size):
    """The original's eval size, written independently: hustvl/YOLOS (DETR) get_size_with_aspect_ratio,
    then both sides floored to multiples of 16."""
    lo, hi = float(min(h, w)), float(max(h, w))
    if hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        oh, ow = h, w
    elif w < h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    return oh // 16 * 16, ow // 16 * 16


def _hf_alone(model, image_uint8, target_hw):
    """HF on one un-padded image: PIL bilinear to the original's eval size, ImageNet normalisation, the
    model, HF's post_process_object_detection (all queries, boxes in original-image pixels)."""
    import torch
    from PIL import Image
    from transformers import YolosImageProcessorPil

    oh, ow = target_hw
    x = np.asarray(Image.fromarray(image_uint8).resize((ow, oh), Image.BILINEAR), np.float32) / 255.0
    x = (x - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])))
    h, w = image_uint8.shape[:2]
    res = YolosImageProcessorPil().post_process_object_detection(out, threshold=-1.0, target_sizes=[(h, w)])[0]
    return {k: v.numpy() for k, v in res.items()}


def test_eval_of_a_converted_hf_checkpoint_equals_hf_on_each_image_alone(tmp_path):
    """eval.py's logic (`evaluate_checkpoint`) on a converted HF YOLOS (mid PEs) over a prepared COCO folder of
    real-looking JPEG/PNG images of several aspect ratios, most on canvases larger than themselves: every
    detection of every image equals HF run on that image alone (scores within 1e-4, boxes within 0.01 px)."""
    import reference_models as ref
    import scipy.special
    from PIL import Image

    from yolos_jax import convert, data
    from yolos_jax.data import prepared_dataset

    # The checkpoint: a random O(1) HF model, save_pretrained, converted as convert_torch_weights.py does.
    hf = ref.hf_yolos(_HF_EVAL_CFG, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    convert.convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))

    # The COCO-format folder (non-contiguous category ids; contiguous labels 0..2 = the model's 3 classes).
    rng = np.random.default_rng(0)
    cats = [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}, {"id": 12, "name": "c"}]
    src = tmp_path / "coco"
    (src / "val").mkdir(parents=True)
    (src / "annotations").mkdir()
    images, anns, originals = [], [], {}
    for k, (h, w, fmt) in enumerate(_REAL_LOOKING):
        iid = 1000 + 3 * k
        img, boxes = _real_looking_image(h, w, rng)
        name = f"{iid}.{fmt}"
        Image.fromarray(img).save(src / "val" / name, **({"quality": 90} if fmt == "jpg" else {}))
        originals[iid] = np.asarray(Image.open(src / "val" / name).convert("RGB"))  # decoded by PIL
        images.append({"id": iid, "height": h, "width": w, "file_name": name})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": cats[len(anns) % 3]["id"],
                         "bbox": [float(v) for v in b], "area": float(b[2] * b[3]), "iscrowd": 0})
    with open(src / "annotations" / "instances_val.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    prepared_dataset.prepare(str(tmp_path / "tfds"), "real_looking", source_dir=str(src), splits=["val"], quiet=True)

    input_cfg = data.default_input_config("s")
    input_cfg.update(data_dir=str(tmp_path / "tfds"), dataset_name="real_looking", source_dir=str(src),
                     train_split="val", val_split="val", label_mode="contiguous", eval_size=_EVAL_SIZE,
                     eval_num_canvases=2, eval_batch_size=3)
    config = ml_collections.ConfigDict({"input": input_cfg.to_dict(),
                                        "eval": evaluation.default_eval_config().to_dict()})
    config.eval.eval_size = _EVAL_SIZE
    eval_checkpoint.evaluate_checkpoint(config, str(tmp_path / "ckpt"), str(tmp_path / "out"))
    dets = json.load(open(tmp_path / "out" / coco_eval.DETECTIONS_FILE))

    # Where the pipeline put each image: its canvas vs its own eval size (the same batches eval ran on).
    max_size = _EVAL_SIZE * 1333 // 800
    placed = {}  # image id -> (canvas hw, image row, pixel mask)
    for batch in data.make_eval_iterator(config.input):
        for i in np.flatnonzero(batch["valid"]):
            placed[int(batch["image_id"][i])] = (batch["image"].shape[1:3], batch["image"][i], batch["pixel_mask"][i])
    assert sorted(placed) == sorted(originals)
    kinds = set()
    for iid, (canvas, _, mask) in placed.items():
        h, w = originals[iid].shape[:2]
        own = _detr_eval_hw(h, w, _EVAL_SIZE, max_size)
        assert (mask.any(1).sum(), mask.any(0).sum()) == own, iid  # the pipeline's size is the original's
        kinds.add((canvas[0] > own[0], canvas[1] > own[1]))
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}, kinds

    cat_of_label = [c["id"] for c in sorted(cats, key=lambda c: c["id"])]
    assert len({d["category_id"] for d in dets}) > 1  # the label -> category mapping is exercised
    q = _HF_EVAL_CFG["num_detection_tokens"]
    worst = {"score": 0.0, "box": 0.0}
    padded_worst = {}
    for iid, img in originals.items():
        h, w = img.shape[:2]
        want = _hf_alone(hf, img, _detr_eval_hw(h, w, _EVAL_SIZE, max_size))
        got = [d for d in dets if d["image_id"] == iid]  # detections.json: image then query order
        assert len(got) == q == len(want["scores"]), iid
        assert [d["category_id"] for d in got] == [cat_of_label[lab] for lab in want["labels"]], iid
        got_xyxy = np.asarray([[x, y, x + bw, y + bh] for x, y, bw, bh in (d["bbox"] for d in got)])
        worst["score"] = max(worst["score"], ref.max_abs([d["score"] for d in got], want["scores"]))
        worst["box"] = max(worst["box"], ref.max_abs(got_xyxy, want["boxes"]))
        # The test can fail: the old behaviour (the image on its canvas, positions resized to the canvas's
        # grid, padding masked as keys; float64) departs from HF alone on the images on larger canvases.
        canvas, image, mask = placed[iid]
        old = ref.numpy_yolos(hf, image[None].astype(np.float64), mask[None])
        prob = scipy.special.softmax(old["logits"][0], axis=-1)[:, :-1]
        cx, cy, bw, bh = old["boxes"][0].T
        old_xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * [w, h, w, h]
        padded = tuple(canvas) != (int(mask.any(1).sum()), int(mask.any(0).sum()))
        padded_worst[iid] = (padded, ref.max_abs(prob.max(-1), want["scores"]), ref.max_abs(old_xyxy, want["boxes"]))
    print(f"eval vs HF alone: max |score diff| {worst['score']:.3g}, max |box diff| {worst['box']:.3g} px; "
          f"old (canvas-grid PEs) per image (padded, score, box px): {padded_worst}")
    assert worst["score"] <= 1e-4 and worst["box"] <= 0.01, worst
    for iid, (padded, ds, db) in padded_worst.items():
        if not padded:  # filling its canvas, the old behaviour was already right
            assert ds <= 1e-4 and db <= 0.01, (iid, ds, db)
    assert max(db for padded, _, db in padded_worst.values() if padded) > 0.5, padded_worst
