"""Dense scenes (more objects per image than input.max_boxes): the prepare report counts them, training warns at
start with the numbers and the fix (max_boxes <= num_det_tokens is validated: test_run_config.py), and a converted
detector's [DET] tokens grow to a larger model.num_det_tokens (old tokens kept exactly, new ones cyclic copies)."""

import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from yolos_jax import init_from, run_config, sharding, trainer, weights
from yolos_jax.config import model_config
from yolos_jax.data import prepared_dataset, tfds_builder
from yolos_jax.yolos import YOLOS

# Non-crowd boxes per image of the dense folder's train split (plus 2 crowd boxes on the first image, which
# never become targets and so are not counted).
TRAIN_COUNTS = (305, 101, 5, 100)


def _dense_folder(root):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)).save(buf, "PNG")
    os.makedirs(root / "annotations")
    for split, counts in (("train", TRAIN_COUNTS), ("val", (2, 3))):
        os.makedirs(root / split)
        images, anns = [], []
        for i, n in enumerate(counts):
            (root / split / f"{i}.png").write_bytes(buf.getvalue())
            images.append({"id": i + 1, "file_name": f"{i}.png", "height": 40, "width": 48})
            for k in range(n + (2 if i == 0 else 0)):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + k % 2,
                             "bbox": [k % 30, k % 20, 8, 6], "iscrowd": int(i == 0 and k >= n)})
        doc = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def dense_dataset(tmp_path_factory):
    from yolos_jax.data import prepare as prepare_cli

    root = tmp_path_factory.mktemp("dense")
    _dense_folder(root / "src")
    return root, prepare_cli


def test_prepare_reports_images_over_each_box_limit(dense_dataset, capsys):
    root, prepare_cli = dense_dataset
    prepare_cli.main([f"--data_dir={root / 'tfds'}", "--name=dense", f"--coco_dir={root / 'src'}", "--no_verify"])
    capsys.readouterr()
    ds = prepared_dataset.load(str(root / "tfds"), "dense")
    expected = {"max": 305, "over": {"100": {"images": 2, "boxes_beyond": 205 + 1}, "300": {"images": 1, "boxes_beyond": 5}}}
    assert ds.index("train").num_objects.tolist() == list(TRAIN_COUNTS)
    assert ds.report("train")["boxes_per_image"] == expected
    assert ds.report("val")["boxes_per_image"] == {"max": 3, "over": {"100": {"images": 0, "boxes_beyond": 0},
                                                                       "300": {"images": 0, "boxes_beyond": 0}}}
    # Kept next to the dataset, and printed by the command (run again: reused, the same summary).
    with open(os.path.join(ds.path, tfds_builder.SOURCE_FILE)) as f:
        assert json.load(f)["reports"]["train"]["boxes_per_image"] == expected
    prepare_cli.main([f"--data_dir={root / 'tfds'}", "--name=dense", f"--coco_dir={root / 'src'}", "--no_verify"])
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["splits"]["train"]["boxes_per_image"] == expected


def test_training_warns_at_start_with_the_numbers_and_the_fix(dense_dataset, monkeypatch, caplog):
    root, prepare_cli = dense_dataset
    prepare_cli.main([f"--data_dir={root / 'tfds'}", "--name=dense", f"--coco_dir={root / 'src'}", "--no_verify"])
    config = run_config.default_config("ti")
    config.input.update(data_dir=str(root / "tfds"), dataset_name="dense", train_split="train", val_split="val",
                        batch_size=8, eval_batch_size=8, label_mode="contiguous", resize_on_device="off")
    config.model.update(hidden_size=16, depth=1, num_heads=2, num_classes=2, init_pe_size=(32, 32))
    config.train.num_steps = 1

    class Stop(Exception):
        pass

    def stop(**kwargs):  # the model is built right after the train iterator: no need to go further
        raise Stop

    monkeypatch.setattr(trainer, "YOLOS", stop)
    with caplog.at_level(logging.WARNING, logger="yolos_jax"), pytest.raises(Stop):
        trainer.train_and_evaluate(config, str(root / "work"))
    lines = [r.getMessage() for r in caplog.records if "dense scenes" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0] == trainer.dense_scene_warning(np.asarray(TRAIN_COUNTS), 100, 100, "train")
    assert ("2 of 4 images of train split 'train' have more than input.max_boxes=100 boxes (up to 305); their 206 "
            "boxes beyond the first 100 (40.31% of the split's boxes)") in lines[0]
    assert "input.max_boxes=305 and model.num_det_tokens >= 305 (now 100" in lines[0]
    assert trainer.dense_scene_warning(np.asarray(TRAIN_COUNTS), 305, 305, "train") is None


Q_OLD, Q_NEW = 4, 10  # the tiny equivalent of a 100-token COCO detector fine-tuned for 250 objects per image


def _tiny(q, **kw):
    return model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=q, num_classes=3,
                        init_pe_size=(32, 48), mid_pe_size=(32, 48), adapter=True, **kw)


def test_converted_detector_grows_its_det_tokens(tmp_path):
    old_cfg = _tiny(Q_OLD)
    old_model = YOLOS(**old_cfg.to_dict())
    rng = np.random.default_rng(1)  # random values of the detector's shapes (an initialiser would cost a compile)
    old = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32),
                       jax.eval_shape(lambda: old_model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 48, 3))))["params"])
    weights.save_params_dir(str(tmp_path / "ckpt"), old, old_cfg)
    new_cfg = _tiny(Q_NEW)
    model = YOLOS(**new_cfg.to_dict())
    mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    # As train.py does with --config.init_from (seed = config.seed).
    grown = jax.device_get(init_from.init_from_converted(str(tmp_path / "ckpt"), model, new_cfg, 7, (32, 32), shardings))

    cycle = np.arange(Q_NEW) % Q_OLD
    for path in ("pos_embed_det", "mid_pos_embed_det", "adapter/query_pos"):  # copied exactly, old ones kept
        leaf_old, leaf_new = weights.flatten_params(old)[path], weights.flatten_params(grown)[path]
        assert leaf_new.shape == (leaf_old.shape[0], Q_NEW, 32)
        np.testing.assert_array_equal(leaf_new, leaf_old[:, cycle])
    tok_old, tok_new = old["det_tokens"], grown["det_tokens"]
    np.testing.assert_array_equal(tok_new[:, :Q_OLD], tok_old)  # the checkpoint's tokens, exactly
    noise = tok_new[:, Q_OLD:] - tok_old[:, cycle[Q_OLD:]]
    assert np.all(noise != 0)  # no copy is identical to its source
    assert np.std(noise) == pytest.approx(init_from.DET_COPY_NOISE * np.std(tok_old), rel=0.2)
    # Seeded: the same seed gives the same copies, another seed others.
    conv, _, _ = weights.load_params_dir(str(tmp_path / "ckpt"))
    fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    again, report = init_from.init_params_from(fresh, conv, None, seed=7)
    np.testing.assert_array_equal(again["det_tokens"], tok_new)
    other, _ = init_from.init_params_from(fresh, conv, None, seed=8)
    assert not np.array_equal(other["det_tokens"][:, Q_OLD:], tok_new[:, Q_OLD:])
    assert sorted(g.split(" ")[0] for g in report.grown) == sorted(init_from.DET_TOKEN_LEAVES)
    assert f"{Q_OLD} -> {Q_NEW} tokens" in str(report)
    # Everything else of the detector is taken as it is; the grown model runs.
    np.testing.assert_array_equal(grown["class_head"]["layers_2"]["kernel"], old["class_head"]["layers_2"]["kernel"])
    out = jax.jit(model.apply)({"params": grown}, jnp.zeros((1, 32, 48, 3)))
    assert out["logits"].shape == (1, Q_NEW, 4) and np.all(np.isfinite(np.asarray(out["boxes"])))
    # Fewer tokens than the checkpoint's: fresh, and reported as such.
    small = weights.unflatten_params({k: v[:, :2] if k in init_from.DET_TOKEN_LEAVES else v
                                      for k, v in weights.flatten_params(fresh).items()})  # a 2-token model's tree
    shrunk, report = init_from.init_params_from(small, conv, None)
    np.testing.assert_array_equal(shrunk["det_tokens"], small["det_tokens"])
    assert not report.grown and any(f.startswith("det_tokens (checkpoint") for f in report.fresh)
