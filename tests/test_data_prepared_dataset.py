"""The prepared dataset: a copied workdir keeps it; preparing surfaces JSON errors and leaves nothing
half-written; a missing dataset names the command that prepares it."""

import os

import pytest

from yolos_jax.data import coco_json, prepared_dataset, synthetic


def test_a_copied_workdir_keeps_its_prepared_dataset(tmp_path):
    """WORKDIR/data/{synthetic,tfds} copied elsewhere (cp -r: new modification times) is still the same source."""
    import shutil

    first = tmp_path / "run1"
    synthetic.generate(str(first / "synthetic"), 4, 2, seed=2, image_size=[(48, 64)], num_classes=2)
    prepared_dataset.prepare(str(first / "tfds"), "d", source_dir=str(first / "synthetic"), quiet=True)
    second = tmp_path / "run2"
    shutil.copytree(first, second, copy_function=shutil.copy)  # contents only, not times
    ds = prepared_dataset.load(str(second / "tfds"), "d")
    ds.check_source(str(second / "synthetic"), None)  # was: "was prepared from .../run1/synthetic"
    assert ds.source_changes() == []
    shutil.rmtree(first)
    assert ds.source_dir() == str(second / "synthetic") and ds.source_changes() == []
    with pytest.raises(coco_json.DataError, match="set --config.input.source_dir=.*choose another input.dataset_name"):
        ds.check_source(str(tmp_path), None)


def test_prepare_surfaces_json_errors_and_missing_data(tmp_path):
    root = tmp_path / "src"
    os.makedirs(root / "annotations")
    os.makedirs(root / "train")
    (root / "annotations" / "instances_train.json").write_text('{"images": [}')
    with pytest.raises(coco_json.DataError, match="instances_train.json: not valid JSON"):
        prepared_dataset.prepare(str(tmp_path / "tfds"), "broken", source_dir=str(root), quiet=True)
    assert not (tmp_path / "tfds" / "coco_folder" / "broken" / "1.0.0").exists()  # nothing half-written
    with pytest.raises(coco_json.DataError, match="does not exist"):
        prepared_dataset.prepare(str(tmp_path / "tfds"), "x", source_dir=str(tmp_path / "nowhere"))
    with pytest.raises(coco_json.DataError, match="python -m yolos_jax.data.prepare"):
        prepared_dataset.load(str(tmp_path / "tfds"), "never_prepared")
