"""The tfds builder `CocoFolder`: a COCO-format source as a random-access tfds dataset, and its side files.

Prepared output (ArrayRecord files so that any example can be read by index, which the planned, resumable
batching of `iterators` relies on):
    DATA_DIR/coco_folder/NAME/1.0.0/
        coco_folder-{split}.array_record-*    examples in `index` order (below)
        dataset_info.json, features.json      tfds metadata
        yolos_source.json                     where it came from, categories, per-split reports (bad data,
                                              and `boxes_per_image`: images over the box limits)
        yolos_index_{split}.json              per example: image_id, height, width, num_objects, num_crowd
        instances_{split}.json                the cleaned ground truth (COCO format) for pycocotools
Example features: image (encoded bytes, stored as read), image/id, image/filename, image/height,
image/width, objects/{bbox [N, 4] float32 (x0, y0, x1, y1) pixels clipped to the image, category_id
int64 (the dataset's own ids; `LabelMap` maps them to labels), is_crowd bool, area float32, id int64}.

The format, feature names and VERSION are what prepared datasets on disk were written with: changing them
orphans every prepared dataset.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import absl.logging

from yolos_jax import atomic
from yolos_jax.data import coco_source
from yolos_jax.data.coco_json import DataError, Report, box_limit_stats
from yolos_jax.data.source_fingerprint import source_fingerprint
from yolos_jax.data.tf_setup import get_tf, get_tfds

log = logging.getLogger(__name__)

VERSION = "1.0.0"
SOURCE_FILE = "yolos_source.json"
INDEX_FILE = "yolos_index_{split}.json"
GT_FILE = "instances_{split}.json"


def features():
    """The example features (see the module docstring): the on-disk format of every prepared dataset."""
    tfds = get_tfds()
    tf = get_tf()
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "image/id": tf.int64,
        "image/filename": tfds.features.Text(),
        "image/height": tf.int32,
        "image/width": tf.int32,
        "objects": tfds.features.Sequence({
            "bbox": tfds.features.Tensor(shape=(4,), dtype=tf.float32),
            "category_id": tf.int64,
            "is_crowd": tf.bool,
            "area": tf.float32,
            "id": tf.int64,
        }),
    })


class SplitRecord:
    """One split's side files, gathered while its examples are generated (in record order): the index
    (INDEX_FILE) and the cleaned ground truth for pycocotools (GT_FILE)."""

    def __init__(self):
        self.index: dict[str, list] = {"image_id": [], "height": [], "width": [], "num_objects": [], "num_crowd": []}
        self.gt_images: list[dict] = []
        self.gt_anns: list[dict] = []

    def add(self, ex: dict[str, Any]) -> None:
        """Records one example (`coco_source.make_example`'s dict)."""
        o = ex["objects"]
        self.index["image_id"].append(ex["image/id"])
        self.index["height"].append(ex["image/height"])
        self.index["width"].append(ex["image/width"])
        self.index["num_objects"].append(int((~o["is_crowd"]).sum()))
        self.index["num_crowd"].append(int(o["is_crowd"].sum()))
        self.gt_images.append({"id": ex["image/id"], "file_name": ex["image/filename"],
                               "height": ex["image/height"], "width": ex["image/width"]})
        for b, c, crowd, area, aid in zip(o["bbox"], o["category_id"], o["is_crowd"], o["area"], o["id"]):
            x0, y0, x1, y1 = (float(v) for v in b)
            self.gt_anns.append({"id": int(aid), "image_id": ex["image/id"], "category_id": int(c),
                                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": int(crowd)})

    def write(self, out: str, split: str, categories: list[dict]) -> dict[str, Any]:
        """Writes the split's index and ground truth into `out`; returns its `box_limit_stats` (warned about)."""
        # Annotation ids must be unique and positive for pycocotools; renumber missing ones.
        used = {a["id"] for a in self.gt_anns if a["id"] > 0}
        next_id = max(used, default=0) + 1
        seen: set = set()
        for a in self.gt_anns:
            if a["id"] <= 0 or a["id"] in seen:
                a["id"] = next_id
                next_id += 1
            seen.add(a["id"])
        atomic.write_json_atomic(os.path.join(out, INDEX_FILE.format(split=split)), self.index)
        atomic.write_json_atomic(os.path.join(out, GT_FILE.format(split=split)),
                                 {"images": self.gt_images, "annotations": self.gt_anns, "categories": categories})
        density = box_limit_stats(self.index["num_objects"])
        for lim, o in density["over"].items():
            if o["images"]:
                log.warning("split '%s': %d images have more than %s non-crowd boxes (up to %d); %d boxes lie "
                            "beyond %s", split, o["images"], lim, density["max"], o["boxes_beyond"], lim)
        return density


def merged_categories(categories_by_split: dict[str, list[dict]]) -> list[dict]:
    """The union of the splits' categories, sorted by id: it defines the label map (a val set may lack a class).
    Splits must agree on category names (DataError naming the id and split)."""
    merged: dict[int, str] = {}
    for s_name, s_cats in sorted(categories_by_split.items()):
        for c in s_cats:
            if merged.setdefault(c["id"], c["name"]) != c["name"]:
                raise DataError(f"category id {c['id']} is named {merged[c['id']]!r} in one split and "
                                f"{c['name']!r} in split '{s_name}'; the splits must share categories")
    return [{"id": i, "name": n} for i, n in sorted(merged.items())]


def _make_builder_classes():
    tfds = get_tfds()

    class CocoFolderConfig(tfds.core.BuilderConfig):
        """name: the dataset's name in DATA_DIR; source_dir or tfds_source says where it comes from."""

        def __init__(self, *, source_dir: Optional[str] = None, splits: Optional[Sequence[str]] = None,
                     tfds_source: Optional[str] = None, tfds_data_dir: Optional[str] = None,
                     verify_images: bool = True, num_threads: int = 2, tfds_skip_decoding: bool = True, **kwargs):
            super().__init__(version=VERSION, **kwargs)
            self.tfds_skip_decoding = tfds_skip_decoding  # False only for tfds.testing.mock_data
            self.source_dir = source_dir
            self.splits = tuple(splits) if splits else None
            self.tfds_source = tfds_source
            self.tfds_data_dir = tfds_data_dir
            self.verify_images = verify_images
            self.num_threads = num_threads

    class CocoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A COCO-format folder (or tfds coco/2017) as a random-access tfds dataset; see module docstring."""

        VERSION = tfds.core.Version(VERSION)
        BUILDER_CONFIGS = []

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                # The description is stored in dataset_info.json; kept as earlier versions wrote it.
                description="COCO-format detection data prepared by yolos_jax.data.coco_builder",
                features=features(),
                # Keep the generation order (sorted image ids): the index files rely on it.
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            cfg = self.builder_config
            if cfg.tfds_source:
                splits = list(cfg.splits or ("train", "validation"))
            else:
                if not cfg.source_dir or not os.path.isdir(cfg.source_dir):
                    raise DataError(f"source folder {cfg.source_dir!r} does not exist")
                splits = list(cfg.splits or coco_source.discover_splits(cfg.source_dir))
            self._yolos_reports = {}
            self._yolos_categories = {}
            self._yolos_fingerprints = {}
            return {s: self._generate_examples(s) for s in splits}

        def _generate_examples(self, split):
            cfg = self.builder_config
            report = Report()
            cats: list = []
            if not cfg.tfds_source:  # taken before reading, so a change during preparation counts as one
                self._yolos_fingerprints[split] = source_fingerprint(cfg.source_dir, split)
            if cfg.tfds_source:
                stream = coco_source.tfds_examples(cfg.tfds_source, cfg.tfds_data_dir, split, report, cats,
                                                   cfg.tfds_skip_decoding)
            else:
                stream = coco_source.folder_examples(cfg.source_dir, split, report, cfg.verify_images,
                                                     cfg.num_threads, cats)
            record = SplitRecord()
            for key, ex in enumerate(stream):
                record.add(ex)
                yield key, ex
            out = str(self.data_path)
            density = record.write(out, split, cats)
            self._yolos_reports[split] = {**report.to_dict(), "boxes_per_image": density}
            self._yolos_categories[split] = cats
            # Rewritten after each split, so the last one leaves the full summary.
            atomic.write_json_atomic(os.path.join(out, SOURCE_FILE), {
                "format": "yolos_jax.coco_folder", "version": VERSION,
                "source_dir": cfg.source_dir, "tfds_source": cfg.tfds_source,
                "source_dir_relative": os.path.relpath(cfg.source_dir, out) if cfg.source_dir else None,
                "categories": merged_categories(self._yolos_categories),
                "reports": self._yolos_reports,
                "source_fingerprints": self._yolos_fingerprints,
            })

    return CocoFolderConfig, CocoFolder


_CLASSES = None


def builder_classes():
    """(CocoFolderConfig, CocoFolder), created on first use (tfds is imported lazily)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_builder_classes()
    return _CLASSES


def make_builder(data_dir: str, name: str, **config_kwargs: Any):
    """The `CocoFolder` builder for dataset `name` in `data_dir` (prepared or not)."""
    config_cls, builder_cls = builder_classes()
    # tfds warns "Using custom data configuration" for every dynamic config: quiet while building one.
    level = absl.logging.get_verbosity()
    absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        return builder_cls(data_dir=data_dir, config=config_cls(name=name, **config_kwargs), file_format="array_record")
    finally:
        absl.logging.set_verbosity(level)

