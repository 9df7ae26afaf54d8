"""The trainer's warnings at the start of training: dense scenes (more objects per image than input.max_boxes)
are announced with the numbers and the fix (max_boxes <= num_det_tokens is validated: test_run_config.py).

To be merged into tests/test_trainer.py."""

import logging

import numpy as np
import pytest

from eval_fixtures import DENSE_TRAIN_COUNTS as TRAIN_COUNTS
from yolos_jax import run_config, trainer


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
