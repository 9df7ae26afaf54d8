"""Visualisations and inference on files: [DET] attention vs HF, Fig. 2/3 statistics, annotated images whose
boxes sit on the objects, and the commands on a tiny model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from yolos_jax import sharding, visualize
from yolos_jax.config import model_config
from yolos_jax.data.labels import LabelMap
from yolos_jax.yolos import YOLOS


def random_params(model, image_hw, seed=0, scale=0.05):
    """Random params without running the initialisers (eval_shape only: no compilation)."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *image_hw, 3)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=scale, size=s.shape).astype(np.float32)), shapes)


# --------------------------------------------------------------------------------------------------
# Attention maps
# --------------------------------------------------------------------------------------------------


def test_attention_weights_match_hf_output_attentions(tmp_path):
    torch = pytest.importorskip("torch")
    import reference_models as ref

    from yolos_jax import convert

    hf = ref.hf_yolos(ref.CFG_TI, 0)
    hf.set_attn_implementation("eager")  # sdpa returns no attention weights
    hf.save_pretrained(tmp_path / "hf")
    conv = convert.convert_state(str(tmp_path / "hf"))
    model = YOLOS(**conv.model_cfg)
    x = np.random.default_rng(0).normal(size=(2, 80, 112, 3)).astype(np.float32)
    ours = visualize.attention_weights(model, conv.params, x)
    with torch.no_grad():
        out = hf(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_attentions=True)
    want = out.attentions[-1].numpy()  # [B, heads, T, T] of the last layer
    assert ours["attention"].shape == want.shape
    np.testing.assert_allclose(ours["attention"], want, atol=2e-5)
    np.testing.assert_allclose(ours["logits"], out.logits.numpy(), atol=1e-4)
    maps = visualize.det_token_maps(ours["attention"], ours["grid"], model.num_det_tokens)
    gh, gw = ours["grid"]
    assert maps.shape == (2, model.num_heads, model.num_det_tokens, gh, gw)
    # Token 0's map is its attention row over the patch tokens (1 .. gh*gw), laid out row-major.
    np.testing.assert_array_equal(maps[1, 1, 0].ravel(), ours["attention"][1, 1, -model.num_det_tokens, 1 : 1 + gh * gw])


def test_attention_weights_with_padding_reproduce_the_block():
    """With a pixel mask, recomputing attn(x) = proj(softmax(qk/sqrt d) v) from our weights must give the
    model's own attention output (captured): the masked weights are the ones the model used."""
    cfg = model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=4, num_classes=3,
                       init_pe_size=(64, 96), mid_pe_size=(64, 96))
    model = YOLOS(**cfg.to_dict())
    params = random_params(model, (64, 96), scale=0.3)
    x = np.random.default_rng(1).normal(size=(2, 64, 96, 3)).astype(np.float32)
    mask = np.ones((2, 64, 96), bool)
    mask[1, :, 48:] = False
    x[~mask] = 0
    res = visualize.attention_weights(model, params, x, mask)
    att = res["attention"].astype(np.float64)
    gh, gw = res["grid"]
    padded_cols = 1 + np.flatnonzero(~np.tile(np.arange(gw) < 3, gh))  # image 1: patch columns 3.. are padding
    assert np.all(att[1][..., padded_cols] == 0) and np.all(att[0] > 0)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)

    capture = lambda m, _: m.scope is not None and m.scope.path[:1] == ("block_1",)  # noqa: E731
    _, state = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m, mutable=["intermediates"],
                                                   capture_intermediates=capture))(params, x, mask)
    inter = state["intermediates"]["block_1"]
    y = np.asarray(inter["norm1"]["__call__"][0], np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["block_1"]["attn"])
    v = (y @ p["qkv"]["kernel"] + p["qkv"]["bias"])[..., 64:].reshape(2, -1, 2, 16)  # (q | k | v), heads
    o = np.einsum("bhts,bshd->bthd", att, v).reshape(2, -1, 32) @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(o, np.asarray(inter["attn"]["__call__"][0]), atol=1e-4)

    # Params replicated over every device (as a multi-process `make_figures` gets them from `Evaluator.place`)
    # give the same weights, recomputed on the first device alone.
    mesh = sharding.make_mesh(sharding.default_mesh_config())
    assert mesh.devices.size > 1
    replicated = sharding.place_host(jax.device_get(params), sharding.replicated(mesh))
    np.testing.assert_array_equal(visualize.attention_weights(model, replicated, x, mask)["attention"], res["attention"])


def test_splash_attention_weights_run_the_kernel_under_a_one_device_mesh(monkeypatch, splash_calls):
    """attention_impl='splash' (Pallas interpret mode on CPU) with several devices visible: the recomputation's
    forward is traced under a mesh of the first device, so the model's kernel runs there inside the mesh's
    shard_map (on a multi-chip TPU: not the no-mesh fallback), and weights and outputs are 'einsum''s."""
    cfg = model_config("s", hidden_size=32, depth=1, num_heads=2, num_det_tokens=4, num_classes=3,
                       init_pe_size=(32, 48), mid_pe_size=None)
    model = YOLOS(**cfg.to_dict())
    params = random_params(model, (32, 48), scale=0.3)
    x = np.random.default_rng(2).normal(size=(2, 32, 48, 3)).astype(np.float32)
    mask = np.ones((2, 32, 48), bool)
    mask[1, :, 32:] = False
    calls = splash_calls  # (images, the mesh axes manual there) of each kernel call traced
    want = visualize.attention_weights(model, params, x, mask)
    got = visualize.attention_weights(model.clone(attention_impl="splash"), params, x, mask)
    assert calls == [(2, ("data", "fsdp"))], calls
    for name in ("attention", "logits", "boxes"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)

# --------------------------------------------------------------------------------------------------
# Figs. 2 and 3: the numbers behind the plots
# --------------------------------------------------------------------------------------------------


def test_token_centers_and_size_classes():
    rel = np.asarray([[[0.5, 0.25, 0.05, 0.05], [0.1, 0.9, 0.5, 0.5]],
                      [[0.3, 0.3, 0.1, 0.2], [0.7, 0.2, 1.0, 1.0]]])
    orig = np.asarray([[400, 600], [100, 100]])  # (h, w)
    centers, classes = visualize.token_centers(rel, orig)
    np.testing.assert_array_equal(centers[0], [[0.5, 0.25], [0.3, 0.3]])  # token 0 over both images
    # Areas: 30x20=600 (small), 300x200 (large) / 10x20=200 (small), 100x100 (large, >= 96^2).
    np.testing.assert_array_equal(classes, [[0, 0], [2, 2]])
    assert visualize.size_class([32 * 32, 32 * 32 + 1, 96 * 96 - 1, 96 * 96]).tolist() == [0, 1, 1, 2]


def test_category_distribution_counts():
    label_map = LabelMap.from_categories([{"id": 5, "name": "a"}, {"id": 9, "name": "b"}, {"id": 11, "name": "c"}])
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(50, 4))
    gt = rng.choice([5, 9, 11], size=70)
    dist = visualize.category_distribution(labels, gt, label_map)
    assert [c["id"] for c in dist["categories"]] == [5, 9, 11]
    assert [c["name"] for c in dist["categories"]] == ["a", "b", "c"]
    assert dist["gt"] == [int((gt == c).sum()) for c in (5, 9, 11)]
    per_token = np.stack([np.bincount(labels[:, t], minlength=3) for t in range(4)])
    np.testing.assert_array_equal(dist["per_token"], per_token)
    np.testing.assert_allclose(dist["token_std"], per_token.std(0))
    # Identity mode: label == id, and labels of unused ids are not counted.
    ident = LabelMap.from_categories([{"id": 2, "name": "x"}, {"id": 4, "name": "y"}], "identity")
    d = visualize.category_distribution(np.asarray([[2, 4, 0, 3]]), [4, 4], ident)
    assert d["per_token"] == [[1, 0], [0, 1], [0, 0], [0, 0]] and d["gt"] == [0, 2]


# --------------------------------------------------------------------------------------------------
# The figures command on a tiny model
# --------------------------------------------------------------------------------------------------


def test_make_figures_on_a_tiny_model(tmp_path_factory, tmp_path):
    import ml_collections

    from yolos_jax import data, evaluation, weights

    # The same prepared synthetic set as test_evaluation's fixture (one preparation per session).
    cfg = data.synthetic_input_config(str(tmp_path_factory.getbasetemp() / "synth_eval"), num_train=4, num_val=10)
    label_map = data.dataset_info(cfg).label_map
    model_cfg = model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=6,
                             num_classes=label_map.num_classes, init_pe_size=(64, 96), mid_pe_size=None).to_dict()
    params = jax.tree.map(np.asarray, random_params(YOLOS(**model_cfg), (64, 96), scale=0.3))
    weights.save_params_dir(str(tmp_path / "ckpt"), params, model_cfg)
    config = ml_collections.ConfigDict({"input": cfg.to_dict(), "eval": evaluation.default_eval_config().to_dict()})
    out = tmp_path / "figs"
    written = visualize.make_figures(config, str(tmp_path / "ckpt"), str(out), num_tokens=4, attention_images=2,
                                     attention_tokens=2)
    pngs = written["centers"] + [p for p in written["categories"] if p.endswith(".png")] + written["attention"]
    assert len(written["attention"]) == 4 and len(pngs) == 6
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100
    # Fig. 3's numbers: ground truth = the split's non-crowd objects per category; each token predicts
    # one category per image.
    dist = json.loads((out / "det_token_categories.json").read_text())
    gt = json.load(open(data.coco_ground_truth(cfg)))
    want = [sum(1 for a in gt["annotations"] if a["category_id"] == c and not a["iscrowd"])
            for c in label_map.category_ids]
    assert dist["gt"] == want
    assert np.all(np.sum(dist["per_token"], axis=1) == len(gt["images"]))


# --------------------------------------------------------------------------------------------------
# Annotated val images (the end of training)
# --------------------------------------------------------------------------------------------------


def test_write_annotated_val_images_are_readable_and_thresholded(synth, tmp_path):
    """Each val image enlarged to a readable size (short side >= 480 px, the aspect kept); nothing is drawn for a
    threshold no score passes without faint top-k, and the boxes appear once the threshold lets them."""
    from yolos_jax.data import prepared_dataset
    from yolos_jax.inference import read_image_rgb

    cfg, model, params = synth
    model_cfg = {f: getattr(model, f) for f in model_config("s").keys()}
    host = jax.device_get(params)
    none = visualize.write_annotated_val_images(host, model_cfg, cfg, str(tmp_path / "none"), num_images=2,
                                                threshold=1.0, top_k=0)
    every = visualize.write_annotated_val_images(host, model_cfg, cfg, str(tmp_path / "all"), num_images=2,
                                                 threshold=0.0)
    source = prepared_dataset.open_dataset(cfg).source_for(cfg.val_split)
    assert len(none) == len(every) == 2
    for i, (p_none, p_all) in enumerate(zip(none, every)):
        image = read_image_rgb(source[i]["image"])
        h, w = image.shape[:2]
        assert p_none.endswith(f"{int(source[i]['image/id'])}.png")
        plain, drawn = (np.asarray(Image.open(p).convert("RGB")) for p in (p_none, p_all))
        k = plain.shape[0] // h
        assert min(plain.shape[:2]) >= 480 and plain.shape[:2] == (k * h, k * w) == drawn.shape[:2]
        np.testing.assert_array_equal(plain, np.repeat(np.repeat(image, k, 0), k, 1))  # nothing above 1.0
        assert (drawn != plain).any(axis=-1).mean() > 0.01  # every prediction is drawn at threshold 0
