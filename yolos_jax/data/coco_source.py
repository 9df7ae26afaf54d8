"""A COCO-format source read as a stream of examples, one dict per kept image, in image-id order.

Sources
  * a COCO-format folder (COCO 2017 extracted, the synthetic set, your own data):
        SOURCE/annotations/instances_{split}.json   and   SOURCE/{split}/*.jpg  (or SOURCE/images/{split}/)
    e.g. COCO 2017: splits 'train2017', 'val2017'; the synthetic set: 'train', 'val'.
  * tfds's own prepared `coco/2017` (splits 'train', 'validation'), when present in a tfds data dir.

Each example holds the features of `tfds_builder` (image bytes as stored, boxes (x0, y0, x1, y1) pixels
clipped to the image, the dataset's own category ids). Images are probed here, annotations parsed in
`coco_json`; both follow the bad-data policy written there.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import re
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from yolos_jax.data.coco_json import DataError, ImageEntry, Report, clip_boxes, parse_instances, read_instances_json
from yolos_jax.data.tf_setup import get_tf, get_tfds

# tfds coco/2017's 80 contiguous labels -> COCO category ids (the 91-id space with gaps).
COCO80_TO_91 = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
    32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
    58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
    88, 89, 90,
)
assert len(COCO80_TO_91) == 80


def probe_image(data: bytes, verify: bool = True) -> tuple[bytes, int, int, str]:
    """Checks that `data` decodes to an RGB image the way the pipeline will decode it.

    Returns (bytes to store, height, width, PIL mode or format note). The bytes are the original ones
    whenever TF's decoder reads them (JPEG, PNG, GIF, BMP, WebP, any channel layout); other formats
    PIL can read (e.g. TIFF) are re-encoded as lossless RGB PNG. Raises ValueError if nothing decodes.
    With verify=False only the header is read (fast; a truncated file then fails at training time).
    """
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
        tf_error = tf_error_text(e)
    try:  # a format TF cannot decode but PIL can: store lossless RGB PNG
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
            buf = io.BytesIO()
            rgb.save(buf, format="PNG")
            return buf.getvalue(), rgb.height, rgb.width, f"{im.format}:{im.mode}->PNG"
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot decode image ({tf_error}; PIL: {e})") from None


def tf_error_text(error: BaseException, limit: int = 160) -> str:
    """TF's reason in an op error, without the op's wrapper: '{{function_node __wrapped__DecodeImage_device_/job:
    localhost/...}} Invalid PNG data, size 7 [Op:DecodeImage]' -> 'Invalid PNG data, size 7'."""
    text = str(getattr(error, "message", None) or error).strip().split("\n")[0]
    text = re.sub(r"^\{\{.*?\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _tf_reads_header(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n" or data[:4] in (b"GIF8", b"RIFF") or data[:2] == b"BM"


def find_image_dir(source_dir: str, split: str) -> str:
    """The image folder of `split`: SOURCE/{split}/ or SOURCE/images/{split}/ (DataError if neither)."""
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


def folder_examples(source_dir: str, split: str, report: Report, verify: bool, num_threads: int,
                    categories_out: list) -> Iterator[dict[str, Any]]:
    """Examples of a COCO-format folder's `split` (images probed with `num_threads` threads, fully decoded if
    `verify`); appends the split's categories to `categories_out`, counts bad data in `report`."""
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
                yield make_example(data, e.image_id, e.file_name, h, w, anns)


def tfds_examples(tfds_name: str, tfds_data_dir: Optional[str], split: str, report: Report,
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
        yield make_example(data, iid, fname, h, w, anns)


def make_example(data: bytes, image_id: int, file_name: str, h: int, w: int, anns: list) -> dict[str, Any]:
    """One example in `tfds_builder`'s features: anns are (id, category_id, (x0, y0, x1, y1) pixels, iscrowd,
    area) tuples; h, w the image's size in pixels."""
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

