"""The one place where dataset category ids become the model's label indices (and back).

A COCO-format dataset names its classes by `category_id` (COCO 2017: 80 classes with ids 1..90, with
gaps). The model predicts a label index in [0, num_classes) (plus a "no object" logit at index
num_classes). Two mappings are offered:

  'identity'    label == category_id; num_classes = max(category_id) + 1. COCO gives 91 labels (ids 0 and
                the 10 unused ids are never targets). This is what the original YOLOS/DETR checkpoints and
                HF `YolosForObjectDetection` (num_labels=91) use, so converted heads line up.
  'contiguous'  the sorted category ids map to 0..K-1; num_classes = K. The natural choice for a new
                dataset (no wasted logits).

Every other module converts through a `LabelMap`; nothing else knows about category ids.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from yolos_jax.errors import ConfigError

MODES = ("contiguous", "identity")
# 'identity' allocates max(id) + 1 logits; above this, a typo or a hashed id is far more likely than a
# real need, and the model would silently grow a huge head.
MAX_IDENTITY_ID = 100_000
UNUSED_NAME = "N/A"  # the name of an identity-mode label that no category uses (as HF's COCO id2label)


class LabelMap:
    """A bijection between a dataset's category ids and label indices in [0, num_classes).

    Build with `LabelMap.from_categories(categories, mode)`, where `categories` is the `categories` list
    of a COCO instances JSON (dicts with int `id` and str `name`).

    Attributes:
      mode: 'contiguous' or 'identity'.
      num_classes: number of label indices (the model's `num_classes`, without "no object").
      names: list[str] of length num_classes; names[label] is the category's name ('N/A' for identity
        labels that no category uses).
      category_ids: list[int], the dataset's category ids, sorted.
    """

    def __init__(self, categories: Sequence[tuple[int, str]], mode: str = "contiguous"):
        """categories: (category_id, name) pairs, ids unique. Prefer `from_categories`."""
        if mode not in MODES:
            raise ConfigError(f"config.input.label_mode must be one of {MODES}, got {mode!r}")
        cats = sorted((int(i), str(n)) for i, n in categories)
        ids = [i for i, _ in cats]
        if not ids:
            raise ValueError("LabelMap needs at least one category; the dataset's 'categories' list is empty")
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate category ids {dup} in 'categories'; each id must appear once")
        self.mode = mode
        self.category_ids: list[int] = ids
        if mode == "identity":
            if ids[0] < 0:
                raise ConfigError(
                    f"category id {ids[0]} is negative; config.input.label_mode='identity' needs ids >= 0 "
                    "(use --config.input.label_mode=contiguous)"
                )
            if ids[-1] > MAX_IDENTITY_ID:
                raise ConfigError(
                    f"category id {ids[-1]} > {MAX_IDENTITY_ID}: config.input.label_mode='identity' would allocate "
                    f"{ids[-1] + 1} logits; use --config.input.label_mode=contiguous"
                )
            self.num_classes = ids[-1] + 1
            self.names = [UNUSED_NAME] * self.num_classes
            for i, n in cats:
                self.names[i] = n
            self._id_to_label = {i: i for i in ids}
            self._label_to_id = list(range(self.num_classes))
        else:
            self.num_classes = len(ids)
            self.names = [n for _, n in cats]
            self._id_to_label = {i: k for k, i in enumerate(ids)}
            self._label_to_id = list(ids)

    # --- construction / serialisation -------------------------------------------------------------

    @classmethod
    def from_categories(cls, categories: Iterable[Mapping[str, Any]], mode: str = "contiguous") -> "LabelMap":
        """From a COCO `categories` list: [{'id': int, 'name': str, ...}, ...]."""
        pairs = []
        for k, c in enumerate(categories):
            if not isinstance(c, Mapping) or "id" not in c:
                raise ValueError(f"categories[{k}] = {c!r} has no 'id'; each category needs an int 'id' and a 'name'")
            cid = c["id"]
            if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)):
                raise ValueError(f"categories[{k}]['id'] = {cid!r} is not an integer")
            pairs.append((int(cid), str(c.get("name", f"category_{cid}"))))
        return cls(pairs, mode)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: {'mode': str, 'categories': [{'id', 'name'}, ...]}."""
        cats = [{"id": i, "name": self.names[self._id_to_label[i]]} for i in self.category_ids]
        return {"mode": self.mode, "categories": cats}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelMap":
        if "categories" not in d or "mode" not in d:
            raise ValueError(f"a LabelMap dict needs 'mode' and 'categories'; got keys {sorted(d)}")
        return cls.from_categories(d["categories"], d["mode"])

    def to_json(self) -> str:
        """A JSON string of `to_dict()`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str | Mapping[str, Any]) -> "LabelMap":
        """From `to_json()`'s string (or the already-parsed dict)."""
        return cls.from_dict(json.loads(s) if isinstance(s, (str, bytes)) else s)

    # --- mapping ------------------------------------------------------------------------------------

    def to_label(self, category_id: int) -> int:
        """Category id -> label index. KeyError naming the id if the dataset has no such category."""
        try:
            return self._id_to_label[int(category_id)]
        except KeyError:
            raise KeyError(
                f"category_id {category_id} is not among the dataset's categories {self.category_ids}"
            ) from None

    def to_category(self, label: int) -> int:
        """Label index -> category id. In 'identity' mode every label in range maps to itself."""
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise KeyError(f"label {label} is outside [0, {self.num_classes})")
        return self._label_to_id[label]

    def to_labels(self, category_ids: np.ndarray) -> np.ndarray:
        """Vectorised `to_label`: int array of category ids -> int32 array of labels (same shape)."""
        return np.asarray([self.to_label(c) for c in np.ravel(category_ids)], np.int32).reshape(
            np.shape(category_ids)
        )

    def to_categories(self, labels: np.ndarray) -> np.ndarray:
        """Vectorised `to_category`: int array of labels -> int64 array of category ids (same shape)."""
        table = np.asarray(self._label_to_id, np.int64)
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise KeyError(f"labels outside [0, {self.num_classes}): {labels[(labels < 0) | (labels >= self.num_classes)][:5]}")
        return table[labels]

    def names_for(self, num_classes: int) -> list[str]:
        """`names` for a model with `num_classes` >= self.num_classes logits: the labels no category uses
        (e.g. a 91-way COCO head fine-tuned on a dataset with fewer categories) are named 'N/A'."""
        num_classes = int(num_classes)
        if num_classes < self.num_classes:
            raise ValueError(f"a model with num_classes={num_classes} cannot hold the {self.num_classes} labels of "
                             f"this label map ({self.mode} mode)")
        return list(self.names) + [UNUSED_NAME] * (num_classes - self.num_classes)

    def incompatibility(self, other: "LabelMap") -> str | None:
        """Why a model trained with label map `other` would misread this dataset's labels, or None.

        Compatible when every category of this map has the same label under both maps (names may differ;
        `other` may have more categories, e.g. evaluating a COCO model on a subset of COCO's categories)."""
        wrong = [(c, self.to_label(c), other._id_to_label.get(c)) for c in self.category_ids
                 if other._id_to_label.get(c) != self.to_label(c)]
        if not wrong:
            return None
        c, here, there = wrong[0]
        there_text = "no label" if there is None else f"label {there}"
        return (f"{len(wrong)} of the dataset's {len(self.category_ids)} categories map to other labels than in "
                f"training: e.g. category_id {c} is label {here} here ({self.mode} mode) but was {there_text} in "
                f"training ({other.mode} mode, category ids {other.category_ids[:10]}"
                f"{'...' if len(other.category_ids) > 10 else ''})")

    def is_used(self, label: int) -> bool:
        """False for identity-mode labels that no category uses (never a training target)."""
        return self._label_to_id[int(label)] in self._id_to_label

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"LabelMap(mode={self.mode!r}, num_classes={self.num_classes}, categories={len(self.category_ids)})"
