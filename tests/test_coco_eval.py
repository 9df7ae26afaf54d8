"""COCO scoring: post-processing (vs HF and numpy), COCO AP (vs pycocotools directly), label mapping."""

import json

import jax
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from eval_fixtures import make_coco_gt, numpy_postprocess
from yolos_jax import atomic, coco_eval
from yolos_jax.data.labels import LabelMap


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


def test_postprocess_matches_hf_and_numpy():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(0)
    b, q, c = 3, 10, 6
    logits = rng.normal(size=(b, q, c + 1)).astype(np.float32) * 3
    boxes = rng.uniform(0.05, 0.95, size=(b, q, 4)).astype(np.float32)
    orig = np.asarray([[480, 640], [427, 320], [100, 1000]], np.int32)

    scores, labels, xyxy = jax.jit(coco_eval.postprocess)(logits, boxes, orig)
    ref_s, ref_l, ref_b = numpy_postprocess(logits, boxes, orig)
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


def test_ground_truth_as_detections_scores_ap_one():
    gt = make_coco_gt()
    label_map = LabelMap.from_categories(gt["categories"], "contiguous")
    ids, scores, labels, boxes = gt_as_predictions(gt, label_map)
    dets = coco_eval.detections_to_coco(ids, scores, labels, boxes, label_map)
    metrics, table = coco_eval.coco_evaluate(gt, dets)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert metrics[name] == pytest.approx(1.0), (name, metrics)
    assert "Average Precision" in table and len(table.strip().splitlines()) == 12


def test_label_category_mapping_round_trips_non_contiguous_ids():
    gt = make_coco_gt()
    for mode in ("contiguous", "identity"):
        label_map = LabelMap.from_categories(gt["categories"], mode)
        ids, scores, labels, boxes = gt_as_predictions(gt, label_map)
        dets = coco_eval.detections_to_coco(ids, scores, labels, boxes, label_map)
        got = sorted((d["image_id"], d["category_id"], tuple(np.round(d["bbox"], 2))) for d in dets if d["score"] > 0.5)
        want = sorted(
            (a["image_id"], a["category_id"], tuple(np.round(np.float32(a["bbox"]).astype(float), 2)))
            for a in gt["annotations"]
        )
        assert got == want, mode
        assert {d["category_id"] for d in dets} <= {3, 7, 42}
    # Identity mode: labels are the ids themselves; labels no category uses (0, 1, ...) are dropped.
    label_map = LabelMap.from_categories(gt["categories"], "identity")
    dets = coco_eval.detections_to_coco(np.asarray([100]), np.asarray([[0.5, 0.6, 0.7]]),
                                         np.asarray([[0, 7, 42]]), np.zeros((1, 3, 4)), label_map)
    assert [d["category_id"] for d in dets] == [7, 42]


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
    dets = coco_eval.detections_to_coco(np.asarray(ids), scores, labels, boxes, label_map)
    ours, _ = coco_eval.coco_evaluate(gt, dets)

    # pycocotools directly, on files, the standard way.
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    atomic.write_json_atomic(str(det_path), dets)
    coco = COCO(str(gt_path))
    ev = COCOeval(coco, coco.loadRes(str(det_path)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [ours[k] for k in coco_eval.METRIC_NAMES] == [float(s) for s in ev.stats]
    assert 0.2 < ours["AP"] < 0.95  # a real, imperfect score (the comparison is not vacuous)


def test_coco_evaluate_restricts_to_given_images_and_handles_no_detections():
    gt = make_coco_gt()
    label_map = LabelMap.from_categories(gt["categories"], "contiguous")
    ids, scores, labels, boxes = gt_as_predictions(gt, label_map)
    dets = coco_eval.detections_to_coco(ids[:2], scores[:2], labels[:2], boxes[:2], label_map)
    # Only the 2 predicted images are scored (DETR's evaluator does the same): AP stays 1.
    assert coco_eval.coco_evaluate(gt, dets, image_ids=ids[:2])[0]["AP"] == pytest.approx(1.0)
    assert coco_eval.coco_evaluate(gt, dets)[0]["AP"] < 1.0
    empty, _ = coco_eval.coco_evaluate(gt, [])
    assert empty["AP"] == 0.0
    with pytest.raises(ValueError, match="image ids"):
        coco_eval.coco_evaluate(gt, dets, image_ids=[123456])


def test_bad_ground_truth_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        coco_eval.load_coco(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        coco_eval.load_coco(str(bad))
    with pytest.raises(ValueError, match="'annotations'"):
        coco_eval.load_coco({"images": [], "categories": []})
