"""The weights format (`yolos_jax.weights`): one loader for converted directories and training checkpoints, and
what older code wrote still loads: tests/fixtures/ holds a converted directory and a training workdir written by
the code of commit ade8405 (before the format moved out of convert.py) with what that code loaded from them."""

import hashlib
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from eval_fixtures import random_params
from yolos_jax import Detector, checkpoint_reading, checkpointing, weights
from yolos_jax.config import model_config
from yolos_jax.yolos import YOLOS

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _expected(name):
    npz = np.load(os.path.join(FIXTURES, f"{name}_expected.npz"))
    with open(os.path.join(FIXTURES, f"{name}_expected.json")) as f:
        return npz, json.load(f)


def _assert_params_equal(params, want):
    """`params` has exactly the leaves of `want` ({path: [shape, dtype, sha256 of the bytes]}), bit for bit."""
    flat = {k: np.asarray(v) for k, v in weights.flatten_params(jax.device_get(params)).items()}
    got = {k: [list(v.shape), str(v.dtype), hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()]
           for k, v in flat.items()}
    assert got == want


def test_converted_v1_directory_still_loads():
    """A converted HF YOLOS (mid PEs, label names) written by the old converter: same params, config, metadata,
    Detector settings and outputs."""
    npz, want = _expected("converted_v1")
    path = os.path.join(FIXTURES, "converted_v1")
    params, cfg, meta = weights.load_any(path)
    _assert_params_equal(params, want["params"])
    assert weights.model_cfg_json(cfg) == want["model_cfg"]
    assert {k: v for k, v in meta.items() if k != "source"} == want["meta"]
    assert weights.load_params_dir(path)[1] == cfg
    det = Detector.from_checkpoint(path)
    assert [det.eval_size, det.max_size, det.label_names] == [want["detector"][k] for k in ("eval_size", "max_size",
                                                                                             "label_names")]
    out = det.forward(npz["x"])
    np.testing.assert_allclose(out["logits"], npz["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["boxes"], npz["boxes"], rtol=1e-5, atol=1e-5)
    pred = det.predict([npz["image"]], threshold=0.0)[0]
    np.testing.assert_array_equal(pred["labels"], npz["pred_labels"])
    np.testing.assert_allclose(pred["scores"], npz["pred_scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred["boxes"], npz["pred_boxes"], atol=1e-3)


def test_training_workdir_v1_still_loads_and_resumes(tmp_path):
    """A training workdir written by the old Checkpointer: `load_any` gives what the old loaders gave, a Detector
    computes the same outputs, and the Checkpointer restores the full training state (resume)."""
    npz, want = _expected("workdir_v1")
    work = str(tmp_path / "workdir_v1")
    shutil.copytree(os.path.join(FIXTURES, "workdir_v1"), work)
    for path in (work, os.path.join(work, "checkpoints"), os.path.join(work, "checkpoints", "5")):
        params, cfg, meta = weights.load_any(path)
        _assert_params_equal(params, want["params"])
        assert weights.model_cfg_json(cfg) == want["model_cfg"]
        meta = json.loads(json.dumps(meta))
        assert meta.pop("weights") == "params"  # added since (issue 17): an old run has no EMA of its parameters
        assert meta == want["meta"]
        assert weights.workdir_of(path) == work
    det = Detector.from_checkpoint(work)
    out = det.forward(npz["x"])
    np.testing.assert_allclose(out["logits"], npz["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["boxes"], npz["boxes"], rtol=1e-5, atol=1e-5)
    ck = checkpointing.Checkpointer(work, checkpointing.default_checkpoint_config())
    assert ck.latest_step() == 5
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(x):
        return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=dev)

    target = {"params": jax.tree.map(abstract, params), "step": abstract(np.int32(0)),
              "opt_state": {"mu": abstract(np.zeros(3, np.float32))}, "rng": abstract(np.zeros(2, np.uint32))}
    state, data_state = ck.restore(5, target)
    ck.close()
    assert int(state["step"]) == 5 and data_state == want["data_state"]
    np.testing.assert_array_equal(np.asarray(state["opt_state"]["mu"]), np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(state["rng"]), np.array([1, 2], np.uint32))
    _assert_params_equal(state["params"], want["params"])
    assert checkpoint_reading.restore_config(work)["label_names"] == ["w", "x", "y", "z"]


def test_load_any_refuses_a_backbone_where_a_detector_is_needed_and_names_missing_paths(tmp_path):
    cfg = model_config("s", hidden_size=16, depth=1, num_heads=2, num_det_tokens=3, num_classes=4,
                       init_pe_size=(32, 48), mid_pe_size=(32, 48))
    params = jax.tree.map(np.asarray, random_params(YOLOS(**cfg.to_dict()), (32, 48)))
    backbone = {k: v for k, v in params.items() if weights.is_backbone_leaf(k + "/") or weights.is_backbone_leaf(k)}
    weights.save_params_dir(str(tmp_path / "bb"), backbone, cfg.to_dict())
    assert weights.load_any(str(tmp_path / "bb"))[2]["kind"] == "backbone"
    with pytest.raises(ValueError, match="holds a 'backbone' checkpoint"):
        weights.load_any(str(tmp_path / "bb"), require_detector=True)
    with pytest.raises(FileNotFoundError, match="does not exist.*convert_torch_weights"):
        weights.load_any(str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="no checkpoint found.*convert_torch_weights"):
        weights.load_any(str(tmp_path))


def test_load_model_from_a_training_workdir_and_a_converted_dir(tmp_path):
    """eval.py --workdir (the trainer's checkpoints) and --checkpoint (converted) give the same model."""
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
    weights.save_params_dir(str(tmp_path / "conv"), params, cfg.to_dict())
    for path in (tmp_path / "work", tmp_path / "conv"):
        got, got_model, _ = weights.load_model(str(path))
        assert got_model == model, path
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.load_model(str(tmp_path / "nothing"))
    # '{workdir}' in the data paths (configs/demo.py) resolves to the workdir of any of its checkpoints,
    # before anything is generated; a converted checkpoint has no workdir, and a wrong path says so first.
    input_cfg = ml_collections.ConfigDict({"data_dir": "{workdir}/data/tfds", "source_dir": "{workdir}/data/src"})
    for path in (tmp_path / "work", tmp_path / "work" / "checkpoints", tmp_path / "work" / "checkpoints" / "7"):
        got = weights.input_config_for_checkpoint(input_cfg, str(path))
        assert got.data_dir == f"{tmp_path / 'work'}/data/tfds" and got.source_dir == f"{tmp_path / 'work'}/data/src"
    assert weights.input_config_for_checkpoint(input_cfg, str(tmp_path / "conv"), "/w").data_dir == "/w/data/tfds"
    with pytest.raises(ValueError, match="not inside a training workdir: set --config.input.data_dir"):
        weights.input_config_for_checkpoint(input_cfg, str(tmp_path / "conv"))
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        weights.input_config_for_checkpoint(input_cfg, str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()
