"""Train a YOLOS detector.

  python train.py --config=configs/yolos_s.py --workdir=/tmp/yolos_s [--config.input.batch_size=16 ...]

Re-running the same command resumes from the workdir's latest checkpoint. This file is intentionally
short: the loop is `yolos_jax.trainer.train_and_evaluate`.
"""

if __name__ == "__main__":  # first, before anything allocates: once, re-run this command on oneTBB's malloc
    from yolos_jax import malloc

    malloc.use_scalable_malloc()

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/yolos_s.py[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard summaries and evaluation output.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from yolos_jax import runtime

    runtime.setup_host()
    from yolos_jax.errors import UserError

    try:
        runtime.maybe_initialize_distributed(FLAGS.config.distributed)
        from yolos_jax import trainer

        trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except UserError as e:  # foreseen (a held workdir, bad checkpoints, a failed save, NaN): one line, no traceback
        runtime.exit_with_error(e)
    except Exception:  # a collective failing because a process died: let the watchdog name it first
        runtime.await_lost_peer_verdict()
        raise


if __name__ == "__main__":
    from yolos_jax import runtime

    app.run(main, flags_parser=runtime.parse_flags)
