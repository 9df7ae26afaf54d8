"""Evaluation: post-processing (vs HF and numpy), COCO scoring (vs pycocotools directly), label mapping,
the Evaluator end to end on a generated COCO-format set (one device and an 8-device mesh), speed/FLOPs, and
eval.py's logic on a converted HF checkpoint against HF run on each image alone (padded batches)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from yolos_jax import atomic, evaluation
from yolos_jax.config import model_config
from yolos_jax.data.labels import LabelMap
from yolos_jax.yolos import YOLOS

# Non-contiguous category ids on purpose (the mapping must round-trip through them).
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "disk"}, {"id": 42, "name": "triangle"}]


def make_coco_gt(num_images=6, seed=0):
    """A COCO-format ground truth with small, medium and large boxes of 3 non-contiguous categories."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    aid = 1
    for k in range(num_images):
        iid = 100 + 7 * k  # non-contiguous image ids too
        h, w = (480, 640) if k % 2 == 0 else (427, 320)
        images.append({"id": iid, "height": h, "width": w, "file_name": f"{iid}.jpg"})
        for side in (20, 60, 150, 250)[: 2 + k % 3]:  # < 32^2, 32^2..96^2, > 96^2 areas
            bw, bh = side * rng.uniform(0.8, 1.2), side * rng.uniform(0.8, 1.2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"]
            anns.append({"id": aid, "image_id": iid, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
            aid += 1
    return {"images": images, "annotations": anns, "categories": CATEGORIES}


def gt_as_predictions(gt, label_map, q=8):
    """The ground truth in the evaluator's prediction layout: [N, Q] with GT in the first slots."""
    n = len(gt["images"])
    ids = np.asarray([im["id"] for im in gt["images"]], np.int64)
    scores = np.zeros((n, q), np.float32)
    labels = np.zeros((n, q), np.int32)
    boxes = np.zeros((n, q, 4), np.float32)
    for i, iid in enumerate(ids):
        objs = [a for a in gt["annotations"] if a["image_id"] == iid]
        for j, a in enumerate(objs):
            x, y, w, h = a["bbox"]
            boxes[i, j] = (x, y, x + w, y + h)
            labels[i, j] = label_map.to_label(a["category_id"])
            scores[i, j] = 0.9 + 0.01 * j
        # The remaining slots: low-score boxes far from every object (ranked after every true positive).
        for j in range(len(objs), q):
            boxes[i, j] = (0, 0, 5, 5)
            labels[i, j] = j % label_map.num_classes
            scores[i, j] = 0.01
    return ids, scores, labels, boxes


# --------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------


def _numpy_postprocess(logits, boxes, orig_size):
    """float64 reference of DETR's PostProcess."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p = p[..., :-1]
    cx, cy, w, h = np.moveaxis(boxes.astype(np.float64), -1, 0)
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    hh, ww = orig_size[:, 0].astype(np.float64), orig_size[:, 1].astype(np.float64)
    return p.max(-1), p.argmax(-1), xyxy * np.stack([ww, hh, ww, hh], -1)[:, None]


def test_postprocess_matches_hf_and_numpy():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    b, q, c = 3, 10, 6
    logits = rng.normal(size=(b, q, c + 1)).astype(np.float32) * 3
    boxes = rng.uniform(0.05, 0.95, size=(b, q, 4)).astype(np.float32)
    orig = np.asarray([[480, 640], [427, 320], [100, 1000]], np.int32)

    scores, labels, xyxy = jax.jit(evaluation.postprocess)(logits, boxes, orig)
    ref_s, ref_l, ref_b = _numpy_postprocess(logits, boxes, orig)
    np.testing.assert_allclose(np.asarray(scores), ref_s, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(labels), ref_l)
    np.testing.assert_allclose(np.asarray(xyxy), ref_b, rtol=1e-5, atol=1e-3)

    class Out:  # what HF's post-processing reads from YolosObjectDetectionOutput
        pass

    out = Out()
    out.logits, out.pred_boxes = torch.from_numpy(logits), torch.from_numpy(boxes)
    proc = transformers.YolosImageProcessorPil()
    hf = proc.post_process_object_detection(out, threshold=0.0, target_sizes=torch.from_numpy(orig))
    for i in range(b):
        assert len(hf[i]["scores"]) == q  # threshold 0 keeps every [DET] token, as we do
        np.testing.assert_allclose(np.asarray(scores[i]), hf[i]["scores"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(labels[i]), hf[i]["labels"].numpy())
        np.testing.assert_allclose(np.asarray(xyxy[i]), hf[i]["boxes"].numpy(), rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# COCO scoring and label mapping
# --------------------------------------------------------------------------------------------------


def test_ground_truth_as_detections_scores_ap_one():
    gt = make_coco_gt()
    label_map = LabelMap.from_categories(gt["categories"], "contiguous")
    ids, scores, labels, boxes = gt_as_predictions(gt, label_map)
    dets = evaluation.detections_to_coco(ids, scores, labels, boxes, label_map)
    metrics, table = evaluation.coco_evaluate(gt, dets)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[name] == pytest.approx(1.0), (name, metrics)
    assert "Average Precision" in table and len(table.strip().splitlines()) == 12


def test_label_category_mapping_round_trips_non_contiguous_ids():
    gt = make_coco_gt()
    for mode in ("contiguous", "identity"):
        label_map = LabelMap.from_categories(gt["categories"], mode)
        ids, scores, labels, boxes = gt_as_predictions(gt, label_map)
        dets = evaluation.detections_to_coco(ids, scores, labels, boxes, label_map)
        got = sorted((d["image_id"], d["category_id"], tuple(np.round(d["bbox"], 2))) for d in dets if d["score"] > 0.5)
        want = sorted(
            (a["image_id"], a["category_id"], tuple(np.round(np.float32(a["bbox"]).astype(float), 2)))
            for a in gt["annotations"]
        )
        assert got == want, mode
        assert {d["category_id"] for d in dets} <= {3, 7, 42}
    # Identity mode: labels are the ids themselves; labels no category uses (0, 1, ...) are dropped.
    label_map = LabelMap.from_categories(gt["categories"], "identity")
    dets = evaluation.detections_to_coco(np.asarray([100]), np.asarray([[0.5, 0.6, 0.7]]),
                                         np.asarray([[0, 7, 42]]), np.zeros((1, 3, 4)), label_map)
    assert [d["category_id"] for d in dets] == [7, 42]


def test_check_label_map_refuses_a_checkpoint_whose_labels_mean_other_categories():
    cats = make_coco_gt()["categories"]  # ids 3, 7, 42
    contiguous, identity = (LabelMap.from_categories(cats, m) for m in ("contiguous", "identity"))
    meta = {"label_map": contiguous.to_dict(), "dataset": {"dataset_name": "mine", "data_dir": "/d",
                                                            "label_mode": "contiguous"}}
    evaluation.check_label_map(contiguous, 3, meta)
    evaluation.check_label_map(identity, 91, {})  # converted checkpoints record no label map: not checked
    with pytest.raises(ValueError, match=r"num_classes=3"):
        evaluation.check_label_map(identity, 3, meta)
    with pytest.raises(ValueError, match=r"category_id 3 is label 3 here \(identity mode\) but was label 0") as e:
        evaluation.check_label_map(identity, 91, meta)
    assert "dataset 'mine' in /d with input.label_mode='contiguous'" in str(e.value)


def _perturbed(gt, rng):
    """Jittered, re-scored, sometimes mislabelled detections plus false positives and misses."""
    dets = []
    cats = [c["id"] for c in gt["categories"]]
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue  # missed
        x, y, w, h = a["bbox"]
        jit = rng.normal(scale=0.08, size=4) * np.asarray([w, h, w, h])
        cat = a["category_id"] if rng.random() > 0.2 else int(rng.choice(cats))
        dets.append((a["image_id"], cat, [x + jit[0], y + jit[1], w + jit[2], h + jit[3]], rng.uniform(0.2, 1)))
    for im in gt["images"]:
        for _ in range(3):
            w, h = rng.uniform(10, 200, size=2)
            x, y = rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h)
            dets.append((im["id"], int(rng.choice(cats)), [x, y, w, h], rng.uniform(0, 0.8)))
    return dets


def test_perturbed_detections_give_exactly_pycocotools_ap(tmp_path):
    gt = make_coco_gt(num_images=8, seed=1)
    label_map = LabelMap.from_categories(gt["categories"], "contiguous")
    raw = _perturbed(gt, np.random.default_rng(2))
    # Into the evaluator's prediction layout ([N, Q], padded slots with labels no category can take are
    # impossible in contiguous mode, so pad with zero-score boxes that pycocotools also sees).
    ids = [im["id"] for im in gt["images"]]
    q = max(sum(1 for d in raw if d[0] == i) for i in ids)
    scores = np.zeros((len(ids), q), np.float32)
    labels = np.zeros((len(ids), q), np.int32)
    boxes = np.zeros((len(ids), q, 4), np.float32)
    for i, iid in enumerate(ids):
        for j, (_, cat, (x, y, w, h), s) in enumerate(d for d in raw if d[0] == iid):
            scores[i, j], labels[i, j], boxes[i, j] = s, label_map.to_label(cat), (x, y, x + w, y + h)
    dets = evaluation.detections_to_coco(np.asarray(ids), scores, labels, boxes, label_map)
    ours, _ = evaluation.coco_evaluate(gt, dets)

    # pycocotools directly, on files, the standard way.
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    atomic.write_json_atomic(str(det_path), dets)
    coco = COCO(str(gt_path))
    ev = COCOeval(coco, coco.loadRes(str(det_path)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [ours[k] for k in evaluation.METRIC_NAMES] == [float(s) for s in ev.stats]
    assert 0.2 < ours["AP"] < 0.95  # a real, imperfect score (the comparison is not vacuous)


def test_coco_evaluate_restricts_to_given_images_and_handles_no_detections():
    gt = make_coco_gt()
    label_map = LabelMap.from_categories(gt["categories"], "contiguous")
    ids, scores, labels, boxes = gt_as_predictions(gt, label_map)
    dets = evaluation.detections_to_coco(ids[:2], scores[:2], labels[:2], boxes[:2], label_map)
    # Only the 2 predicted images are scored (DETR's evaluator does the same): AP stays 1.
    assert evaluation.coco_evaluate(gt, dets, image_ids=ids[:2])[0]["AP"] == pytest.approx(1.0)
    assert evaluation.coco_evaluate(gt, dets)[0]["AP"] < 1.0
    empty, _ = evaluation.coco_evaluate(gt, [])
    assert empty["AP"] == 0.0
    with pytest.raises(ValueError, match="image ids"):
        evaluation.coco_evaluate(gt, dets, image_ids=[123456])


def test_bad_ground_truth_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.load_coco(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        evaluation.load_coco(str(bad))
    with pytest.raises(ValueError, match="'annotations'"):
        evaluation.load_coco({"images": [], "categories": []})


def test_write_json_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "out" / "m.json"
    atomic.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        atomic.write_json_atomic(str(path), {"a": object()})  # not serialisable: fails mid-write
    assert json.loads(path.read_text()) == {"a": 1}  # the previous file is intact
    assert os.listdir(path.parent) == ["m.json"]  # and no temp file is left behind


# --------------------------------------------------------------------------------------------------
# Speed / FLOPs
# --------------------------------------------------------------------------------------------------


def random_params(model, image_hw, seed=0, scale=0.05):
    """Random params of `model` without running its initialisers (eval_shape only: no compilation)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *image_hw, 3)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=scale, size=s.shape).astype(np.float32)), shapes)


def _analytic_macs(cfg, h, w):
    """Multiply-adds of the YOLOS forward (matmuls and the patch convolution only)."""
    d, p, q, c = cfg.hidden_size, cfg.patch_size, cfg.num_det_tokens, cfg.num_classes
    mlp = cfg.mlp_dim or 4 * d
    n = (h // p) * (w // p)
    t = 1 + n + q
    macs = n * p * p * 3 * d
    macs += cfg.depth * (t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * mlp)
    macs += q * (2 * d * d + d * (c + 1)) + q * (2 * d * d + d * 4)
    return macs


def test_speed_protocol_flops_match_analytic_count():
    # Default (fused/chunked) attention: at 345 tokens XLA's own count of that path misses attention FLOPs,
    # so this also checks that the protocol counts on explicit matmuls.
    cfg = model_config("s", hidden_size=32, depth=1, num_heads=2, num_det_tokens=8, num_classes=5,
                       init_pe_size=(64, 96), mid_pe_size=None)
    model = YOLOS(**cfg.to_dict())
    params = random_params(model, (64, 96))
    rng = np.random.default_rng(0)
    shapes = [(256, 336), (256, 336)]
    images = [rng.normal(size=(1, h, w, 3)).astype(np.float32) for h, w in shapes]
    res = evaluation.measure_speed(model, params, images, warmup=1, repeats=1)
    macs = np.mean([_analytic_macs(cfg, h, w) for h, w in shapes])
    # XLA counts 2 FLOPs per multiply-add; softmax, LayerNorm, GELU and adds are a few percent on top.
    assert 1.0 <= res["xla_gflops"] * 1e9 / (2 * macs) < 1.15, (res, macs)
    assert res["gflops"] == pytest.approx(res["xla_gflops"] / 2)
    assert res["params"] == sum(x.size for x in jax.tree.leaves(params))
    assert res["num_images"] == 2 and res["num_shapes"] == 1 and res["fps"] > 0
    table = evaluation.speed_table([{"model": "tiny", "size": 64, "AP": 0.123, **res}])
    assert "12.3" in table and "tiny" in table and "64 x *" in table


# --------------------------------------------------------------------------------------------------
# The Evaluator end to end on a generated COCO-format set (the data pipeline's synthetic shapes)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """(input config, tiny YOLOS, random params) over a prepared synthetic set of 10 val images."""
    from yolos_jax import data

    # The same root as test_visualize's fixture: one preparation per session.
    cfg = data.synthetic_input_config(str(tmp_path_factory.getbasetemp() / "synth_eval"), num_train=4, num_val=10)
    label_map = data.dataset_info(cfg).label_map
    model = YOLOS(**model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=6,
                                 num_classes=label_map.num_classes, init_pe_size=(64, 96), mid_pe_size=None).to_dict())
    return cfg, model, random_params(model, (64, 96), scale=0.3)


def _by_image(pred):
    order = np.argsort(pred["image_id"])
    return {k: np.asarray(v)[order] for k, v in pred.items()}


def test_evaluator_end_to_end_matches_direct_computation(synth, tmp_path):
    from yolos_jax import data

    cfg, model, params = synth
    ev = evaluation.Evaluator(evaluation.default_eval_config(), cfg, model)
    metrics = ev.run(params, str(tmp_path))
    pred = _by_image(ev.predict(params))
    gt_path = data.coco_ground_truth(cfg)
    gt = json.load(open(gt_path))
    assert sorted(pred["image_id"].tolist()) == sorted(im["id"] for im in gt["images"])  # each image once

    # Independent: the model on the pipeline's batches + the float64 numpy post-processing.
    fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
    for batch in data.make_eval_iterator(cfg):
        out = fwd(params, batch["image"], batch["pixel_mask"])
        s, l, b = _numpy_postprocess(np.asarray(out["logits"]), np.asarray(out["boxes"]), batch["orig_size"])
        for i in np.flatnonzero(batch["valid"]):
            row = int(np.searchsorted(pred["image_id"], batch["image_id"][i]))
            np.testing.assert_allclose(pred["scores"][row], s[i], rtol=1e-4, atol=1e-6)
            np.testing.assert_array_equal(pred["labels"][row], l[i])
            np.testing.assert_allclose(pred["boxes"][row], b[i], rtol=1e-4, atol=1e-2)

    # The files: detections.json holds all Q detections per image with category ids; metrics.json equals
    # pycocotools run directly on those two files.
    dets = json.load(open(tmp_path / evaluation.DETECTIONS_FILE))
    assert len(dets) == len(gt["images"]) * model.num_det_tokens == metrics["num_detections"]
    assert {d["category_id"] for d in dets} <= {c["id"] for c in gt["categories"]}
    coco = COCO(gt_path)
    direct = COCOeval(coco, coco.loadRes(str(tmp_path / evaluation.DETECTIONS_FILE)), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    saved = json.load(open(tmp_path / evaluation.METRICS_FILE))
    assert [saved[k] for k in evaluation.METRIC_NAMES] == [float(v) for v in direct.stats]
    assert saved == metrics and metrics["num_images"] == len(gt["images"])


def test_ground_truth_through_the_evaluator_scores_ap_one(synth, tmp_path):
    """The prepared split's ground truth (with crowd objects, which COCOeval ignores) as predictions."""
    cfg, model, _ = synth
    ev = evaluation.Evaluator(evaluation.default_eval_config(), cfg, model)
    gt = ev.coco_gt.dataset
    ids = [im["id"] for im in gt["images"]]
    q = max(sum(1 for a in gt["annotations"] if a["image_id"] == i) for i in ids)
    pred = evaluation.Predictions(image_id=np.asarray(ids), scores=np.zeros((len(ids), q), np.float32),
                                  labels=np.zeros((len(ids), q), np.int32), boxes=np.zeros((len(ids), q, 4), np.float32))
    assert any(a["iscrowd"] for a in gt["annotations"])
    for r, iid in enumerate(ids):
        for j, a in enumerate(a for a in gt["annotations"] if a["image_id"] == iid and not a["iscrowd"]):
            x, y, w, h = a["bbox"]
            pred["boxes"][r, j] = (x, y, x + w, y + h)
            pred["labels"][r, j] = ev.label_map.to_label(a["category_id"])
            pred["scores"][r, j] = 1.0
    metrics = ev.score(pred, str(tmp_path))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    assert json.load(open(tmp_path / evaluation.METRICS_FILE))["AP50"] == pytest.approx(1.0)


def test_evaluator_on_an_8_device_mesh_equals_one_device(synth):
    from yolos_jax import sharding

    cfg, model, params = synth
    one = _by_image(evaluation.Evaluator(evaluation.default_eval_config(), cfg, model).predict(params))
    cfg8 = ml_collections.ConfigDict(cfg.to_dict())
    cfg8.eval_batch_size = 8
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    assert mesh.devices.size == 8
    ev8 = evaluation.Evaluator(evaluation.default_eval_config(), cfg8, model, mesh=mesh)
    eight = _by_image(ev8.predict(evaluation.place_params(params, mesh)))
    np.testing.assert_array_equal(eight["image_id"], one["image_id"])
    np.testing.assert_array_equal(eight["labels"], one["labels"])
    np.testing.assert_allclose(eight["scores"], one["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight["boxes"], one["boxes"], rtol=1e-5, atol=1e-3)
    # An eval batch smaller than the mesh (4 images on 8 devices) is padded with fillers: same result.
    cfg8.eval_batch_size = 4
    four = _by_image(evaluation.Evaluator(evaluation.default_eval_config(), cfg8, model, mesh=mesh).predict(
        evaluation.place_params(params, mesh)))
    np.testing.assert_array_equal(four["image_id"], one["image_id"])
    np.testing.assert_allclose(four["scores"], one["scores"], rtol=1e-5, atol=1e-6)


def test_eval_resamples_on_host_even_with_resize_on_device(synth):
    """input.resize_on_device speeds up training only: evaluation keeps the one eval transform (the original's
    PIL resize on the host), so its batches are the same with the setting on."""
    cfg, _, _ = synth
    dev_cfg = ml_collections.ConfigDict(cfg.to_dict())
    dev_cfg.resize_on_device = "on"
    from yolos_jax import data

    host = next(iter(data.make_eval_iterator(cfg)))
    dev = next(iter(data.make_eval_iterator(dev_cfg)))
    assert "image" in dev and "source_image" not in dev
    for k in host:
        np.testing.assert_array_equal(dev[k], host[k])


def test_eval_command_with_speed_and_robustness(synth, tmp_path):
    """eval.py's logic on a converted tiny checkpoint: metrics, the speed row, COCO-C files."""
    from yolos_jax import convert

    cfg, model, params = synth
    ckpt = tmp_path / "ckpt"
    model_cfg = {f: getattr(model, f) for f in model_config("s").keys()}
    convert.save_params_dir(str(ckpt), jax.tree.map(np.asarray, params), model_cfg, {"variant": "tiny"})
    config = ml_collections.ConfigDict({"input": cfg.to_dict(), "eval": evaluation.default_eval_config().to_dict()})
    config.eval.speed_images = 3
    config.eval.corruptions = "gaussian_noise"
    config.eval.severities = "1,5"
    config.eval.robustness_max_images = 4
    out = tmp_path / "out"
    res = evaluation.evaluate_checkpoint(config, str(ckpt), str(out), speed=True, robustness=True)
    assert set(json.load(open(out / "metrics.json"))) >= set(evaluation.METRIC_NAMES)
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


# One process of a 2-process evaluation on localhost (4 CPU devices each): every process reads its own
# half of each eval batch; process 0 scores and writes.
_WORKER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, cfg_json, ckpt, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import ml_collections
from yolos_jax import evaluation, sharding
cfg = ml_collections.ConfigDict(json.loads(cfg_json))
params, model, _ = evaluation.load_model(ckpt)
mesh = sharding.make_mesh(sharding.default_mesh_config())
ev = evaluation.Evaluator(evaluation.default_eval_config(), cfg, model, mesh=mesh)
assert len(ev.batches()) == 2  # 10 images in global batches of 8; each process reads 4 of every 8
metrics = ev.run(evaluation.place_params(params, mesh), out, verbose=False)
print("METRICS " + json.dumps(metrics), flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_equal_one(synth, tmp_path):
    import socket
    import subprocess
    import sys

    from yolos_jax import convert

    cfg, model, params = synth
    ckpt = tmp_path / "ckpt"
    convert.save_params_dir(str(ckpt), jax.tree.map(np.asarray, params),
                            {f: getattr(model, f) for f in model_config("s").keys()})
    cfg8 = ml_collections.ConfigDict(cfg.to_dict())
    cfg8.eval_batch_size = 8
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), str(port), cfg8.to_json(), str(ckpt),
                               str(tmp_path / f"out{i}")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    one = evaluation.Evaluator(evaluation.default_eval_config(), cfg, model).run(params, str(tmp_path / "one"),
                                                                                 verbose=False)
    logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    got = [json.loads(next(line for line in log.splitlines() if line.startswith("METRICS "))[8:]) for log in logs]
    assert got[0] == got[1]  # every process returns process 0's metrics
    for k in evaluation.METRIC_NAMES:
        assert got[0][k] == pytest.approx(one[k], abs=1e-6), k
    assert got[0]["num_images"] == one["num_images"] == 10
    assert not (tmp_path / "out1").exists()  # only process 0 writes

    def key(d):
        return d["image_id"], d["category_id"], round(d["score"], 5), tuple(np.round(d["bbox"], 2))

    multi = sorted(map(key, json.load(open(tmp_path / "out0" / evaluation.DETECTIONS_FILE))))
    single = sorted(map(key, json.load(open(tmp_path / "one" / evaluation.DETECTIONS_FILE))))
    assert len(multi) == len(single) == 10 * model.num_det_tokens
    assert [m[:2] for m in multi] == [s[:2] for s in single]
    np.testing.assert_allclose([m[2] for m in multi], [s[2] for s in single], atol=2e-5)


def test_load_model_from_a_training_workdir_and_a_converted_dir(tmp_path):
    """eval.py --workdir (the trainer's checkpoints) and --checkpoint (converted) give the same model."""
    from yolos_jax import checkpointing, convert

    cfg = model_config("s", hidden_size=16, depth=1, num_heads=2, num_det_tokens=3, num_classes=4,
                       init_pe_size=(32, 48), mid_pe_size=(32, 48))
    model = YOLOS(**cfg.to_dict())
    params = jax.tree.map(np.asarray, random_params(model, (32, 48)))
    ckpt_cfg = checkpointing.default_checkpoint_config()
    ckpt_cfg.async_save = False
    ck = checkpointing.Checkpointer(str(tmp_path / "work"), ckpt_cfg)
    state = {"params": params, "step": np.int32(7), "opt_state": {"mu": np.zeros(3, np.float32)},
             "rng": np.zeros(2, np.uint32)}
    ck.save(7, state, {"epoch": 0, "batch": 7}, ml_collections.ConfigDict({"model": cfg.to_dict()}))
    ck.close()
    convert.save_params_dir(str(tmp_path / "conv"), params, cfg.to_dict())
    for path in (tmp_path / "work", tmp_path / "conv"):
        got, got_model, _ = evaluation.load_model(str(path))
        assert got_model == model, path
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluation.load_model(str(tmp_path / "nothing"))
    # '{workdir}' in the data paths (configs/demo.py) resolves to the workdir of any of its checkpoints,
    # before anything is generated; a converted checkpoint has no workdir, and a wrong path says so first.
    from yolos_jax import trainer

    input_cfg = ml_collections.ConfigDict({"data_dir": "{workdir}/data/tfds", "source_dir": "{workdir}/data/src"})
    for path in (tmp_path / "work", tmp_path / "work" / "checkpoints", tmp_path / "work" / "checkpoints" / "7"):
        got = trainer.input_config_for_checkpoint(input_cfg, str(path))
        assert got.data_dir == f"{tmp_path / 'work'}/data/tfds" and got.source_dir == f"{tmp_path / 'work'}/data/src"
    assert trainer.input_config_for_checkpoint(input_cfg, str(tmp_path / "conv"), "/w").data_dir == "/w/data/tfds"
    with pytest.raises(ValueError, match="not inside a training workdir: pass --workdir"):
        trainer.input_config_for_checkpoint(input_cfg, str(tmp_path / "conv"))
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        trainer.input_config_for_checkpoint(input_cfg, str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()


def test_eval_takes_runtime_fields_from_config_model_and_names_the_ignored_ones():
    ckpt = dict(model_config("s", hidden_size=16, depth=1, num_heads=2).to_dict())
    ckpt = {**ckpt, "init_pe_size": (512, 864), "mid_pe_size": (512, 864)}
    cfg = model_config("s", hidden_size=999, depth=1, num_heads=2, dtype="bfloat16", attention_impl="xla")
    overrides, ignored = evaluation.runtime_overrides(cfg, ckpt)
    assert overrides == {"dtype": "bfloat16", "attention_impl": "xla", "remat": False}
    assert ignored == ["hidden_size"]  # sequence fields compare as tuples (JSON lists do not count as changes)
    assert evaluation.runtime_overrides(None, ckpt) == ({}, [])


def test_resuming_a_workdir_with_another_model_is_refused_naming_the_fields(tmp_path):
    from yolos_jax import checkpointing, trainer

    cfg = model_config("s", hidden_size=16, depth=1, num_heads=2, num_det_tokens=3, num_classes=4,
                       init_pe_size=(32, 48), mid_pe_size=(32, 48))
    params = jax.tree.map(np.asarray, random_params(YOLOS(**cfg.to_dict()), (32, 48)))
    ckpt_cfg = checkpointing.default_checkpoint_config()
    ckpt_cfg.async_save = False
    ck = checkpointing.Checkpointer(str(tmp_path / "work"), ckpt_cfg)
    ck.save(3, {"params": params, "step": np.int32(3), "opt_state": {}, "rng": np.zeros(2, np.uint32)},
            {"epoch": 0, "batch": 3}, ml_collections.ConfigDict({"model": cfg.to_dict()}))
    ck.close()
    runtime_only = ml_collections.ConfigDict(dict(cfg.to_dict(), dtype="bfloat16", remat=True))
    trainer.check_resumable_model(ck.directory, runtime_only)
    wider = ml_collections.ConfigDict(dict(cfg.to_dict(), hidden_size=32))
    with pytest.raises(ValueError, match="shapes differ.*hidden_size: 16 in the checkpoints, 32 now.*another --workdir"):
        trainer.check_resumable_model(ck.directory, wider)
    later_det = ml_collections.ConfigDict(dict(cfg.to_dict(), drop_path_rate=0.1))  # same shapes, other model
    with pytest.raises(ValueError, match="computed differently.*drop_path_rate: 0.0 in the checkpoints, 0.1 now"):
        trainer.check_resumable_model(ck.directory, later_det)


# --------------------------------------------------------------------------------------------------
# eval.py on a converted HF checkpoint == HF on each image alone (batch-invariance, issue 14)
# --------------------------------------------------------------------------------------------------

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
    evaluation.evaluate_checkpoint(config, str(tmp_path / "ckpt"), str(tmp_path / "out"))
    dets = json.load(open(tmp_path / "out" / evaluation.DETECTIONS_FILE))

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
