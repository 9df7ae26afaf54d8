r"""YOLOS-S with FP-DETR's task adapter (fp_detr_paper.md Sec. 3.3) and auxiliary losses.

  python train.py --config=configs/yolos_s_fpdetr.py --workdir=/tmp/yolos_s_fpdetr \
      --config.init_from=/path/to/converted/deit_small --config.input.data_dir=/path/to/tfds
  python train.py --config=configs/yolos_s_fpdetr.py:insert=0,aux=3 ...   # [DET] tokens in every block

The defaults are FP-DETR's (fp_detr_paper.md §4.1): the queries are "concatenated with the image tokens at an
intermediate (the 7th) encoder layer" (insert=6: blocks 0-5 see [CLS] + patches only, as in pre-training) and
deep supervision is applied "on the last six encoder layers" (aux=5, plus the final one). Unlike FP-DETR the
[CLS] token is kept from block 0 (DeiT's pre-training sequence), and the rest is the YOLOS-S recipe (100
[DET] tokens, global attention), not FP-DETR's deformable-attention detector.

One self-attention layer over the [DET] tokens, shared by all blocks and applied before each of them, with
learnable query position embeddings (the "visual prompts") on its queries and keys; `insert=k` lets the
[DET] tokens join the sequence only before block k (the first k blocks see [CLS] + patches, as in
pre-training); `aux=n` adds the set loss on the [DET] outputs of the n blocks before the last
(`config.model.aux_layers` with `config.loss.aux_loss`). The adapter is new, randomly initialised; the
rest is the YOLOS-S recipe of configs/yolos_s.py.
"""

from yolos_jax import variants
from yolos_jax.run_config import default_config, parse_config_arg


def get_config(arg=None):
    opts = dict(insert=6, aux=5)
    opts.update(parse_config_arg(arg, "configs/yolos_s_fpdetr.py", {"insert": ("insert", int), "aux": ("aux", int)},
                                 "e.g. 'insert=6,aux=5'"))
    config = default_config("s")
    config.model.update(variants.OPTION_DEFAULTS)  # every variant field present, so overrides type-check
    config.model.adapter = True
    config.model.adapter_insert_det_at = opts["insert"]
    config.model.aux_layers = opts["aux"]
    config.loss.aux_loss = opts["aux"] > 0
    variants.validate_options(config.model)
    config.input.batch_size = 8
    config.train.num_epochs = 150
    # The original trains S and B at 1 image per GPU: each GPU's F.cross_entropy is that image's weighted mean,
    # then DDP averages over the 8 GPUs, i.e. the mean of per-image means (losses.py: 'per_image').
    config.loss.ce_normalization = "per_image"
    config.input.eval_size = 800
    return config
