r"""YOLOS-S and its scaled variants: 150 epochs on COCO, multi-scale 480-800 (original README).

  python train.py --config=configs/yolos_s.py --workdir=/tmp/yolos_s \
      --config.init_from=/path/to/converted/deit_small --config.input.data_dir=/path/to/tfds
  python train.py --config=configs/yolos_s.py:dWr ...   # YOLOS-S (dWr): 14 deep, 330 wide (fast scaling)
  python train.py --config=configs/yolos_s.py:dwr ...   # YOLOS-S (dwr): 19 deep, 240 wide (compound scaling)

Total batch 8 at lr 2.5e-5 (1 image x 8 GPUs in the original); init_pe_size = mid_pe_size = 512x864.
"""

from yolos_jax.run_config import default_config, parse_config_arg

VARIANTS = {"s": "s", "dWr": "s_dWr", "dwr": "s_dwr"}  # the argument -> config.MODEL_VARIANTS


def get_config(arg=None):
    opts = parse_config_arg(arg, "configs/yolos_s.py", {}, "one of 'dWr', 'dwr' or nothing",
                            positional=("variant", VARIANTS.__getitem__))
    config = default_config(opts.get("variant", "s"))
    config.input.batch_size = 8
    config.train.num_epochs = 150
    # The original trains S and B at 1 image per GPU: each GPU's F.cross_entropy is that image's weighted mean,
    # then DDP averages over the 8 GPUs, i.e. the mean of per-image means (losses.py: 'per_image').
    config.loss.ce_normalization = "per_image"
    # The original README evaluates every S variant at 800 (paper Table 6 also lists dWr at 784: 37.6 AP).
    config.input.eval_size = 800
    return config
