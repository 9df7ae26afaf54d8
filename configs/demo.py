r"""The embedded default: train, evaluate and look at a small YOLOS on a generated dataset, on a CPU.

  python train.py --config=configs/demo.py --workdir=workdir/demo

Generates a seeded synthetic COCO-format dataset (circles, squares and triangles of random colour on plain
colour-noise backgrounds) into WORKDIR/data on first use — no download — trains a small YOLOS with a
convolutional stem and [DET] spatial priors from scratch, evaluates it with pycocotools on its val split
(also midway: the learning curve) and writes annotated val images to WORKDIR/eval/step_N/images.
Interrupt it (Ctrl-C) and run the same command again: it continues from its last checkpoint.
`--config=configs/demo.py:smoke` is the few-step version the tests run.
"""

import ml_collections

from yolos_jax.data import default_input_config
from yolos_jax.run_config import default_config, flag, link_eval_size, parse_config_arg


def get_config(arg=None):
    smoke = parse_config_arg(arg, "configs/demo.py", {"smoke": ("smoke", flag)}, "'smoke' or nothing").get("smoke", False)
    config = default_config("ti")
    # A small ViT: the synthetic shapes need far less capacity than COCO. Trained from scratch (no
    # ImageNet pre-training here), plain YOLOS's [DET] tokens take far longer than minutes to learn where to
    # look, so the full demo gives them spatial priors (yolos_jax/det_prior.py): one [DET] token per patch
    # cell (8 x 10 reference points over the 128 x 160 image), two heads with a Gaussian prior of 1 patch
    # around the reference point, one of 2 patches, and boxes predicted relative to the point.
    # The ConvStem (MIMDet) instead of the patchify stem: from scratch, a patchify ViT takes far longer to
    # tell a circle from a square that sits anywhere on the patch grid (benchmarks/study_demo_stem.py).
    config.model.update(
        patch_embed="conv_stem",
        hidden_size=96 if not smoke else 32,
        depth=6 if not smoke else 2,
        num_heads=3 if not smoke else 2,
        num_det_tokens=80 if not smoke else 8,
        num_classes=3 if not smoke else 4,
        init_pe_size=(128, 160) if not smoke else (64, 96),
        mid_pe_size=None,
    )
    if not smoke:
        config.model.update(det_reference_grid=(8, 10), det_attention_sigma=(1.0, 1.0, 2.0), det_box_offset=True)
    else:  # the same path in miniature: 2 x 4 reference points over the 4 x 6 patch grid
        config.model.update(det_reference_grid=(2, 4), det_attention_sigma=(1.0, 2.0), det_box_offset=True)
    num_train, num_val, image_size = (2048, 128, (128, 160)) if not smoke else (16, 8, (64, 96))
    config.input = default_input_config("s")
    link_eval_size(config)  # config.eval.eval_size reads the new input's eval_size
    config.input.train_split, config.input.val_split = "train", "val"
    config.input.label_mode = "contiguous"
    config.input.auto_prepare = True
    config.input.data_dir = "{workdir}/data/tfds"
    config.input.source_dir = "{workdir}/data/synthetic"
    config.input.dataset_name = "synthetic_demo_v2" if not smoke else "synthetic_smoke"
    if smoke:
        config.input.synthetic = ml_collections.ConfigDict(
            dict(num_train=num_train, num_val=num_val, image_size=image_size, num_classes=4, seed=0, max_objects=6)
        )
    else:
        # The demo's data: three shapes of clearly different outline, 1-3 per image, 0.3-0.6 of the short
        # side, on plain colour-noise backgrounds (the generator's defaults — 4-8 classes, objects from 0.08
        # of the short side, textured backgrounds — are for tests and benchmarks, too hard for minutes).
        config.input.synthetic = ml_collections.ConfigDict(
            dict(num_train=num_train, num_val=num_val, image_size=image_size, num_classes=3, seed=0, max_objects=3,
                 classes=("circle", "square", "triangle"), min_size_frac=0.3, max_size_frac=0.6,
                 background="plain")
        )
    config.input.max_boxes = 8
    if smoke:  # one scale, no crop or flip: a few steps must visibly fit the 16 images
        config.input.num_canvases = 2
        config.input.eval_num_canvases = 3
        config.input.scales = (64,)
        config.input.max_size = 96
        config.input.crop_resize_sizes = (112, 128, 144)
        config.input.crop_min_size = 96
        config.input.crop_max_size = 144
        config.input.crop_prob = 0.0
        config.input.hflip_prob = 0.0
        config.input.eval_size = 64
        config.input.eval_max_size = 96
        config.input.batch_size = 4
        config.input.eval_batch_size = 4
        config.optim.base_lr = 2e-3
        config.optim.base_batch_size = config.input.batch_size
        config.optim.warmup_steps = 1
        config.optim.clip_grad_norm = 1.0
        config.train.num_steps = 16
        config.train.log_every = 4
        config.checkpoint.every_steps = 4
        return config
    # One scale (the images' own size) and flips only: every batch has the same shape, so XLA compiles
    # one train program, and the host does no resampling.
    config.input.scales = (128,)
    config.input.max_size = 160
    config.input.crop_prob = 0.0
    config.input.hflip_prob = 0.5
    config.input.num_canvases = 2
    config.input.eval_num_canvases = 2
    config.input.eval_size = 128
    config.input.eval_max_size = 160
    config.input.image_format = "uint8"
    config.input.batch_size = 16
    config.input.eval_batch_size = 16
    config.optim.base_lr = 1e-3
    config.optim.base_batch_size = config.input.batch_size
    config.optim.warmup_steps = 100
    # The class is what is slow to learn here (the boxes come early): its loss weighs 3x. The matching
    # cost keeps DETR's 1 : 5 : 2 (BENCHMARKS.md, the demo's A/B runs).
    config.loss.ce_weight = 3.0
    config.optim.clip_grad_norm = 1.0
    config.train.num_steps = 3000  # 7-16 minutes end to end on a 2-core CPU, by host (BENCHMARKS.md)
    config.train.log_every = 50
    config.train.eval_every = 750  # the learning curve: AP at 750, 1500, 2250 and 3000 steps
    config.checkpoint.every_steps = 250
    return config
