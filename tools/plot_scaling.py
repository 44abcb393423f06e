"""Scaling report of one or more sweeps' results.jsonl: figures, results.md, summary JSON on stdout.

  python tools/plot_scaling.py workdir/results.jsonl [more.jsonl ...] --out experiments/cpu_sweep

The figures (the DiT paper's Fig. 8 left and right, Fig. 9, iso-FLOP curves, the prediction check)
and their statistics are dit_jax.analysis.report's; see its docstring for what is grouped, what is refused
and what each interval is. Bad input ends with a one-line error, no traceback.
"""
import argparse
import json
import pathlib
import sys

# this checkout's dit_jax, not whichever one an editable install points at
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from dit_jax.analysis import report  # noqa: E402


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("results", nargs="+", help="results.jsonl files (merged; a run may be in several "
                  "only with the same rows)")
  ap.add_argument("--out", required=True, help="directory for the figures and results.md")
  hold = ap.add_mutually_exclusive_group()
  hold.add_argument("--holdout", default=None, help="DiT model held out of the law and predicted "
                    "(default: the DiT of largest final training compute)")
  hold.add_argument("--no-holdout", action="store_true", help="no prediction check")
  ap.add_argument("--ci", type=float, default=0.9, help="interval level (default 0.9)")
  ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
  ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  args = ap.parse_args(argv)
  try:
    summary = report.write(report.read(args.results), args.out,
                           holdout=False if args.no_holdout else args.holdout, ci=args.ci,
                           n_boot=args.n_boot, seed=args.seed)
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f"plot_scaling: {type(e).__name__ + ': ' if isinstance(e, KeyError) else ''}{e}")
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
