"""Training checkpoints (`yolos_jax.checkpointing`): the run metadata (label names, label map) is a checkpoint item of
its own, and checkpoints written before it (metadata inside the config item) still give the same meta; steps that do
not restore are skipped and set aside, restore_step, storage failures and failing saves (README "Faults")."""

import glob
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from eval_fixtures import random_params
from yolos_jax import checkpoint_reading, checkpointing
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
    _, _, meta = checkpoint_reading.restore_params(ck.directory, 3)
    assert (meta["label_names"], meta["label_map"]) == (run_meta["label_names"], label_map)
    assert "label_names" not in checkpoint_reading.restore_config(str(tmp_path / "new"))  # not in the config
    # The layout before the meta item: the same values inside the config.
    old = checkpointing.Checkpointer(str(tmp_path / "old"), ckpt_cfg)
    old.manager.save(3, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave({"step": state["step"], "opt_state": {}, "rng": state["rng"]}),
        data=ocp.args.JsonSave({"epoch": 0, "batch": 3}),
        config=ocp.args.JsonSave({"model": cfg.to_dict(), **run_meta})), force=True)
    old.close()
    _, _, meta = checkpoint_reading.restore_params(old.directory, 3)
    assert (meta["label_names"], meta["label_map"]) == (run_meta["label_names"], label_map)


# --------------------------------------------------------------------------------------------------
# Faults: steps that do not restore, saves that fail (README "Faults")
# --------------------------------------------------------------------------------------------------



def _state(step, size=64):
    return {"params": {"w": np.arange(size, dtype=np.float32) + step, "b": np.full((3, 4), step, np.float32)},
            "step": np.int32(step), "opt_state": {"mu": np.zeros(5, np.float32) + step}, "rng": np.zeros(2, np.uint32)}


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device), state)


def _checkpointer(workdir, **overrides):
    cfg = checkpointing.default_checkpoint_config()
    cfg.update({"keep": 3, **overrides})
    return checkpointing.Checkpointer(str(workdir), cfg)


def _run(workdir, steps, size=64):
    ck = _checkpointer(workdir)
    for s in steps:
        assert ck.save(s, _state(s, size), {"batch": s}, {"model": {"hidden_size": 8}}, {})
    ck.close()
    return ck.directory


def _truncate_largest_array_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def _garbage(path):
    with open(path, "w") as f:
        f.write("{not json")


CORRUPTIONS = {
    "truncated array file": _truncate_largest_array_file,
    "missing array files": lambda d: [os.remove(f) for f in glob.glob(os.path.join(d, "params", "**", "d", "*"),
                                                                      recursive=True)],
    "broken item metadata": lambda d: _garbage(os.path.join(d, "params", "_METADATA")),
    "broken step metadata": lambda d: _garbage(os.path.join(d, "_CHECKPOINT_METADATA")),
    "broken iterator state": lambda d: _garbage(os.path.join(d, "data", "metadata")),
    "no commit marker": lambda d: os.remove(os.path.join(d, "commit_success.txt")),
    "missing item": lambda d: shutil.rmtree(os.path.join(d, "train")),
    "empty step directory": lambda d: (shutil.rmtree(d), os.makedirs(d)),
}

READERS_DO_NOT_READ = {"broken iterator state", "missing item"}  # eval and inference read params, config, meta only


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_resume_falls_back_to_the_newest_step_that_restores_and_sets_the_bad_one_aside(tmp_path, corruption, caplog):
    directory = _run(tmp_path, (2, 4, 6))
    CORRUPTIONS[corruption](os.path.join(directory, "6"))
    ck = _checkpointer(tmp_path)
    with caplog.at_level("WARNING", logger="yolos_jax"):
        step, state, data_state = ck.resume(_abstract(_state(0)))
    assert step == 4 and data_state == {"batch": 4}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), _state(4)["params"]["w"])
    np.testing.assert_array_equal(np.asarray(state["opt_state"]["mu"]), _state(4)["opt_state"]["mu"])
    moved = tmp_path / checkpointing.UNRESTORABLE_SUBDIR / "6"
    assert moved.is_dir() and (moved / "WHY.txt").read_text().strip()  # renamed, never deleted
    assert checkpointing.step_dirs(directory) == [4, 2]
    assert any("checkpoint step 6 does not restore" in r.getMessage() and str(moved) in r.getMessage()
               for r in caplog.records)
    assert all("\n" not in r.getMessage() for r in caplog.records if r.name == "yolos_jax")  # one line each
    # The run goes on from there: the next save lands and the manager never names the moved step.
    assert ck.save(5, _state(5), {"batch": 5}, {"model": {}}, {})
    ck.close()
    assert checkpointing.step_dirs(directory) == [5, 4, 2]
    # Readers of the workdir (eval, Detector, figures) skip it the same way without moving anything.
    _run(tmp_path / "reader", (2, 4))
    CORRUPTIONS[corruption](str(tmp_path / "reader" / "checkpoints" / "4"))
    params, _, meta = checkpoint_reading.restore_params_from(str(tmp_path / "reader"))
    assert (tmp_path / "reader" / "checkpoints" / "4").is_dir()
    if corruption in READERS_DO_NOT_READ:  # the params, config and meta items are intact: step 4 is fine to read
        assert meta["step"] == 4
        return
    assert meta["step"] == 2
    with pytest.raises(checkpointing.CheckpointError, match=r"checkpoints/4 does not restore"):
        checkpoint_reading.restore_params_from(str(tmp_path / "reader" / "checkpoints" / "4"))


def test_no_step_restores_one_error_naming_each_and_the_choices(tmp_path):
    directory = _run(tmp_path, (2, 4))
    for s in (2, 4):
        _truncate_largest_array_file(os.path.join(directory, str(s)))
    with pytest.raises(checkpointing.CheckpointError) as e:
        _checkpointer(tmp_path).resume(_abstract(_state(0)))
    message = str(e.value)
    assert "\n" not in message and "step 4: OUT_OF_RANGE" in message and "step 2: OUT_OF_RANGE" in message
    assert "--config.checkpoint.restore_step=N" in message and "--workdir" in message
    assert checkpointing.step_dirs(directory) == [4, 2]  # nothing moved when nothing restores


def test_restore_step_resumes_there_once_and_sets_newer_steps_aside(tmp_path):
    directory = _run(tmp_path, (2, 4, 6))
    with pytest.raises(checkpointing.CheckpointError, match="has no step 3; it holds steps 6, 4, 2"):
        _checkpointer(tmp_path, restore_step=3).resume(_abstract(_state(0)))
    assert checkpointing.step_dirs(directory) == [6, 4, 2]  # refused before anything moved
    ck = _checkpointer(tmp_path, restore_step=4)
    step, state, _ = ck.resume(_abstract(_state(0)))
    assert step == 4 and int(state["step"]) == 4
    assert checkpointing.step_dirs(directory) == [4, 2]
    assert (tmp_path / checkpointing.SUPERSEDED_SUBDIR / "6" / "params").is_dir()  # moved, never deleted
    ck.save(5, _state(5), {"batch": 5}, {"model": {}}, {})
    ck.close()
    # Re-running the same command (restore_step still 4) resumes from the newest step instead of rewinding again.
    step, _, _ = _checkpointer(tmp_path, restore_step=4).resume(_abstract(_state(0)))
    assert step == 5 and checkpointing.step_dirs(directory) == [5, 4, 2]
    with pytest.raises(checkpointing.CheckpointError, match="has no step 4; it holds none"):
        _checkpointer(tmp_path / "empty", restore_step=4).resume(_abstract(_state(0)))


def test_a_storage_failure_is_not_taken_for_a_bad_checkpoint(tmp_path, monkeypatch):
    directory = _run(tmp_path, (2, 4))
    ck = _checkpointer(tmp_path)

    def unreadable(step, abstract_state):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(ck, "restore", unreadable)
    with pytest.raises(checkpointing.CheckpointError, match="step 4 .* Permission denied.*nothing was moved"):
        ck.resume(_abstract(_state(0)))
    assert checkpointing.step_dirs(directory) == [4, 2]


def test_a_different_model_is_not_taken_for_corruption(tmp_path):
    directory = _run(tmp_path, (2,))

    def refuse(stored):
        raise ValueError(f"another model: {stored['model']}")

    with pytest.raises(ValueError, match="another model"):
        _checkpointer(tmp_path).resume(_abstract(_state(0)), check_config=refuse)
    assert checkpointing.step_dirs(directory) == [2]


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failing_save_leaves_earlier_checkpoints_intact_and_stops_in_one_line(tmp_path, file_size_limit, async_save):
    big = 200_000  # float32 values: an 800 KB array file, over the limit below
    ck = _checkpointer(tmp_path, keep=2, async_save=async_save)
    for s in (2, 4):
        ck.save(s, _state(s, big), {"batch": s}, {"model": {}}, {})
    ck.wait()
    with file_size_limit(100_000), pytest.raises(checkpointing.CheckpointSaveError) as e:  # (conftest.py)
        ck.save(6, _state(6, big), {"batch": 6}, {"model": {}}, {})
        ck.save(8, _state(8, big), {"batch": 8}, {"model": {}}, {})  # an asynchronous failure surfaces here
    message = str(e.value)
    assert "\n" not in message and "checkpoint step 6 could not be written" in message
    assert "File too large" in message and "(steps 2, 4) are intact" in message
    assert "on_save_error=warn" in message
    ck.close()
    # keep=2 must not have deleted step 2 for the step that never landed; a partial step can only be orbax's
    # temporary directory (never read as a step), which the next start removes.
    assert checkpointing.step_dirs(ck.directory) == [4, 2]
    assert all(d.isdigit() or ".orbax-checkpoint-tmp" in d for d in os.listdir(ck.directory))
    _checkpointer(tmp_path).close()
    assert sorted(os.listdir(ck.directory)) == ["2", "4"]
    step, state, data_state = _checkpointer(tmp_path).resume(_abstract(_state(0, big)))
    assert step == 4 and data_state == {"batch": 4}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), _state(4, big)["params"]["w"])
    params, _, _ = checkpoint_reading.restore_params(ck.directory, 2)
    np.testing.assert_array_equal(np.asarray(params["w"]), _state(2, big)["params"]["w"])


def test_on_save_error_warn_goes_on_and_the_next_interval_saves(tmp_path, file_size_limit, caplog):
    big = 200_000
    ck = _checkpointer(tmp_path, keep=2, on_save_error="warn")
    ck.save(2, _state(2, big), {"batch": 2}, {"model": {}}, {})
    ck.wait()
    with file_size_limit(100_000), caplog.at_level("WARNING", logger="yolos_jax"):
        ck.save(4, _state(4, big), {"batch": 4}, {"model": {}}, {})
        assert ck.wait() is False
    assert any("checkpoint step 4 could not be written" in r.getMessage() and "Training goes on" in r.getMessage()
               for r in caplog.records)
    assert ck.save(6, _state(6, big), {"batch": 6}, {"model": {}}, {}) and ck.wait()  # landed
    # The last save of a run (must_land) has nothing after it to retry: it raises whatever the policy.
    with file_size_limit(100_000), pytest.raises(checkpointing.CheckpointSaveError, match="step 8 could not.*File too large"):
        ck.save(8, _state(8, big), {"batch": 8}, {"model": {}}, {}, must_land=True)
    ck.close()
    assert checkpointing.step_dirs(ck.directory) == [6, 2]


def test_best_checkpoint_survives_an_interrupted_replacement_and_a_changed_rule(tmp_path):
    ck = _checkpointer(tmp_path)
    path = ck.save_best(3, _state(3)["params"], {"model": {"hidden_size": 8}}, {}, "AP", 0.25, "max", "params")
    assert ck.best_so_far("AP", "max") == {"metric": "AP", "value": 0.25, "step": 3, "mode": "max",
                                           "weights": "params"}
    os.rename(path, os.path.join(ck.directory, ".best.old"))  # killed between save_best's two renames
    assert ck.best_so_far("AP", "max")["step"] == 3 and os.path.isdir(path)  # put back, not forgotten
    assert ck.best_so_far("AP50", "max") is None and ck.best_so_far("AP", "min") is None  # another rule: afresh
    params, _, meta = checkpoint_reading.restore_params_from(path)
    np.testing.assert_array_equal(np.asarray(params["w"]), _state(3)["params"]["w"])
    assert meta["best"]["value"] == 0.25 and checkpointing.step_dirs(ck.directory) == []  # never a step
    ck.close()
