"""`yolos_jax.export` and `export.py`: each format's artifact, run by its own runtime (jax.export.deserialize,
onnxruntime, tf.saved_model.load), equals the Flax forward (`Detector.forward`) within 1e-4 on logits and boxes
at two non-square canvases and batch sizes 1 and 2 (padded: each image equals itself run alone, un-padded),
for a small random model and for a converted HF YOLOS (and then equals HF PyTorch too); scores and labels are
`Detector`'s post-processing. Then the bad inputs, atomic outputs, the CLI and the README's onnxruntime example
(run in a Python without JAX)."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from yolos_jax import export, weights
from yolos_jax.config import model_config
from yolos_jax.errors import UserError
from yolos_jax.inference import Detector
from yolos_jax.yolos import YOLOS

# One worker runs the module under `pytest -n 2 --dist loadgroup`, so its exports (fixtures) are made once.
pytestmark = pytest.mark.xdist_group("export")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((64, 112), (48, 32))  # two non-square canvases (H, W), multiples of 16
NAMES = ["circle", "square", "triangle"]
_HF_CFG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=[64, 96],
               patch_size=16, num_detection_tokens=10, num_labels=3, use_mid_position_embeddings=True)


def _random_checkpoint(path, seed=0):
    """A converted-format directory of a small random YOLOS (mid position embeddings, 3 classes), weights with O(1)
    activations so that the outputs are far from constant."""
    cfg = model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=5, num_classes=len(NAMES),
                       init_pe_size=(64, 96), mid_pe_size=(64, 96)).to_dict()
    shapes = jax.eval_shape(lambda: YOLOS(**cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    rng = np.random.default_rng(seed)
    flat = {k: (rng.normal(size=s.shape) / np.sqrt(s.shape[0] if len(s.shape) > 1 else 4.0)).astype(np.float32)
            for k, s in weights.flatten_params(shapes).items()}
    weights.save_params_dir(str(path), weights.unflatten_params(flat), cfg, {"label_names": NAMES, "eval_size": 64})
    return str(path)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    return _random_checkpoint(tmp_path_factory.mktemp("random") / "ckpt")


@pytest.fixture(scope="module")
def hf_model_and_ckpt(tmp_path_factory):
    import reference_models as ref

    from yolos_jax import convert

    tmp = tmp_path_factory.mktemp("hf")
    hf = ref.hf_yolos(_HF_CFG, seed=5)
    hf.save_pretrained(tmp / "hf")
    convert.convert(str(tmp / "hf"), str(tmp / "ckpt"))
    return hf, str(tmp / "ckpt")


def _padded_batch(size, rng):
    """Batch of 2 on the canvas `size`: image 0 fills it, image 1 is smaller in both axes (zeros + mask outside);
    returned with the un-padded images."""
    h, w = size
    alone = [rng.normal(size=(h, w, 3)).astype(np.float32),
             rng.normal(size=(h - 16, w - 16, 3)).astype(np.float32)]
    pixels = np.zeros((2, h, w, 3), np.float32)
    mask = np.zeros((2, h, w), bool)
    for i, im in enumerate(alone):
        pixels[i, : im.shape[0], : im.shape[1]] = im
        mask[i, : im.shape[0], : im.shape[1]] = True
    return pixels, mask, alone


def _assert_equals_detector(got, detector, pixels, mask, alone):
    """got (the artifact's outputs on pixels/mask) == the Flax forward on each image alone, un-padded."""
    for i, image in enumerate(alone):
        want = detector.forward(image[None])  # no mask: the image alone on its own canvas
        np.testing.assert_allclose(got["logits"][i], want["logits"][0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["boxes"][i], want["boxes"][0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["scores"][i], want["scores"][0], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got["labels"][i], want["labels"][0])
    batch = detector.forward(pixels, mask)  # and the padded batch as Detector runs it
    for k in ("logits", "boxes", "scores"):
        np.testing.assert_allclose(got[k], batch[k], atol=1e-4 if k != "scores" else 1e-5, rtol=0)
    np.testing.assert_array_equal(got["labels"], batch["labels"])
    assert got["labels"].dtype == np.int32 and got["scores"].dtype == np.float32


@pytest.fixture(scope="module")
def random_artifacts(random_ckpt, tmp_path_factory):
    """{(format, size): path}: the random model exported in every format at both SIZES (made once)."""
    directory = tmp_path_factory.mktemp("artifacts")
    paths = {}
    for fmt in export.FORMATS:
        for size in SIZES:
            paths[fmt, size] = str(directory / f"model_{size[0]}x{size[1]}.{fmt}")
            description = export.export_checkpoint(random_ckpt, fmt, f"{size[0]},{size[1]}", paths[fmt, size])
            assert description["verified"]["batch"] == 2 and description["image_size"] == list(size)
            # eval_size 64 (max 106): every landscape image resizes into 64 x 96 at most; 48 x 32 holds neither way
            assert description["holds_eval_resize"] == (size == (64, 112)), (size, description)
    return paths


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_artifact_equals_the_flax_forward_at_two_sizes_and_batch_sizes(random_ckpt, random_artifacts, fmt):
    detector = Detector.from_checkpoint(random_ckpt, attention_impl="chunked")  # our CPU kernel vs exported einsum
    rng = np.random.default_rng(1)
    for size in SIZES:
        out = random_artifacts[fmt, size]
        run = export.load_artifact(out, fmt)
        pixels, mask, alone = _padded_batch(size, rng)
        _assert_equals_detector(run(pixels, mask), detector, pixels, mask, alone)
        one = run(pixels[1:], mask[1:])  # batch size 1: the same artifact (symbolic batch)
        _assert_equals_detector(one, detector, pixels[1:], mask[1:], alone[1:])
        assert json.load(open(out + ".json"))["inputs"]["pixel_values"]["shape"] == ["B", size[0], size[1], 3]


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_converted_hf_yolos_artifact_equals_flax_and_hf(hf_model_and_ckpt, fmt, tmp_path):
    import reference_models as ref

    hf, ckpt = hf_model_and_ckpt
    detector = Detector.from_checkpoint(ckpt)
    rng = np.random.default_rng(2)
    for size in ((64, 96), (96, 48)):
        out = str(tmp_path / f"hf_{size[0]}x{size[1]}.{fmt}")
        export.export_checkpoint(ckpt, fmt, size, out)
        run = export.load_artifact(out, fmt)
        pixels, mask, alone = _padded_batch(size, rng)
        got = run(pixels, mask)
        _assert_equals_detector(got, detector, pixels, mask, alone)
        _assert_equals_detector(run(pixels[1:], mask[1:]), detector, pixels[1:], mask[1:], alone[1:])
        for i, image in enumerate(alone):  # and HF PyTorch on each image alone
            want = ref.hf_outputs(hf, image[None])
            np.testing.assert_allclose(got["logits"][i], want["logits"][0], atol=1e-4, rtol=0)
            np.testing.assert_allclose(got["boxes"][i], want["boxes"][0], atol=1e-4, rtol=0)


VARIANTS = {  # ViT-detection options whose layers the plain model lacks (windows, relative positions, priors, ...)
    "windowed_rel_pos": dict(window_size=2, global_blocks=(1,), rel_pos=True),
    "conv_stem_det_priors": dict(patch_embed="conv_stem", det_reference_grid=(1, 5), det_attention_sigma=(1.0, 0.0),
                                 det_box_offset=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_models_export_to_onnx(variant, tmp_path):
    """The ViT-detection variants convert too: the ONNX artifact equals `Detector.forward` on a padded batch."""
    cfg = model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=5, num_classes=3,
                       init_pe_size=(64, 96), mid_pe_size=None, **VARIANTS[variant]).to_dict()
    params = jax.jit(YOLOS(**cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 96, 3)))["params"]
    params = jax.tree.map(lambda a: np.asarray(a) + np.random.default_rng(0).normal(scale=0.05, size=a.shape), params)
    weights.save_params_dir(str(tmp_path / "ckpt"), params, cfg, {"eval_size": 64})
    out = str(tmp_path / "m.onnx")
    export.export_checkpoint(str(tmp_path / "ckpt"), "onnx", (64, 96), out)
    pixels, mask, alone = _padded_batch((64, 96), np.random.default_rng(6))
    _assert_equals_detector(export.load_artifact(out, "onnx")(pixels, mask), Detector.from_checkpoint(str(tmp_path / "ckpt")),
                            pixels, mask, alone)


def test_fixed_batch_and_no_mask_artifacts(random_ckpt, tmp_path):
    detector = Detector.from_checkpoint(random_ckpt)
    out = str(tmp_path / "fixed.stablehlo")
    description = export.export_checkpoint(random_ckpt, "stablehlo", (48, 80), out, batch_size=3, pixel_mask=False,
                                           platforms=("cpu",))
    assert list(description["inputs"]) == ["pixel_values"] and description["inputs"]["pixel_values"]["shape"][0] == 3
    pixels = np.random.default_rng(3).normal(size=(3, 48, 80, 3)).astype(np.float32)
    got = export.load_artifact(out, "stablehlo")(pixels)
    want = detector.forward(pixels)
    for k in ("logits", "boxes"):
        np.testing.assert_allclose(got[k], want[k], atol=1e-4, rtol=0)
    with pytest.raises(Exception):  # the batch size is part of the artifact
        export.load_artifact(out, "stablehlo")(pixels[:2])


def test_a_training_checkpoint_exports_the_weights_it_would_evaluate(random_ckpt, tmp_path):
    """A training workdir (its newest step) exports as a converted directory does: the artifact equals
    `Detector.from_checkpoint(workdir)`, and OUT.json carries the run's class names and eval size."""
    import ml_collections

    from yolos_jax import checkpointing

    params, cfg, _ = weights.load_params_dir(random_ckpt)
    params = jax.tree.map(lambda a: np.asarray(a) * 0.9, params)  # not the converted directory's weights
    ckpt_cfg = checkpointing.default_checkpoint_config()
    ckpt_cfg.async_save = False
    ck = checkpointing.Checkpointer(str(tmp_path / "run"), ckpt_cfg)
    state = {"params": params, "step": np.int32(7), "opt_state": {}, "rng": np.zeros(2, np.uint32)}
    run_config = ml_collections.ConfigDict({"model": cfg, "input": {"eval_size": 48}})
    ck.save(7, state, {"epoch": 0, "batch": 7}, run_config, {"label_names": NAMES})
    ck.close()
    out = str(tmp_path / "run.stablehlo")
    description = export.export_checkpoint(str(tmp_path / "run"), "stablehlo", (48, 80), out, platforms=("cpu",))
    assert description["label_names"] == NAMES
    detector = Detector.from_checkpoint(str(tmp_path / "run"))
    assert description["eval_size"] == detector.eval_size and description["max_size"] == detector.max_size
    pixels, mask, alone = _padded_batch((48, 80), np.random.default_rng(4))
    _assert_equals_detector(export.load_artifact(out, "stablehlo")(pixels, mask), detector, pixels, mask, alone)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear error each, nothing written
# ---------------------------------------------------------------------------------------------------------

def _leftovers(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def test_bad_inputs_name_the_problem_and_write_nothing(random_ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "m.onnx")
    cases = [
        (dict(fmt="tflite"), r"--format='tflite': choose one of stablehlo, onnx, savedmodel"),
        (dict(checkpoint=str(tmp_path / "missing")), r"--checkpoint=.*missing: .*no checkpoint found"),
        (dict(image_size="48,81"), r"multiples of the model's patch size 16, e\.g\. 48,80"),
        (dict(image_size="48x80"), r"give the canvas as H,W in pixels"),
        (dict(image_size="8,16"), r"positive multiples"),
        (dict(batch_size=-1), r"--batch_size=-1"),
    ]
    for overrides, message in cases:
        args = dict(checkpoint=random_ckpt, fmt="onnx", image_size="48,80") | overrides
        with pytest.raises(UserError, match=message):
            export.export_checkpoint(args["checkpoint"], args["fmt"], args["image_size"], out,
                                     batch_size=args.get("batch_size"))
    assert os.listdir(tmp_path) == []

    unreadable = tmp_path / "unreadable"
    _random_checkpoint(unreadable)
    for data_file in (unreadable / "params").rglob("*"):  # every byte of the stored arrays
        if data_file.is_file() and "ocdbt" in str(data_file.relative_to(unreadable)):
            data_file.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"--checkpoint=.*unreadable"):
        export.export_checkpoint(str(unreadable), "stablehlo", "48,80", str(tmp_path / "x.stablehlo"))
    assert not os.path.exists(tmp_path / "x.stablehlo")

    # A converter missing from the environment.
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # `import jax2onnx` raises ImportError
    with pytest.raises(UserError, match=r'ONNX export needs jax2onnx .*pip install -e "\.\[export\]"'):
        export.export_checkpoint(random_ckpt, "onnx", "48,80", out)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(UserError, match=r"SavedModel export needs TensorFlow"):
        export.export_checkpoint(random_ckpt, "savedmodel", "48,80", str(tmp_path / "sm"))
    assert sorted(os.listdir(tmp_path)) == ["unreadable"]


def test_existing_output_needs_overwrite_and_a_failed_export_leaves_the_old_one(random_ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "m.stablehlo")
    export.export_checkpoint(random_ckpt, "stablehlo", "48,80", out, platforms=("cpu",))
    before = open(out, "rb").read()
    with pytest.raises(UserError, match=r"m\.stablehlo already exists: pass --overwrite"):
        export.export_checkpoint(random_ckpt, "stablehlo", "64,32", out)

    # A converter that dies half-way through writing: the old artifact stays, no temporary is left.
    def half_written(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_stablehlo", half_written)
    with pytest.raises(UserError, match=r"stablehlo export of .* failed: RuntimeError: disk full"):
        export.export_checkpoint(random_ckpt, "stablehlo", "64,32", out, overwrite=True)
    assert open(out, "rb").read() == before and json.load(open(out + ".json"))["image_size"] == [48, 80]
    assert _leftovers(tmp_path) == []

    # An artifact that does not compute what the Flax forward does is never published.
    monkeypatch.undo()
    original = export.write_stablehlo

    def wrong(path, model, params, specs, platforms):
        original(path, model, jax.tree.map(lambda a: a * 1.01, params), specs, platforms)

    monkeypatch.setattr(export, "write_stablehlo", wrong)
    with pytest.raises(UserError, match=r"the stablehlo artifact differs from the Flax forward"):
        export.export_checkpoint(random_ckpt, "stablehlo", "64,32", out, overwrite=True, platforms=("cpu",))
    assert open(out, "rb").read() == before and _leftovers(tmp_path) == []

    monkeypatch.undo()
    sm = tmp_path / "sm"
    sm.mkdir()
    (sm / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match=r"sm already exists"):
        export.export_checkpoint(random_ckpt, "savedmodel", "48,80", str(sm))
    with pytest.raises(UserError, match=r"is a directory that holds no SavedModel: --overwrite replaces only"):
        export.export_checkpoint(random_ckpt, "savedmodel", "48,80", str(sm), overwrite=True)
    with pytest.raises(UserError, match=r"is a directory: onnx writes one file"):
        export.export_checkpoint(random_ckpt, "onnx", "48,80", str(sm), overwrite=True)
    assert (sm / "mine.txt").read_text() == "keep"
    with pytest.raises(UserError, match=r"holds the checkpoint"):
        export.export_checkpoint(random_ckpt, "savedmodel", "48,80", os.path.dirname(random_ckpt), overwrite=True)
    with pytest.raises(UserError, match=r"--platforms=cpu,gpu: choose from cpu, cuda, rocm, tpu"):
        export.export_checkpoint(random_ckpt, "stablehlo", "48,80", str(tmp_path / "p.stablehlo"),
                                 platforms=("cpu", "gpu"))

    # An artifact for another platform cannot run here: it is written, and OUT.json says it was not verified.
    description = export.export_checkpoint(random_ckpt, "stablehlo", "48,80", out, overwrite=True, platforms=("cuda",))
    assert description["verified"].startswith("skipped: this machine's backend (cpu)")
    assert json.load(open(out + ".json"))["platforms"] == ["cuda"] and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------
# The command and the README's deployment example
# ---------------------------------------------------------------------------------------------------------

def _fixed_answer_checkpoint(path):
    """The random model with heads that ignore the image: every [DET] token predicts box (cx, cy, w, h) =
    (0.5, 0.4, 0.25, 0.5) of the image and class 'square' (bias +8)."""
    _random_checkpoint(path)
    params, cfg, meta = weights.load_params_dir(str(path))
    flat = weights.flatten_params(params)
    flat["box_head/layers_2/kernel"] = np.zeros_like(flat["box_head/layers_2/kernel"])
    flat["box_head/layers_2/bias"] = np.log(np.float32([0.5, 0.4, 0.25, 0.5]) / np.float32([0.5, 0.6, 0.75, 0.5]))
    flat["class_head/layers_2/kernel"] = np.zeros_like(flat["class_head/layers_2/kernel"])
    flat["class_head/layers_2/bias"] = np.float32([0, 8, 0, 0])
    weights.save_params_dir(str(path) + "_fixed", weights.unflatten_params(flat), cfg, meta)
    return str(path) + "_fixed"


def _readme_onnx_example():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Deploy"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_readme_example(directory):
    """The README's example in `directory` (yolos.onnx, yolos.onnx.json, photo.jpg) in a Python that has neither
    JAX nor yolos_jax imported (asserted); returns its printed detections [(name, score, [x0, y0, x1, y1])]."""
    code = _readme_onnx_example() + "\nimport sys; assert 'jax' not in sys.modules and 'yolos_jax' not in sys.modules\n"
    run = subprocess.run([sys.executable, "-c", code], cwd=directory, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=""))
    assert run.returncode == 0, run.stderr[-3000:]
    return [(name, float(score), [float(v) for v in box])
            for name, score, *box in (line.split() for line in run.stdout.strip().splitlines())]


def test_export_py_and_the_readme_onnxruntime_example(tmp_path, random_ckpt, random_artifacts):
    ckpt = _fixed_answer_checkpoint(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=ROOT)
    usage = subprocess.run([sys.executable, "export.py", "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "pixel_values float32 [B, H, W, 3]" in usage.stdout and "labels       int32   [B, Q]" in usage.stdout

    fixed, rand = tmp_path / "fixed", tmp_path / "random"
    run = subprocess.run([sys.executable, "export.py", f"--checkpoint={ckpt}", "--format=onnx", "--image_size=64,112",
                          f"--out={fixed / 'yolos.onnx'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "verified on a padded batch of 2" in run.stdout

    bad = subprocess.run([sys.executable, "export.py", f"--checkpoint={ckpt}", "--format=onnx", "--image_size=64,100",
                          f"--out={fixed / 'yolos.onnx'}", "--overwrite"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --image_size=64,100: height and width must be")

    # The README's example, as a user runs it. A model whose answer ignores the image: every [DET] token says
    # 'square', score ~1, the fixed box, which must come out in pixels of the 200x150 original.
    photo = np.random.default_rng(5).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    for directory in (fixed, rand):
        directory.mkdir(exist_ok=True)
        Image.fromarray(photo).save(directory / "photo.jpg", quality=90)
    detections = _run_readme_example(fixed)
    assert len(detections) == 5
    for name, score, box in detections:
        assert name == "square" and score > 0.99
        np.testing.assert_allclose(box, [75, 22.5, 125, 97.5], atol=0.01)
    # A model whose answer depends on every pixel: the example's pre- and post-processing are `Detector.predict`'s.
    for suffix in ("", ".json"):
        shutil.copy(random_artifacts["onnx", (64, 112)] + suffix, rand / f"yolos.onnx{suffix}")
    detections = _run_readme_example(rand)
    want = Detector.from_checkpoint(random_ckpt).predict(np.asarray(Image.open(rand / "photo.jpg").convert("RGB")))[0]
    assert len(detections) == len(want["scores"]) > 0
    for (name, score, box), w_name, w_score, w_box in zip(sorted(detections, key=lambda d: -d[1]), want["names"],
                                                           want["scores"], want["boxes"]):
        assert name == w_name and abs(score - w_score) < 2e-4
        np.testing.assert_allclose(box, w_box, atol=0.02)
