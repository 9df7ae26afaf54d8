"""Reading a COCO instances JSON: unreadable files and bad structure raise a DataError naming the file
and the field."""

import json

import pytest

from yolos_jax.data import coco_json


def _bad_json(tmp_path, text):
    p = tmp_path / "instances_x.json"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"images": [', r"not valid JSON \(line 1, column 13"),
        ("[1, 2]", "top level must be a JSON object"),
        ('{"images": [], "annotations": []}', "missing field 'categories'"),
        ('{"images": {}, "annotations": [], "categories": []}', "field 'images' must be a list"),
    ],
)
def test_unreadable_json_raises_naming_file_and_field(tmp_path, text, match):
    path = _bad_json(tmp_path, text)
    with pytest.raises(coco_json.DataError, match=match) as e:
        coco_json.read_instances_json(path)
    assert path in str(e.value)


@pytest.mark.parametrize(
    "images, categories, match",
    [
        ([{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], [{"id": 1, "name": "x"}], "repeats image id 1"),
        ([{"id": 1}], [{"id": 1, "name": "x"}], r"images\[0\] \(id 1\) field 'file_name'"),
        ([{"id": "7", "file_name": "a.jpg"}], [{"id": 1, "name": "x"}], r"images\[0\] field 'id' must be an integer"),
        ([], [{"id": 1, "name": "x"}, {"id": 1, "name": "y"}], "field 'categories': duplicate category ids"),
    ],
)
def test_bad_json_structure_raises(tmp_path, images, categories, match):
    path = _bad_json(tmp_path, json.dumps({"images": images, "annotations": [], "categories": categories}))
    doc = coco_json.read_instances_json(path)
    with pytest.raises(coco_json.DataError, match=match):
        coco_json.parse_instances(doc, path, coco_json.Report())

