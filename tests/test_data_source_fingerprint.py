"""The source fingerprint: an unchanged folder (also a copy with new modification times) shows no change; an
edited instances JSON and files added to an image folder each show up, naming what changed."""

import json
import os
import shutil

from yolos_jax.data import source_fingerprint, synthetic


def test_changes_since_names_each_change(tmp_path):
    src = tmp_path / "src"
    synthetic.generate(str(src), 3, 2, seed=0, image_size=[(32, 48)], num_classes=2)
    recorded = {s: source_fingerprint.source_fingerprint(str(src), s) for s in ("train", "val")}
    assert recorded["train"]["num_files"] == 3 and recorded["val"]["num_files"] == 2
    assert source_fingerprint.changes_since(str(src), recorded) == []
    copy = tmp_path / "copy"
    shutil.copytree(src, copy, copy_function=shutil.copy)  # contents only, not times
    assert source_fingerprint.changes_since(str(copy), recorded) == []

    ann = src / "annotations" / "instances_val.json"
    doc = json.loads(ann.read_text())
    doc["images"] = doc["images"][:1]
    ann.write_text(json.dumps(doc))
    os.utime(ann, ns=(1, 1))
    (src / "train" / "extra.jpg").write_bytes(b"x")
    changes = source_fingerprint.changes_since(str(src), recorded)
    assert len(changes) == 2
    assert "'train' image folder (4 files now, 3 when prepared)" in changes[0]
    assert changes[1] == f"{src}/annotations/instances_val.json was modified"

    # An image replaced in place (the undecodable one a preparation reported, fixed): same names, another size.
    recorded = {s: source_fingerprint.source_fingerprint(str(src), s) for s in ("train", "val")}
    victim = next(p for p in sorted((src / "val").iterdir()))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert source_fingerprint.changes_since(str(src), recorded) == [
        "files in the 'val' image folder were replaced or edited in place (their sizes changed)"]
    assert source_fingerprint.changes_since(str(src), recorded, sizes=False) == []  # a run's start: no stat per file
    # A record written before sizes were fingerprinted sees no change from them.
    older = {s: {k: v for k, v in r.items() if k != "file_sizes_sha1"} for s, r in recorded.items()}
    assert source_fingerprint.changes_since(str(src), older) == []
