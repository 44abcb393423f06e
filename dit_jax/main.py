"""Entry point. A training run, or a sweep when the config has a `sweep` block:

  python -m dit_jax.main --config=configs/default.py:cpu --workdir=/tmp/dit     # one model
  python -m dit_jax.main --config=configs/dit_sweep.py                          # the scaling sweep
"""
import os
import sys

# TensorFlow (via clu and tfds) logs its C++ INFO lines at import; keep its warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging
from ml_collections import config_flags

from dit_jax import config_check
from dit_jax.sweep import runner as sweep
from dit_jax.training import compile_cache
from dit_jax.training import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results "
                    "(default: the config's `workdir` field).")
config_flags.DEFINE_config_file("config", None, "Config file (with an optional :preset).",
                                lock_config=True)
flags.DEFINE_bool("verbose", False, "A sweep logs only one line per member and errors; --verbose "
                  "brings back the INFO logs (training metrics, orbax, TensorFlow).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Orbax logs every save step by step at INFO; keep its warnings only.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname)
  config = FLAGS.config
  workdir = FLAGS.workdir or config.get("workdir")
  if not workdir:
    raise app.UsageError("--workdir is required (this config has no default workdir)")
  if "sweep" in config and not FLAGS.verbose:
    logging.set_verbosity(logging.WARNING)  # the sweep prints its own progress lines
  logging.info("config:\n%s", config)
  compile_cache.enable()  # seeds, resumes and re-runs load their programs instead of compiling
  if "sweep" in config:
    failed = sweep.run(config, workdir)
    if failed:
      logging.error("sweep: %d member(s) failed: %s (see %s/results.jsonl)", len(failed), failed,
                    workdir)
      sys.exit(1)
  else:
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
  try:
    config_check.check_argv(sys.argv[1:])
  except ValueError as e:
    sys.exit(f"dit_jax.main: {e}")
  app.run(main)
