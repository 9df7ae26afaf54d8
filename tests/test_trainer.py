"""The training loop's host checks (`yolos_jax.trainer`): a workdir holding another model than the config's is
refused on resume, naming the fields; dense scenes (more objects per image than input.max_boxes) are announced at
the start with the numbers and the fix (max_boxes <= num_det_tokens is validated: test_run_config.py). The loop
itself runs end to end in test_train_e2e.py and test_init_from.py."""

import logging

import jax
import ml_collections
import numpy as np
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
