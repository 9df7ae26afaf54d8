"""The YOLOS model against HF transformers' YolosForObjectDetection, PyTorch's bicubic, the paper's
parameter counts and a float64 numpy reference with key masking."""

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, YolosConfig, YolosForObjectDetection

import reference_models as ref
from eval_fixtures import perturbed_params
from yolos_jax import Detector, attention, config, convert, vit

TOL = 1e-4


# --------------------------------------------------------------------------------------------------
# Parameter counts: HF with the same settings, and the paper
# --------------------------------------------------------------------------------------------------

# Table 6 (detectors, M params): Ti 6.5, S 30.7 (31 in Table 6; 30.7 at 0.1M precision), B 127,
# S (dWr = fast scaling, 14 x 330) 28. Table 1 (pre-training DeiT classifiers with 1000 classes, at their
# pre-training resolution): Ti 5.7, S 22.1, S(dwr) 13.7 @ 272, S(dWr) 19.0 @ 240.
PAPER_DETECTOR = {"ti": ("%.1f", "6.5"), "s": ("%.1f", "30.7"), "b": ("%d", "127"), "s_dWr": ("%.0f", "28")}
PAPER_BACKBONE = {"ti": (224, 5.7), "s": (224, 22.1), "s_dwr": (272, 13.7), "s_dWr": (240, 19.0)}


@pytest.mark.parametrize("variant", sorted(config.MODEL_VARIANTS))
def test_param_counts(variant):
    cfg = config.model_config(variant)
    ours = sum(int(np.prod(s)) for s in convert.expected_param_shapes(cfg).values())
    hf_cfg = YolosConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=4 * cfg.hidden_size, image_size=list(cfg.init_pe_size), num_labels=cfg.num_classes,
        num_detection_tokens=cfg.num_det_tokens, use_mid_position_embeddings=cfg.mid_pe_size is not None,
    )
    assert cfg.mid_pe_size is None or tuple(cfg.mid_pe_size) == tuple(cfg.init_pe_size)  # HF ties them
    with torch.device("meta"):
        hf = sum(p.numel() for p in YolosForObjectDetection(hf_cfg).parameters())
    assert ours == hf
    if variant in PAPER_DETECTOR:
        fmt, want = PAPER_DETECTOR[variant]
        value = ours / 1e6
        assert (fmt % (int(value) if fmt == "%d" else value)) == want, (variant, value)
    if variant in PAPER_BACKBONE:
        res, want = PAPER_BACKBONE[variant]
        vit_cfg = ViTConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
            intermediate_size=4 * cfg.hidden_size, image_size=res, num_labels=1000,
        )
        with torch.device("meta"):
            n = sum(p.numel() for p in ViTForImageClassification(vit_cfg).parameters())
        assert round(n / 1e6, 1) == want, (variant, n)


# --------------------------------------------------------------------------------------------------
# Outputs equal HF's YolosForObjectDetection (converted weights, PE resizing by grid shape)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{'ti'|'s': (hf_model, Detector)} from save_pretrained folders converted by our converter."""
    out = {}
    for name, cfg, seed in (("ti", ref.CFG_TI, 0), ("s", ref.CFG_S, 1)):
        model = ref.hf_yolos(cfg, seed)
        folder = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(folder)
        conv = convert.convert_state(str(folder))
        out[name] = (model, Detector(conv.params, conv.model_cfg))
    return out


@pytest.mark.parametrize("name", ["ti", "s"])
def test_matches_hf(converted, name):
    model, det = converted[name]
    assert (det.model_cfg["mid_pe_size"] is not None) == (name == "s")
    rng = np.random.RandomState(2)
    for hw in ref.INPUT_SIZES:  # non-square; 48x128 = 3x8 has the 4x6 grid's token count
        x = rng.randn(2, *hw, 3).astype(np.float32)
        want = ref.hf_outputs(model, x)
        got = det.forward(x)
        assert np.std(want["logits"]) > 0.3  # O(1) outputs: a wrong mapping cannot hide
        assert ref.max_abs(got["logits"], want["logits"]) <= TOL, hw
        assert ref.max_abs(got["boxes"], want["boxes"]) <= TOL, hw


def test_matches_hf_more_tokens_than_a_query_chunk(converted):
    """A sequence longer than the CPU attention's query chunk (so the chunked path, with its padded last
    chunk, runs), on a non-square grid that forces position-embedding resizing."""
    model, det = converted["s"]
    chunk = attention.CPU_QUERY_CHUNK
    gh = 11
    gw = chunk // gh + 2  # 1 + gh * gw + Q tokens > chunk, and not a multiple of it
    x = np.random.RandomState(6).randn(1, 16 * gh, 16 * gw, 3).astype(np.float32)
    assert (1 + gh * gw + model.config.num_detection_tokens) % chunk and gh * gw > chunk
    want = ref.hf_outputs(model, x)
    got = det.forward(x)
    assert ref.max_abs(got["logits"], want["logits"]) <= TOL
    assert ref.max_abs(got["boxes"], want["boxes"]) <= TOL


def test_same_token_count_other_grid_is_resized(converted):
    """48x128 (3x8) has as many patches as the stored 4x6 grid. The original skips the resize when the
    token count matches, which lays the embeddings on the wrong 2-D grid; HF and we resize by grid shape."""
    model, det = converted["s"]
    stored = np.asarray(det.params["pos_embed_patches"])
    assert stored.shape[1:3] == (4, 6)
    by_count = stored.reshape(1, 3, 8, -1)  # what a token-count check would use
    by_grid = vit.resize_posemb_grid_np(stored, (3, 8))
    assert ref.max_abs(by_count, by_grid) > 0.1  # the two readings differ: the case is not trivial
    x = np.random.RandomState(3).randn(2, 48, 128, 3).astype(np.float32)
    want = ref.hf_outputs(model, x)
    got = det.forward(x)
    assert ref.max_abs(got["logits"], want["logits"]) <= TOL
    assert ref.max_abs(got["boxes"], want["boxes"]) <= TOL


# --------------------------------------------------------------------------------------------------
# Padding-awareness
# --------------------------------------------------------------------------------------------------


def test_pixel_mask_all_true_equals_unmasked(converted):
    """With a mask the position embeddings are resized per image in float32 inside jit (without one, by
    host-computed taps): the same function to float32 rounding."""
    _, det = converted["s"]
    x = np.random.RandomState(4).randn(2, 80, 112, 3).astype(np.float32)
    a = det.forward(x)
    b = det.forward(x, np.ones(x.shape[:3], bool))
    for k in ("logits", "boxes"):
        assert ref.max_abs(a[k], b[k]) <= 1e-6


def test_padded_image_equals_hf_on_the_image_alone(converted):
    """An image padded into a larger canvas gives HF's output for that image alone (its own position
    embedding grid, padded patches ignored), whatever the padding holds."""
    model, det = converted["s"]
    rng = np.random.RandomState(5)
    x = rng.randn(2, 80, 112, 3).astype(np.float32)
    mask = np.ones(x.shape[:3], bool)
    mask[0, 48:, :] = False  # image 0 is 48x80 on the 80x112 canvas
    mask[0, :, 80:] = False
    x[~mask] = 0.0
    got = det.forward(x, mask)
    x2 = x.copy()
    x2[~mask] = rng.randn(int((~mask).sum()), 3) * 10
    got2 = det.forward(x2, mask)
    for k in ("logits", "boxes"):
        assert ref.max_abs(got[k], got2[k]) <= 1e-6
    alone = ref.hf_outputs(model, x[:1, :48, :80])
    full = ref.hf_outputs(model, x[1:])
    for k in ("logits", "boxes"):
        assert ref.max_abs(got[k][:1], alone[k]) <= TOL
        assert ref.max_abs(got[k][1:], full[k]) <= TOL
    # and the canvas matters to HF (so the test can fail): the padded image read on the canvas grid
    canvas = ref.hf_outputs(model, x[:1])
    assert ref.max_abs(canvas["boxes"], alone["boxes"]) > 1e-3


# --------------------------------------------------------------------------------------------------
# Parameter gradients equal HF's (torch autograd), through every attention path we train with
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,impl", [("ti", "chunked"), ("s", "chunked"), ("s", "xla")])
def test_parameter_gradients_match_hf(converted, name, impl, tmp_path):
    """d(loss)/d(params) of our model equals torch autograd through HF's model for a loss that weighs
    every logit and box: the HF gradients are laid into our tree by the same converter (a pure
    re-layout, so linear), then compared leaf by leaf. The sequence is longer than a CPU query chunk so
    the chunked path runs with a padded last chunk."""
    import jax
    import jax.numpy as jnp

    from yolos_jax.yolos import YOLOS

    model, det = converted[name]
    chunk = attention.CPU_QUERY_CHUNK
    gh, gw = 9, chunk // 9 + 3
    rng = np.random.RandomState(11)
    x = rng.randn(2, 16 * gh, 16 * gw, 3).astype(np.float32)
    w_logits = rng.randn(2, model.config.num_detection_tokens, model.config.num_labels + 1).astype(np.float32)
    w_boxes = rng.randn(2, model.config.num_detection_tokens, 4).astype(np.float32)

    model.zero_grad()
    out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    loss = (out.logits * torch.from_numpy(w_logits)).sum() + (out.pred_boxes * torch.from_numpy(w_boxes)).sum()
    loss.backward()
    grads_state = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
                   for k, p in model.named_parameters()}
    # Lay the torch gradients out as our parameter tree: save them as a checkpoint and convert.
    grad_hf = YolosForObjectDetection(model.config)
    with torch.no_grad():
        for k, p in grad_hf.named_parameters():
            p.copy_(grads_state[k])
    grad_hf.save_pretrained(tmp_path / "grads")
    want = convert.flatten_params(convert.convert_state(str(tmp_path / "grads")).params)

    ours = YOLOS(**(det.model_cfg | {"attention_impl": impl}))

    def loss_fn(params):
        o = ours.apply({"params": params}, jnp.asarray(x))
        return jnp.sum(o["logits"] * w_logits) + jnp.sum(o["boxes"] * w_boxes)

    got = convert.flatten_params(jax.grad(loss_fn)(det.params))
    assert set(got) == set(want)
    for k in sorted(want):
        scale = max(float(np.abs(want[k]).max()), 1e-3)
        err = float(np.abs(np.asarray(got[k]) - np.asarray(want[k])).max())
        assert err <= 2e-4 * scale, (k, err, scale)


# --------------------------------------------------------------------------------------------------
# bf16 compute with fp32 parameters (config.model.dtype='bfloat16'), the whole model
# --------------------------------------------------------------------------------------------------


def test_bfloat16_compute_matches_float32():
    """A tiny YOLOS (mid PEs, non-square padded input that forces PE resizing) with dtype='bfloat16' against
    the same parameters in float32: parameters and gradients stay float32, the matmuls run in bf16, and
    outputs and gradients agree to bf16 precision.

    Tolerances: bf16 keeps 8 significand bits, a relative spacing of 2^-8 (0.4%) per rounded operand. Two
    blocks and the heads chain ~15 rounded matmuls, layer norms and softmaxes whose errors add up to a
    few 2^-8; measured here: max |dlogits| ~ 0.5% of max |logits|, max |dboxes| ~ 1.5e-3. We allow 8 * 2^-8
    (3%) of the fp32 logits' largest magnitude, and 4 * 2^-8 (0.016, 1.6% of the image side) absolute on
    the boxes (sigmoid outputs in [0, 1]; the sigmoid's slope <= 1/4 only shrinks the box-logit errors).
    Gradients: the direction must agree (cosine > 0.99 overall and per parameter; measured >= 0.9993)."""
    import jax
    import jax.numpy as jnp

    from yolos_jax.yolos import YOLOS

    cfg = config.model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=5, num_classes=7,
                              init_pe_size=(64, 96), mid_pe_size=(64, 96)).to_dict()
    m32, m16 = YOLOS(**cfg), YOLOS(**(cfg | {"dtype": "bfloat16"}))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 80, 112, 3)).astype(np.float32)
    mask = np.ones(x.shape[:3], bool)
    mask[1, 48:], mask[1, :, 80:] = False, False  # image 1 is 48x80 on the 80x112 canvas
    x[~mask] = 0.0

    # Parameters the bf16 model declares: float32 (shapes only, no initialiser runs).
    shapes16 = jax.eval_shape(lambda: m16.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    shapes32 = jax.eval_shape(lambda: m32.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert {str(s.dtype) for s in jax.tree.leaves(shapes16)} == {"float32"}
    assert jax.tree.map(lambda s: s.shape, shapes16) == jax.tree.map(lambda s: s.shape, shapes32)

    # O(1) random parameters (as reference_models.randomize_), so that outputs are not just the biases.
    def draw(path, s):
        name, r = jax.tree_util.keystr(path), rng.normal(size=s.shape)
        if name.endswith("['scale']"):
            return (1.0 + 0.2 * r).astype(np.float32)
        if name.endswith("['bias']"):
            return (0.2 * r).astype(np.float32)
        if name.endswith("['kernel']"):
            return (r / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        return (0.5 * r).astype(np.float32)  # tokens and position embeddings

    params = jax.tree_util.tree_map_with_path(draw, shapes16)
    w_logits = rng.normal(size=(2, 5, 8)).astype(np.float32)
    w_boxes = rng.normal(size=(2, 5, 4)).astype(np.float32)

    def loss_and_grad(model):
        def loss(p):
            o = model.apply({"params": p}, jnp.asarray(x), jnp.asarray(mask))
            return jnp.sum(o["logits"] * w_logits) + jnp.sum(o["boxes"] * w_boxes), o

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    # The bf16 model really computes in bf16 (its jaxpr has bf16 matmuls; the fp32 one has none).
    jaxpr16 = str(jax.make_jaxpr(lambda p: m16.apply({"params": p}, x, mask))(params))
    jaxpr32 = str(jax.make_jaxpr(lambda p: m32.apply({"params": p}, x, mask))(params))
    assert "bf16" in jaxpr16 and "bf16" not in jaxpr32

    (_, o32), g32 = loss_and_grad(m32)(params)
    (_, o16), g16 = loss_and_grad(m16)(params)
    for k in ("logits", "boxes"):
        assert o16[k].dtype == jnp.float32 and o16[k].shape == o32[k].shape, k
        assert np.isfinite(np.asarray(o16[k])).all(), k
    eps = 2.0**-8
    logit_scale = float(np.abs(o32["logits"]).max())
    assert np.std(np.asarray(o32["logits"])) > 0.3  # O(1) logits: the comparison has something to compare
    d_logits = ref.max_abs(o16["logits"], o32["logits"])
    d_boxes = ref.max_abs(o16["boxes"], o32["boxes"])
    assert d_logits <= 8 * eps * logit_scale, (d_logits, logit_scale)
    assert d_boxes <= 4 * eps, d_boxes
    assert d_logits > 1e-4  # and bf16 rounding did happen (an ignored dtype would give exactly 0)

    f32, f16 = convert.flatten_params(g32), convert.flatten_params(g16)
    assert set(f16) == set(f32)
    for k in f16:
        assert f16[k].dtype == jnp.float32, k  # gradients have the parameters' dtype
        assert np.isfinite(np.asarray(f16[k])).all(), k

    def cosine(a, b):
        a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    flat32 = np.concatenate([np.ravel(f32[k]) for k in sorted(f32)])
    flat16 = np.concatenate([np.ravel(f16[k]) for k in sorted(f32)])
    assert cosine(flat16, flat32) > 0.99
    per_leaf = {k: cosine(f16[k], f32[k]) for k in f32}
    assert min(per_leaf.values()) > 0.99, min(per_leaf.items(), key=lambda kv: kv[1])


# --------------------------------------------------------------------------------------------------
# Batch invariance: a padded batch gives each image what it gets alone (outputs and loss gradients)
# --------------------------------------------------------------------------------------------------

INV_BASE = dict(hidden_size=32, depth=3, num_heads=2, patch_size=8, num_det_tokens=6, num_classes=4,
                init_pe_size=(48, 64))
INV_MID = dict(mid_pe_size=(40, 56))
INV_WINDOWED = dict(window_size=3, global_blocks=(1,))  # blocks 0 and 2 windowed, 1 global
# Every variant of item 1 of the batching-fidelity issue, combined where they compose (each compile of a
# model costs seconds on CPU): windowed blocks with and without the relative position bias, both kernels.
INV_VARIANTS = {
    "plain": {},
    "mid_pe_conv_stem_det_priors": INV_MID | dict(patch_embed="conv_stem", det_reference_grid=(2, 3),
                                                  det_attention_sigma=(1.0, 0.0), det_box_offset=True),
    "windowed": INV_WINDOWED | INV_MID,
    "windowed_rel_pos_chunked": INV_WINDOWED | dict(rel_pos=True),
    "windowed_rel_pos_einsum": INV_WINDOWED | dict(rel_pos=True, attention_impl="einsum"),
    # Inference of a partial-sequence model sees every patch; its training draw is covered by
    # tests/test_variants.py (given the kept patches, each image's result is its own).
    "partial_sequence_adapter_late_det": INV_MID | dict(token_keep_ratio=0.5, adapter=True, adapter_insert_det_at=1,
                                                        aux_layers=1),
}
# A canvas larger than each image: in both axes with a height and width that are no multiple of the patch
# (the image alone drops the partial patches), in width only, in height only.
INV_CANVAS = (64, 88)
INV_SIZES = ((45, 70), (64, 48), (40, 88))


def _invariance_case(kw, seed=0):
    from yolos_jax.yolos import YOLOS

    model = YOLOS(**(INV_BASE | kw))
    rng = np.random.RandomState(seed)
    images = [rng.randn(h, w, 3).astype(np.float32) for h, w in INV_SIZES]
    canvas = np.zeros((len(images), *INV_CANVAS, 3), np.float32)
    mask = np.zeros((len(images), *INV_CANVAS), bool)
    for i, im in enumerate(images):
        canvas[i, : im.shape[0], : im.shape[1]] = im
        mask[i, : im.shape[0], : im.shape[1]] = True
    canvas[~mask] = rng.randn(int((~mask).sum()), 3) * 5  # what padding holds must not matter

    return model, perturbed_params(model, images[0], seed), images, canvas, mask


def _targets(num_images, seed):
    rng = np.random.RandomState(seed)
    m = 3
    boxes = np.concatenate([rng.uniform(0.3, 0.7, (num_images, m, 2)), rng.uniform(0.1, 0.4, (num_images, m, 2))], -1)
    mask = np.zeros((num_images, m), bool)
    for i in range(num_images):
        mask[i, : i + 1] = True  # 1, 2, 3 boxes
    return dict(labels=rng.randint(0, 4, (num_images, m)).astype(np.int32), boxes=boxes.astype(np.float32),
                box_mask=mask)


@pytest.mark.parametrize("variant", sorted(INV_VARIANTS))
def test_padded_batch_equals_each_image_alone(variant):
    """Outputs of a padded batch equal each image run alone without padding (1e-5), and the gradient of
    the set loss of the batch equals the gradient of the same loss assembled from the images run alone."""
    import jax
    import jax.numpy as jnp

    from yolos_jax import losses, matcher

    kw = INV_VARIANTS[variant]
    model, params, images, canvas, mask = _invariance_case(kw)
    aux = bool(kw.get("aux_layers"))
    loss_cfg = losses.default_loss_config()
    loss_cfg.aux_loss = aux
    matcher_cfg = matcher.default_matcher_config()
    targets = _targets(len(images), 3)

    def set_loss(outputs):
        return losses.set_loss(outputs, targets, loss_cfg, matcher_cfg)[0]

    def batched_loss(p):
        out = model.apply({"params": p}, canvas, mask)
        return set_loss(out), out

    (loss_batched, batched), grad_batched = jax.jit(jax.value_and_grad(batched_loss, has_aux=True))(params)

    # Each image alone, unpadded: its outputs, then the same loss over them (one program for the three images;
    # its gradient is the sum of each image's vjp of the assembled loss).
    def alone_loss(p):
        alone = [model.apply({"params": p}, jnp.asarray(im[None])) for im in images]
        return set_loss(jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *alone)), alone

    (loss_alone, alone), grad_alone = jax.jit(jax.value_and_grad(alone_loss, has_aux=True))(params)
    for i in range(len(images)):
        for k in ("logits", "boxes"):
            err = float(np.abs(np.asarray(alone[i][k][0]) - np.asarray(batched[k][i])).max())
            assert err <= 1e-5, (variant, INV_SIZES[i], k, err)
    assert float(loss_batched) == pytest.approx(float(loss_alone), rel=1e-5, abs=1e-6)
    flat_b, flat_a = convert.flatten_params(grad_batched), convert.flatten_params(grad_alone)
    assert max(float(np.abs(np.asarray(v)).max()) for v in flat_a.values()) > 1e-3  # gradients are not trivial
    for name in flat_a:
        err = float(np.abs(np.asarray(flat_b[name]) - np.asarray(flat_a[name])).max())
        assert err <= 1e-5, (variant, name, err)


# The variants whose blocks reach `attention.dot_product_attention`: with rel_pos every block (global ones too)
# runs the windowed module's own masked kernels, which no fused kernel applies to.
PREFIX_VARIANTS = ("plain", "mid_pe_conv_stem_det_priors", "windowed", "partial_sequence_adapter_late_det")


@pytest.mark.parametrize("variant", PREFIX_VARIANTS)
def test_valid_keys_first_attention_equals_the_masked_path(variant):
    """`jax.nn.dot_product_attention` with the key mask as per-image lengths of reordered keys
    (`attention.keys_valid_first`, the form cuDNN's flash kernel runs) gives a padded batch the outputs and
    loss gradients of the masked einsum path, within 1e-5, in every variant: the [DET] prior's biased rows
    and the windowed blocks (r x r windows, relative position bias) keep their masked einsum/blocked kernels,
    every other attention (global blocks of windowed models included) takes the reordered path."""
    import jax

    from yolos_jax import losses, matcher

    kw = INV_VARIANTS[variant]
    _, params, images, canvas, mask = _invariance_case(kw)
    loss_cfg = losses.default_loss_config()
    loss_cfg.aux_loss = bool(kw.get("aux_layers"))
    targets = _targets(len(images), 3)

    def loss_and_outputs(impl):
        from yolos_jax.yolos import YOLOS

        model = YOLOS(**(INV_BASE | kw | dict(attention_impl=impl)))

        def loss(p):
            out = model.apply({"params": p}, canvas, mask)
            return losses.set_loss(out, targets, loss_cfg, matcher.default_matcher_config())[0], out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, masked), grad_masked = loss_and_outputs("einsum")
    (_, prefix), grad_prefix = loss_and_outputs("xla")
    for k in ("logits", "boxes"):
        err = float(np.abs(np.asarray(masked[k]) - np.asarray(prefix[k])).max())
        assert err <= 1e-5, (variant, k, err)
    flat_m, flat_p = convert.flatten_params(grad_masked), convert.flatten_params(grad_prefix)
    for name in flat_m:
        err = float(np.abs(np.asarray(flat_m[name]) - np.asarray(flat_p[name])).max())
        assert err <= 1e-5, (variant, name, err)


def test_canvas_position_embeddings_would_differ():
    """The invariance above is not vacuous: read on the canvas grid (the image filling it, no mask), an
    image's outputs differ from its outputs alone by far more than the tolerance."""
    model, params, images, canvas, _ = _invariance_case(INV_MID)
    im = images[0]
    on_canvas = np.zeros((1, *INV_CANVAS, 3), np.float32)
    on_canvas[0, : im.shape[0], : im.shape[1]] = im
    alone = model.apply({"params": params}, im[None])
    canvas_grid = model.apply({"params": params}, on_canvas)
    assert float(np.abs(np.asarray(alone["boxes"]) - np.asarray(canvas_grid["boxes"])).max()) > 1e-3


def test_heads_start_as_torch_nn_linear():
    """The class and box heads are initialised as PyTorch's default nn.Linear (the original builds them
    that way): weights and biases uniform in +-1/sqrt(fan_in), with torch's spread."""
    import jax
    import jax.numpy as jnp

    from yolos_jax.yolos import MLPHead

    width, out = 256, 92
    params = MLPHead(width, out).init(jax.random.PRNGKey(0), jnp.zeros((1, width)))["params"]
    torch.manual_seed(0)
    ref_layer = torch.nn.Linear(width, width)
    bound = 1.0 / np.sqrt(width)
    for i in range(3):
        kernel = np.asarray(params[f"layers_{i}"]["kernel"])
        bias = np.asarray(params[f"layers_{i}"]["bias"])
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
        assert np.abs(kernel).max() > 0.99 * bound  # uniform over the whole range, not a narrower law
        assert abs(kernel.std() / ref_layer.weight.detach().numpy().std() - 1) < 0.02
        assert abs(bias.std() / (bound / np.sqrt(3)) - 1) < 0.2


@pytest.mark.parametrize("rel_pos", [False, True])
def test_windowed_image_smaller_than_a_window_equals_alone(rel_pos):
    """An image whose own grid fits in one window (alone: plain global attention without rel-pos, or a
    window clipped to the grid with it) or is shorter than a window in one axis (a clipped window), padded
    into a canvas of several r x r windows, gives its alone output."""
    import jax

    from yolos_jax.yolos import YOLOS

    model = YOLOS(**(INV_BASE | INV_WINDOWED | dict(rel_pos=rel_pos)))
    rng = np.random.RandomState(7)
    sizes = ((20, 20), (20, 70))  # own grids 2 x 2 (within one 3 x 3 window) and 2 x 8; canvas grid 8 x 11
    images = [rng.randn(h, w, 3).astype(np.float32) for h, w in sizes]
    canvas = rng.randn(len(images), *INV_CANVAS, 3).astype(np.float32) * 5
    mask = np.zeros((len(images), *INV_CANVAS), bool)
    for i, im in enumerate(images):
        canvas[i, : im.shape[0], : im.shape[1]] = im
        mask[i, : im.shape[0], : im.shape[1]] = True
    params = perturbed_params(model, images[1], 0)
    apply = jax.jit(lambda x, m=None: model.apply({"params": params}, x, m))
    batched = apply(canvas, mask)
    for i, im in enumerate(images):
        alone = apply(im[None])
        for k in ("logits", "boxes"):
            err = float(np.abs(np.asarray(alone[k][0]) - np.asarray(batched[k][i])).max())
            assert err <= 1e-5, (sizes[i], k, err)
