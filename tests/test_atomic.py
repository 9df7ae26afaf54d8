"""Atomic outputs: no partial file or directory is ever left where a reader looks."""

import json
import os

import pytest

from yolos_jax import atomic


def test_write_json_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "out" / "m.json"
    atomic.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(TypeError):
        atomic.write_json_atomic(str(path), {"a": object()})  # not serialisable: fails mid-write
    assert json.loads(path.read_text()) == {"a": 1}  # the previous file is intact
    assert os.listdir(path.parent) == ["m.json"]  # and no temp file is left behind


def test_atomic_directory_replacing_a_file_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    target.write_text("old")
    atomic.atomic_directory(str(target), lambda d: open(os.path.join(d, "x"), "w").close(), overwrite=True)
    assert target.is_dir() and os.listdir(tmp_path) == ["out"]
