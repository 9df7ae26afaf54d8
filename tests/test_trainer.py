"""The training loop's host checks (`yolos_jax.trainer`): a workdir holding another model than the config's is
refused on resume, naming the fields; dense scenes (more objects per image than input.max_boxes) are announced at
the start with the numbers and the fix (max_boxes <= num_det_tokens is validated: test_run_config.py). The loop
itself runs end to end in test_train_e2e.py and test_init_from.py."""

import logging
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eval_fixtures import DENSE_TRAIN_COUNTS as TRAIN_COUNTS
from eval_fixtures import random_params
from yolos_jax import run_config, trainer
from yolos_jax.config import model_config
from yolos_jax.yolos import YOLOS


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


def test_best_checkpoint_keeps_the_best_evaluated_weights_of_a_metric_that_rises_then_falls(tmp_path, monkeypatch):
    """checkpoint.keep_best_by='AP' over evaluations whose AP goes 0.1, 0.3, 0.2: checkpoints/best holds the
    weights evaluated at the second one (the EMA: optim.ema_decay is on), besides the last `keep` steps, and the
    loaders read it as a detector checkpoint; the learning curve has every point."""
    import json

    from yolos_jax import checkpoint_reading, data, evaluation, weights

    config = run_config.default_config("ti")
    config.input = data.synthetic_input_config(str(tmp_path / "data"), num_train=4, num_val=4, batch_size=8,
                                               eval_batch_size=8)  # the 8 simulated devices
    run_config.link_eval_size(config)
    config.model.update(hidden_size=16, depth=1, num_heads=2, num_classes=4, num_det_tokens=8,
                        init_pe_size=(32, 48), mid_pe_size=None)
    config.optim.ema_decay = 0.5
    config.train.update(num_steps=6, eval_every=2, eval_at_end=True, log_every=2)
    config.checkpoint.update(every_steps=2, keep=1, keep_best_by="AP", async_save=False)
    scripted, seen = iter([0.1, 0.3, 0.2]), []

    def fake_run(self, params, out_dir=None, **kwargs):  # scores in a scripted order; records what it was given
        seen.append({jax.tree_util.keystr(p): np.asarray(v) for p, v in
                     jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]})
        metrics = {"AP": next(scripted), "AP50": 0.0}
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f)
        return metrics

    monkeypatch.setattr(evaluation.Evaluator, "run", fake_run)
    monkeypatch.setattr(trainer.run_plots, "write_eval_pictures", lambda *a, **k: {"images": [], "contact_sheet": None})
    workdir = tmp_path / "work"
    trainer.train_and_evaluate(config, str(workdir))

    assert sorted(os.listdir(workdir / "checkpoints")) == ["6", "best"]  # keep=1, plus the best
    params, _, meta = weights.load_any(str(workdir / "checkpoints" / "best"), require_detector=True)
    assert meta["best"] == {"metric": "AP", "value": 0.3, "step": 4, "mode": "max", "weights": "ema"}
    assert meta["step"] == 4 and meta["weights"] == "ema"
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for k, v in seen[1].items():  # exactly the weights evaluated at step 4
        np.testing.assert_array_equal(flat[k], v, err_msg=k)
    # What was evaluated is the EMA, not the raw parameters; the workdir's newest step loads it as the weights.
    _, _, last = checkpoint_reading.restore_params(str(workdir / "checkpoints"), 6)
    assert last["weights"] == "ema"
    raw = checkpoint_reading.read_items(str(workdir / "checkpoints" / "6"), params=ocp.args.StandardRestore())["params"]
    raw = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]}
    assert any(not np.array_equal(raw[k], seen[-1][k]) for k in raw)
    assert json.load(open(workdir / "eval" / "step_4" / "metrics.json"))["weights"] == "ema"
    # The learning curve is refreshed at each evaluation, from the logged losses and the evaluations' AP.
    assert (workdir / "learning_curve.png").stat().st_size > 0
    history = json.load(open(workdir / "learning_curve.json"))
    assert [p["AP"] for p in history if "AP" in p] == [0.1, 0.3, 0.2]
    assert [p["step"] for p in history if "loss" in p] == [2, 4, 6]
