r"""YOLOS-B trained with the ViTDet recipe (vitdet_benchmarking_paper.md §2.1, §2.3, §4 "Hyperparameter
Tuning"): windowed attention, 1024 x 1024 large-scale jitter, AdamW with warm-up and half-cycle cosine.

  python train.py --config=configs/vitdet_b.py --workdir=/tmp/vitdet_b \
      --config.init_from=/path/to/converted/deit_base --config.input.data_dir=/path/to/tfds
  python train.py --config=configs/vitdet_b.py:window=14,rel_pos=False ...  # without relative position bias

The backbone is the paper's (§3: "the DeiT released weights for ViT-B ... pre-trained for 300 epochs"), DeiT-B
at 224 (deit_base_patch16_224-b5f2ef4d.pth, converted with --variant=b), whose global attention spans 14 x 14
patches. Starting from YOLOS-B's deit_base_distilled_patch16_384 instead, the paper's rule ("r = the global
self-attention size used in pre-training") gives r = 24: add `:window=24`.

What the paper's formula sets, and the values here:
  * backbone: 14 x 14 windowed attention (r = DeiT-B's 224 / 16 pre-training grid) in all blocks but the
    global blocks 2, 5, 8, 11 (every depth/4-th); decomposed relative position biases in every block,
    zero-initialised, together with the absolute position embeddings ("we include both ... in all
    detection models"; ViTDet-style, yolos_jax/windowed.py). [CLS]/[DET] tokens attend globally.
  * input: large-scale jitter: resize by a factor in [0.1, 2.0] of 1024 x 1024, crop / pad to 1024 x 1024
    (input.large_scale_jitter, lsj_size, lsj_min_scale, lsj_max_scale). Evaluation resizes the longest
    side to ~1024 (the one eval rule, transforms.eval_resize_hw, with eval_size = eval_max_size = 1024:
    sides floored to 16, long side never above 1024, so 1008 or 1024) and pads to the same 1024 x 1024
    canvas, as the paper does (§2.5: padding to the training size was 0.5-1 AP better than smaller canvases).
  * position embeddings stored for the 1024 x 1024 grid (64 x 64 patches; DeiT-B's are resized once at
    init_from), so no resize runs per step; the global blocks' relative position tables are 127 long.
  * optimiser: AdamW (b1, b2 = 0.9, 0.999), weight decay 0.1, lr 8e-5 at batch 64 (the value most
    pre-trained initialisations selected, §4), linear warm-up over 0.25 epochs of COCO train2017
    (118287 images: 462 steps at batch 64; recompute optim.warmup_steps for other datasets or batch
    sizes), half-cycle cosine to 0 over 100 epochs (the fine-tuning length of the paper).
  * drop path 0.1 (the rate the paper found best for ViT-B with every initialisation).
Kept from YOLOS rather than ViTDet, because the detector is DETR-like (set loss, no Mask R-CNN): gradient
clipping at global norm 0.1 and the YOLOS loss and matcher weights. The paper uses mixed precision: add
--config.model.dtype=bfloat16 (and --config.model.remat=True if activations do not fit).
"""

from yolos_jax.run_config import apply_window_options, default_config

COCO_TRAIN_IMAGES = 118287
BATCH = 64
LSJ = 1024


def get_config(arg=None):
    config = default_config("b")
    apply_window_options(config.model, arg, "configs/vitdet_b.py", rel_pos=True)
    config.model.init_pe_size = (LSJ, LSJ)
    config.model.mid_pe_size = (LSJ, LSJ)
    config.model.drop_path_rate = 0.1

    config.input.large_scale_jitter = True
    config.input.lsj_size = LSJ
    config.input.lsj_min_scale = 0.1
    config.input.lsj_max_scale = 2.0
    config.input.batch_size = BATCH
    config.input.eval_size = LSJ
    config.input.eval_max_size = LSJ
    config.input.eval_canvases = ((LSJ, LSJ),)

    config.optim.base_lr = 8e-5
    config.optim.base_batch_size = BATCH
    config.optim.weight_decay = 0.1
    config.optim.b1, config.optim.b2 = 0.9, 0.999
    config.optim.schedule = "cosine"
    config.optim.min_lr = 0.0  # half-cycle cosine down to 0
    config.optim.warmup_steps = round(0.25 * COCO_TRAIN_IMAGES / BATCH)
    config.train.num_epochs = 100
    return config
