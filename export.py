r"""Export a detector for deployment: StableHLO (jax.export), ONNX or a TF SavedModel.

  python export.py --checkpoint=/ckpt/yolos_s_hf --format=onnx --image_size=800,1344 --out=/tmp/yolos_s.onnx
  python export.py --checkpoint=/tmp/run --format=stablehlo --image_size=512,864 --out=/tmp/yolos.stablehlo
  python export.py --checkpoint=/tmp/run/checkpoints/best --format=savedmodel --image_size=512,864 --out=/tmp/sm

--checkpoint takes a converted checkpoint (convert_torch_weights.py) or a training workdir/step. --image_size
is the canvas H,W in pixels (multiples of the patch size); images are resized (e.g. shortest side to the
checkpoint's eval size, see OUT.json) and padded bottom/right into it. ONNX needs `pip install -e ".[export]"`,
SavedModel TensorFlow. The artifact is run by its own runtime and compared with the Flax forward before it
appears at --out; OUT.json describes it. The logic is `yolos_jax.export.export_checkpoint`.

Every artifact computes:
"""

from absl import app, flags

from yolos_jax.export import DEFAULT_PLATFORMS, FORMATS, signature_text

__doc__ += signature_text() + "\n"

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Converted checkpoint dir, training workdir or checkpoint step dir.")
flags.DEFINE_enum("format", None, FORMATS, "Artifact format.")
flags.DEFINE_string("image_size", None, "Canvas H,W in pixels (multiples of the patch size), e.g. 800,1344.")
flags.DEFINE_string("out", None, "Output file (stablehlo, onnx) or directory (savedmodel); OUT.json beside it.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
flags.DEFINE_integer("batch_size", 0, "Fix the batch size (0: symbolic, any batch size).")
flags.DEFINE_bool("pixel_mask", True, "The artifact takes a pixel_mask input (false: images fill the canvas).")
flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS), "stablehlo and savedmodel: platforms to lower for "
                  "(cpu, cuda, rocm, tpu).")
flags.DEFINE_bool("verify", True, "Run the artifact in its runtime and compare with the Flax forward first.")
flags.mark_flags_as_required(["checkpoint", "format", "image_size", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from yolos_jax import runtime

    runtime.setup_host()
    from yolos_jax import export
    from yolos_jax.errors import UserError

    try:
        description = export.export_checkpoint(
            FLAGS.checkpoint, FLAGS.format, FLAGS.image_size, FLAGS.out, overwrite=FLAGS.overwrite,
            batch_size=FLAGS.batch_size or None, pixel_mask=FLAGS.pixel_mask, platforms=FLAGS.platforms,
            verify=FLAGS.verify,
        )
    except UserError as e:
        runtime.exit_with_error(e)
    verified = description.get("verified")
    check = (f"; verified on a padded batch of {verified['batch']}: max |diff| logits "
             f"{verified['max_abs_diff']['logits']:.1e}, boxes {verified['max_abs_diff']['boxes']:.1e}"
             if verified else "")
    print(f"wrote {FLAGS.out} ({FLAGS.format}, canvas {description['image_size'][0]}x{description['image_size'][1]}, "
          f"batch {description['inputs']['pixel_values']['shape'][0]}){check}")
    if not description["holds_eval_resize"]:
        from yolos_jax.data import transforms

        short, long = transforms.eval_canvas_bound(description["eval_size"], description["max_size"])
        print(f"warning: the canvas holds neither orientation of this checkpoint's eval resize (eval_size "
              f"{description['eval_size']}, max_size {description['max_size']}): images resized as Detector does "
              f"will not fit; for them export --image_size={short},{long} (landscape) or {long},{short} (portrait)",
              flush=True)


if __name__ == "__main__":
    app.run(main)
