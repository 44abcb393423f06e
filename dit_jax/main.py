"""Entry point. A training run, or a sweep when the config has a `sweep` block:

  python -m dit_jax.main --config=configs/default.py:cpu --workdir=/tmp/dit     # one model
  python -m dit_jax.main --config=configs/dit_sweep.py                          # the scaling sweep

Exit codes (errors.py): 0 finished, 1 a member failed (or a bug), 2 a user error (one line; the
traceback with --verbose), 75 preempted by SIGTERM (re-run the same command to resume).
"""
import os
import sys
import traceback

# TensorFlow (via clu and tfds) logs its C++ INFO lines at import; keep its warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging
from ml_collections import config_flags

from dit_jax import config_check
from dit_jax import errors
from dit_jax.sweep import runner as sweep
from dit_jax.training import compile_cache
from dit_jax.training import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results "
                    "(default: the config's `workdir` field).")
config_flags.DEFINE_config_file("config", None, "Config file (with an optional :preset).",
                                lock_config=True)
flags.DEFINE_bool("verbose", False, "A sweep logs only one line per member and errors; --verbose "
                  "brings back the INFO logs (training metrics, orbax, TensorFlow), and a user "
                  "error's traceback.")
flags.mark_flags_as_required(["config"])


def _run(workdir) -> None:
  """The run or sweep of --config (FLAGS.config) into `workdir`."""
  if "sweep" in FLAGS.config and not FLAGS.verbose:
    logging.set_verbosity(logging.WARNING)  # the sweep prints its own progress lines
  compile_cache.enable()  # seeds, resumes and re-runs load their programs instead of compiling
  if "sweep" in FLAGS.config:
    failed = sweep.run(FLAGS.config, workdir)
    if failed:
      logging.error("sweep: %d member(s) failed: %s (see %s/results.jsonl)", len(failed), failed,
                    workdir)
      sys.exit(errors.EXIT_FAILED)
    return
  config_check.check(FLAGS.config)  # before the config dump, so that a bad field is the last line
  logging.info("config:\n%s", FLAGS.config)
  state = train.train_and_evaluate(FLAGS.config, workdir)
  steps = FLAGS.config.num_train_steps
  if state is not None and int(state.step) < steps:
    raise errors.Preempted(f"SIGTERM at step {int(state.step)} of {steps}; the checkpoint is saved "
                           f"in {workdir}, re-run to resume")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax logs every save step by step at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
  workdir = FLAGS.workdir or FLAGS.config.get("workdir")
  if not workdir:
    raise app.UsageError("--workdir is required (this config has no default workdir)")
  try:
    _run(workdir)
  except errors.Preempted as e:
    print(f"dit_jax.main: preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_PREEMPTED)
  except Exception as e:  # pylint: disable=broad-except
    cause = errors.root_cause(e)
    if not errors.is_user_error(cause):
      raise
    if FLAGS.verbose:
      traceback.print_exc()
    errors.exit_user_error("dit_jax.main", cause,
                           "" if FLAGS.verbose else " (--verbose for the traceback)")


if __name__ == "__main__":
  config_check.checked_argv("dit_jax.main")
  app.run(main)
