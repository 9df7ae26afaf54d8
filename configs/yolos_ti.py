r"""YOLOS-Ti: DeiT-Ti backbone, 300 epochs on COCO, multi-scale 256-608 (original README).

  python train.py --config=configs/yolos_ti.py --workdir=/tmp/yolos_ti \
      --config.init_from=/path/to/converted/deit_tiny --config.input.data_dir=/path/to/tfds

Total batch 16 at lr 5e-5 (2 images x 8 GPUs in the original); other batch sizes scale the lr linearly
(config.optim.lr_scaling). Evaluated at shortest side 512.

Train scales: shortest side 256-608 in steps of 16 with the longest side at most 608 * 1333 // 800 = 1013,
the rule of the original code (datasets/coco.py) that the released Ti weights were trained with. The paper's
text (yolos_paper.md §3.1) says "the longest at most 864 for tiny models": add --config.input.max_size=864
for that reading.
"""

from yolos_jax.run_config import default_config, parse_config_arg


def get_config(arg=None):
    parse_config_arg(arg, "configs/yolos_ti.py", {}, "no argument")  # a stray ':arg' must not pass unseen
    config = default_config("ti")
    config.input.batch_size = 16
    config.train.num_epochs = 300
    # The original trains Ti at 2 images per GPU: its CE is the weighted mean over each GPU's 2 images' queries,
    # then DDP averages over the 8 GPUs, between 'batch' (one mean over all 16) and 'per_image'. We keep
    # HF's 'batch' (losses.py); --config.loss.ce_normalization=per_image is the 1-image-per-GPU variant.
    config.loss.ce_normalization = "batch"
    config.input.eval_size = 512
    return config
