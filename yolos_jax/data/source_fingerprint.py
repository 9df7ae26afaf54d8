"""What a change to a prepared source folder shows up in: `source_fingerprint` is recorded per split when
preparing (yolos_source.json's 'source_fingerprints'), `changes_since` compares the folder as it is now."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Optional

from yolos_jax.data.coco_json import DataError
from yolos_jax.data.coco_source import find_image_dir


def source_fingerprint(source_dir: str, split: str, previous: Optional[Mapping[str, Any]] = None,
                       sizes: bool = True) -> dict[str, Any]:
    """What a change to a split's source shows up in: the instances JSON's size and SHA-1 (hashed only when its
    size or modification time differ from `previous`, so an unchanged file costs one stat), the sorted file names
    of the image folder (files added, removed or renamed) and their sizes: an image replaced in place, e.g. the
    undecodable one a preparation's report named, shows up when its size changed (one stat per file: ~0.2 s for
    COCO's 118k on a local disk, more on a network file system, so `changes_since` compares sizes only when asked:
    the prepare command does, a run's start does not). Files in sub-folders of the image folder are not looked
    at. Copying the folder elsewhere (new modification times) is not a change."""
    ann_file = os.path.join(source_dir, "annotations", f"instances_{split}.json")
    out: dict[str, Any] = {"size": None, "mtime_ns": None, "sha1": None, "num_files": None, "file_names_sha1": None,
                           "file_sizes_sha1": None}
    try:
        st = os.stat(ann_file)
        out["size"], out["mtime_ns"] = st.st_size, st.st_mtime_ns
        if previous and [previous.get("size"), previous.get("mtime_ns")] == [out["size"], out["mtime_ns"]]:
            out["sha1"] = previous.get("sha1")
        else:
            h = hashlib.sha1()
            with open(ann_file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            out["sha1"] = h.hexdigest()
    except OSError:
        pass
    try:
        with os.scandir(find_image_dir(source_dir, split)) as entries:
            files = sorted((e.name, (e.stat().st_size if e.is_file() else -1) if sizes else None) for e in entries)
        out["num_files"] = len(files)
        out["file_names_sha1"] = hashlib.sha1("\n".join(name for name, _ in files).encode()).hexdigest()
        if sizes:
            out["file_sizes_sha1"] = hashlib.sha1("\n".join(f"{n}\t{s}" for n, s in files).encode()).hexdigest()
    except (OSError, DataError):
        pass
    return out


def changes_since(source_dir: str, recorded: Mapping[str, Mapping[str, Any]], sizes: bool = True) -> list[str]:
    """What changed in `source_dir` since `recorded` ({split: `source_fingerprint` when prepared}), one sentence
    per change; [] if nothing did. sizes=False skips the image files' sizes (no stat per file)."""
    changes = []
    for split, before in sorted(recorded.items()):
        now = source_fingerprint(source_dir, split, before, sizes=sizes)
        if [now["size"], now["sha1"]] != [before.get("size"), before.get("sha1")]:
            changes.append(f"{source_dir}/annotations/instances_{split}.json was modified")
        if now["file_names_sha1"] != before.get("file_names_sha1"):
            changes.append(f"files were added to, removed from or renamed in the '{split}' image folder "
                           f"({now['num_files']} files now, {before.get('num_files')} when prepared)")
        elif sizes and before.get("file_sizes_sha1") not in (None, now["file_sizes_sha1"]):  # (older: no sizes)
            changes.append(f"files in the '{split}' image folder were replaced or edited in place (their sizes "
                           "changed)")
    return changes
