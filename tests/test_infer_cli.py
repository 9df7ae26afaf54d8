"""`infer.py` as a user runs it, with a model whose answer is known: every [DET] token predicts one chosen
box and class whatever the image, so the JSON and the annotated PNG must put that box on the object drawn
there. Exercises Detector.from_checkpoint -> pre-processing (resize with rounding of a non-square image)
-> model -> post-processing -> scaling to original pixels -> drawing."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from yolos_jax import draw, weights
from yolos_jax.config import model_config
from yolos_jax.data.transforms import eval_resize_hw
from yolos_jax.yolos import YOLOS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["circle", "square", "triangle"]
LABEL = 1  # "square"
H, W = 120, 200  # resized to 64x96 at eval size 64: both sides rounded, aspect ratio 1.67 -> 1.5
EVAL_SIZE = 64
BOX_XYXY = (40, 30, 130, 96)  # pixels of the 200x120 image; cx, cy, w, h all differ
BACKGROUND, OBJECT = (236, 236, 236), (20, 40, 200)


def _logit(p):
    return float(np.log(p / (1.0 - p)))


def _fixed_answer_checkpoint(path):
    """A converted-format directory of a tiny YOLOS whose heads ignore the image: box head's last layer
    zero kernel, bias = logit(chosen box); class head's last layer bias +8 on LABEL."""
    cfg = model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=5, num_classes=len(NAMES),
                       init_pe_size=(64, 96), mid_pe_size=None).to_dict()
    shapes = jax.eval_shape(lambda: YOLOS(**cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    rng = np.random.default_rng(0)
    flat = {k: rng.normal(scale=0.05, size=s.shape).astype(np.float32)
            for k, s in weights.flatten_params(shapes).items()}
    x0, y0, x1, y1 = BOX_XYXY
    box = [(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H]  # normalised cx, cy, w, h
    flat["box_head/layers_2/kernel"][:] = 0.0
    flat["box_head/layers_2/bias"][:] = [_logit(v) for v in box]
    bias = np.zeros(len(NAMES) + 1, np.float32)  # last = "no object"
    bias[LABEL] = 8.0
    flat["class_head/layers_2/bias"][:] = bias
    weights.save_params_dir(str(path), weights.unflatten_params(flat), cfg,
                            {"label_names": NAMES, "eval_size": EVAL_SIZE})


def test_infer_py_puts_the_predicted_box_on_the_object(tmp_path):
    ckpt = tmp_path / "ckpt"
    _fixed_answer_checkpoint(ckpt)
    image = np.empty((H, W, 3), np.uint8)
    image[:] = BACKGROUND
    x0, y0, x1, y1 = BOX_XYXY
    image[y0:y1, x0:x1] = OBJECT  # the object covers pixels x0..x1-1, y0..y1-1: its box is (x0, y0, x1, y1)
    Image.fromarray(image).save(tmp_path / "scene.png")
    assert eval_resize_hw(H, W, EVAL_SIZE, EVAL_SIZE * 1333 // 800) == (64, 96)  # the model sees another aspect

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(YOLOS_JAX_COMPILATION_CACHE=str(tmp_path / "xla_cache"), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "infer.py"), f"--checkpoint={ckpt}", f"--images={tmp_path / 'scene.png'}",
         f"--out={out}", "--threshold=0.5"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "scene.png: 5 detections" in proc.stdout

    (record,) = json.loads((out / "detections.json").read_text())
    assert (record["height"], record["width"]) == (H, W)
    assert os.path.samefile(record["file"], tmp_path / "scene.png")
    dets = record["detections"]
    assert len(dets) == 5  # every [DET] token, all above the threshold
    for d in dets:
        assert d["label"] == LABEL and d["name"] == "square"
        assert d["score"] > 0.99  # softmax of +8 against three 0 logits (and tiny kernel terms): ~0.999
        np.testing.assert_allclose(d["box_xyxy"], BOX_XYXY, atol=1.0)

    # The annotated PNG: same size as the input, the box outline (the class's colour) on the object's edges.
    drawn = np.asarray(Image.open(record["output"]).convert("RGB"))
    assert drawn.shape == image.shape
    color = np.array(draw.color_for("square"))
    assert not np.any(np.all(image == color, axis=-1))  # the colour appears nowhere in the input

    def edge_fraction(line_pixels):
        return float(np.mean(np.all(line_pixels == color, axis=-1)))

    def best(fractions):
        return max(fractions)

    rows, cols = slice(y0 + 2, y1 - 2), slice(x0 + 2, x1 - 2)
    # each edge: within 1 px of the object's border, a line (almost) all in the outline colour
    left = best(edge_fraction(drawn[rows, c]) for c in (x0 - 1, x0, x0 + 1))
    right = best(edge_fraction(drawn[rows, c]) for c in (x1 - 1, x1, x1 + 1))
    top = best(edge_fraction(drawn[r, cols]) for r in (y0 - 1, y0, y0 + 1))
    bottom = best(edge_fraction(drawn[r, cols]) for r in (y1 - 1, y1, y1 + 1))
    assert min(left, right, top, bottom) > 0.95, (left, right, top, bottom)
    # and nowhere else: inside and outside the box the image is unchanged, away from the outline and the tag
    changed = np.any(drawn != image, axis=-1)
    assert not changed[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].any()  # interior
    assert not changed[y1 + 2 :].any() and not changed[:, x1 + 2 :].any() and not changed[:, : x0 - 1].any()
