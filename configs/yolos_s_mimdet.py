r"""YOLOS-S with MIMDet's partial-sequence fine-tuning and ConvStem (mimdet_paper.md Sec. 2.1, 2.2).

  python train.py --config=configs/yolos_s_mimdet.py --workdir=/tmp/yolos_s_mimdet \
      --config.init_from=/path/to/converted/deit_small --config.input.data_dir=/path/to/tfds
  python train.py --config=configs/yolos_s_mimdet.py:0.25 ...   # keep 25% of the patch tokens instead

In training the encoder sees a random 50% of the patch tokens (with their position embeddings) plus
[CLS] and all [DET] tokens; evaluation uses every token (MIMDet Table 2: train 50% / infer 100% is its
best trade-off). The patchify stem is replaced by a randomly initialised ConvStem: for S, four stride-2
3x3 convs with 48-96-192-384 channels, LayerNorm and GELU, then a 1x1 projection (yolos_jax/variants.py);
a converted DeiT checkpoint's `patch_embed` is therefore not used. Everything else is the YOLOS-S recipe of
configs/yolos_s.py.
"""

from yolos_jax import variants
from yolos_jax.run_config import default_config, parse_config_arg


def get_config(arg=None):
    ratio = parse_config_arg(arg, "configs/yolos_s_mimdet.py", {}, "the kept fraction of patch tokens, e.g. '0.25'",
                             positional=("ratio", float)).get("ratio", 0.5)
    config = default_config("s")
    config.model.update(variants.OPTION_DEFAULTS)  # every variant field present, so overrides type-check
    config.model.token_keep_ratio = ratio
    config.model.patch_embed = "conv_stem"
    variants.validate_options(config.model)
    config.input.batch_size = 8
    config.train.num_epochs = 150
    # The original trains S and B at 1 image per GPU: each GPU's F.cross_entropy is that image's weighted mean,
    # then DDP averages over the 8 GPUs, i.e. the mean of per-image means (losses.py: 'per_image').
    config.loss.ce_normalization = "per_image"
    config.input.eval_size = 800
    return config
