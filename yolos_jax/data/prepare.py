"""One-time preparation of a dataset for training/eval (thin CLI over `prepared_dataset.prepare`).

  # a COCO-format folder (COCO 2017 extracted: train2017/ val2017/ annotations/instances_*.json):
  python -m yolos_jax.data.prepare --data_dir=$HOME/tensorflow_datasets --name=coco2017 --coco_dir=/data/coco
  # tfds's own prepared coco/2017 (already in a tfds data dir):
  python -m yolos_jax.data.prepare --data_dir=$HOME/tensorflow_datasets --name=coco2017 --from_tfds=coco/2017
  # the synthetic set:
  python -m yolos_jax.data.synthetic --out=/data/synth && \\
  python -m yolos_jax.data.prepare --data_dir=/data/tfds --name=synth --coco_dir=/data/synth

Then train with input.data_dir=DATA_DIR, input.dataset_name=NAME and the split names (COCO 2017:
train2017 / val2017; tfds coco/2017: train / validation; synthetic: train / val). The report of skipped
and clipped items, and per split the most boxes in one image and how many images and boxes exceed 100 and
300 non-crowd boxes per image (`boxes_per_image`; training keeps at most input.max_boxes per image, see
the README's "Dense scenes"), is printed and kept in DATA_DIR/coco_folder/NAME/1.0.0/yolos_source.json.

Preparing an already prepared NAME reuses it; if the source folder changed since (its instances JSON, or
files added or removed in an image folder), the command stops and says so: add --force to prepare again.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Optional, Sequence

from yolos_jax.data import coco_source, prepared_dataset
from yolos_jax.data.coco_json import DataError


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Prepare a COCO-format dataset for yolos_jax (one time).")
    p.add_argument("--data_dir", required=True, help="tfds data dir that will hold the prepared dataset")
    p.add_argument("--name", required=True, help="dataset name (input.dataset_name)")
    p.add_argument("--coco_dir", default=None, help="COCO-format folder (annotations/instances_<split>.json + <split>/)")
    p.add_argument("--from_tfds", default=None, help="instead: a tfds dataset such as coco/2017")
    p.add_argument("--tfds_data_dir", default=None, help="tfds data dir holding --from_tfds (default: tfds's)")
    p.add_argument("--splits", default="", help="comma-separated split names (default: all found)")
    p.add_argument("--no_verify", action="store_true", help="read image headers only (faster; corrupt files fail later)")
    p.add_argument("--threads", type=int, default=4, help="images decoded in parallel while verifying")
    p.add_argument("--force", action="store_true",
                   help="prepare again even if already prepared (e.g. after fixing the source folder); the previous "
                        "version stays in place until the new one is complete")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        existing = prepared_dataset.load(a.data_dir, a.name).path
    except DataError:
        existing = None
    try:
        ds = prepared_dataset.prepare(
            a.data_dir, a.name, source_dir=a.coco_dir, tfds_source=a.from_tfds, tfds_data_dir=a.tfds_data_dir,
            splits=[s for s in a.splits.split(",") if s] or None, verify_images=not a.no_verify,
            num_threads=a.threads, force=a.force, reuse_changed=False)
    except (DataError, ValueError) as e:  # bad data or arguments: the message says what to fix
        raise SystemExit(f"\nerror: {e}") from None  # on a line of its own, not after a progress bar's
    if existing and not a.force:
        in_source = coco_source.discover_splits(a.coco_dir) if a.coco_dir and not a.splits else []
        left_out = [s for s in in_source if s not in ds.splits]
        if left_out:  # prepared earlier with --splits; asked now for every split the folder has
            raise SystemExit(f"\nerror: {ds.path} was prepared with the splits {ds.splits} only; the source also "
                             f"has {left_out}: prepare again with --force to include them (or --splits="
                             f"{','.join(ds.splits)} to use it as it is)")
        print(f"{ds.path} was already prepared from this source, unchanged since; reused as it is "
              "(--force prepares it again)")
    reports = {s: ds.report(s) for s in ds.splits}
    summary = {"path": ds.path, "categories": len(ds.categories),
               "splits": {s: {"examples": len(ds.index(s)), "report": r.get("counts", {}),
                              "boxes_per_image": r["boxes_per_image"]} for s, r in reports.items()}}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
