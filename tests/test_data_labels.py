"""LabelMap (category ids <-> labels). No TensorFlow here."""

import json

import numpy as np
import pytest

from yolos_jax.data.labels import LabelMap
from yolos_jax.errors import ConfigError

# COCO 2017's 80 category ids (gaps at 12, 26, 29, 30, 45, 66, 68, 69, 71, 83).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def _cats(ids):
    return [{"id": i, "name": f"c{i}"} for i in ids]


def test_contiguous_is_rank_of_sorted_ids():
    rng = np.random.default_rng(0)
    ids = [int(i) for i in rng.choice(np.arange(1, 500), 37, replace=False)]
    lm = LabelMap.from_categories(_cats(ids), "contiguous")
    ref = {c: k for k, c in enumerate(np.unique(ids))}  # independent: numpy's sorted unique
    assert lm.num_classes == 37
    assert all(lm.to_label(c) == ref[c] for c in ids)
    assert all(lm.to_category(ref[c]) == c for c in ids)
    assert lm.names == [f"c{c}" for c in sorted(ids)]
    np.testing.assert_array_equal(lm.to_labels(np.asarray(ids).reshape(-1, 1)), np.asarray([[ref[c]] for c in ids]))
    np.testing.assert_array_equal(lm.to_categories(np.arange(37)), np.unique(ids))


def test_identity_matches_coco_91():
    lm = LabelMap.from_categories(_cats(COCO_IDS), "identity")
    assert lm.num_classes == 91  # HF YolosForObjectDetection num_labels for COCO
    assert all(lm.to_label(c) == c and lm.to_category(c) == c for c in COCO_IDS)
    assert lm.names[0] == "N/A" and lm.names[12] == "N/A" and lm.names[90] == "c90"
    assert not lm.is_used(0) and not lm.is_used(83) and lm.is_used(1)
    assert lm.to_category(12) == 12  # unused labels still map (the evaluator filters with is_used)


def test_json_round_trip_and_equality():
    for mode in ("contiguous", "identity"):
        lm = LabelMap.from_categories(list(reversed(_cats([3, 7, 5]))), mode)
        s = lm.to_json()
        assert json.loads(s)["mode"] == mode
        assert LabelMap.from_json(s) == lm and LabelMap.from_json(json.loads(s)) == lm
    assert LabelMap.from_categories(_cats([1, 2])) != LabelMap.from_categories(_cats([1, 2]), "identity")


@pytest.mark.parametrize(
    "cats, mode, match",
    [
        (_cats([1, 2, 2]), "contiguous", "duplicate category ids"),
        (_cats([-1, 2]), "identity", "negative"),
        (_cats([1, 10**7]), "identity", "contiguous"),
        ([], "contiguous", "at least one category"),
        ([{"name": "x"}], "contiguous", "has no 'id'"),
        ([{"id": "3", "name": "x"}], "contiguous", "not an integer"),
        (_cats([1]), "sorted", "mode must be one of"),
    ],
)
def test_bad_categories_raise(cats, mode, match):
    with pytest.raises(ValueError, match=match) as e:
        LabelMap.from_categories(cats, mode)
    # What config.input.label_mode can fix is a ConfigError: train.py / eval.py print it in one line.
    assert isinstance(e.value, ConfigError) == (mode != "contiguous"), e.value


def test_unknown_ids_and_labels_raise():
    lm = LabelMap.from_categories(_cats([4, 8]))
    with pytest.raises(KeyError, match="category_id 5"):
        lm.to_label(5)
    with pytest.raises(KeyError, match="outside"):
        lm.to_category(2)
    with pytest.raises(KeyError):
        lm.to_categories(np.asarray([0, 2]))


def test_names_for_a_larger_head_and_label_map_compatibility():
    cats = [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}, {"id": 42, "name": "owl"}]
    contiguous = LabelMap.from_categories(cats, "contiguous")
    identity = LabelMap.from_categories(cats, "identity")
    assert contiguous.names_for(3) == ["cat", "dog", "owl"]
    assert contiguous.names_for(5) == ["cat", "dog", "owl", "N/A", "N/A"]  # a 5-way head on 3 labels
    assert len(identity.names_for(91)) == 91 and identity.names_for(91)[17] == "dog"
    with pytest.raises(ValueError, match="num_classes=2 cannot hold the 3 labels"):
        contiguous.names_for(2)

    assert contiguous.incompatibility(contiguous) is None
    renamed = LabelMap.from_categories([dict(c, name=c["name"].upper()) for c in cats], "contiguous")
    assert contiguous.incompatibility(renamed) is None  # names may differ, labels may not
    why = contiguous.incompatibility(identity)
    assert why.startswith("3 of the dataset's 3 categories") and "category_id 3 is label 0 here" in why
    assert "was label 3 in training (identity mode" in why
    # A COCO-style identity model read on a subset of its categories: compatible; the other way round not.
    subset = LabelMap.from_categories(cats[1:], "identity")
    assert subset.incompatibility(identity) is None
    assert "category_id 3 is label 3 here (identity mode) but was no label" in identity.incompatibility(subset)
