r"""YOLOS-B: DeiT-B (distilled, 384) backbone, 150 epochs on COCO, multi-scale 480-800 (original README).

  python train.py --config=configs/yolos_b.py --workdir=/tmp/yolos_b \
      --config.init_from=/path/to/converted/deit_base_distilled_384 --config.input.data_dir=/path/to/tfds

Total batch 8 at lr 2.5e-5; init_pe_size = mid_pe_size = 800x1344. For large meshes set
--config.mesh.fsdp=N to shard parameters and optimiser state, --config.model.remat=True and
--config.model.dtype=bfloat16 to save activation memory.
"""

from yolos_jax.run_config import default_config, parse_config_arg


def get_config(arg=None):
    parse_config_arg(arg, "configs/yolos_b.py", {}, "no argument")  # a stray ':arg' must not pass unseen
    config = default_config("b")
    config.input.batch_size = 8
    config.train.num_epochs = 150
    # The original trains S and B at 1 image per GPU: each GPU's F.cross_entropy is that image's weighted mean,
    # then DDP averages over the 8 GPUs, i.e. the mean of per-image means (losses.py: 'per_image').
    config.loss.ce_normalization = "per_image"
    config.input.eval_size = 800
    return config
