"""The learning-rate transfer plot and table of a `configs/dit_sweep.py:mup_transfer` sweep.

  python tools/mup_transfer.py --workdir=workdir/dit_sweep_mup_transfer --out=experiments/mup

Reads the sweep's final rows (results.jsonl) and each member's config.json (its parameterisation
and optim.lr) and applies the rules written before the run (experiments/mup/README.md): the
optimum of a (parameterisation, width) is the learning rate of the lowest seed-mean val_loss (a
non-finite or failed run counts as +inf); its uncertainty is the spread of the per-seed argmins and
the vertex of a parabola in log2(lr) through the minimum and its two neighbours (interior minima
only). Writes <name>.png (loss against lr, one curve per width; SP and μP panels) and <name>.md.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from absl import app
from absl import flags

from dit_jax import files
from dit_jax.models import dit
from dit_jax.sweep import members

_WORKDIR = flags.DEFINE_string("workdir", "workdir/dit_sweep_mup_transfer", "The sweep's workdir.")
_OUT = flags.DEFINE_string("out", "experiments/mup", "Folder for <name>.png / <name>.md.")
_NAME = flags.DEFINE_string("name", "transfer", "File name stem of the outputs.")
_LRS = flags.DEFINE_list("lrs", [], "Only these learning rates (default: all in the workdir).")


def losses(workdir) -> dict:
  """{(parameterization, width): {lr: {seed: val_loss}}} from the final rows."""
  workdir, out = pathlib.Path(workdir), {}
  for r in files.read_jsonl(workdir / "results.jsonl"):
    if not r.get("final") and r.get("status") == "ok":
      continue
    cfg = json.loads((workdir / members.run_dir_name(r["run"]) / "config.json").read_text())
    key = (cfg.get("parameterization", "sp"), dit.SIZES[cfg["model"].split("-")[1].split("/")[0]]
           .hidden_size)
    loss = r.get("val_loss", math.inf) if r.get("status") == "ok" else math.inf
    loss = loss if loss is not None and math.isfinite(loss) else math.inf
    out.setdefault(key, {}).setdefault(float(cfg["optim"]["lr"]), {})[int(cfg["seed"])] = loss
  return out


def vertex(lrs, means, i: int) -> float | None:
  """log2-lr vertex of the parabola through points i-1, i, i+1 (None at an edge or non-finite)."""
  if i == 0 or i == len(lrs) - 1 or not all(map(math.isfinite, means[i - 1:i + 2])):
    return None
  x, y = np.log2(lrs[i - 1:i + 2]), np.asarray(means[i - 1:i + 2])
  a, b, _ = np.polyfit(x, y, 2)
  return float(-b / (2 * a)) if a > 0 else None


def optimum(by_lr: dict) -> dict:
  """The rules' optimum of one (parameterisation, width)."""
  lrs = sorted(by_lr)
  seeds = sorted({s for v in by_lr.values() for s in v})
  means = [float(np.mean([by_lr[lr].get(s, math.inf) for s in seeds])) for lr in lrs]
  i = int(np.argmin(means))
  per_seed = [lrs[int(np.argmin([by_lr[lr].get(s, math.inf) for lr in lrs]))] for s in seeds]
  v = vertex(lrs, means, i)
  edge = "≤ " if i == 0 else "≥ " if i == len(lrs) - 1 else ""
  return dict(lrs=lrs, means=means, best=lrs[i], index=i, edge=edge, per_seed=per_seed,
              vertex=v, spread=int(round(math.log2(max(per_seed) / min(per_seed)))))


def plot(table: dict, path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  params = [p for p in ("sp", "mup") if any(k[0] == p for k in table)]
  fig, axes = plt.subplots(1, len(params), figsize=(5.5 * len(params), 4), sharey=True,
                           squeeze=False)
  widths = sorted({w for _, w in table})
  for ax, p in zip(axes[0], params):
    for j, w in enumerate(widths):
      if (p, w) not in table:
        continue
      o = table[(p, w)]
      color = plt.cm.viridis(j / max(len(widths) - 1, 1))
      ax.plot(o["lrs"], o["means"], "o-", color=color, label=f"width {w}")
      ax.axvline(o["best"], color=color, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xticks(o["lrs"], [f"{lr:g}" for lr in o["lrs"]], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("optim.lr" + (" (base-width lr)" if p == "mup" else ""))
    ax.set_title({"sp": "SP (standard)", "mup": "μP (base width 64)"}[p])
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("validation loss at step 300 (mean of seeds)")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def markdown(table: dict) -> str:
  widths = sorted({w for _, w in table})
  lrs = table[next(iter(table))]["lrs"]
  lines = ["| param | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) +
           " | optimum | per-seed argmins | parabola vertex |",
           "|---|---:|" + "---:|" * len(lrs) + "---:|---|---:|"]
  for p in ("sp", "mup"):
    for w in widths:
      if (p, w) not in table:
        continue
      o = table[(p, w)]
      cells = [f"**{m:.4f}**" if k == o["index"] else f"{m:.4f}" for k, m in enumerate(o["means"])]
      v = "—" if o["vertex"] is None else f"{2 ** o['vertex']:.2e}"
      lines.append(f"| {p} | {w} | " + " | ".join(cells) + f" | {o['edge']}{o['best']:g} | "
                   + ", ".join(f"{x:g}" for x in o["per_seed"]) + f" | {v} |")
  lines += ["", "Verdict (rules of README.md):", ""]
  for p in ("sp", "mup"):
    lo, hi = table.get((p, widths[0])), table.get((p, widths[-1]))
    if lo is None or hi is None:
      continue
    steps = int(round(math.log2(hi["best"] / lo["best"])))
    shift = "—" if lo["vertex"] is None or hi["vertex"] is None else \
        f"{hi['vertex'] - lo['vertex']:+.2f}"
    lines.append(f"- {p}: optimum {lo['edge']}{lo['best']:g} at width {widths[0]}, "
                 f"{hi['edge']}{hi['best']:g} at width {widths[-1]}: {steps:+d} grid step(s); "
                 f"parabola vertices differ by {shift} in log2(lr)")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  keep = {float(x) for x in _LRS.value}
  table = {k: optimum({lr: v for lr, v in by_lr.items() if not keep or lr in keep})
           for k, by_lr in losses(_WORKDIR.value).items()}
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  plot(table, out / f"{_NAME.value}.png")
  text = markdown(table)
  flags_used = f" --lrs={','.join(_LRS.value)}" if _LRS.value else ""
  (out / f"{_NAME.value}.md").write_text(
      f"`python tools/mup_transfer.py --workdir={_WORKDIR.value} --out={_OUT.value} "
      f"--name={_NAME.value}{flags_used}`: seed-mean validation loss at step 300 (bold: the "
      "minimum)\n\n" + text)
  print(text)


if __name__ == "__main__":
  app.run(main)
