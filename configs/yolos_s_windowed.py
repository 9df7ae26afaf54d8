r"""YOLOS-S with ViTDet windowed attention: 14 x 14 patch windows, global attention in blocks 2, 5, 8, 11.

  python train.py --config=configs/yolos_s_windowed.py --workdir=/tmp/yolos_s_win \
      --config.init_from=/path/to/converted/deit_small --config.input.data_dir=/path/to/tfds
  python train.py --config=configs/yolos_s_windowed.py:window=7,rel_pos ...  # r = 7, relative position bias

The recipe of configs/yolos_s.py (150 epochs, total batch 8 at lr 2.5e-5, multi-scale 480-800, eval at
800) with config.model.window_size / global_blocks / rel_pos set; see yolos_jax/windowed.py for the
attention pattern ([CLS] and [DET] tokens stay global). The parameter tree equals the global model's
(plus the zero-initialised relative position tables with rel_pos), so DeiT and YOLOS checkpoints load.
"""

from yolos_jax.run_config import apply_window_options, default_config


def get_config(arg=None):
    config = default_config("s")
    config.input.batch_size = 8
    config.train.num_epochs = 150
    # The original trains S and B at 1 image per GPU: each GPU's F.cross_entropy is that image's weighted mean,
    # then DDP averages over the 8 GPUs, i.e. the mean of per-image means (losses.py: 'per_image').
    config.loss.ce_normalization = "per_image"
    config.input.eval_size = 800
    apply_window_options(config.model, arg, "configs/yolos_s_windowed.py")
    return config
