"""Scaling plots from a sweep's results.jsonl: the DiT paper's Fig. 8 (left, right) and Fig. 9.

  python tools/plot_scaling.py workdir/results.jsonl --out experiments/cpu_sweep

Writes fid_vs_gflops, fid_vs_steps, fid_vs_compute (PNG and SVG) and results.md (a markdown table
of each member's final evaluation, the Spearman rank correlation of Gflops and final FID, and the
power law fitted to FID against training compute).
"""
import argparse
import collections
import json
import pathlib
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from dit_jax import files  # noqa: E402
from dit_jax import models  # noqa: E402

MARKERS = {2: "o", 4: "s", 8: "^", 1: "D", 16: "v"}


def read_rows(path) -> list[dict]:
  """Evaluation rows of a results.jsonl (failed members are skipped); rows written before they
  carried `family` and `size` get them from the model registry."""
  rows = []
  for row in files.read_jsonl(path):
    if row.get("status", "ok") == "ok" and row.get("fid") is not None:
      if "family" not in row:
        family, size, _ = models.parse(row["model"])
        row = dict(row, family=family.name, size=size)
      rows.append(row)
  if not rows:
    raise ValueError(f"{path}: no evaluation rows")
  return rows


def by_run(rows) -> dict:
  runs = collections.defaultdict(list)
  for r in rows:
    runs[r["run"]].append(r)
  return {k: sorted(v, key=lambda r: r["step"]) for k, v in runs.items()}


def final_rows(rows) -> list[dict]:
  """The last evaluation of each run, ordered by Gflops."""
  return sorted((v[-1] for v in by_run(rows).values()), key=lambda r: r["gflops"])


def size_of(row) -> str:
  return f"{row['family']}-{row['size']}"


def colours(rows) -> dict:
  sizes = sorted({size_of(r) for r in rows}, key=lambda s: min(
      r["gflops"] for r in rows if size_of(r) == s))
  cmap = plt.get_cmap("viridis", max(len(sizes), 2))
  return {s: cmap(i) for i, s in enumerate(sizes)}


def power_law(x, y):
  """Least-squares fit of log y = log a + b log x; returns (a, b)."""
  b, log_a = np.polyfit(np.log(x), np.log(y), 1)
  return float(np.exp(log_a)), float(b)


def plot_all(rows, out: pathlib.Path) -> dict:
  """Draws the three figures into `out`; returns the summary numbers."""
  out.mkdir(parents=True, exist_ok=True)
  metric = rows[0].get("fid_metric", "fid")
  finals, runs, col = final_rows(rows), by_run(rows), colours(rows)

  def save(fig, name):
    for ax in fig.axes:  # x: label only the decades (minor labels overlap); y: plain numbers
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
      ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
      ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    for ext in ("png", "svg"):
      fig.savefig(out / f"{name}.{ext}", dpi=130, bbox_inches="tight")
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 4))
  for r in finals:
    ax.scatter(r["gflops"], r["fid"], color=col[size_of(r)], marker=MARKERS.get(r["patch"], "x"),
               s=60, label=r["model"])
  ax.set(xscale="log", xlabel="forward Gflops (one image)", ylabel=metric,
         title=f"{metric} vs model Gflops (step {finals[0]['step']})")
  ax.legend(fontsize=7)
  save(fig, "fid_vs_gflops")

  fig, ax = plt.subplots(figsize=(5, 4))
  for name, rs in runs.items():
    ax.plot([r["step"] for r in rs], [r["fid"] for r in rs], color=col[size_of(rs[0])],
            marker=MARKERS.get(rs[0]["patch"], "x"), label=rs[0]["model"])
  ax.set(xlabel="training steps", ylabel=metric, title=f"{metric} during training")
  ax.legend(fontsize=7)
  save(fig, "fid_vs_steps")

  fig, ax = plt.subplots(figsize=(5, 4))
  for name, rs in runs.items():
    ax.plot([r["train_compute_gflops"] for r in rs], [r["fid"] for r in rs],
            color=col[size_of(rs[0])], marker=MARKERS.get(rs[0]["patch"], "x"), label=rs[0]["model"])
  all_c = np.array([r["train_compute_gflops"] for r in rows if r["train_compute_gflops"] > 0])
  all_f = np.array([r["fid"] for r in rows if r["train_compute_gflops"] > 0])
  fit = power_law(all_c, all_f) if len(all_c) >= 2 else None
  if fit:
    xs = np.geomspace(all_c.min(), all_c.max(), 50)
    ax.plot(xs, fit[0] * xs ** fit[1], "k--", label=f"fit: {fit[0]:.3g}·C^{fit[1]:.3f}")
  ax.set(xscale="log", yscale="log", xlabel="training compute (Gflops = Gflops·batch·steps·3)",
         ylabel=metric, title=f"{metric} vs training compute")
  ax.legend(fontsize=7)
  save(fig, "fid_vs_compute")

  dits = [r for r in finals if r["family"] == "DiT"]
  rho = stats.spearmanr([r["gflops"] for r in dits], [r["fid"] for r in dits])[0] \
      if len(dits) >= 3 else float("nan")
  summary = {"metric": metric, "spearman_gflops_fid_dit": float(rho), "power_law": fit,
             "members": len(finals)}
  (out / "results.md").write_text(markdown(finals, summary))
  return summary


def markdown(finals, summary) -> str:
  metric = summary["metric"]
  lines = [f"| model | params (M) | Gflops | XLA Gflops | step | train compute (Gflops) | {metric} "
           "| images/s | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in finals:
    lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops']:.4f} | "
                 f"{r['xla_gflops']:.4f} | {r['step']} | {r['train_compute_gflops']:.4g} | "
                 f"{r['fid']:.2f} | {r['images_per_s']:.1f} | {r['wall_s']:.0f} |")
  lines.append("")
  lines.append(f"Spearman rank correlation of Gflops and final {metric} over the DiT members: "
               f"{summary['spearman_gflops_fid_dit']:.3f}")
  if summary["power_law"]:
    a, b = summary["power_law"]
    lines.append(f"Power law fitted to {metric} vs training compute C: {a:.4g} · C^{b:.4f}")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("results", help="a sweep's results.jsonl")
  ap.add_argument("--out", required=True, help="directory for the figures and results.md")
  args = ap.parse_args(argv)
  try:
    summary = plot_all(read_rows(args.results), pathlib.Path(args.out))
  except (OSError, ValueError) as e:
    sys.exit(f"plot_scaling: {e}")
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
