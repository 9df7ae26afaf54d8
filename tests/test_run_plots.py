"""yolos_jax.run_plots: the val rows (predictions + the dataset's ground truth), the contact sheet (grid, sides,
boxes where the objects are), the readable annotated images of a tiny model, the learning curve (each panel
shows its own data) and the history file."""

import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from yolos_jax import draw, run_plots
from yolos_jax.config import model_config

CAT, DOG = draw.color_for("cat"), draw.color_for("dog")
BACKGROUND = (60, 60, 60)


def row(image_id, hw=(128, 160)):
    """A ROW with one 'cat' prediction (score 0.9) on the left half and one 'dog' ground-truth box on the right."""
    h, w = hw
    return {
        "image_id": image_id,
        "image": np.full((h, w, 3), BACKGROUND, np.uint8),
        "boxes": np.asarray([[0.1 * w, 0.3 * h, 0.4 * w, 0.8 * h]], np.float32),
        "scores": np.asarray([0.9], np.float32),
        "names": ["cat"],
        "gt_boxes": np.asarray([[0.6 * w, 0.3 * h, 0.9 * w, 0.8 * h]], np.float32),
        "gt_names": ["dog"],
    }


def has(img, color):
    return np.all(img == color, axis=-1)


def test_contact_sheet_grid_and_sides():
    assert CAT != DOG and BACKGROUND not in draw.PALETTE
    rows = [row(i) for i in range(5)]
    sheet, cells = run_plots.contact_sheet(rows, tile_height=320, columns=2)
    assert [c["image_id"] for c in cells] == list(range(5))
    tile_w = round(160 * 320 / 128)
    ys = sorted({c["predictions"][1] for c in cells})
    assert len(ys) == math.ceil(5 / 2)  # 2 pairs per line: 3 lines
    for c in cells:
        (px0, py0, px1, py1), (gx0, gy0, gx1, gy1) = c["predictions"], c["ground_truth"]
        assert (px1 - px0, py1 - py0) == (gx1 - gx0, gy1 - gy0) == (tile_w, 320)  # the common height
        assert gy0 == py0 and gx0 >= px1  # side by side: predictions | ground truth
        assert 0 <= px0 and gx1 <= sheet.shape[1] and py1 <= sheet.shape[0]
        pred, truth = sheet[py0:py1, px0:px1], sheet[gy0:gy1, gx0:gx1]
        # The left picture shows the prediction (cat colour, on the left of the object area), not the truth;
        # the right one the ground truth (dog colour), not the prediction.
        assert has(pred, CAT).any() and not has(pred, DOG).any()
        assert has(truth, DOG).any() and not has(truth, CAT).any()
        s = 320 / 128
        assert has(pred, CAT)[int(0.5 * 128 * s), int(0.1 * 160 * s)]  # the box's left edge, where it belongs
        assert has(truth, DOG)[int(0.5 * 128 * s), int(0.6 * 160 * s)]
        # Both tiles are the image, enlarged: outside the boxes and tags, the background.
        assert has(pred, BACKGROUND)[:, int(0.5 * tile_w) :].all()
    # Pairs never overlap each other.
    rects = [c[k] for c in cells for k in ("predictions", "ground_truth")]
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    # Another height: the tiles follow.
    small, cells = run_plots.contact_sheet(rows[:1], tile_height=200)
    p = cells[0]["predictions"]
    assert (p[2] - p[0], p[3] - p[1]) == (250, 200) and small.shape[0] < sheet.shape[0]
    with pytest.raises(ValueError, match="no rows"):
        run_plots.contact_sheet([])


def test_write_contact_sheet_writes_the_sheet(tmp_path):
    rows = [row(1), row(2, (160, 96))]  # a portrait image too: the same height, a narrower tile
    sheet, cells = run_plots.contact_sheet(rows, threshold=0.5, top_k=3)
    path = run_plots.write_contact_sheet(rows, str(tmp_path / "sheet" / "contact_sheet.png"), threshold=0.5, top_k=3)
    with Image.open(path) as im:
        assert im.format == "PNG"
        np.testing.assert_array_equal(np.asarray(im), sheet)
    assert os.listdir(tmp_path / "sheet") == ["contact_sheet.png"]
    p = cells[1]["predictions"]
    assert (p[2] - p[0], p[3] - p[1]) == (192, 320)


# --------------------------------------------------------------------------------------------------
# A tiny model on the prepared synthetic set
# --------------------------------------------------------------------------------------------------


def test_val_rows_carry_the_predictions_and_the_datasets_ground_truth(synth):
    from yolos_jax import data

    cfg, model, params = synth
    model_cfg = {f: getattr(model, f) for f in model_config("s").keys()}
    rows = run_plots.val_rows(jax.device_get(params), model_cfg, cfg, num_images=3)
    gt = json.load(open(data.coco_ground_truth(cfg)))
    names = {c["id"]: c["name"] for c in gt["categories"]}
    assert [r["image_id"] for r in rows] == [im["id"] for im in gt["images"][:3]]
    for r in rows:
        image = next(im for im in gt["images"] if im["id"] == r["image_id"])
        assert r["image"].shape == (image["height"], image["width"], 3) and r["image"].dtype == np.uint8
        anns = [a for a in gt["annotations"] if a["image_id"] == r["image_id"] and not a["iscrowd"]]
        want = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        np.testing.assert_allclose(r["gt_boxes"], want, atol=1e-3)
        assert r["gt_names"] == [names[a["category_id"]] for a in anns]
        # Every [DET] token's prediction, best first (the threshold is the drawing's).
        assert len(r["scores"]) == model.num_det_tokens == len(r["names"]) == len(r["boxes"])
        assert np.all(np.diff(r["scores"]) <= 0)


def test_write_eval_pictures_are_readable(synth, tmp_path):
    cfg, model, params = synth
    model_cfg = {f: getattr(model, f) for f in model_config("s").keys()}
    out = run_plots.write_eval_pictures(jax.device_get(params), model_cfg, cfg, str(tmp_path), num_images=3,
                                        threshold=0.0)
    assert len(out["images"]) == 3 and out["contact_sheet"] == str(tmp_path / "contact_sheet.png")
    assert sorted(os.listdir(tmp_path)) == ["contact_sheet.png", "images"]
    rows = run_plots.val_rows(jax.device_get(params), model_cfg, cfg, num_images=3)
    checked = 0
    for path, r in zip(out["images"], rows):
        assert os.path.basename(path) == f"{r['image_id']}.png"
        h, w = r["image"].shape[:2]
        with Image.open(path) as im:
            drawn = np.asarray(im.convert("RGB"))
        k = drawn.shape[0] // h
        assert min(drawn.shape[:2]) >= 480 and drawn.shape[:2] == (k * h, k * w)
        # threshold 0: every prediction solid, its box's left edge in its class colour (where no tag covers it).
        marks = draw.plan_detections((h, w), r["boxes"], r["names"], r["scores"], scale=k, threshold=0.0)
        assert len(marks) == model.num_det_tokens and not any(m.faint for m in marks)
        H, W = drawn.shape[:2]
        for m in marks:
            x0, y0, x1, y1 = (int(round(v)) for v in m.box)
            rows, cols = slice(max(y0, 0) + 3, min(y1, H) - 3), slice(max(x0, 0) + 3, min(x1, W) - 3)
            lines = [drawn[rows, x] for x in (x0 - 1, x0, x0 + 1, x1 - 1, x1, x1 + 1) if 0 <= x < W]
            lines += [drawn[y, cols] for y in (y1 - 1, y1, y1 + 1) if 0 <= y < H]  # (the top may hold tags)
            lines = [ln for ln in lines if len(ln) >= 10]
            if lines:  # an edge inside the picture: (mostly) in the class colour, where no other box or tag is
                assert max(np.mean(has(ln, m.color)) for ln in lines) > 0.3, m
                checked += 1
    assert checked >= 3
    with Image.open(out["contact_sheet"]) as im:
        assert im.size[1] > 320 and im.format == "PNG"


# --------------------------------------------------------------------------------------------------
# The learning curve and its history
# --------------------------------------------------------------------------------------------------


def curve(history, path):
    run_plots.write_learning_curve(history, str(path))
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(int)


def test_learning_curve_panels_show_their_own_data(tmp_path):
    train = [{"step": s, "loss": 3.0 / (1 + s / 100), "loss_ce": 1.0, "loss_bbox": 0.5 / (1 + s / 50),
              "loss_giou": 0.8} for s in range(0, 1001, 50)]
    evals = [{"step": 500, "AP": 0.1, "AP50": 0.25, "AP75": 0.05}, {"step": 1000, "AP": 0.2, "AP50": 0.4}]
    base = curve(train + evals, tmp_path / "a.png")
    assert base.shape == (400, 1100, 3)
    half = base.shape[1] // 2
    assert (base[60:, :half] != 255).any() and (base[60:, half:] != 255).any()
    more_ap = curve(train + [dict(evals[0], AP=0.3), evals[1]], tmp_path / "b.png")
    changed = np.any(more_ap != base, axis=-1)
    assert changed[:, :half].any() and not changed[:, half:].any()  # AP lives in the left panel only
    more_loss = curve([dict(p, loss_giou=2.0) for p in train] + evals, tmp_path / "c.png")
    changed = np.any(more_loss != base, axis=-1)
    assert changed[:, half:].any() and not changed[:, :half].any()  # the losses in the right one only
    # pycocotools' -1 (no ground truth in that range) and non-finite values are not points.
    same = curve(train + evals + [{"step": 1000, "AP": -1.0, "loss": float("nan")}], tmp_path / "d.png")
    np.testing.assert_array_equal(same, base)


def test_learning_curve_with_one_point_and_missing_keys(tmp_path):
    empty = curve([], tmp_path / "empty.png")
    one = curve([{"step": 10, "loss": 2.5}], tmp_path / "one.png")
    half = one.shape[1] // 2
    changed = np.any(one != empty, axis=-1)
    assert changed[60:, half:].any()  # the single loss point is drawn (a marker) ...
    assert not changed[60:, :half].any()  # ... and the AP panel still says it has no points
    ap_only = curve([{"step": 10, "AP": 0.5}], tmp_path / "ap.png")
    assert np.any(ap_only[60:, :half] != empty[60:, :half])
    assert os.listdir(tmp_path) and not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp files


def test_append_history_keeps_numbers_and_drops_rolled_back_points(tmp_path):
    path = str(tmp_path / "learning_curve.json")
    h = run_plots.append_history(path, [{"step": 10, "loss": np.float32(2.0), "tag": "x"},
                                        {"step": 20, "loss": float("nan"), "AP": 0.1}])
    assert h == [{"step": 10, "loss": 2.0}, {"step": 20, "loss": None, "AP": 0.1}]
    assert json.load(open(path)) == h
    h = run_plots.append_history(path, [{"step": 30, "AP": 0.2}])
    assert [p["step"] for p in h] == [10, 20, 30]
    h = run_plots.append_history(path, [{"step": 20, "loss": 1.5}], drop_after=10)  # resumed from step 10
    assert h == [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5}] == json.load(open(path))
    with pytest.raises(ValueError, match="without 'step'"):
        run_plots.append_history(path, [{"loss": 1.0}])
    run_plots.write_learning_curve(h, str(tmp_path / "curve.png"))  # the history plots as it is
    assert (tmp_path / "curve.png").is_file()
