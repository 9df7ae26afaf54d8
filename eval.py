r"""Evaluate a YOLOS detector on the val split with pycocotools (COCO box AP), as the papers do.

  python eval.py --config=configs/yolos_s.py --workdir=/tmp/yolos_s          # a training run's latest checkpoint
  python eval.py --config=configs/yolos_s.py --checkpoint=/ckpt/yolos_s_hf \
      --config.input.label_mode=identity                                     # a converted COCO checkpoint
  python eval.py ... --speed        # + FPS at batch 1 and GFLOPs over the first 100 val images (Tables 4-6)
  python eval.py ... --robustness   # + COCO-C: 15 benchmark corruptions x 5 severities, per corruption, mPC

Writes OUT/metrics.json (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) and
OUT/detections.json (COCO results format); OUT defaults to WORKDIR/eval or ./eval_<checkpoint name>.
Config overrides as in training, e.g. --config.eval.max_images=500. The logic is
`yolos_jax.eval_checkpoint.evaluate_checkpoint`.
"""

if __name__ == "__main__":  # first, before anything allocates: once, re-run this command on oneTBB's malloc
    from yolos_jax import malloc

    malloc.use_scalable_malloc()

import os

import ml_collections
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/yolos_s.py[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir: evaluate its latest checkpoint.")
flags.DEFINE_string("checkpoint", None, "A converted checkpoint dir (convert_torch_weights.py) or a checkpoint step dir.")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval or ./eval_<checkpoint name>).")
flags.DEFINE_bool("speed", False, "Also measure FPS (batch 1) and GFLOPs over the first config.eval.speed_images.")
flags.DEFINE_bool("robustness", False, "Also evaluate on COCO-C corruptions (config.eval.corruptions/severities).")
flags.DEFINE_bool("skip_clean", False, "Skip the clean evaluation (e.g. with --speed only).")
flags.DEFINE_string("model_name", None, "Name in the speed table (default: the variant or checkpoint name).")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
        raise app.UsageError("give exactly one of --workdir and --checkpoint")
    from yolos_jax import runtime  # imported here, as the rest: setup_host() runs before jax and TF are used

    runtime.setup_host()
    from yolos_jax.errors import UserError

    try:
        runtime.maybe_initialize_distributed(FLAGS.config.distributed)
    except UserError as e:  # a distributed setting that cannot work: one line, no traceback
        runtime.exit_with_error(e)
    from yolos_jax import eval_checkpoint, weights

    path = FLAGS.workdir or FLAGS.checkpoint
    out = FLAGS.out or (os.path.join(FLAGS.workdir, "eval") if FLAGS.workdir
                        else f"eval_{os.path.basename(os.path.normpath(FLAGS.checkpoint))}")
    config = ml_collections.ConfigDict(FLAGS.config.to_dict())
    try:
        # '{workdir}' in data paths (configs/demo.py) is the training workdir of the checkpoint
        config.input = weights.input_config_for_checkpoint(config.input, path, FLAGS.workdir)
        eval_checkpoint.evaluate_checkpoint(config, path, out, speed=FLAGS.speed, robustness=FLAGS.robustness,
                                            model_name=FLAGS.model_name, skip_clean=FLAGS.skip_clean)
    except UserError as e:  # e.g. a checkpoint that does not restore: one line, no traceback
        runtime.exit_with_error(e)


if __name__ == "__main__":
    from yolos_jax import runtime

    app.run(main, flags_parser=runtime.parse_flags)
