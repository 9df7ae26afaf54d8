"""Atomic outputs: no partial file or directory is ever left where a reader looks, even when the kernel refuses a
write half-way (a file-size limit fails it with EFBIG, as a full disk with ENOSPC); files that belong together are
replaced all or none."""

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


def test_write_json_atomic_refused_half_way_by_the_kernel_keeps_the_previous_file(tmp_path, file_size_limit):
    """A real write failure (EFBIG, as a full disk's ENOSPC) after part of the new file was written."""
    import errno

    path = tmp_path / "m.json"
    atomic.write_json_atomic(str(path), {"a": 1})
    with pytest.raises(OSError) as e, file_size_limit(1000):
        atomic.write_json_atomic(str(path), {"a": "x" * 5000})
    assert e.value.errno == errno.EFBIG
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["m.json"]


def test_atomic_files_replace_all_their_targets_or_none(tmp_path, file_size_limit):
    import errno

    first, second = tmp_path / "detections.json", tmp_path / "metrics.json"
    first.write_text("old first")
    second.write_text("old second")

    def write(text_first, text_second):
        with atomic.atomic_files([first, second], suffix=".json") as (tmp_first, tmp_second):
            for tmp, text in ((tmp_first, text_first), (tmp_second, text_second)):
                with open(tmp, "w") as f:
                    f.write(text)

    # the first written whole, the second refused half-way: neither target changes, no temporary stays
    with pytest.raises(OSError) as e, file_size_limit(1000):
        write("new first", "x" * 5000)
    assert e.value.errno == errno.EFBIG
    assert (first.read_text(), second.read_text()) == ("old first", "old second")
    assert sorted(os.listdir(tmp_path)) == ["detections.json", "metrics.json"]
    # an exception in the block (after both were written) is the same
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_files([first, second]) as tmps:
            for tmp in tmps:
                open(tmp, "w").close()
            raise KeyboardInterrupt
    assert (first.read_text(), second.read_text()) == ("old first", "old second")
    assert sorted(os.listdir(tmp_path)) == ["detections.json", "metrics.json"]
    write("new first", "new second")
    assert (first.read_text(), second.read_text()) == ("new first", "new second")
    assert sorted(os.listdir(tmp_path)) == ["detections.json", "metrics.json"]
    assert oct(second.stat().st_mode & 0o777) == oct(atomic.default_file_mode())  # not mkstemp's 0o600


def test_remove_tree_outlasts_a_late_writer(tmp_path, monkeypatch):
    """A failed storage write may still have writers in flight that recreate files in its temporary directory:
    remove_tree keeps removing until the directory stays gone. (A writer in flight, without threads: each of the
    first three removals is followed at once by a late write, so no timing can make the test pass or fail.)"""
    import shutil

    target = tmp_path / ".out.tmp-1234"
    real_rmtree, removals = shutil.rmtree, []

    def rmtree_then_a_late_write(path, ignore_errors=False):
        real_rmtree(path, ignore_errors=ignore_errors)
        removals.append(path)
        if len(removals) <= 3:
            os.makedirs(target / "d", exist_ok=True)
            (target / "d" / f"chunk{len(removals)}").write_bytes(b"x")

    os.makedirs(target / "d")
    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree_then_a_late_write)
    atomic.remove_tree(str(target), settle_s=0.1)
    assert not target.exists() and len(removals) == 4
