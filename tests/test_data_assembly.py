"""Batch assembly: transformed examples padded into their canvas follow the BATCH SCHEMA (zeros and a False
mask in the padding; float32 normalised or uint8 as stored), also as input.resize_on_device source batches."""

import numpy as np
import pytest

from yolos_jax.data import assembly
from yolos_jax.data import transforms as T


def _element(hw, canvas, value, image_id, source_hw=None):
    h, w = source_hw or hw
    return {"image": np.full((h, w, 3), value, np.uint8), "canvas": np.asarray(canvas, np.int32),
            "size": np.asarray(hw, np.int32), "source_size": np.asarray((h, w), np.int32),
            "boxes": np.full((2, 4), 0.5, np.float32), "labels": np.asarray([1, 0], np.int32),
            "box_mask": np.asarray([True, False]), "image_id": np.int64(image_id),
            "orig_size": np.asarray((2 * h, 2 * w), np.int32), "valid": image_id >= 0}


def test_assemble_pads_examples_into_the_canvas():
    els = [_element((16, 32), (32, 48), 200, 7), _element((32, 16), (32, 48), 50, -1)]
    for fmt in ("uint8", "float32"):
        b = assembly.assemble(els, fmt)
        assert tuple(b) == assembly.BATCH_KEYS
        assert b["image"].shape == (2, 32, 48, 3) and b["image"].dtype == (np.uint8 if fmt == "uint8" else np.float32)
        assert b["pixel_mask"][0].sum() == 16 * 32 and b["pixel_mask"][0, :16, :32].all()
        assert b["pixel_mask"][1].sum() == 32 * 16 and b["pixel_mask"][1, :32, :16].all()
        assert not b["image"][~b["pixel_mask"]].any()
        want = els[0]["image"] if fmt == "uint8" else T.normalize_np(els[0]["image"])
        np.testing.assert_allclose(b["image"][0, :16, :32], want, atol=1e-6)
        assert b["image_id"].tolist() == [7, -1] and b["valid"].tolist() == [True, False]
        assert b["boxes"].shape == (2, 2, 4) and b["labels"].dtype == np.int32 and b["size"].tolist() == [[16, 32], [32, 16]]
    with pytest.raises(AssertionError, match="does not fit the batch canvas"):
        assembly.assemble([_element((40, 16), (32, 48), 1, 1)], "uint8")


def test_assemble_sources_keeps_pre_resize_images():
    els = [_element((32, 48), (32, 48), 9, 1, source_hw=(20, 30)), _element((16, 16), (32, 48), 3, 2, source_hw=(10, 10))]
    b = assembly.assemble(els, "uint8", source_hw=(32, 32))
    assert set(b) == set(assembly.BATCH_KEYS) - {"image"} | {"source_image", "source_size"}
    assert b["source_image"].shape == (2, 32, 32, 3) and b["source_size"].tolist() == [[20, 30], [10, 10]]
    assert (b["source_image"][0, :20, :30] == 9).all() and not b["source_image"][0, 20:].any()
    assert not b["source_image"][0, :, 30:].any() and not b["source_image"][1, 10:].any()
    assert b["pixel_mask"].shape == (2, 32, 48) and b["pixel_mask"][0].all() and b["pixel_mask"][1].sum() == 16 * 16
    with pytest.raises(AssertionError, match="pre-resize image"):
        assembly.assemble(els, "uint8", source_hw=(16, 16))
