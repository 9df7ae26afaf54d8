"""The prepare command (`python -m yolos_jax.data.prepare`): reuses an unchanged preparation, refuses a
changed source without --force, and --force replaces the dataset only once the new one is complete (a write failure
half-way leaves no partial dataset, and the previous one as it was); it reports dense scenes (images with more boxes
than each input.max_boxes limit)."""

import errno
import json
import os

import numpy as np
import pytest
from PIL import Image

from eval_fixtures import DENSE_TRAIN_COUNTS as TRAIN_COUNTS
from yolos_jax.data import prepared_dataset, synthetic, tfds_builder


def test_prepare_notices_a_changed_source_and_force_prepares_again(tmp_path, capsys):
    """Fixing the source folder and preparing again used to reuse the stale dataset silently."""
    from yolos_jax.data import prepare as prepare_cli

    src, data = tmp_path / "src", tmp_path / "tfds"
    synthetic.generate(str(src), 5, 2, seed=1, image_size=[(48, 64)], num_classes=2)
    args = [f"--data_dir={data}", "--name=fix", f"--coco_dir={src}", "--no_verify"]
    prepare_cli.main(args)
    first = prepared_dataset.load(str(data), "fix")
    assert first.source_changes() == [] and len(first.index("train")) == 5
    prepare_cli.main(args)  # unchanged: reused, and said so
    assert "already prepared from this source, unchanged since; reused" in capsys.readouterr().out

    ann = src / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    doc["images"] = doc["images"][:4]  # the user removes an image from the split
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in {im["id"] for im in doc["images"]}]
    ann.write_text(json.dumps(doc))
    os.utime(ann, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    (src / "train" / "extra.jpg").write_bytes((src / "train" / doc["images"][0]["file_name"]).read_bytes())
    changes = prepared_dataset.load(str(data), "fix").source_changes()
    assert any("instances_train.json was modified" in c for c in changes)
    assert any("'train' image folder" in c for c in changes)
    with pytest.raises(SystemExit, match="error: .*source changed since.*--force"):
        prepare_cli.main(args)
    assert prepared_dataset.prepare(str(data), "fix", source_dir=str(src)).path == first.path  # train/eval: reused (warned)

    # --force with a broken source: fails, and the previous version never left its place.
    good = ann.read_text()
    ann.write_text("{ not json")
    with pytest.raises(SystemExit, match="error: .*instances_train.json"):
        prepare_cli.main(args + ["--force"])
    assert len(prepared_dataset.load(str(data), "fix").index("train")) == 5
    ann.write_text(good)
    prepare_cli.main(args + ["--force"])
    again = prepared_dataset.load(str(data), "fix")
    assert len(again.index("train")) == 4 and again.source_changes() == []
    assert again.source_dir() == str(src)  # the relative source path fits the final place, not the scratch one
    assert json.loads(open(os.path.join(again.path, tfds_builder.SOURCE_FILE)).read())["source_dir_relative"] == \
        os.path.relpath(src, again.path)
    assert not [p for p in os.listdir(data) if p.startswith(".yolos_")]

    # A --force killed between the two renames of the swap: the next prepare puts the previous version back;
    # killed while building: its scratch folder is dropped.
    os.rename(again.path, data / ".yolos_previous-fix-999")
    (data / ".yolos_rebuild-fix-998").mkdir()
    assert len(prepared_dataset.prepare(str(data), "fix", source_dir=str(src)).index("train")) == 4
    assert not [p for p in os.listdir(data) if p.startswith(".yolos_")]

    # An image replaced in place (the fix for one the report called undecodable): seen by its size.
    victim = src / "val" / sorted(os.listdir(src / "val"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(SystemExit, match="error: .*source changed since: files in the 'val' image folder were "
                                         "replaced or edited in place"):
        prepare_cli.main(args)
    prepare_cli.main(args + ["--force"])
    # A split the preparation does not hold is refused, not silently left out; one the source lacks is named.
    (src / "annotations" / "instances_test.json").write_text((src / "annotations" / "instances_val.json").read_text())
    with pytest.raises(SystemExit, match=r"error: .*already prepared with the splits \['train', 'val'\], without "
                                         r"\['test'\]: .*--splits=train,val,test --force"):
        prepare_cli.main(args + ["--splits=test"])
    with pytest.raises(SystemExit, match=r"error: .*no annotations/instances_<split>.json for the split\(s\) \['vall'\]; "
                                         r"it has \['test', 'train', 'val'\]"):
        prepare_cli.main(args + ["--splits=vall"])
    # Asked for every split (no --splits) of a folder that now has one more than was prepared: said, not skipped.
    with pytest.raises(SystemExit, match=r"error: .*prepared with the splits \['train', 'val'\] only; the source also "
                                         r"has \['test'\]: prepare again with --force"):
        prepare_cli.main(args)
    (src / "annotations" / "instances_test.json").unlink()

    # Deleting the source after preparing is not a change.
    import shutil

    shutil.rmtree(src)
    assert prepared_dataset.load(str(data), "fix").source_changes() == []


def _tree_bytes(root):
    """{relative path: bytes} of every file under root."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_a_write_failure_while_preparing_leaves_no_partial_dataset(tmp_path, file_size_limit, monkeypatch):
    """A full disk or I/O error half-way through preparing (the kernel refusing val's record file after train's
    record, index and ground-truth files and val's side files were written; a full disk half-way through val's
    cleaned instances JSON): the error propagates, no prepared dataset appears (first preparation) or the previous
    one stays byte for byte (--force), and no tfds incomplete.* folder, scratch folder or temporary file is left."""
    from yolos_jax.data import prepare as prepare_cli

    src, data = tmp_path / "src", tmp_path / "tfds"
    synthetic.generate(str(src), 2, 5, seed=1, image_size=[(192, 256)], num_classes=2)
    rng = np.random.default_rng(0)
    for name in os.listdir(src / "val"):  # incompressible val images: val's record file (~290 KB) outgrows the limit
        Image.fromarray(rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)).save(src / "val" / name, format="JPEG",
                                                                                 quality=95)
    limit = 200_000  # above train's record file and every JSON file, below val's record file
    args = [f"--data_dir={data}", "--name=fail", f"--coco_dir={src}", "--no_verify"]
    done = []  # the splits whose index and ground truth were written before the failure
    real_write = tfds_builder.SplitRecord.write
    monkeypatch.setattr(tfds_builder.SplitRecord, "write",
                        lambda self, out, split, cats: done.append(split) or real_write(self, out, split, cats))

    def leftovers():
        return [os.path.join(d, n) for d, dirs, files in os.walk(data) for n in dirs + files
                if "incomplete" in n or n.startswith((".yolos_", ".tmp_"))]

    with pytest.raises(Exception, match="File too large") as e, file_size_limit(limit):
        prepare_cli.main(args)
    assert "coco_folder-val.array_record" in str(e.value) and done == ["train", "val"]
    assert [f for _, _, files in os.walk(data) for f in files] == [] and leftovers() == []
    with pytest.raises(prepared_dataset.DataError, match="not prepared"):
        prepared_dataset.load(str(data), "fail")

    prepare_cli.main(args)  # once the disk has room, the same command prepares it
    path = prepared_dataset.load(str(data), "fail").path
    before = _tree_bytes(path)
    assert max(len(b) for n, b in before.items() if "val.array_record" not in n) < limit < \
        len(next(b for n, b in before.items() if "val.array_record" in n))

    # --force: the new version fails half-way; the previous one never left its place.
    done.clear()
    with pytest.raises(Exception, match="File too large"), file_size_limit(limit):
        prepare_cli.main(args + ["--force"])
    assert done == ["train", "val"] and _tree_bytes(path) == before and leftovers() == []

    val_ids = {im["id"] for im in json.loads((src / "annotations" / "instances_val.json").read_text())["images"]}
    real_dump = json.dump

    def dump(obj, f, **kwargs):  # val's cleaned instances JSON: half of it, then the disk is full
        if not (isinstance(obj, dict) and "annotations" in obj and {im["id"] for im in obj["images"]} == val_ids):
            return real_dump(obj, f, **kwargs)
        text = json.dumps(obj, **kwargs)
        f.write(text[: len(text) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device", f.name)

    monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(OSError, match="No space left on device"):
        prepare_cli.main(args + ["--force"])
    monkeypatch.undo()
    assert _tree_bytes(path) == before and leftovers() == []
    assert len(prepared_dataset.load(str(data), "fail").index("val")) == 5


def test_prepare_reports_images_over_each_box_limit(dense_dataset, capsys):
    root, prepare_cli = dense_dataset
    prepare_cli.main([f"--data_dir={root / 'tfds'}", "--name=dense", f"--coco_dir={root / 'src'}", "--no_verify"])
    capsys.readouterr()
    ds = prepared_dataset.load(str(root / "tfds"), "dense")
    expected = {"max": 305, "over": {"100": {"images": 2, "boxes_beyond": 205 + 1}, "300": {"images": 1, "boxes_beyond": 5}}}
    assert ds.index("train").num_objects.tolist() == list(TRAIN_COUNTS)
    assert ds.report("train")["boxes_per_image"] == expected
    assert ds.report("val")["boxes_per_image"] == {"max": 3, "over": {"100": {"images": 0, "boxes_beyond": 0},
                                                                       "300": {"images": 0, "boxes_beyond": 0}}}
    # Kept next to the dataset, and printed by the command (run again: reused, the same summary).
    with open(os.path.join(ds.path, tfds_builder.SOURCE_FILE)) as f:
        assert json.load(f)["reports"]["train"]["boxes_per_image"] == expected
    prepare_cli.main([f"--data_dir={root / 'tfds'}", "--name=dense", f"--coco_dir={root / 'src'}", "--no_verify"])
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["splits"]["train"]["boxes_per_image"] == expected
