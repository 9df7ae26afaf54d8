"""The prepared dataset: prepared once (`prepare`), then opened (`load`, or `open_dataset` for an input config)
and read by index (`PreparedDataset`: categories, per-split indexes, ground-truth JSON, random access).
The files on disk are `tfds_builder`'s.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from yolos_jax import atomic
from yolos_jax.data import coco_source, source_fingerprint
from yolos_jax.data.coco_json import DataError, box_limit_stats
from yolos_jax.data.example_reader import RecordReader
from yolos_jax.data.labels import LabelMap
from yolos_jax.data.tf_setup import get_tfds
from yolos_jax.data.tfds_builder import GT_FILE, INDEX_FILE, SOURCE_FILE, make_builder

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Preparing once.


def prepare(
    data_dir: str,
    name: str,
    *,
    source_dir: Optional[str] = None,
    splits: Optional[Sequence[str]] = None,
    tfds_source: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
    verify_images: bool = True,
    num_threads: int = 2,
    quiet: bool = False,
    force: bool = False,
    reuse_changed: bool = True,
    **builder_kwargs: Any,
) -> "PreparedDataset":
    """One-time: turns `source_dir` (COCO-format folder) or `tfds_source` (e.g. 'coco/2017') into the
    prepared dataset DATA_DIR/coco_folder/NAME/1.0.0. A no-op if it is already there (and came from the
    same source). tfds writes into a temporary folder and renames it at the end, so a crash leaves
    nothing half-prepared. splits: which splits (default: every instances_<split>.json; tfds: train
    and validation). verify_images: fully decode each image (else header only). quiet: no progress
    bars. force: prepare again even if prepared (the new version is built in a scratch folder beside the old
    one, which is replaced only once the new one is complete; an interrupted swap is undone by the next
    call). reuse_changed: what to do when it is prepared but the source folder
    changed since (`PreparedDataset.source_changes`): True reuses it with a warning, False raises
    (the `prepare` command: the user asked for the folder as it is now). Returns `load(data_dir, name)`."""
    if (source_dir is None) == (tfds_source is None):
        raise ValueError("prepare: give exactly one of source_dir (a COCO-format folder) or tfds_source (e.g. 'coco/2017')")
    if source_dir is not None:
        source_dir = os.path.abspath(source_dir)
        if not os.path.isdir(source_dir):
            raise DataError(f"source folder {source_dir} does not exist")
        unknown = [s for s in (splits or ()) if s not in coco_source.discover_splits(source_dir)]
        if unknown:
            raise DataError(f"{source_dir}: no annotations/instances_<split>.json for the split(s) {unknown}; it has "
                            f"{coco_source.discover_splits(source_dir)}")
    b = make_builder(data_dir, name, source_dir=source_dir, splits=splits, tfds_source=tfds_source,
                     tfds_data_dir=tfds_data_dir, verify_images=verify_images, num_threads=num_threads,
                     **builder_kwargs)
    _recover_interrupted_rebuild(data_dir, name, str(b.data_path))
    if b.data_path.exists() and not force:
        ds = load(data_dir, name)
        ds.check_source(source_dir, tfds_source)
        changes = ds.source_changes(source_dir, sizes=not reuse_changed)  # a stat per image only when asked to prepare
        if changes and not reuse_changed:
            raise DataError(f"{ds.path} is already prepared, but its source changed since: {'; '.join(changes)}. "
                            "Prepare again with --force (python -m yolos_jax.data.prepare ... --force)")
        missing = [s for s in (splits or ()) if s not in ds.splits]
        if missing:  # a preparation holds the splits it was made with; asking for another must not pass unseen
            wanted = ",".join(dict.fromkeys([*ds.splits, *splits]))
            raise DataError(f"{ds.path} is already prepared with the splits {sorted(ds.splits)}, without {missing}: "
                            f"prepare it again with them (python -m yolos_jax.data.prepare ... --splits={wanted} "
                            "--force), or under another name")
        return ds
    if not b.data_path.exists():
        return _download_and_prepare(b, data_dir, name, source_dir, tfds_source, quiet)
    # --force over a prepared dataset: build the new version beside it (in a scratch data dir), then swap the two
    # folders. Until the swap the old version stays where it is, whatever happens to this process.
    scratch = os.path.join(data_dir, f"{_REBUILD_PREFIX}{name}-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    fresh = make_builder(scratch, name, source_dir=source_dir, splits=splits, tfds_source=tfds_source,
                         tfds_data_dir=tfds_data_dir, verify_images=verify_images, num_threads=num_threads,
                         **builder_kwargs)
    try:
        _download_and_prepare(fresh, scratch, name, source_dir, tfds_source, quiet)
        _set_relative_source(str(fresh.data_path), str(b.data_path))
        previous = os.path.join(data_dir, f"{_PREVIOUS_PREFIX}{name}-{os.getpid()}")
        os.rename(str(b.data_path), previous)
        os.rename(str(fresh.data_path), str(b.data_path))
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return load(data_dir, name)


_REBUILD_PREFIX = ".yolos_rebuild-"  # a --force preparation in progress (or interrupted): scratch data dir
_PREVIOUS_PREFIX = ".yolos_previous-"  # the replaced version, between the two renames of the swap


def _recover_interrupted_rebuild(data_dir: str, name: str, data_path: str) -> None:
    """Cleans up after a `prepare(force=True)` that was killed: drops its scratch folder, and puts the previous
    version back if the process died between the two renames of the swap."""
    for scratch in glob.glob(os.path.join(data_dir, f"{_REBUILD_PREFIX}{name}-*")):
        shutil.rmtree(scratch, ignore_errors=True)
    for previous in glob.glob(os.path.join(data_dir, f"{_PREVIOUS_PREFIX}{name}-*")):
        if os.path.exists(data_path):
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(previous, data_path)
            log.warning("put back %s, left aside by an interrupted --force preparation", data_path)


def _set_relative_source(built_path: str, final_path: str) -> None:
    """The source's path relative to the prepared folder, for the folder's final place (it was built elsewhere)."""
    src_file = os.path.join(built_path, SOURCE_FILE)
    with open(src_file) as f:
        source = json.load(f)
    if source.get("source_dir"):
        source["source_dir_relative"] = os.path.relpath(source["source_dir"], final_path)
        atomic.write_json_atomic(src_file, source)


def _download_and_prepare(b: Any, data_dir: str, name: str, source_dir: Optional[str], tfds_source: Optional[str],
                          quiet: bool) -> "PreparedDataset":
    tfds = get_tfds()
    if quiet:
        tfds.disable_progress_bar()
    try:
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    except Exception as e:  # noqa: BLE001 - tfds wraps errors; surface the two we can explain
        msg = str(e)
        if "No examples were yielded" in msg:
            raise DataError(f"{source_dir or tfds_source}: a split has no usable images ({msg.strip().splitlines()[0]}); "
                            "the warnings above say why each image was skipped") from None
        if isinstance(e, DataError) or "DataError" in type(e).__name__:
            raise
        cause = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    finally:
        if quiet:
            tfds.enable_progress_bar()
    return load(data_dir, name)


# --------------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class SplitIndex:
    """Per-example facts of a prepared split, in record order (index i = record i)."""

    image_id: np.ndarray  # [N] int64
    height: np.ndarray  # [N] int32, original image height in pixels
    width: np.ndarray  # [N] int32
    num_objects: np.ndarray  # [N] int32, non-crowd boxes
    num_crowd: np.ndarray  # [N] int32

    def __len__(self) -> int:
        return len(self.image_id)


class PreparedDataset:
    """A prepared dataset: categories, per-split indexes, ground-truth JSON paths, random-access reads."""

    def __init__(self, builder: Any):
        self.builder = builder
        self.path = str(builder.data_path)
        src_file = os.path.join(self.path, SOURCE_FILE)
        if not os.path.isfile(src_file):
            raise DataError(f"{self.path}: missing {SOURCE_FILE}; this folder was not prepared by yolos_jax "
                            "(delete it and run python -m yolos_jax.data.prepare again)")
        with open(src_file) as f:
            self.source = json.load(f)
        self.categories: list[dict] = self.source["categories"]
        self.splits = sorted(builder.info.splits.keys())
        self._index: dict[str, SplitIndex] = {}
        self._sources: dict[str, Any] = {}

    def check_source(self, source_dir: Optional[str], tfds_source: Optional[str]) -> None:
        """Raises if this dataset was prepared from a different source than the one asked for."""
        relative = self.source.get("source_dir_relative")
        same_place = relative is not None and source_dir is not None and (
            os.path.normpath(os.path.join(self.path, relative)) == os.path.abspath(source_dir))  # moved together
        if source_dir is not None and self.source.get("source_dir") not in (None, os.path.abspath(source_dir)) \
                and not same_place:
            raise DataError(
                f"{self.path} was prepared from {self.source.get('source_dir')}, not {source_dir} "
                f"(input.source_dir): to use this prepared dataset set --config.input.source_dir="
                f"{self.source.get('source_dir')}; to prepare {source_dir} choose another input.dataset_name "
                "(or prepare again with --force)")
        if tfds_source is not None and self.source.get("tfds_source") != tfds_source:
            raise DataError(f"{self.path} was prepared from {self.source.get('source_dir') or self.source.get('tfds_source')}, "
                            f"not tfds {tfds_source}: choose another dataset name or delete the prepared folder")

    def source_changes(self, source_dir: Optional[str] = None, sizes: bool = True) -> list[str]:
        """What changed in the source folder (`source_dir`, default `self.source_dir()`) since it was prepared
        (`source_fingerprint.changes_since`; sizes=False: not the image files' sizes); [] if nothing did, if the
        folder is gone (deleting the source after preparing is fine), or if nothing was recorded (tfds sources,
        datasets prepared by older versions)."""
        recorded = self.source.get("source_fingerprints") or {}
        src = os.path.abspath(source_dir) if source_dir else self.source_dir()
        if not src or not recorded or not os.path.isdir(src):
            return []
        return source_fingerprint.changes_since(src, recorded, sizes=sizes)

    def source_dir(self) -> Optional[str]:
        """The source folder: where it was when prepared, or, if that is gone and the folder sits at the same place
        relative to the prepared dataset (a copied workdir: WORKDIR/data/{synthetic,tfds}), there."""
        recorded, relative = self.source.get("source_dir"), self.source.get("source_dir_relative")
        if recorded and not os.path.isdir(recorded) and relative:
            moved = os.path.normpath(os.path.join(self.path, relative))
            if os.path.isdir(moved):
                return moved
        return recorded

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise DataError(f"split '{split}' is not in the prepared dataset {self.path} (it has {self.splits})")

    def index(self, split: str) -> SplitIndex:
        self._check_split(split)
        if split not in self._index:
            path = os.path.join(self.path, INDEX_FILE.format(split=split))
            with open(path) as f:
                d = json.load(f)
            idx = SplitIndex(
                image_id=np.asarray(d["image_id"], np.int64), height=np.asarray(d["height"], np.int32),
                width=np.asarray(d["width"], np.int32), num_objects=np.asarray(d["num_objects"], np.int32),
                num_crowd=np.asarray(d["num_crowd"], np.int32),
            )
            n = self.builder.info.splits[split].num_examples
            if len(idx) != n:
                raise DataError(f"{path}: {len(idx)} entries but the split has {n} records; re-prepare the dataset")
            self._index[split] = idx
        return self._index[split]

    def gt_json(self, split: str) -> str:
        """Path of the split's cleaned instances JSON (for pycocotools)."""
        self._check_split(split)
        return os.path.join(self.path, GT_FILE.format(split=split))

    def report(self, split: str) -> dict[str, Any]:
        """The split's preparation report: bad-data 'counts' and 'examples', and 'boxes_per_image'
        (`box_limit_stats`; computed from the index for datasets prepared before it was recorded)."""
        out = dict(self.source.get("reports", {}).get(split, {}))
        if "boxes_per_image" not in out:
            out["boxes_per_image"] = box_limit_stats(self.index(split).num_objects)
        return out

    def source_for(self, split: str) -> RecordReader:
        """Random-access reader: `src[i]` -> the record dict of example i (image left encoded)."""
        self._check_split(split)
        if split not in self._sources:
            src = RecordReader(self.builder, split, get_tfds())
            idx = self.index(split)
            # The index files assume records are stored in generation order; check both ends.
            for i in {0, len(idx) - 1} if len(idx) else ():
                if int(src[i]["image/id"]) != int(idx.image_id[i]):
                    raise DataError(f"{self.path}: record {i} is image {int(src[i]['image/id'])} but the index says "
                                    f"{int(idx.image_id[i])}; re-prepare the dataset")
            self._sources[split] = src
        return self._sources[split]


def load(data_dir: str, name: str) -> PreparedDataset:
    """Opens the prepared dataset DATA_DIR/coco_folder/NAME (DataError with the command to run if absent)."""
    b = make_builder(data_dir, name)
    if not b.data_path.exists():
        raise DataError(
            f"dataset '{name}' is not prepared in {data_dir} ({b.data_path} missing). Prepare it once with\n"
            f"  python -m yolos_jax.data.prepare --data_dir={data_dir} --name={name} --coco_dir=/path/to/coco_format_folder\n"
            f"(or --from_tfds=coco/2017), or set input.auto_prepare=True with input.source_dir."
        )
    return PreparedDataset(b)


# --------------------------------------------------------------------------------------------------
# The prepared dataset of an input config.


def open_dataset(cfg: ml_collections.ConfigDict, process_count: int = 1) -> PreparedDataset:
    """The prepared dataset of `cfg` (preparing it first if input.auto_prepare and single-process)."""
    try:
        ds = load(cfg.data_dir, cfg.dataset_name)
    except DataError:
        if not cfg.auto_prepare or not (cfg.source_dir or cfg.from_tfds):
            raise
        if process_count > 1:
            raise DataError(
                f"dataset '{cfg.dataset_name}' is not prepared in {cfg.data_dir}; with several processes prepare it "
                "once beforehand: python -m yolos_jax.data.prepare ...") from None
        ds = prepare(
            cfg.data_dir, cfg.dataset_name, source_dir=cfg.source_dir or None, tfds_source=cfg.from_tfds or None,
            tfds_data_dir=cfg.tfds_data_dir or None, verify_images=cfg.verify_images, num_threads=cfg.prepare_threads)
    if cfg.source_dir or cfg.from_tfds:
        ds.check_source(cfg.source_dir or None, cfg.from_tfds or None)
    changes = ds.source_changes(cfg.source_dir or None, sizes=False)  # each start: names only, no stat per image
    if changes:
        log.warning("using %s as prepared, but its source changed since (%s); to use the source as it is now: "
                    "python -m yolos_jax.data.prepare --data_dir=%s --name=%s --coco_dir=%s --force",
                    ds.path, "; ".join(changes), cfg.data_dir, cfg.dataset_name, cfg.source_dir or ds.source_dir())
    return ds


@dataclasses.dataclass
class DatasetInfo:
    """What train/eval need to know about the data.

    label_map: category ids <-> labels (its num_classes is the model's num_classes).
    num_examples: {split: examples in the prepared split}.
    instances_json: {split: path of the cleaned COCO ground-truth JSON for pycocotools}; it holds
      exactly the examples the eval iterator yields (image ids, original sizes).
    reports: {split: bad-data counts from preparing}.
    """

    label_map: LabelMap
    num_examples: dict
    instances_json: dict
    train_split: str
    val_split: str
    path: str
    reports: dict

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes


def dataset_info(cfg: ml_collections.ConfigDict) -> DatasetInfo:
    """The `DatasetInfo` of `cfg`'s prepared dataset (preparing it first if input.auto_prepare)."""
    ds = open_dataset(cfg)
    return DatasetInfo(
        label_map=LabelMap.from_categories(ds.categories, cfg.label_mode),
        num_examples={s: int(ds.builder.info.splits[s].num_examples) for s in ds.splits},
        instances_json={s: ds.gt_json(s) for s in ds.splits},
        train_split=cfg.train_split, val_split=cfg.val_split, path=ds.path,
        reports={s: ds.report(s) for s in ds.splits},
    )


def coco_ground_truth(input_cfg: ml_collections.ConfigDict, split: Optional[str] = None) -> str:
    """Path of the cleaned COCO instances JSON of `split` (default input.val_split): exactly the images
    and annotations of the prepared split, for pycocotools."""
    return open_dataset(input_cfg).gt_json(split or input_cfg.val_split)

