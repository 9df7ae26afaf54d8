r"""YOLOS-B with ViTDet windowed attention: 14 x 14 patch windows, global attention in blocks 2, 5, 8, 11.

  python train.py --config=configs/yolos_b_windowed.py --workdir=/tmp/yolos_b_win \
      --config.init_from=/path/to/converted/deit_base_distilled_384 --config.input.data_dir=/path/to/tfds
  python train.py --config=configs/yolos_b_windowed.py:window=7,rel_pos ...  # r = 7, relative position bias

The recipe of configs/yolos_b.py (150 epochs, total batch 8 at lr 2.5e-5, multi-scale 480-800, eval at
800) with config.model.window_size / global_blocks / rel_pos set; see yolos_jax/windowed.py for the
attention pattern ([CLS] and [DET] tokens stay global). r = 14 is ViTDet's window for ViT-B (its DeiT-B was
pre-trained at 224, a 14 x 14 grid); the paper's rule applied to YOLOS-B's 384-pixel checkpoint would give r = 24
(`:window=24`), which pads an 800 x 1333 input's 50 x 83 grid to 72 x 96. For the ViTDet training recipe (1024 x 1024
large-scale jitter, relative position bias, drop path) use configs/vitdet_b.py.
benchmarks/bench_windowed.py measures this model's train step against the global one.
"""

from yolos_jax.run_config import apply_window_options, default_config


def get_config(arg=None):
    config = default_config("b")
    config.input.batch_size = 8
    config.train.num_epochs = 150
    # The original trains S and B at 1 image per GPU: each GPU's F.cross_entropy is that image's weighted mean,
    # then DDP averages over the 8 GPUs, i.e. the mean of per-image means (losses.py: 'per_image').
    config.loss.ce_normalization = "per_image"
    config.input.eval_size = 800
    apply_window_options(config.model, arg, "configs/yolos_b_windowed.py")
    return config
