"""The training loop's host checks (`yolos_jax.trainer`): a workdir holding another model than the config's is
refused on resume, naming the fields (moved from test_checkpointing.py). The loop itself runs end to end in
test_train_e2e.py, test_dense_scenes.py and test_init_from_e2e.py."""

import jax
import ml_collections
import numpy as np
import pytest

from eval_fixtures import random_params
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
