"""Deployable artifacts of a detector: StableHLO (`jax.export`), ONNX (jax2onnx) and a TF SavedModel (jax2tf).

`export.py` is the command; `export_checkpoint` is its logic. Every artifact computes `inference.detector_outputs`
(the model plus the original's post-processing) on one fixed canvas, with the parameters inside it, so it runs
without yolos_jax or JAX's Python model code:

  inputs   pixel_values float32 [B, H, W, 3]  RGB scaled to [0, 1] and normalised with the ImageNet mean/std
                                              (NHWC, as `Detector.preprocess` makes it); zeros in padding
           pixel_mask   bool    [B, H, W]     True on real pixels: each image's real pixels form a top-left
                                              rectangle (pad bottom/right); absent with --pixel_mask=false,
                                              where every image fills the canvas
  outputs  logits       float32 [B, Q, C + 1] class logits; the last is "no object"
           boxes        float32 [B, Q, 4]     (cx, cy, w, h) in [0, 1] of each image's un-padded extent
           scores       float32 [B, Q]        softmax over the C + 1 logits, max over the C real classes
           labels       int32   [B, Q]        the class of that max (0-based model label)

(H, W) is `--image_size`; B is symbolic (any batch size) unless `--batch_size` fixes it; Q = num_det_tokens,
C = num_classes. A padded batch gives each image the result it gets alone (per-image position embeddings and
key masks, as in `Detector`). Boxes in pixels of the original image: (cx - w/2, cy - h/2, cx + w/2, cy + h/2)
times (width, height) of the image before resizing.

What each format writes at --out (the artifact appears atomically, after it was run by its own runtime and
compared with the Flax forward; OUT.json, its description, beside it):
  stablehlo   a file: `jax.export.Exported.serialize()` bytes, lowered for --platforms (default cpu, cuda and
              tpu). Run: `jax.export.deserialize(bytearray(open(OUT, 'rb').read())).call(pixel_values,
              pixel_mask)` -> dict of the outputs.
  onnx        a file (opset `ONNX_OPSET`), named inputs and outputs as above, OUT.json's content (before the
              verification) also in the model's metadata_props['yolos_jax']. Run with onnxruntime.
  savedmodel  a directory; signature 'serving_default' (inputs and outputs by name), lowered for --platforms,
              OUT.json's content also in assets.extra/yolos_jax.json. The model is serialised StableHLO inside
              an XlaCallModule op (jax2tf native serialisation), traced with `vit.portable_erf` so that
              TensorFlow's older StableHLO reader accepts it under a symbolic batch size (a process-wide switch
              while the export traces: do not trace other models in other threads meanwhile).
Exports always compute in float32 with the explicit (einsum) attention, which every runtime converts cleanly;
the checkpoint's training-time compute settings (dtype, attention kernel, remat) do not carry over.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from yolos_jax import atomic, inference, vit, weights
from yolos_jax.data import transforms as T
from yolos_jax.data.labels import UNUSED_NAME
from yolos_jax.errors import UserError, describe_error
from yolos_jax.yolos import YOLOS

FORMATS = ("stablehlo", "onnx", "savedmodel")
INPUT_NAMES = ("pixel_values", "pixel_mask")
OUTPUT_NAMES = ("logits", "boxes", "scores", "labels")
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_OPSET = 21  # accepted by onnxruntime >= 1.20 and TensorRT 10; the graph uses no newer operator
# Export overrides the checkpoint's runtime fields (weights.RUNTIME_MODEL_FIELDS): see the module docstring.
EXPORT_MODEL_FIELDS = dict(dtype="float32", attention_impl="einsum", remat=False)
# `verify` compares the artifact with the Flax forward within these (absolute, on logits and boxes; scores).
VERIFY_ATOL = 1e-4
VERIFY_SCORE_ATOL = 1e-5

log = logging.getLogger("yolos_jax")


def signature_text() -> str:
    """The inputs and outputs every artifact has (this module's docstring table), for `export.py --help`."""
    doc = __doc__ or ""
    start = doc.index("  inputs")
    return doc[start:doc.index("\n\n", start)]


def parse_image_size(text: Any, patch_size: Optional[int] = 16) -> tuple[int, int]:
    """'H,W' (or a pair) -> (H, W): the canvas in pixels, each a positive multiple of `patch_size` (None: only
    the syntax is checked)."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        size = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) <= 0:
        raise UserError(f"--image_size={text!r}: give the canvas as H,W in pixels, e.g. --image_size=800,1344")
    if patch_size and any(s < patch_size or s % patch_size for s in size):
        raise UserError(f"--image_size={size[0]},{size[1]}: height and width must be positive multiples of the "
                        f"model's patch size {patch_size}, e.g. "
                        f"{max(patch_size, size[0] // patch_size * patch_size)},"
                        f"{max(patch_size, size[1] // patch_size * patch_size)}")
    return size


def export_model_config(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `YOLOS` keyword arguments an artifact computes: `model_cfg` with `EXPORT_MODEL_FIELDS`."""
    cfg = weights.model_cfg_dict(model_cfg)
    cfg.update(EXPORT_MODEL_FIELDS)
    return cfg


def input_specs(image_size: Sequence[int], batch_size: Optional[int], pixel_mask: bool,
                batch_name: Any) -> list[jax.ShapeDtypeStruct]:
    """The artifact's input shapes; `batch_name` stands for the batch size when `batch_size` is None."""
    batch = batch_size if batch_size else batch_name
    h, w = (int(s) for s in image_size)
    specs = [jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)]
    if pixel_mask:
        specs.append(jax.ShapeDtypeStruct((batch, h, w), jnp.bool_))
    return specs


def _outputs_fn(model: YOLOS, pixel_mask: bool) -> Callable[..., dict]:
    """(params, pixel_values[, pixel_mask]) -> dict of the outputs."""
    if pixel_mask:
        return lambda params, pixel_values, mask: inference.detector_outputs(model, params, pixel_values, mask)
    return lambda params, pixel_values: inference.detector_outputs(model, params, pixel_values, None)


# ---------------------------------------------------------------------------------------------------------
# The three writers: each writes the artifact at `path` (a temporary name; `export_checkpoint` moves it).
# ---------------------------------------------------------------------------------------------------------

def write_stablehlo(path: str, model: YOLOS, params: Any, specs: Sequence[jax.ShapeDtypeStruct],
                    platforms: Sequence[str] = DEFAULT_PLATFORMS) -> None:
    """Serialized `jax.export.Exported` of (pixel_values [B, H, W, 3] float32[, pixel_mask [B, H, W] bool]) ->
    {'logits', 'boxes', 'scores', 'labels'} (the module docstring's table), lowered for `platforms`, with the
    parameters as constants; B symbolic unless `specs` fix it (a str batch dimension names the symbol)."""
    fn = _outputs_fn(model, len(specs) == 2)
    batch = specs[0].shape[0]
    if not isinstance(batch, int):
        batch, = jax.export.symbolic_shape(str(batch))
        specs = [jax.ShapeDtypeStruct((batch,) + tuple(s.shape[1:]), s.dtype) for s in specs]
    exported = jax.export.export(jax.jit(lambda *inputs: fn(params, *inputs)), platforms=tuple(platforms))(*specs)
    with open(path, "wb") as f:
        f.write(exported.serialize())


def write_onnx(path: str, model: YOLOS, params: Any, specs: Sequence[jax.ShapeDtypeStruct],
               metadata: Mapping[str, Any]) -> None:
    """ONNX through jax2onnx: inputs and outputs by name (the module docstring's table; B a symbolic dimension
    unless `specs` fix it), parameters as initializers, `metadata` as JSON in metadata_props['yolos_jax']."""
    to_onnx, onnx = _onnx_converter()
    with_mask = len(specs) == 2
    fn = _outputs_fn(model, with_mask)
    names = INPUT_NAMES[: len(specs)]

    def ordered(*inputs):
        out = fn(params, *inputs)
        return tuple(out[k] for k in OUTPUT_NAMES)

    # jax2onnx prints debugging lines from some plugins and logs each optional plugin it skips: keep the
    # user's console to our own report.
    with contextlib.redirect_stdout(io.StringIO()), _quiet_loggers("jax2onnx", "onnx_ir"):
        proto = to_onnx(ordered, list(specs), model_name="yolos", opset=ONNX_OPSET, input_names=list(names),
                        output_names=list(OUTPUT_NAMES))
    _drop_unused_initializers(proto.graph)
    onnx.helper.set_model_props(proto, {"yolos_jax": json.dumps(dict(metadata), sort_keys=True)})
    onnx.save(proto, path)


def _drop_unused_initializers(graph: Any) -> None:
    """Removes the initializers no node reads (jax2onnx leaves shape constants behind; onnxruntime warns about
    each one at every load). Node inputs of subgraphs (If, Loop, Scan bodies) count as reads."""
    used: set[str] = set()

    def collect(g: Any) -> None:
        for node in g.node:
            used.update(node.input)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    collect(sub)

    collect(graph)
    used.update(o.name for o in graph.output)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def write_savedmodel(path: str, model: YOLOS, params: Any, specs: Sequence[jax.ShapeDtypeStruct],
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> None:
    """A TF SavedModel with signature 'serving_default' (inputs and outputs as `write_stablehlo`'s, by name),
    lowered for `platforms` (TF picks the one it runs on); parameters as (non-trainable) tf.Variables."""
    tf, jax2tf = _tensorflow()
    with_mask = len(specs) == 2
    fn = _outputs_fn(model, with_mask)
    batch = specs[0].shape[0] if isinstance(specs[0].shape[0], int) else None
    h, w = specs[0].shape[1:3]
    poly = None if batch else [None, f"(b, {h}, {w}, 3)"] + ([f"(b, {h}, {w})"] if with_mask else [])
    module = tf.Module()
    module.params = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a, np.float32), trainable=False), params)
    tf_spec = [tf.TensorSpec([batch, h, w, 3], tf.float32, name=INPUT_NAMES[0])]
    if with_mask:
        tf_spec.append(tf.TensorSpec([batch, h, w], tf.bool, name=INPUT_NAMES[1]))
    with vit.portable_erf():
        converted = jax2tf.convert(fn, polymorphic_shapes=poly, with_gradient=False,
                                   native_serialization_platforms=tuple(platforms))

        @tf.function(autograph=False, input_signature=tf_spec)
        def serve(*inputs):
            out = converted(module.params, *inputs)
            return {k: tf.identity(out[k], name=k) for k in OUTPUT_NAMES}

        module.serve = serve
        tf.saved_model.save(module, path, signatures={"serving_default": serve})


# ---------------------------------------------------------------------------------------------------------
# Running an artifact in its own runtime (verification, tests, the benchmark)
# ---------------------------------------------------------------------------------------------------------

def load_artifact(path: str, fmt: str) -> Callable[..., dict[str, np.ndarray]]:
    """A callable (pixel_values[, pixel_mask]) -> numpy dict of the outputs, run by the format's own runtime:
    `jax.export.deserialize`, onnxruntime (CPU) or `tf.saved_model.load`."""
    if fmt == "stablehlo":
        with open(path, "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        return lambda *inputs: jax.tree.map(np.asarray, exported.call(*inputs))
    if fmt == "onnx":
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only (jax2onnx leaves unused shape constants ort warns about)
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run(*inputs):
            values = session.run(list(OUTPUT_NAMES), {n: np.asarray(x) for n, x in zip(names, inputs)})
            return dict(zip(OUTPUT_NAMES, values))

        return run
    if fmt == "savedmodel":
        tf, _ = _tensorflow()
        serve = tf.saved_model.load(path).signatures["serving_default"]

        def run(*inputs):
            out = serve(**{n: tf.constant(np.asarray(x)) for n, x in zip(INPUT_NAMES, inputs)})
            return {k: out[k].numpy() for k in OUTPUT_NAMES}

        return run
    raise UserError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")


def verification_inputs(image_size: Sequence[int], patch_size: int, pixel_mask: bool,
                        batch_size: Optional[int] = None, seed: int = 0) -> list[np.ndarray]:
    """A deterministic batch (2 images unless `batch_size` fixes it): random normal pixels; with a mask, image
    0 fills the canvas and the others have smaller top-left extents (multiples of the patch, zeros outside)."""
    h, w = (int(s) for s in image_size)
    batch = batch_size or 2
    pixels = np.random.RandomState(seed).randn(batch, h, w, 3).astype(np.float32)
    if not pixel_mask:
        return [pixels]
    extents = ((1.0, 1.0), (0.75, 0.5), (0.5, 1.0), (1.0, 0.75))  # (height, width) fractions, cycled
    mask = np.zeros((batch, h, w), bool)
    for i in range(batch):
        fh, fw = extents[i % len(extents)]
        mask[i, : max(patch_size, int(h * fh) // patch_size * patch_size),
             : max(patch_size, int(w * fw) // patch_size * patch_size)] = True
    pixels[~mask] = 0.0
    return [pixels, mask]


def compare_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Max |difference| per output between an artifact's outputs and the Flax forward's. 'labels' counts the
    labels outside [0, C) or whose probability (float64 softmax of the Flax logits) is below the best real
    class's by more than `VERIFY_SCORE_ATOL` (a near-tie may pick either class)."""
    diffs = {k: float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(want[k], np.float64))))
             for k in ("logits", "boxes", "scores")}
    logits = np.asarray(want["logits"], np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = (probs / probs.sum(axis=-1, keepdims=True))[..., :-1]
    labels = np.asarray(got["labels"], np.int64)
    in_range = (labels >= 0) & (labels < probs.shape[-1])
    picked = np.take_along_axis(probs, np.where(in_range, labels, 0)[..., None], axis=-1)[..., 0]
    diffs["labels"] = float(np.sum(~in_range | (picked < probs.max(axis=-1) - VERIFY_SCORE_ATOL)))
    return diffs


def check_close(diffs: Mapping[str, float], what: str) -> None:
    """Raises UserError unless `compare_outputs`' differences are within the VERIFY tolerances."""
    bad = {k: v for k, v in diffs.items()
           if v > {"logits": VERIFY_ATOL, "boxes": VERIFY_ATOL, "scores": VERIFY_SCORE_ATOL, "labels": 0}[k]}
    if bad:
        raise UserError(f"{what} differs from the Flax forward: {bad} (tolerance {VERIFY_ATOL} on logits and boxes, "
                        f"{VERIFY_SCORE_ATOL} on scores); nothing was written. Please report this with the command.")


# ---------------------------------------------------------------------------------------------------------
# export.py
# ---------------------------------------------------------------------------------------------------------

def export_checkpoint(checkpoint: str, fmt: str, image_size: Any, out: str, *, overwrite: bool = False,
                      batch_size: Optional[int] = None, pixel_mask: bool = True,
                      platforms: Sequence[str] = DEFAULT_PLATFORMS, verify: bool = True) -> dict[str, Any]:
    """Exports the detector of any converted or training checkpoint (`weights.load_any`) to `out`.

    fmt: one of FORMATS. image_size: 'H,W' or (H, W) pixels, multiples of the patch size. batch_size: None for
    a symbolic batch, else fixed. pixel_mask: whether the artifact takes one. platforms: what StableHLO and the
    SavedModel are lowered for. verify: run the artifact in its runtime on a padded batch and compare with the
    Flax forward (float32, highest matmul precision) before anything is replaced (`check_close`); skipped, and
    recorded as skipped, when this machine's backend is not among `platforms`.
    Returns the description written to OUT.json (inputs, outputs, canvas, eval resize, class names, source,
    and the verification's differences); for files OUT.json and the artifact replace their targets together.
    Raises UserError for what the user can fix.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
    out = os.path.abspath(out)
    meta_path = out + ".json"
    _check_output(out, fmt, overwrite, checkpoint)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch_size={batch_size}: must be positive (or unset for a symbolic batch size)")
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise UserError(f"--platforms={','.join(platforms)}: choose from {', '.join(PLATFORMS)}")
    parse_image_size(image_size, None)  # the syntax before a (possibly long) checkpoint read
    if fmt == "onnx":
        _onnx_converter(), _onnxruntime()
    elif fmt == "savedmodel":
        _tensorflow()
    try:
        params, model_cfg, meta = weights.load_any(checkpoint, require_detector=True)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"--checkpoint={checkpoint}: {describe_error(e)}") from None
    size = parse_image_size(image_size, model_cfg["patch_size"])
    export_cfg = export_model_config(model_cfg)
    model = YOLOS(**export_cfg)
    specs = input_specs(size, batch_size, pixel_mask, batch_name="B")
    description = _describe(fmt, checkpoint, export_cfg, meta, specs, platforms)
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), dict(params))

    def build(path: str, json_path: Optional[str]) -> None:
        try:
            if fmt == "stablehlo":
                write_stablehlo(path, model, params, specs, platforms)
            elif fmt == "onnx":
                # The model's own copy of the description (before verification; the checkpoint's name only).
                write_onnx(path, model, params, specs,
                           dict(description, checkpoint=os.path.basename(description["checkpoint"].rstrip(os.sep))))
            else:
                write_savedmodel(path, model, params, specs, platforms)
            if verify and jax.default_backend() in _jax_platforms(platforms):
                inputs = verification_inputs(size, model_cfg["patch_size"], pixel_mask, batch_size)
                with jax.default_matmul_precision("highest"):
                    want = jax.device_get(jax.jit(_outputs_fn(model, pixel_mask))(params, *inputs))
                diffs = compare_outputs(load_artifact(path, fmt)(*inputs), want)
                check_close(diffs, f"the {fmt} artifact")
                description["verified"] = {"batch": int(inputs[0].shape[0]), "max_abs_diff": diffs}
            else:
                description["verified"] = None if not verify else (
                    f"skipped: this machine's backend ({jax.default_backend()}) is not among the platforms")
            if fmt == "savedmodel":  # the description travels inside the directory too (TF Serving's assets.extra)
                atomic.write_json_atomic(os.path.join(path, "assets.extra", "yolos_jax.json"), description, indent=1)
            else:
                with open(json_path, "w") as f:
                    json.dump(description, f, indent=1)
        except UserError:
            raise
        except Exception as e:  # a converter's or runtime's failure on this model: name it, log the traceback
            log.debug("export failed", exc_info=True)
            raise UserError(f"{fmt} export of {checkpoint} failed: {describe_error(e)}") from e

    try:
        if fmt == "savedmodel":
            if os.path.lexists(meta_path):  # no stale description beside a new directory, even after a crash
                os.remove(meta_path)
            atomic.atomic_directory(out, lambda tmp: build(tmp, None), overwrite=overwrite)
            atomic.write_json_atomic(meta_path, description, indent=1)
        else:
            with atomic.atomic_files([out, meta_path]) as (tmp, tmp_json):
                build(tmp, tmp_json)
    except OSError as e:
        raise UserError(f"--out={out}: cannot write there ({describe_error(e)})") from None
    return description


# jax.export's platform names; 'gpu' backends export as 'cuda' or 'rocm'.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _jax_platforms(platforms: Sequence[str]) -> set[str]:
    """Backend names (`jax.default_backend()`) that can run an artifact lowered for `platforms`."""
    return {"gpu" if p in ("cuda", "rocm") else p for p in platforms}


def _check_output(out: str, fmt: str, overwrite: bool, checkpoint: str) -> None:
    """Refuses an --out that exists without --overwrite, that --overwrite may not replace (a directory that is
    not an earlier SavedModel export, a file where a directory goes or the reverse), or that holds the checkpoint."""
    meta_path = out + ".json"
    existing = [p for p in (out, meta_path) if os.path.lexists(p)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists: pass --overwrite to replace it, or choose another --out")
    source = os.path.abspath(checkpoint)
    if source == out or source.startswith(out.rstrip(os.sep) + os.sep):
        raise UserError(f"--out={out} holds the checkpoint {source}: choose another --out")
    if os.path.isdir(out) and not os.path.islink(out):
        if fmt != "savedmodel":
            raise UserError(f"--out={out} is a directory: {fmt} writes one file; give a file name")
        if not os.path.isfile(os.path.join(out, "saved_model.pb")):
            raise UserError(f"--out={out} is a directory that holds no SavedModel: --overwrite replaces only an "
                            "earlier export; choose a new --out")
    elif os.path.lexists(out) and fmt == "savedmodel":
        raise UserError(f"--out={out} is a file: savedmodel writes a directory; choose another --out")


def _describe(fmt: str, checkpoint: str, model_cfg: Mapping[str, Any], meta: Mapping[str, Any],
              specs: Sequence[jax.ShapeDtypeStruct], platforms: Sequence[str]) -> dict[str, Any]:
    """OUT.json's content (before verification): what the artifact takes and gives, and how to feed it."""
    q, c = model_cfg["num_det_tokens"], model_cfg["num_classes"]
    batch = specs[0].shape[0] if isinstance(specs[0].shape[0], int) else "B"
    eval_size = int(meta.get("eval_size") or 800)
    names = list(meta.get("label_names") or [str(k) for k in range(c)])
    names += [UNUSED_NAME] * (c - len(names))  # as `Detector`: a head with more classes than named ones
    description = {
        "format": fmt,
        "inputs": {n: {"dtype": str(s.dtype), "shape": [batch, *s.shape[1:]]} for n, s in zip(INPUT_NAMES, specs)},
        "outputs": {"logits": {"dtype": "float32", "shape": [batch, q, c + 1]},
                    "boxes": {"dtype": "float32", "shape": [batch, q, 4]},
                    "scores": {"dtype": "float32", "shape": [batch, q]},
                    "labels": {"dtype": "int32", "shape": [batch, q]}},
        "image_size": [int(d) for d in specs[0].shape[1:3]],
        "patch_size": model_cfg["patch_size"],
        # The eval resize `Detector.from_checkpoint` applies (`data.transforms.eval_resize_hw`).
        "eval_size": eval_size,
        "max_size": int(meta.get("max_size") or eval_size * 1333 // 800),
        "label_names": names[:c],
        "checkpoint": os.path.abspath(checkpoint),
        "step": meta.get("step"),
        "model": weights.model_cfg_json(model_cfg),
        "jax": jax.__version__,
    }
    if fmt != "onnx":
        description["platforms"] = list(platforms)
    # Whether the canvas holds the eval resize of every landscape (or every portrait) image: a smaller one fails
    # on the images `Detector` / the README's recipe would feed it (export.py says so).
    short, long = T.eval_canvas_bound(eval_size, description["max_size"])
    h, w = description["image_size"]
    description["holds_eval_resize"] = (h >= short and w >= long) or (h >= long and w >= short)
    return description


# ---------------------------------------------------------------------------------------------------------
# Optional converters: imported when used (heavy; the 'export' extra or TensorFlow)
# ---------------------------------------------------------------------------------------------------------

def _onnx_converter():
    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_loggers("jax2onnx", "onnx_ir"):
            import onnx
            from jax2onnx import to_onnx
    except ImportError as e:
        raise UserError(f"ONNX export needs jax2onnx and onnx ({e}): pip install -e \".[export]\"") from None
    return to_onnx, onnx


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError(f"running an ONNX artifact needs onnxruntime ({e}): pip install -e \".[export]\"") from None
    return onnxruntime


def _tensorflow():
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise UserError(f"SavedModel export needs TensorFlow ({e}): pip install tensorflow-cpu (installed with "
                        "yolos_jax on machines where it installs)") from None
    return tf, jax2tf


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Within the block, the named loggers pass ERROR records only."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

