"""The Evaluator end to end on a generated COCO-format set (one device, an 8-device mesh, two processes; the
splash attention kernel under its mesh), and the label-map check of a checkpoint against the dataset."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import train_fixtures
from eval_fixtures import make_coco_gt, numpy_postprocess
from yolos_jax import coco_eval, evaluation, weights
from yolos_jax.config import model_config
from yolos_jax.data.labels import LabelMap


# --------------------------------------------------------------------------------------------------
# COCO scoring and label mapping
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The Evaluator end to end on a generated COCO-format set (the data pipeline's synthetic shapes)
# --------------------------------------------------------------------------------------------------


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
        s, l, b = numpy_postprocess(np.asarray(out["logits"]), np.asarray(out["boxes"]), batch["orig_size"])
        for i in np.flatnonzero(batch["valid"]):
            row = int(np.searchsorted(pred["image_id"], batch["image_id"][i]))
            np.testing.assert_allclose(pred["scores"][row], s[i], rtol=1e-4, atol=1e-6)
            np.testing.assert_array_equal(pred["labels"][row], l[i])
            np.testing.assert_allclose(pred["boxes"][row], b[i], rtol=1e-4, atol=1e-2)

    # The files: detections.json holds all Q detections per image with category ids; metrics.json equals
    # pycocotools run directly on those two files.
    dets = json.load(open(tmp_path / coco_eval.DETECTIONS_FILE))
    assert len(dets) == len(gt["images"]) * model.num_det_tokens == metrics["num_detections"]
    assert {d["category_id"] for d in dets} <= {c["id"] for c in gt["categories"]}
    coco = COCO(gt_path)
    direct = COCOeval(coco, coco.loadRes(str(tmp_path / coco_eval.DETECTIONS_FILE)), "bbox")
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    saved = json.load(open(tmp_path / coco_eval.METRICS_FILE))
    assert [saved[k] for k in coco_eval.METRIC_NAMES] == [float(v) for v in direct.stats]
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
    assert json.load(open(tmp_path / coco_eval.METRICS_FILE))["AP50"] == pytest.approx(1.0)


def test_evaluator_on_an_8_device_mesh_equals_one_device(synth):
    from yolos_jax import sharding

    cfg, model, params = synth
    one = _by_image(evaluation.Evaluator(evaluation.default_eval_config(), cfg, model).predict(params))
    cfg8 = ml_collections.ConfigDict(cfg.to_dict())
    cfg8.eval_batch_size = 8
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    assert mesh.devices.size == 8
    ev8 = evaluation.Evaluator(evaluation.default_eval_config(), cfg8, model, mesh=mesh)
    eight = _by_image(ev8.predict(ev8.place(params)))
    np.testing.assert_array_equal(eight["image_id"], one["image_id"])
    np.testing.assert_array_equal(eight["labels"], one["labels"])
    np.testing.assert_allclose(eight["scores"], one["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight["boxes"], one["boxes"], rtol=1e-5, atol=1e-3)
    # An eval batch smaller than the mesh (4 images on 8 devices) is padded with fillers: same result.
    cfg8.eval_batch_size = 4
    four = _by_image(evaluation.Evaluator(evaluation.default_eval_config(), cfg8, model, mesh=mesh).predict(
        ev8.place(params)))
    np.testing.assert_array_equal(four["image_id"], one["image_id"])
    np.testing.assert_allclose(four["scores"], one["scores"], rtol=1e-5, atol=1e-6)


def test_splash_predict_runs_the_kernel_under_the_mesh(synth, monkeypatch, splash_calls):
    """attention_impl='splash' (Pallas interpret mode on CPU): on an 8-device mesh each device runs the kernel
    on its own image; with no mesh (one device of the 8) predict runs under a mesh of that device, so the
    kernel takes the whole batch there (on a multi-chip TPU: not the no-mesh fallback). Both predict what
    'einsum' does."""
    from yolos_jax import sharding

    cfg, model, params = synth
    cfg8 = ml_collections.ConfigDict(cfg.to_dict())
    cfg8.eval_batch_size = 8
    calls = splash_calls  # (images, the mesh axes manual there) of each kernel call traced

    def predict(impl, mesh):
        ev = evaluation.Evaluator(evaluation.default_eval_config(), cfg8, model.clone(attention_impl=impl), mesh=mesh)
        return _by_image(ev.predict(params if mesh is None else ev.place(params), max_images=8))  # one batch

    want = predict("einsum", None)
    assert not calls
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    on_mesh = predict("splash", mesh)
    assert calls and set(calls) == {(1, ("data", "fsdp"))}, calls
    calls.clear()
    one_device = predict("splash", None)
    assert calls and set(calls) == {(8, ("data", "fsdp"))}, calls  # a one-device mesh in context
    for got in (on_mesh, one_device):
        np.testing.assert_array_equal(got["image_id"], want["image_id"])
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-3)


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
from yolos_jax import evaluation, sharding, weights
cfg = ml_collections.ConfigDict(json.loads(cfg_json))
params, model, _ = weights.load_model(ckpt)
mesh = sharding.make_mesh(sharding.default_mesh_config())
ev = evaluation.Evaluator(evaluation.default_eval_config(), cfg, model, mesh=mesh)
assert len(ev.batches()) == 2  # 10 images in global batches of 8; each process reads 4 of every 8
placed = ev.place(params)
metrics = ev.run(placed, out, verbose=False)
print("METRICS " + json.dumps(metrics), flush=True)
# The one-device jits (speed protocol, attention figures) take this process's replica of the placed params.
import numpy as np
from yolos_jax import speed
one = sharding.single_device_mesh()
local = sharding.on_single_device(placed, one)
same = all(a.devices() == {one.devices.flat[0]} and np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(params)))
split = sharding.place_host({"w": np.zeros((8, 2), np.float32)}, {"w": sharding.batch_sharding(mesh)})
try:
    sharding.on_single_device(split, one)
    refused = False
except ValueError as e:
    refused = "['w']" in str(e)
fps = speed.measure_speed(model, placed, [np.zeros((1, 64, 96, 3), np.float32)], warmup=0, repeats=1)["fps"]
print("SINGLE " + json.dumps({"same": same, "refused": refused, "fps": fps > 0}), flush=True)
jax.distributed.shutdown()
"""


def test_two_processes_equal_one(synth, tmp_path):
    import subprocess
    import sys

    cfg, model, params = synth
    ckpt = tmp_path / "ckpt"
    weights.save_params_dir(str(ckpt), jax.tree.map(np.asarray, params),
                            {f: getattr(model, f) for f in model_config("s").keys()})
    cfg8 = ml_collections.ConfigDict(cfg.to_dict())
    cfg8.eval_batch_size = 8
    port = train_fixtures.free_port()
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
    for log in logs:  # each process's replica of the placed params, on its first device, timed there
        single = json.loads(next(line for line in log.splitlines() if line.startswith("SINGLE "))[7:])
        assert single == {"same": True, "refused": True, "fps": True}, single
    for k in coco_eval.METRIC_NAMES:
        assert got[0][k] == pytest.approx(one[k], abs=1e-6), k
    assert got[0]["num_images"] == one["num_images"] == 10
    assert not (tmp_path / "out1").exists()  # only process 0 writes

    def key(d):
        return d["image_id"], d["category_id"], round(d["score"], 5), tuple(np.round(d["bbox"], 2))

    multi = sorted(map(key, json.load(open(tmp_path / "out0" / coco_eval.DETECTIONS_FILE))))
    single = sorted(map(key, json.load(open(tmp_path / "one" / coco_eval.DETECTIONS_FILE))))
    assert len(multi) == len(single) == 10 * model.num_det_tokens
    assert [m[:2] for m in multi] == [s[:2] for s in single]
    np.testing.assert_allclose([m[2] for m in multi], [s[2] for s in single], atol=2e-5)


# --------------------------------------------------------------------------------------------------
# A write failure (full disk, I/O error) leaves the previous outputs as they were, and no temporaries
# --------------------------------------------------------------------------------------------------


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _fail_json_dump_of(monkeypatch, predicate):
    """json.dump of an object matching `predicate` writes half of its text, then fails with ENOSPC (a full disk)."""
    import errno

    real = json.dump

    def dump(obj, f, **kwargs):
        if not predicate(obj):
            return real(obj, f, **kwargs)
        text = json.dumps(obj, **kwargs)
        f.write(text[: len(text) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device", getattr(f, "name", None))

    monkeypatch.setattr(json, "dump", dump)


def test_a_write_failure_keeps_the_previous_metrics_and_detections(synth, tmp_path, file_size_limit, monkeypatch):
    """metrics.json and detections.json are one evaluation's pair: a failure while writing either (here: the
    kernel refusing detections.json half-way; then a full disk half-way through metrics.json, after detections.json
    was written whole) leaves the previous pair byte for byte, and nothing else in the folder."""
    import errno

    cfg, model, params = synth
    out = tmp_path / "eval"
    ev = evaluation.Evaluator(evaluation.default_eval_config(), cfg, model)
    ev.run(params, str(out), verbose=False)
    before = _files(out)
    assert sorted(before) == [coco_eval.DETECTIONS_FILE, coco_eval.METRICS_FILE]
    other = jax.tree.map(lambda x: x * 0.7, params)  # another model: different detections

    # detections.json (~7 KB) grows past the limit half-way; metrics.json (<1 KB) would fit.
    limit = len(before[coco_eval.DETECTIONS_FILE]) // 2
    assert limit > 2 * len(before[coco_eval.METRICS_FILE])
    with pytest.raises(OSError) as e, file_size_limit(limit):
        ev.run(other, str(out), verbose=False)
    assert e.value.errno == errno.EFBIG
    assert _files(out) == before

    # detections.json written whole, then the disk fills up while metrics.json is written.
    _fail_json_dump_of(monkeypatch, lambda obj: isinstance(obj, dict) and "AP" in obj)
    with pytest.raises(OSError, match="No space left on device"):
        ev.run(other, str(out), verbose=False)
    assert _files(out) == before  # not the new detections.json beside the old metrics.json
    monkeypatch.undo()

    metrics = ev.run(other, str(out), verbose=False)  # and the same call, once it can write, replaces both
    after = _files(out)
    assert sorted(after) == sorted(before)
    assert after[coco_eval.DETECTIONS_FILE] != before[coco_eval.DETECTIONS_FILE]  # (so the checks above can tell)
    assert json.loads(after[coco_eval.METRICS_FILE]) == metrics


def test_a_write_failure_leaves_each_annotated_image_whole_or_absent(synth, tmp_path, monkeypatch):
    """The annotated val images (written at the end of training) are written one by one, each atomically: a full
    disk while the third PNG is written leaves the first two whole, no third, and no temporary file."""
    import errno
    import io

    from PIL import Image

    from yolos_jax import visualize

    cfg, model, params = synth
    model_cfg = {f: getattr(model, f) for f in model_config("s").keys()}
    real_save = Image.Image.save
    saves = []

    def save(self, fp, format=None, **kwargs):
        saves.append(fp)
        if len(saves) != 3:
            return real_save(self, fp, format, **kwargs)
        buf = io.BytesIO()
        real_save(self, buf, format, **kwargs)
        with open(fp, "wb") as f:
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", fp)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "images"
    with pytest.raises(OSError, match="No space left on device"):
        visualize.write_annotated_val_images(jax.device_get(params), model_cfg, cfg, str(out), num_images=4)
    monkeypatch.undo()
    assert len(saves) == 3
    written = sorted(os.listdir(out))
    assert len(written) == 2 and all(name.endswith(".png") and not name.startswith(".") for name in written)
    for name in written:
        with Image.open(out / name) as im:
            im.load()  # whole PNGs: they decode
    paths = visualize.write_annotated_val_images(jax.device_get(params), model_cfg, cfg, str(out), num_images=4)
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths) and len(paths) == 4


# --------------------------------------------------------------------------------------------------
# eval.py on a converted HF checkpoint == HF on each image alone (batch-invariance, issue 14)
# --------------------------------------------------------------------------------------------------


