"""Scaling report of one or more sweeps' results.jsonl: figures, results.md, summary JSON on stdout.

  python tools/plot_scaling.py workdir/results.jsonl [more.jsonl ...] --out experiments/cpu_sweep

The figures (the DiT paper's Fig. 8 left and right, Fig. 9, iso-FLOP curves, the prediction check)
and their statistics are dit_jax.analysis.report's; see its docstring for what is grouped, what is
refused and what each interval is. Bad input ends with a one-line error, no traceback.
"""
import json
import sys

from absl import app
from absl import flags

from dit_jax.analysis import laws
from dit_jax.analysis import report

_OUT = flags.DEFINE_string("out", None, "directory for the figures and results.md", required=True)
_HOLDOUT = flags.DEFINE_string("holdout", None, "DiT model held out of the law and predicted "
                               "(default: the DiT of largest final training compute)")
_NO_HOLDOUT = flags.DEFINE_bool("no-holdout", False, "no prediction check")
_CI = flags.DEFINE_float("ci", 0.9, "interval level")
_N_BOOT = flags.DEFINE_integer("n-boot", 1000, "bootstrap replicates")
_SEED = flags.DEFINE_integer("seed", 0, "bootstrap seed")
_RULES = laws.Rules()  # the sweep's default (config.sweep.fit): give the sweep's own if it differs
_MIN_FRACTION = flags.DEFINE_float("fit-min-fraction", _RULES.min_fraction,
                                   "laws use points at step >= this x the run's final step")
_MIN_STEP = flags.DEFINE_integer("fit-min-step", _RULES.min_step, "... and at step >= this")
_RATIO = flags.DEFINE_float("fit-compute-ratio", _RULES.compute_ratio, "the prediction check fits "
                            "DiTs of final compute <= the held-out's / this")
flags.register_multi_flags_validator(
    ["holdout", "no-holdout"], lambda f: f["holdout"] is None or not f["no-holdout"],
    message="--holdout and --no-holdout exclude each other")


def run(paths, out, *, holdout=None, ci=0.9, n_boot=1000, seed=0, rules=_RULES) -> dict:
  """report.write of the merged rows of the results.jsonl `paths` (a run may be in several only
  with the same rows) into `out`; returns the JSON-ready summary. holdout, rules: as
  report.write's."""
  return report.write(report.read(paths), out, holdout=holdout, ci=ci, n_boot=n_boot, seed=seed,
                      rules=rules)


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give one or more results.jsonl files")
  try:
    rules = laws.Rules(_MIN_FRACTION.value, _MIN_STEP.value, _RATIO.value)
    summary = run(argv[1:], _OUT.value, holdout=False if _NO_HOLDOUT.value else _HOLDOUT.value,
                  ci=_CI.value, n_boot=_N_BOOT.value, seed=_SEED.value, rules=rules)
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f"plot_scaling: {type(e).__name__ + ': ' if isinstance(e, KeyError) else ''}{e}")
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
