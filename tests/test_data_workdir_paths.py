"""data/workdir_paths.py: '{workdir}' substituted in input.data_dir and input.source_dir (a resolved copy; the
config is not modified), and the synthetic dataset a config asks for written into a source_dir that does not
exist yet (seeded, with its options), never over one that does."""

import json
import os

import ml_collections
import pytest

from yolos_jax.data import synthetic, workdir_paths
from yolos_jax.errors import ConfigError


def _input_cfg(**fields):
    base = dict(data_dir="{workdir}/data/tfds", source_dir="{workdir}/data/src", dataset_name="d", batch_size=2)
    return ml_collections.ConfigDict(dict(base, **fields))


def test_workdir_is_substituted_in_a_copy(tmp_path):
    cfg = _input_cfg(dataset_name="{workdir}")  # only the path fields are substituted
    assert workdir_paths.uses_workdir(cfg)
    resolved = workdir_paths.resolve_input_config(cfg, str(tmp_path))
    assert resolved.data_dir == f"{tmp_path}/data/tfds" and resolved.source_dir == f"{tmp_path}/data/src"
    assert resolved.dataset_name == "{workdir}" and resolved.batch_size == 2
    assert cfg.data_dir == "{workdir}/data/tfds"  # the caller's config is left as it was
    assert not workdir_paths.uses_workdir(resolved)
    assert not os.path.exists(tmp_path / "data")  # no `synthetic`: nothing written
    plain = _input_cfg(data_dir="/data/tfds", source_dir=None)
    assert not workdir_paths.uses_workdir(plain)
    assert workdir_paths.resolve_input_config(plain, str(tmp_path)).to_dict() == plain.to_dict()


def test_synthetic_dataset_is_written_once_where_the_config_asks(tmp_path):
    spec = dict(num_train=3, num_val=2, image_size=(40, 56), num_classes=2, seed=5, max_objects=2,
                classes=("circle", "square"), background="plain")
    cfg = _input_cfg(synthetic=ml_collections.ConfigDict(spec))
    resolved = workdir_paths.resolve_input_config(cfg, str(tmp_path / "run"))
    src = tmp_path / "run" / "data" / "src"
    assert resolved.source_dir == str(src)
    train = json.loads((src / "annotations" / "instances_train.json").read_text())
    val = json.loads((src / "annotations" / "instances_val.json").read_text())
    assert len(train["images"]) == 3 and len(val["images"]) == 2
    assert [c["name"] for c in train["categories"]] == ["circle", "square"]
    assert all(len([a for a in train["annotations"] if a["image_id"] == im["id"]]) <= 2 for im in train["images"])
    # The generator's own output for the same arguments: the options were passed through.
    synthetic.generate(str(tmp_path / "direct"), 3, 2, 5, (40, 56), num_classes=2, max_objects=2,
                       classes=("circle", "square"), background="plain")
    assert json.loads((tmp_path / "direct" / "annotations" / "instances_train.json").read_text()) == train
    # An existing source folder is the user's: resolving again writes nothing over it.
    (src / "annotations" / "instances_train.json").write_text("{}")
    workdir_paths.resolve_input_config(cfg, str(tmp_path / "run"))
    assert (src / "annotations" / "instances_train.json").read_text() == "{}"
    # Nor is anything generated into a path of the user's (e.g. a misspelt --config.input.source_dir): it must exist.
    typo = tmp_path / "mydata_typo"
    with pytest.raises(ConfigError, match=f"config.input.source_dir={typo}: no such directory"):
        workdir_paths.resolve_input_config(_input_cfg(synthetic=ml_collections.ConfigDict(spec),
                                                      source_dir=str(typo)), str(tmp_path / "run2"))
    assert not typo.exists() and not (tmp_path / "run2").exists()
