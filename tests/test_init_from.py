"""`init_params_from` (config.init_from): a converted detector's leaves taken, resized or kept fresh; a backbone
of another width refused with every mismatch listed; with the ViT-detection options a plain ViT backbone initialises
windowed/rel-pos, ConvStem and adapter models (option-only parameters start fresh, the patchify stem is dropped for
ConvStem); a converted detector's [DET] tokens grow to a larger model.num_det_tokens (old tokens kept exactly, new
ones cyclic copies).

And `config.init_from` end to end through `train.py`: a DeiT-format backbone converted by
`convert_torch_weights.py` initialises the backbone of the run; [DET] tokens, det position embeddings and
heads start fresh (README "Training", yolos_jax/init_from.py `init_params_from`).

The run is configs/demo.py:smoke with 2 steps and a checkpoint after every step. Its linear warm-up starts
at lr 0 (optim.warmup_steps=1: lr(step 0) = 0), so the first update is exactly zero and checkpoint 1
holds the step-0 parameters bit for bit; checkpoint 2 (lr > 0) shows that training did go on from them.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import convert_torch_weights
import reference_models as ref
import train_fixtures
from yolos_jax import convert, init_from, sharding, weights
from yolos_jax.config import model_config
from yolos_jax.errors import ConfigError
from yolos_jax.yolos import YOLOS


@pytest.fixture(scope="module")
def hf_s():
    return ref.hf_yolos(ref.CFG_S, 1)


def _leaves(tree):
    return weights.flatten_params(tree)


def test_init_params_from_detector_and_resizing(hf_s, tmp_path):
    hf_s.save_pretrained(tmp_path / "hf")
    conv = convert.convert_state(str(tmp_path / "hf"))
    # A model on another dataset (9 classes) with other PE grids (80x112 -> 5x7 patches).
    cfg = dict(conv.model_cfg, num_classes=9, init_pe_size=(80, 112), mid_pe_size=(80, 112))
    shapes = weights.expected_param_shapes(cfg)
    fresh = weights.unflatten_params({k: np.full(s, 0.5, np.float32) for k, s in shapes.items()})
    params, report = init_from.init_params_from(fresh, conv.params, cfg)
    assert report.kind == "detector"
    flat, src = _leaves(params), _leaves(conv.params)
    assert [f.split(" ")[0] for f in report.fresh] == ["class_head/layers_2/bias", "class_head/layers_2/kernel"]
    np.testing.assert_array_equal(flat["class_head/layers_2/kernel"], 0.5)
    for k in ("class_head/layers_0/kernel", "box_head/layers_2/bias", "det_tokens", "pos_embed_det",
              "block_2/attn/qkv/kernel"):
        np.testing.assert_array_equal(flat[k], src[k])
    assert sorted(r.split(" ")[0] for r in report.resized) == ["mid_pos_embed_patches", "pos_embed_patches"]
    mid = torch.from_numpy(src["mid_pos_embed_patches"]).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(mid, size=(5, 7), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).numpy()
    assert ref.max_abs(flat["mid_pos_embed_patches"], want) <= 1e-5
    assert "resized 2" in str(report)
    # a backbone of another width is refused in one line: the count of mismatches, the first 8 of them
    small = dict(cfg, hidden_size=24, num_heads=2)
    small_shapes = weights.expected_param_shapes(small)
    fresh_small = weights.unflatten_params({k: np.zeros(s, np.float32) for k, s in small_shapes.items()})
    with pytest.raises(ConfigError, match=r"^config.init_from: the checkpoint does not fit the model .* \((\d+) "
                                          r"problems\): ") as e:
        init_from.init_params_from(fresh_small, conv.params, small)
    problems = int(re.search(r"\((\d+) problems\)", str(e.value)).group(1))
    assert problems > 8 and f"; and {problems - 8} more. Check that config.model" in str(e.value)
    assert "block_0/" in str(e.value) and "(hidden_size=24, depth=" in str(e.value) and "\n" not in str(e.value)
    # kind 'backbone' keeps every detector-only leaf fresh even when it fits
    _, report = init_from.init_params_from(fresh, conv.params, cfg, kind="backbone")
    assert not any(t.startswith(("det_tokens", "class_head", "mid_")) for t in report.taken)


def _params(seed=0, **options):
    cfg = model_config("ti", hidden_size=32, depth=4, num_heads=2, init_pe_size=(64, 64), **options)
    return jax.device_get(jax.jit(YOLOS(**cfg.to_dict()).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 64, 64, 3)))["params"])


@pytest.fixture(scope="module")
def backbone():
    plain = _params(seed=1)
    return {k: v for k, v in plain.items() if k not in ("class_head", "box_head", "det_tokens", "pos_embed_det")}


@pytest.mark.parametrize("options", [dict(window_size=2, rel_pos=True), dict(patch_embed="conv_stem"), dict(adapter=True)])
def test_backbone_initialises_option_models(backbone, options):
    fresh = _params(**options)
    out, report = init_from.init_params_from(fresh, backbone, None, kind="backbone")
    np.testing.assert_array_equal(out["block_1"]["mlp"]["fc1"]["kernel"], backbone["block_1"]["mlp"]["fc1"]["kernel"])
    if options.get("rel_pos"):
        table = out["block_0"]["attn"]["rel_pos_h"]
        np.testing.assert_array_equal(table, np.zeros_like(table))  # zero-initialised, not from the checkpoint
    if options.get("patch_embed") == "conv_stem":
        assert "patch_embed" not in out and any("patch_embed/" in d for d in report.dropped)
    if options.get("adapter"):
        np.testing.assert_array_equal(out["adapter"]["query_pos"], fresh["adapter"]["query_pos"])


def test_rel_pos_tables_of_another_length_are_resized():
    # block_0 is windowed (only block 3 is global): tables of length 2r - 1 = 3 vs 7.
    src = _params(window_size=2, rel_pos=True, global_blocks=(3,))
    dst = _params(window_size=4, rel_pos=True, global_blocks=(3,))
    src["block_0"]["attn"]["rel_pos_h"] = np.random.default_rng(0).normal(size=src["block_0"]["attn"]["rel_pos_h"].shape)
    out, report = init_from.init_params_from(dst, src, None, kind="backbone")
    assert out["block_0"]["attn"]["rel_pos_h"].shape == dst["block_0"]["attn"]["rel_pos_h"].shape
    assert src["block_0"]["attn"]["rel_pos_h"].shape != dst["block_0"]["attn"]["rel_pos_h"].shape
    assert any(r.startswith("block_0/attn/rel_pos_h") for r in report.resized)


Q_OLD, Q_NEW = 4, 10  # the tiny equivalent of a 100-token COCO detector fine-tuned for 250 objects per image


def _tiny(q, **kw):
    return model_config("s", hidden_size=32, depth=2, num_heads=2, num_det_tokens=q, num_classes=3,
                        init_pe_size=(32, 48), mid_pe_size=(32, 48), adapter=True, **kw)


def test_converted_detector_grows_its_det_tokens(tmp_path):
    old_cfg = _tiny(Q_OLD)
    old_model = YOLOS(**old_cfg.to_dict())
    rng = np.random.default_rng(1)  # random values of the detector's shapes (an initialiser would cost a compile)
    old = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32),
                       jax.eval_shape(lambda: old_model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 48, 3))))["params"])
    weights.save_params_dir(str(tmp_path / "ckpt"), old, old_cfg)
    new_cfg = _tiny(Q_NEW)
    model = YOLOS(**new_cfg.to_dict())
    mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    # As train.py does with --config.init_from (seed = config.seed).
    grown = jax.device_get(init_from.init_from_converted(str(tmp_path / "ckpt"), model, new_cfg, 7, (32, 32), shardings))

    cycle = np.arange(Q_NEW) % Q_OLD
    for path in ("pos_embed_det", "mid_pos_embed_det", "adapter/query_pos"):  # copied exactly, old ones kept
        leaf_old, leaf_new = weights.flatten_params(old)[path], weights.flatten_params(grown)[path]
        assert leaf_new.shape == (leaf_old.shape[0], Q_NEW, 32)
        np.testing.assert_array_equal(leaf_new, leaf_old[:, cycle])
    tok_old, tok_new = old["det_tokens"], grown["det_tokens"]
    np.testing.assert_array_equal(tok_new[:, :Q_OLD], tok_old)  # the checkpoint's tokens, exactly
    noise = tok_new[:, Q_OLD:] - tok_old[:, cycle[Q_OLD:]]
    assert np.all(noise != 0)  # no copy is identical to its source
    assert np.std(noise) == pytest.approx(init_from.DET_COPY_NOISE * np.std(tok_old), rel=0.2)
    # Seeded: the same seed gives the same copies, another seed others.
    conv, _, _ = weights.load_params_dir(str(tmp_path / "ckpt"))
    fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    again, report = init_from.init_params_from(fresh, conv, None, seed=7)
    np.testing.assert_array_equal(again["det_tokens"], tok_new)
    other, _ = init_from.init_params_from(fresh, conv, None, seed=8)
    assert not np.array_equal(other["det_tokens"][:, Q_OLD:], tok_new[:, Q_OLD:])
    assert sorted(g.split(" ")[0] for g in report.grown) == sorted(init_from.DET_TOKEN_LEAVES)
    assert f"{Q_OLD} -> {Q_NEW} tokens" in str(report)
    # Everything else of the detector is taken as it is; the grown model runs.
    np.testing.assert_array_equal(grown["class_head"]["layers_2"]["kernel"], old["class_head"]["layers_2"]["kernel"])
    out = jax.jit(model.apply)({"params": grown}, jnp.zeros((1, 32, 48, 3)))
    assert out["logits"].shape == (1, Q_NEW, 4) and np.all(np.isfinite(np.asarray(out["boxes"])))
    # Fewer tokens than the checkpoint's: fresh, and reported as such.
    small = weights.unflatten_params({k: v[:, :2] if k in init_from.DET_TOKEN_LEAVES else v
                                      for k, v in weights.flatten_params(fresh).items()})  # a 2-token model's tree
    shrunk, report = init_from.init_params_from(small, conv, None)
    np.testing.assert_array_equal(shrunk["det_tokens"], small["det_tokens"])
    assert not report.grown and any(f.startswith("det_tokens (checkpoint") for f in report.fresh)


def test_fresh_init_runs_splash_per_device_under_the_runs_mesh(tmp_path, monkeypatch, splash_calls):
    """attention_impl='splash' (Pallas interpret mode on CPU) on the run's ('data', 'fsdp') = (4, 2) mesh: the fresh
    init behind `init_from_converted` is traced under the shardings' mesh, so the kernel runs inside its shard_map,
    one image per device (on a multi-chip TPU: not the no-mesh fallback); the leaves the checkpoint lacks are the
    fresh draw of a plain one-device init, and the params land on the given (FSDP) shardings."""
    cfg = _tiny(Q_OLD)
    einsum = YOLOS(**cfg.to_dict())
    rng = np.random.default_rng(2)
    abstract = jax.eval_shape(lambda: einsum.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 48, 3))))["params"]
    ckpt = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32), abstract)
    del ckpt["box_head"]  # fresh in the run
    weights.save_params_dir(str(tmp_path / "ckpt"), ckpt, cfg)
    calls = splash_calls  # (images, the mesh axes manual there) of each kernel call traced
    mesh_cfg = sharding.default_mesh_config()
    mesh_cfg.fsdp, mesh_cfg.min_fsdp_size = 2, 16
    mesh = sharding.make_mesh(mesh_cfg)
    shardings = sharding.state_shardings(abstract, mesh, mesh_cfg)
    got = init_from.init_from_converted(str(tmp_path / "ckpt"), einsum.clone(attention_impl="splash"), cfg, 7,
                                        (32, 32), shardings)
    assert calls and set(calls) == {(1, ("data", "fsdp"))}, calls
    assert jax.tree.map(lambda a: a.sharding, got) == shardings
    fresh = jax.jit(lambda: einsum.init(jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3))))()["params"]
    for k, v in weights.flatten_params(jax.device_get(got)).items():
        want = fresh if k.startswith("box_head/") else ckpt
        np.testing.assert_array_equal(v, np.asarray(weights.flatten_params(want)[k]), err_msg=k)


# --------------------------------------------------------------------------------------------------
# End to end through train.py
# --------------------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900
# configs/demo.py:smoke's model: 32 wide, 2 deep, 2 heads, PEs stored for 64x96 (a 4x6 grid), no mid PEs.
SMOKE_MODEL = ["hidden_size=32", "depth=2", "num_heads=2", "init_pe_size=(64, 96)", "mid_pe_size=None"]


@pytest.fixture(scope="module")
def converted_backbone(tmp_path_factory):
    """A random DeiT (facebookresearch release format, 64x64 pre-training: a 4x4 PE grid) converted with
    the command-line converter into a 'backbone' directory."""
    root = tmp_path_factory.mktemp("deit")
    timm_sd = ref.timm_vit_state(hidden=32, depth=2, mlp=128, grid=4, distilled=False, seed=5, num_classes=10)
    torch.save({"model": timm_sd}, root / "deit_tiny_random.pth")
    out = root / "converted"
    argv = [f"--source={root / 'deit_tiny_random.pth'}", f"--output={out}", "--variant=ti"]
    argv += [a for m in SMOKE_MODEL for a in ("--model", m)]
    assert convert_torch_weights.main(argv) == 0
    params, model_cfg, meta = weights.load_params_dir(str(out))
    assert meta["kind"] == "backbone" and meta["source_format"] == "timm_vit"
    return str(out), weights.flatten_params(params)


def test_train_py_init_from_converted_backbone(tmp_path, converted_backbone):
    conv_dir, conv = converted_backbone
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(YOLOS_JAX_COMPILATION_CACHE=str(tmp_path / "xla_cache"), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    train_fixtures.generate_demo_data(str(tmp_path / "data" / "synthetic"))
    cmd = [
        sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/demo.py:smoke"),
        "--workdir", str(workdir), f"--config.init_from={conv_dir}",
        # A DeiT has the patchify stem; the demo's ConvStem would have nothing to take from it.
        "--config.model.patch_embed=linear",
        f"--config.input.source_dir={tmp_path}/data/synthetic", f"--config.input.data_dir={tmp_path}/data/tfds",
        "--config.train.num_steps=2", "--config.checkpoint.every_steps=1", "--config.train.log_every=1",
        "--config.optim.warmup_steps=1", "--config.train.eval_at_end=False",
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    # The run says what it took: every backbone leaf from the converted directory, the rest fresh.
    backbone_keys = sorted(k for k in conv if weights.is_backbone_leaf(k))
    assert backbone_keys == sorted(conv)  # a backbone checkpoint holds nothing else
    line = re.search(r"init_from (\S+): converted kind 'backbone': taken (\d+) .*fresh (\d+)", output)
    assert line, output[-3000:]
    assert os.path.abspath(line.group(1)) == os.path.abspath(conv_dir)
    assert int(line.group(2)) == len(backbone_keys)

    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps == [1, 2], steps
    step1, model_cfg, _ = weights.load_any(str(workdir / "checkpoints" / "1"))
    step2, _, _ = weights.load_any(str(workdir / "checkpoints" / "2"))
    step1, step2 = weights.flatten_params(step1), weights.flatten_params(step2)
    assert (model_cfg["hidden_size"], model_cfg["depth"], tuple(model_cfg["init_pe_size"])) == (32, 2, (64, 96))

    # What the model would start from without init_from: the trainer's fresh draw with config.seed (0).
    model = YOLOS(**model_cfg)
    fresh = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))()["params"]
    fresh = {k: np.asarray(v) for k, v in weights.flatten_params(fresh).items()}
    assert set(step1) == set(fresh)
    non_backbone = sorted(k for k in fresh if not weights.is_backbone_leaf(k))
    assert {"det_tokens", "pos_embed_det", "class_head/layers_2/kernel", "box_head/layers_0/kernel"} <= set(non_backbone)
    assert int(line.group(3)) == len(non_backbone)

    # Backbone at step 0 = the converted file, bit for bit (and the converted values are not what a fresh
    # init would give, so this cannot pass by accident).
    for k in backbone_keys:
        np.testing.assert_array_equal(step1[k], conv[k], err_msg=k)
        assert np.abs(conv[k] - fresh[k]).max() > 0.05, k
    # [DET] tokens, det PEs and heads at step 0 = the fresh initialisation (nothing of the sort is in the file).
    for k in non_backbone:
        assert k not in conv
        np.testing.assert_allclose(step1[k], fresh[k], rtol=0, atol=1e-7, err_msg=k)
    # And training went on from there: the second (lr > 0) update moved backbone and heads.
    for k in ("block_0/attn/qkv/kernel", "patch_embed/proj/kernel", "class_head/layers_2/bias", "det_tokens"):
        assert np.abs(step2[k] - step1[k]).max() > 1e-6, k

    # A second fine-tune can start from this run: init_from takes a training workdir (its newest step) as it takes
    # a converted directory, every leaf from the run's weights.
    mesh = sharding.make_mesh(sharding.default_mesh_config(), jax.devices()[:1])
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))["params"]
    shardings = sharding.state_shardings(abstract, mesh, sharding.default_mesh_config())
    cfg = ml_collections.ConfigDict(model_cfg)
    again = init_from.init_from_converted(str(workdir), model, cfg, 3, (32, 32), shardings)
    again = weights.flatten_params(jax.device_get(again))
    assert set(again) == set(step2)
    for k in step2:
        np.testing.assert_array_equal(again[k], step2[k], err_msg=k)
