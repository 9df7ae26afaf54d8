"""`config.init_from` end to end through `train.py`: a DeiT-format backbone converted by
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
import numpy as np
import pytest
import torch

import convert_torch_weights
import reference_models as ref
from yolos_jax import weights
from yolos_jax.yolos import YOLOS

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
