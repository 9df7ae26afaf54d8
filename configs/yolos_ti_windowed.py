r"""YOLOS-Ti with ViTDet windowed attention: 14 x 14 patch windows, global attention in blocks 2, 5, 8, 11.

  python train.py --config=configs/yolos_ti_windowed.py --workdir=/tmp/yolos_ti_win \
      --config.init_from=/path/to/converted/deit_tiny --config.input.data_dir=/path/to/tfds
  python train.py --config=configs/yolos_ti_windowed.py:window=7,rel_pos ...  # r = 7, relative position bias
  python train.py --config=configs/yolos_ti_windowed.py:global=5.11 ...        # only blocks 5 and 11 global

The recipe of configs/yolos_ti.py (300 epochs, total batch 16 at lr 5e-5, multi-scale 256-608, eval at
512) with config.model.window_size / global_blocks / rel_pos set; see yolos_jax/windowed.py for the
attention pattern ([CLS] and [DET] tokens stay global). The parameter tree equals the global model's
(plus the zero-initialised relative position tables with rel_pos), so DeiT and YOLOS checkpoints load.
"""

from yolos_jax.run_config import apply_window_options, default_config


def get_config(arg=None):
    config = default_config("ti")
    config.input.batch_size = 16
    config.train.num_epochs = 300
    # The original trains Ti at 2 images per GPU: its CE is the weighted mean over each GPU's 2 images' queries,
    # then DDP averages over the 8 GPUs, between 'batch' (one mean over all 16) and 'per_image'. We keep
    # HF's 'batch' (losses.py); --config.loss.ce_normalization=per_image is the 1-image-per-GPU variant.
    config.loss.ce_normalization = "batch"
    config.input.eval_size = 512
    apply_window_options(config.model, arg, "configs/yolos_ti_windowed.py")
    return config
