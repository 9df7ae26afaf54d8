r"""Detect objects in image files: annotated PNGs (boxes, class names, scores) and a JSON of detections.

  python infer.py --checkpoint=/ckpt/yolos_s_hf --images=photo.jpg,more/ --out=/tmp/detections
  python infer.py --checkpoint=/tmp/yolos_s --config=configs/yolos_s.py --images='val/*.jpg' --out=OUT

--checkpoint takes a converted checkpoint (convert_torch_weights.py) or a training workdir/step. Class
names: --config's dataset when given, else the checkpoint's (recorded at conversion or by the training run).
Eval size: --eval_size, else the checkpoint's, else --config's.
Writes OUT/<image name>.png and OUT/detections.json ([{file, height, width, detections: [{box_xyxy
(pixels), score, label, name, category_id}]}]; category_id, the dataset's, when the training run recorded its
label map or --config names the dataset). The logic is `yolos_jax.inference.run_inference`.
"""

if __name__ == "__main__":  # first, before anything allocates: once, re-run this command on oneTBB's malloc
    from yolos_jax import malloc

    malloc.use_scalable_malloc()

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted checkpoint dir, training workdir or checkpoint step dir.")
flags.DEFINE_list("images", None, "Image files, directories or glob patterns (comma-separated).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_float("threshold", 0.5, "Keep detections with score > threshold.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("top_k", 100, "At most this many detections per image (0: no limit).", lower_bound=0)
flags.DEFINE_integer("eval_size", 0, "Shortest side after resizing (0: the checkpoint's or the config's).",
                     lower_bound=0)
config_flags.DEFINE_config_file("config", None, "Optional config file: class names and eval size of its dataset.",
                                lock_config=True)
flags.mark_flags_as_required(["checkpoint", "images", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from yolos_jax import runtime

    runtime.setup_host()
    from yolos_jax import inference
    from yolos_jax.errors import UserError

    try:
        inference.run_inference(
            FLAGS.checkpoint, FLAGS.images, FLAGS.out, threshold=FLAGS.threshold, top_k=FLAGS.top_k or None,
            eval_size=FLAGS.eval_size or None, config=FLAGS.config,
            on_result=lambda r: print(f"{r['output']}: {len(r['detections'])} detections", flush=True),
        )
    except UserError as e:  # e.g. a checkpoint that does not restore, an unreadable image: one line, no traceback
        runtime.exit_with_error(e)


if __name__ == "__main__":
    from yolos_jax import runtime

    app.run(main, flags_parser=runtime.parse_flags)
