"""Training checkpoints (`yolos_jax.checkpointing`): the run metadata (label names, label map) is a checkpoint item of
its own, and checkpoints written before it (metadata inside the config item) still give the same meta."""

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from eval_fixtures import random_params
from yolos_jax import checkpointing
from yolos_jax.config import model_config
from yolos_jax.yolos import YOLOS


def test_run_metadata_is_stored_beside_the_config_and_read_from_either_place(tmp_path):
    cfg = model_config("s", hidden_size=16, depth=1, num_heads=2, num_det_tokens=3, num_classes=4,
                       init_pe_size=(32, 48), mid_pe_size=(32, 48))
    params = jax.tree.map(np.asarray, random_params(YOLOS(**cfg.to_dict()), (32, 48)))
    state = {"params": params, "step": np.int32(3), "opt_state": {}, "rng": np.zeros(2, np.uint32)}
    ckpt_cfg = checkpointing.default_checkpoint_config()
    ckpt_cfg.async_save = False
    label_map = {"mode": "contiguous", "category_ids": [1, 2], "names": ["a", "b"]}
    run_meta = {"label_names": ["a", "b", "N/A", "N/A"], "label_map": label_map}
    ck = checkpointing.Checkpointer(str(tmp_path / "new"), ckpt_cfg)
    ck.save(3, state, {"epoch": 0, "batch": 3}, ml_collections.ConfigDict({"model": cfg.to_dict()}), run_meta)
    ck.close()
    _, _, meta = checkpointing.restore_params(ck.directory, 3)
    assert (meta["label_names"], meta["label_map"]) == (run_meta["label_names"], label_map)
    assert "label_names" not in checkpointing.restore_config(str(tmp_path / "new"))  # not in the config
    # The layout before the meta item: the same values inside the config.
    old = checkpointing.Checkpointer(str(tmp_path / "old"), ckpt_cfg)
    old.manager.save(3, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave({"step": state["step"], "opt_state": {}, "rng": state["rng"]}),
        data=ocp.args.JsonSave({"epoch": 0, "batch": 3}),
        config=ocp.args.JsonSave({"model": cfg.to_dict(), **run_meta})), force=True)
    old.close()
    _, _, meta = checkpointing.restore_params(old.directory, 3)
    assert (meta["label_names"], meta["label_map"]) == (run_meta["label_names"], label_map)
