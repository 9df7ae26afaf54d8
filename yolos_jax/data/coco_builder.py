"""COCO-format data -> a prepared tfds dataset with random access (one-time `prepare`, then `load`).

Sources
  * a COCO-format folder (COCO 2017 extracted, the synthetic set, your own data):
        SOURCE/annotations/instances_{split}.json   and   SOURCE/{split}/*.jpg  (or SOURCE/images/{split}/)
    e.g. COCO 2017: splits 'train2017', 'val2017'; the synthetic set: 'train', 'val'.
  * tfds's own prepared `coco/2017` (splits 'train', 'validation'), when present in a tfds data dir.

Prepared output (the tfds builder `CocoFolder`, ArrayRecord files so that any example can be read by
index, which the planned, resumable batching in `pipeline.py` relies on):
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

Bad-data policy (applied while preparing; every skip/clip is counted in the split's report, logged with
the first examples, and stored in yolos_source.json):
  instances JSON missing, unreadable, not JSON         error naming the file (and line/column)
  'images' / 'annotations' / 'categories' missing      error naming the file and field
  image entry without int 'id' / str 'file_name',
    duplicate image id, malformed or duplicate category  error naming the file, entry and field
  annotation naming an unknown image_id                 skipped: ann_unknown_image
  annotation naming an unknown category_id              skipped: ann_unknown_category
  bbox missing or not 4 finite numbers                  skipped: ann_bad_bbox
  bbox with w <= 0 or h <= 0                            skipped: ann_degenerate_box
  bbox partly outside the image                         clipped to the image: ann_clipped_box
  bbox wholly outside the image                         skipped: ann_outside_box
  image file missing                                    image skipped: image_missing
  image corrupt / truncated / not an image              image skipped: image_undecodable
  grayscale, CMYK, palette, alpha, 16-bit images        kept, decoded as 3-channel RGB (alpha dropped,
                                                          as PIL's convert('RGB') in the original):
                                                          image_mode_<MODE>
  JSON width/height differ from the file                the file's size is used: image_size_mismatch
  image without annotations                             kept (a "no object" example, as in DETR):
                                                          image_no_annotations
  iscrowd missing -> 0; area missing -> box area.
Crowd annotations are kept in the dataset and in the ground truth (pycocotools needs them); the
transforms drop them from the training targets, as DETR does.

Dense scenes: each split's report also says how many images have more non-crowd boxes than each of
`BOX_LIMITS` and how many boxes lie beyond it (`box_limit_stats`); training keeps at most
`input.max_boxes` boxes per image (the model's `num_det_tokens` at most) and warns at start when the train
split exceeds it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from yolos_jax import atomic
from yolos_jax.data.labels import LabelMap
from yolos_jax.data.tf_setup import get_tf, get_tfds

log = logging.getLogger(__name__)

BUILDER_NAME = "coco_folder"
VERSION = "1.0.0"
SOURCE_FILE = "yolos_source.json"
INDEX_FILE = "yolos_index_{split}.json"
GT_FILE = "instances_{split}.json"
MAX_LOGGED = 10  # examples logged/stored per report counter

# tfds coco/2017's 80 contiguous labels -> COCO category ids (the 91-id space with gaps).
COCO80_TO_91 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
    32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
    58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
    88, 89, 90,
)
assert len(COCO80_TO_91) == 80


# Boxes per image that matter downstream: 100 is input.max_boxes' default, YOLOS's num_det_tokens (one
# detection per [DET] token) and COCO evaluation's maxDets; 300 a common setting for dense scenes.
BOX_LIMITS = (100, 300)


def box_limit_stats(num_objects: Sequence[int], limits: Sequence[int] = BOX_LIMITS) -> dict[str, Any]:
    """How many images of a split exceed each box limit, from the index's per-image non-crowd box counts
    (crowd boxes never become training targets). Returns {'max': most boxes in one image, 'over': {str(limit):
    {'images': images with more than `limit` boxes, 'boxes_beyond': sum over them of (boxes - limit), the
    boxes a `limit`-slot target set (input.max_boxes = limit) drops}}}."""
    n = np.asarray(num_objects, np.int64).reshape(-1)
    over = {str(int(lim)): {"images": int(np.sum(n > lim)), "boxes_beyond": int(np.sum(np.maximum(n - lim, 0)))}
            for lim in limits}
    return {"max": int(n.max()) if n.size else 0, "over": over}


class DataError(ValueError):
    """Bad input data that cannot be skipped safely; the message names the file and field."""


@dataclasses.dataclass
class Report:
    """Counts of every bad-data case met while preparing one split (see the module docstring)."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def add(self, key: str, message: str) -> None:
        self.counts[key] += 1
        if len(self.examples[key]) < MAX_LOGGED:
            self.examples[key].append(message)
            log.warning("%s: %s", key, message)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(sorted(self.counts.items())), "examples": {k: v for k, v in sorted(self.examples.items())}}


# --------------------------------------------------------------------------------------------------
# Reading and validating a COCO instances JSON (pure Python; no image access).


def read_instances_json(path: str) -> dict[str, Any]:
    """Parses a COCO instances JSON, raising DataError naming the file and what is wrong."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: instances JSON not found (expected annotations/instances_<split>.json)")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for field in ("images", "annotations", "categories"):
        if field not in doc:
            raise DataError(f"{path}: missing field '{field}' (a COCO instances JSON needs images, annotations, categories)")
        if not isinstance(doc[field], list):
            raise DataError(f"{path}: field '{field}' must be a list, got {type(doc[field]).__name__}")
    return doc


@dataclasses.dataclass
class ImageEntry:
    image_id: int
    file_name: str
    json_hw: Optional[tuple[int, int]]
    anns: list = dataclasses.field(default_factory=list)  # (ann_id, category_id, [x, y, w, h], iscrowd, area)


def parse_instances(doc: Mapping[str, Any], path: str, report: Report) -> tuple[list[ImageEntry], list[dict]]:
    """Validates the JSON structure; returns (images sorted by id with their usable annotations,
    categories). Structural problems raise DataError; bad annotations are skipped and counted."""
    try:
        LabelMap.from_categories(doc["categories"])
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: field 'categories': {e}") from None
    categories = [{"id": int(c["id"]), "name": str(c.get("name", c["id"]))} for c in doc["categories"]]
    cat_ids = {c["id"] for c in categories}
    images: dict[int, ImageEntry] = {}
    for k, im in enumerate(doc["images"]):
        if not isinstance(im, dict):
            raise DataError(f"{path}: images[{k}] must be an object, got {im!r:.80}")
        iid, fname = im.get("id"), im.get("file_name")
        if isinstance(iid, bool) or not isinstance(iid, int):
            raise DataError(f"{path}: images[{k}] field 'id' must be an integer, got {iid!r}")
        if not isinstance(fname, str) or not fname:
            raise DataError(f"{path}: images[{k}] (id {iid}) field 'file_name' must be a non-empty string")
        if iid in images:
            raise DataError(f"{path}: images[{k}] repeats image id {iid}; image ids must be unique")
        h, w = im.get("height"), im.get("width")
        hw = (int(h), int(w)) if isinstance(h, (int, float)) and isinstance(w, (int, float)) else None
        images[iid] = ImageEntry(iid, fname, hw)
    for k, a in enumerate(doc["annotations"]):
        where = f"{os.path.basename(path)} annotations[{k}] (id {a.get('id') if isinstance(a, dict) else '?'})"
        if not isinstance(a, dict):
            report.add("ann_bad_bbox", f"{where}: not an object")
            continue
        if a.get("image_id") not in images:
            report.add("ann_unknown_image", f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
            continue
        if a.get("category_id") not in cat_ids:
            report.add("ann_unknown_category", f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
            continue
        box = a.get("bbox")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            report.add("ann_bad_bbox", f"{where}: bbox {box!r:.60} is not 4 finite numbers [x, y, w, h]")
            continue
        if box[2] <= 0 or box[3] <= 0:
            report.add("ann_degenerate_box", f"{where}: bbox {box} has zero or negative size")
            continue
        iscrowd = int(bool(a.get("iscrowd", 0)))
        area = a.get("area")
        area = float(area) if isinstance(area, (int, float)) and math.isfinite(area) else float(box[2] * box[3])
        ann_id = a.get("id")
        ann_id = int(ann_id) if isinstance(ann_id, int) else -1
        images[a["image_id"]].anns.append((ann_id, int(a["category_id"]), [float(v) for v in box], iscrowd, area))
    return [images[i] for i in sorted(images)], categories


def clip_boxes(entry_anns: list, height: int, width: int, where: str, report: Report) -> list:
    """COCO [x, y, w, h] -> (x0, y0, x1, y1) clipped to the image; drops boxes left empty (counted)."""
    out = []
    for ann_id, cat, (x, y, w, h), crowd, area in entry_anns:
        x0, y0, x1, y1 = x, y, x + w, y + h
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        if cx1 <= cx0 or cy1 <= cy0:
            report.add("ann_outside_box", f"{where}: annotation {ann_id} box {[x, y, w, h]} lies outside the {width}x{height} image")
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            report.add("ann_clipped_box", f"{where}: annotation {ann_id} box {[x, y, w, h]} clipped to the {width}x{height} image")
        out.append((ann_id, cat, (cx0, cy0, cx1, cy1), crowd, area))
    return out


# --------------------------------------------------------------------------------------------------
# Images.


def probe_image(data: bytes, verify: bool = True) -> tuple[bytes, int, int, str]:
    """Checks that `data` decodes to an RGB image the way the pipeline will decode it.

    Returns (bytes to store, height, width, PIL mode or format note). The bytes are the original ones
    whenever TF's decoder reads them (JPEG, PNG, GIF, BMP, WebP, any channel layout); other formats
    PIL can read (e.g. TIFF) are re-encoded as lossless RGB PNG. Raises ValueError if nothing decodes.
    With verify=False only the header is read (fast; a truncated file then fails at training time).
    """
    from PIL import Image

    mode = "?"
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode, pil_size = im.mode, im.size
    except Exception:  # noqa: BLE001 - PIL raises many types; TF may still read it
        pil_size = None
    tf = get_tf()
    if not verify and pil_size is not None and _tf_reads_header(data):
        return data, int(pil_size[1]), int(pil_size[0]), mode
    try:
        shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
        return data, int(shape[0]), int(shape[1]), mode
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
        tf_error = str(e).strip().split("\n")[0][-120:]
    try:  # a format TF cannot decode but PIL can: store lossless RGB PNG
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
            buf = io.BytesIO()
            rgb.save(buf, format="PNG")
            return buf.getvalue(), rgb.height, rgb.width, f"{im.format}:{im.mode}->PNG"
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot decode image ({tf_error}; PIL: {e})") from None


def _tf_reads_header(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n" or data[:4] in (b"GIF8", b"RIFF") or data[:2] == b"BM"


def find_image_dir(source_dir: str, split: str) -> str:
    for cand in (os.path.join(source_dir, split), os.path.join(source_dir, "images", split)):
        if os.path.isdir(cand):
            return cand
    raise DataError(f"{source_dir}: no image folder for split '{split}' (looked for {split}/ and images/{split}/)")


def discover_splits(source_dir: str) -> list[str]:
    """Split names with an annotations/instances_<split>.json in the folder."""
    ann_dir = os.path.join(source_dir, "annotations")
    if not os.path.isdir(ann_dir):
        raise DataError(f"{source_dir}: no annotations/ folder; a COCO-format folder needs annotations/instances_<split>.json")
    splits = sorted(f[len("instances_"):-len(".json")] for f in os.listdir(ann_dir)
                    if f.startswith("instances_") and f.endswith(".json"))
    if not splits:
        raise DataError(f"{ann_dir}: no instances_<split>.json files")
    return splits


# --------------------------------------------------------------------------------------------------
# Example streams: one dict per kept image, in a deterministic order.


def _folder_examples(source_dir: str, split: str, report: Report, verify: bool, num_threads: int,
                     categories_out: list) -> Iterator[dict[str, Any]]:
    ann_file = os.path.join(source_dir, "annotations", f"instances_{split}.json")
    doc = read_instances_json(ann_file)
    entries, categories = parse_instances(doc, ann_file, report)
    del doc
    categories_out.extend(categories)
    image_dir = find_image_dir(source_dir, split)

    def load(e: ImageEntry):
        path = os.path.join(image_dir, e.file_name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return e, path, "image_missing", "file not found"
        except OSError as err:
            return e, path, "image_missing", str(err)
        try:
            return e, path, None, probe_image(raw, verify)
        except ValueError as err:
            return e, path, "image_undecodable", str(err)

    # Decode-check a bounded window of images in parallel (TF and PIL release the GIL); keep order.
    window = max(1, num_threads) * 8
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        for start in range(0, len(entries), window):
            for e, path, err, res in pool.map(load, entries[start:start + window]):
                if err is not None:
                    report.add(err, f"{path} (image id {e.image_id}): {res}")
                    continue
                data, h, w, mode = res
                if mode not in ("RGB", "?"):
                    report.add(f"image_mode_{mode}", f"{path}: mode {mode}, decoded as RGB")
                if e.json_hw is not None and e.json_hw != (h, w):
                    report.add("image_size_mismatch", f"{path}: JSON says {e.json_hw[1]}x{e.json_hw[0]}, file is {w}x{h}; using the file's size")
                anns = clip_boxes(e.anns, h, w, path, report)
                if not anns:
                    report.add("image_no_annotations", f"{path} (image id {e.image_id})")
                yield _example(data, e.image_id, e.file_name, h, w, anns)


def _tfds_examples(tfds_name: str, tfds_data_dir: Optional[str], split: str, report: Report,
                   categories_out: list, skip_decoding: bool = True) -> Iterator[dict[str, Any]]:
    """Examples from tfds's prepared coco/20xx (labels are its 80 contiguous classes). Images are read
    as stored (skip_decoding); with skip_decoding=False (tfds.testing.mock_data) decoded arrays are
    stored as PNG."""
    tfds = get_tfds()
    tf = get_tf()
    builder = tfds.builder(tfds_name, data_dir=tfds_data_dir)
    names = builder.info.features["objects"]["label"].names
    if len(names) != 80:
        raise DataError(f"{tfds_name}: expected COCO's 80 classes, found {len(names)}")
    categories_out.extend({"id": COCO80_TO_91[k], "name": n} for k, n in enumerate(names))
    decoders = {"image": tfds.decode.SkipDecoding()} if skip_decoding else None
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
    rows = []
    for ex in ds.as_numpy_iterator():
        rows.append((int(ex["image/id"]), ex))
    rows.sort(key=lambda r: r[0])
    for iid, ex in rows:
        fname = ex["image/filename"].decode() if isinstance(ex["image/filename"], bytes) else str(ex["image/filename"])
        image = ex["image"]
        if isinstance(image, np.ndarray):  # decoded (mock data): store losslessly
            image = tf.io.encode_png(image).numpy()
        try:
            data, h, w, mode = probe_image(image, True)
        except ValueError as err:
            report.add("image_undecodable", f"{tfds_name}[{split}] image id {iid}: {err}")
            continue
        if mode not in ("RGB", "?"):
            report.add(f"image_mode_{mode}", f"{fname}: mode {mode}, decoded as RGB")
        o = ex["objects"]
        anns = []
        for k in range(len(o["label"])):
            ymin, xmin, ymax, xmax = (float(v) for v in o["bbox"][k])
            box = [xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h]
            if box[2] <= 0 or box[3] <= 0:
                report.add("ann_degenerate_box", f"{fname}: object {k} box {box} has zero size")
                continue
            anns.append((int(o["id"][k]), COCO80_TO_91[int(o["label"][k])], box, int(bool(o["is_crowd"][k])),
                         float(o["area"][k])))
        anns = clip_boxes(anns, h, w, fname, report)
        if not anns:
            report.add("image_no_annotations", f"{fname} (image id {iid})")
        yield _example(data, iid, fname, h, w, anns)


def _example(data: bytes, image_id: int, file_name: str, h: int, w: int, anns: list) -> dict[str, Any]:
    n = len(anns)
    return {
        "image": data,
        "image/id": image_id,
        "image/filename": file_name,
        "image/height": h,
        "image/width": w,
        "objects": {
            "bbox": np.asarray([a[2] for a in anns], np.float32).reshape(n, 4),
            "category_id": np.asarray([a[1] for a in anns], np.int64),
            "is_crowd": np.asarray([bool(a[3]) for a in anns], bool),
            "area": np.asarray([a[4] for a in anns], np.float32),
            "id": np.asarray([a[0] for a in anns], np.int64),
        },
    }


def source_fingerprint(source_dir: str, split: str, previous: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What a change to a split's source shows up in: the instances JSON's size and SHA-1 (hashed only when its
    size or modification time differ from `previous`, so an unchanged file costs one stat), and the sorted
    file names of the image folder (files added, removed or renamed). Editing an image in place is not seen; copying the
    folder elsewhere (new modification times) is not a change."""
    ann_file = os.path.join(source_dir, "annotations", f"instances_{split}.json")
    out: dict[str, Any] = {"size": None, "mtime_ns": None, "sha1": None, "num_files": None, "file_names_sha1": None}
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
        names = sorted(os.listdir(find_image_dir(source_dir, split)))
        out["num_files"] = len(names)
        out["file_names_sha1"] = hashlib.sha1("\n".join(names).encode()).hexdigest()
    except (OSError, DataError):
        pass
    return out


# --------------------------------------------------------------------------------------------------
# The tfds builder.


def _make_builder_classes():
    tfds = get_tfds()
    tf = get_tf()

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
                description="COCO-format detection data prepared by yolos_jax.data.coco_builder",
                features=tfds.features.FeaturesDict({
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
                }),
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
                splits = list(cfg.splits or discover_splits(cfg.source_dir))
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
                stream = _tfds_examples(cfg.tfds_source, cfg.tfds_data_dir, split, report, cats, cfg.tfds_skip_decoding)
            else:
                stream = _folder_examples(cfg.source_dir, split, report, cfg.verify_images, cfg.num_threads, cats)
            index = {"image_id": [], "height": [], "width": [], "num_objects": [], "num_crowd": []}
            gt_images, gt_anns = [], []
            for key, ex in enumerate(stream):
                o = ex["objects"]
                index["image_id"].append(ex["image/id"])
                index["height"].append(ex["image/height"])
                index["width"].append(ex["image/width"])
                index["num_objects"].append(int((~o["is_crowd"]).sum()))
                index["num_crowd"].append(int(o["is_crowd"].sum()))
                gt_images.append({"id": ex["image/id"], "file_name": ex["image/filename"],
                                  "height": ex["image/height"], "width": ex["image/width"]})
                for b, c, crowd, area, aid in zip(o["bbox"], o["category_id"], o["is_crowd"], o["area"], o["id"]):
                    x0, y0, x1, y1 = (float(v) for v in b)
                    gt_anns.append({"id": int(aid), "image_id": ex["image/id"], "category_id": int(c),
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": int(crowd)})
                yield key, ex
            # Annotation ids must be unique and positive for pycocotools; renumber missing ones.
            used = {a["id"] for a in gt_anns if a["id"] > 0}
            next_id = max(used, default=0) + 1
            seen: set = set()
            for a in gt_anns:
                if a["id"] <= 0 or a["id"] in seen:
                    a["id"] = next_id
                    next_id += 1
                seen.add(a["id"])
            out = str(self.data_path)
            atomic.write_json_atomic(os.path.join(out, INDEX_FILE.format(split=split)), index)
            atomic.write_json_atomic(os.path.join(out, GT_FILE.format(split=split)),
                               {"images": gt_images, "annotations": gt_anns, "categories": cats})
            density = box_limit_stats(index["num_objects"])
            for lim, o in density["over"].items():
                if o["images"]:
                    log.warning("split '%s': %d images have more than %s non-crowd boxes (up to %d); %d boxes lie "
                                "beyond %s", split, o["images"], lim, density["max"], o["boxes_beyond"], lim)
            self._yolos_reports[split] = {**report.to_dict(), "boxes_per_image": density}
            self._yolos_categories[split] = cats
            # Rewritten after each split, so the last one leaves the full summary. Splits must agree on
            # category names; their union defines the label map (a val set may lack a class).
            merged: dict[int, str] = {}
            for s_name, s_cats in sorted(self._yolos_categories.items()):
                for c in s_cats:
                    if merged.setdefault(c["id"], c["name"]) != c["name"]:
                        raise DataError(f"category id {c['id']} is named {merged[c['id']]!r} in one split and "
                                        f"{c['name']!r} in split '{s_name}'; the splits must share categories")
            atomic.write_json_atomic(os.path.join(out, SOURCE_FILE), {
                "format": "yolos_jax.coco_folder", "version": VERSION,
                "source_dir": cfg.source_dir, "tfds_source": cfg.tfds_source,
                "source_dir_relative": os.path.relpath(cfg.source_dir, out) if cfg.source_dir else None,
                "categories": [{"id": i, "name": n} for i, n in sorted(merged.items())],
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
    import absl.logging  # tfds warns "Using custom data configuration" for every dynamic config

    level = absl.logging.get_verbosity()
    absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        return builder_cls(data_dir=data_dir, config=config_cls(name=name, **config_kwargs), file_format="array_record")
    finally:
        absl.logging.set_verbosity(level)


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
    b = make_builder(data_dir, name, source_dir=source_dir, splits=splits, tfds_source=tfds_source,
                     tfds_data_dir=tfds_data_dir, verify_images=verify_images, num_threads=num_threads,
                     **builder_kwargs)
    _recover_interrupted_rebuild(data_dir, name, str(b.data_path))
    if b.data_path.exists() and not force:
        ds = load(data_dir, name)
        ds.check_source(source_dir, tfds_source)
        changes = ds.source_changes(source_dir)
        if changes and not reuse_changed:
            raise DataError(f"{ds.path} is already prepared, but its source changed since: {'; '.join(changes)}. "
                            "Prepare again with --force (python -m yolos_jax.data.prepare ... --force)")
        return ds
    if not b.data_path.exists():
        return _download_and_prepare(b, data_dir, name, source_dir, tfds_source, quiet)
    # --force over a prepared dataset: build the new version beside it (in a scratch data dir), then swap the two
    # folders. Until the swap the old version stays where it is, whatever happens to this process.
    import shutil

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
    import glob
    import shutil

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

    def source_changes(self, source_dir: Optional[str] = None) -> list[str]:
        """What changed in the source folder (`source_dir`, default `self.source_dir()`) since it was prepared
        (see `source_fingerprint`); [] if nothing did, if the folder is gone (deleting the source after
        preparing is fine), or if nothing was recorded (tfds sources, datasets prepared by older versions)."""
        recorded = self.source.get("source_fingerprints") or {}
        src = os.path.abspath(source_dir) if source_dir else self.source_dir()
        if not src or not recorded or not os.path.isdir(src):
            return []
        changes = []
        for split, before in sorted(recorded.items()):
            now = source_fingerprint(src, split, before)
            if [now["size"], now["sha1"]] != [before.get("size"), before.get("sha1")]:
                changes.append(f"{src}/annotations/instances_{split}.json was modified")
            if now["file_names_sha1"] != before.get("file_names_sha1"):
                changes.append(f"files were added to, removed from or renamed in the '{split}' image folder "
                               f"({now['num_files']} files now, {before.get('num_files')} when prepared)")
        return changes

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

    def source_for(self, split: str) -> Any:
        """Random-access reader: `src[i]` -> the record dict of example i (image left encoded)."""
        self._check_split(split)
        if split not in self._sources:
            tfds = get_tfds()
            src = self.builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
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
