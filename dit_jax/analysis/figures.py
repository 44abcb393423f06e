"""The report's figures (PNG and SVG) of one section and metric, one function per kind.

<metric>_vs_gflops (the DiT paper's Fig. 8 right), _vs_steps (Fig. 8 left), _vs_compute (Fig. 9,
with the frontier and its law), _prediction (with a prediction check), _isoflop (with iso-FLOP
runs). DiTs are coloured by size with a marker per patch; ddpm draws full markers and solid lines,
flow open markers and dashed; the U-Nets are grey stars.
"""
import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from dit_jax.analysis import isoflop
from dit_jax.analysis import rows
from dit_jax.models import flops

MARKERS = {1: "D", 2: "o", 4: "s", 8: "^", 16: "v", 32: "<"}
FILL = {"ddpm": "full", "flow": "none"}
LINE = {"ddpm": "-", "flow": "--"}
NAN = rows.NAN


def _styles(members_by_obj):
  """Member label and objective -> plot style: DiTs coloured by size, marker by patch."""
  dits = [m for ms in members_by_obj.values() for m in ms if m.family == "DiT"]
  sizes = sorted({m.size for m in dits}, key=lambda s: min(m.gflops for m in dits if m.size == s))
  # viridis stops short of its pale yellow end, which vanishes on white
  col = {s: matplotlib.colormaps["viridis"](0.85 * i / max(len(sizes) - 1, 1))
         for i, s in enumerate(sizes)}
  tag = len(members_by_obj) > 1

  def style(m, objective):
    dit = m.family == "DiT"
    return dict(color=col[m.size] if dit else "0.35", marker=MARKERS.get(m.patch, "x") if dit
                else "*", fillstyle=FILL.get(objective, "full"), ls=LINE.get(objective, ":"),
                label=f"{m.label}{f' ({objective})' if tag else ''}")
  return style


def _seed_note(members, metric) -> str:
  n = sorted({int(np.isfinite(m.finals[metric]).sum()) for m in members})
  if n[-1] < 2:
    return "one seed per model: no error bars"
  return f"mean ± sample sd over seeds (n = {n[0]}–{n[-1]})" if n[0] != n[-1] else \
      f"mean ± sample sd over seeds (n = {n[0]})"


def _save(fig, out, name, made):
  plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
  for ax in fig.axes:  # decades only on x (minor labels overlap); plain numbers on y
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if ax.get_yscale() == "log":
      lo, hi = ax.get_ylim()
      ax.yaxis.set_major_formatter(plain)
      ax.yaxis.set_minor_formatter(plain if hi / lo < 10 else matplotlib.ticker.NullFormatter())
  for ext in ("png", "svg"):
    fig.savefig(out / f"{name}.{ext}", dpi=130, bbox_inches="tight")
  made.append(name)


def _legend(ax, title=None, fontsize=6, outside=True):
  """Beside the axes by default: the many members' entries would hide the points."""
  where = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0) if outside else {}
  ax.legend(fontsize=fontsize, title=title, title_fontsize=6, **where)


def _axes(ncols=1):
  fig = Figure(figsize=(5.6 * ncols, 4.2))
  return fig, fig.subplots(1, ncols)


def _draw_law(ax, fit, xs, color, ls, tag=""):
  ax.plot(xs, fit.predict(xs), color=color, ls=ls, lw=1.2, label=f"{fit.formula('y')}{tag}")
  lo, hi = fit.band(xs)
  ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0,
                  label=f"{100 * fit.ci:.0f}% band of the mean law (bootstrap over models){tag}")


def _vs_gflops(grid, metric, ylabel, style):
  """Final metric (seed mean ± sd) against forward Gflops, one point per grid member."""
  all_grid = [m for ms in grid.values() for m in ms]
  fig, ax = _axes()
  for o, ms in grid.items():
    for m in ms:
      mean, sd, _ = m.final(metric)
      st = style(m, o)
      ax.errorbar(m.gflops, mean, yerr=None if np.isnan(sd) else sd, ms=7, capsize=3, **dict(
          st, ls="none"))
  ax.set(xscale="log", xlabel="forward Gflops (one image)", ylabel=ylabel,
         title=f"final {ylabel} vs model Gflops (step {all_grid[0].final_step})")
  _legend(ax, title=_seed_note(all_grid, metric))
  return fig


def _vs_steps(grid, metric, ylabel, style):
  """The metric during training (seed mean ± sd per evaluation step), one line per member."""
  fig, ax = _axes()
  for o, ms in grid.items():
    for m in ms:
      v = m.values[metric]
      ok = np.isfinite(v).sum(1)
      sd = np.array([np.nanstd(r, ddof=1) if k > 1 else NAN for r, k in zip(v, ok)])
      ax.errorbar(m.steps, rows.nanmean(v, axis=1), yerr=None if np.isnan(sd).all() else sd,
                  capsize=2, **style(m, o))
  ax.set(xlabel="training steps", ylabel=ylabel, title=f"{ylabel} during training")
  _legend(ax, title=_seed_note([m for ms in grid.values() for m in ms], metric))
  return fig


def _vs_compute(grid, groups, metric, ylabel, style):
  """The metric against training compute with each group's DiT frontier and its law and band."""
  fig, ax = _axes()
  for o, ms in grid.items():
    for m in ms:
      st = style(m, o)
      ax.plot(m.compute, rows.nanmean(m.values[metric], axis=1), alpha=0.5, lw=0.8, **st)
    stats = groups[o][1]
    if "_frontier" in stats:
      idx, C, y, _, info = stats["_frontier"]
      ls = LINE.get(o, ":")
      idx = idx[np.argsort(C[idx])]
      ax.plot(C[idx], y[idx], "s", color="k", mfc="none", ms=8, alpha=0.6,
              label=f"{'frontier' if info['frontier'] else 'points'} of the law ({o})")
      xs = np.geomspace(C.min(), C.max(), 60)
      _draw_law(ax, stats["_fit"], xs, "crimson", ls, f" ({o})" if len(groups) > 1 else "")
  ax.set(xscale="log", yscale="log", ylabel=ylabel, title=f"{ylabel} vs training compute",
         xlabel=f"training compute C (Gflops = {flops.TRAIN_FORWARD_PASSES} · Gflops · batch · "
         "steps)")
  _legend(ax, title="seed means per (model, step); law fitted to the squares (analysis.laws.Rules)")
  return fig


def _prediction(preds, metric, ylabel):
  """Each group's law without the held-out DiT, its prediction interval and the measured seeds."""
  fig, ax = _axes()
  for o, s in preds.items():
    idx, C, y, _, _ = s["_pfrontier"]
    p, h = s["prediction"], s["_held"]
    ax.plot(C[idx], y[idx], "o", color="0.5", ms=4,
            label=f"fitted: compute ≤ 1/{s['_rules'].compute_ratio:g} of {p['model']}'s ({o})")
    xs = np.geomspace(C.min(), max(C.max(), p["compute"]) * 1.2, 60)
    _draw_law(ax, s["_pfit"], xs, "crimson", LINE.get(o, ":"))
    ax.errorbar(p["compute"], p["predicted"], yerr=[[max(p["predicted"] - p["lo"], 0)],
                [max(p["hi"] - p["predicted"], 0)]], fmt="D", color="crimson", capsize=5,
                label=f"predicted, {100 * s['_pfit'].ci:.0f}% prediction interval")
    ax.plot(np.full(len(h.seeds), p["compute"]), h.finals[metric], "x", color="navy",
            label=f"measured seeds of {p['model']}")
    ax.plot(p["compute"], p["measured"], "o", color="navy", fillstyle="none", ms=9,
            label=f"measured seed mean ({'inside' if p['inside'] else 'OUTSIDE'})")
  ax.set(xscale="log", yscale="log", xlabel="training compute C (Gflops)", ylabel=ylabel,
         title=f"does the law predict? ({ylabel})")
  _legend(ax)
  return fig


def _isoflop_curves(ax, iso, metric, f, ls, o):
  """Per budget: its runs' final metric (seed mean ± sd) against N and the fitted L(N, D) there."""
  budgets = sorted({m.budget for m in iso})
  cmap = matplotlib.colormaps["plasma"].resampled(len(budgets) + 1)
  for i, c in enumerate(budgets):
    ms = sorted((m for m in iso if m.budget == c), key=lambda m: m.gflops)
    n = np.array([m.gflops for m in ms])
    stats = [m.final(metric) for m in ms]
    ax.errorbar(n, [t[0] for t in stats], yerr=[t[1] if t[2] > 1 else 0 for t in stats],
                color=cmap(i), marker="o", ls=ls, capsize=2, label=f"C = {c:.3g} GF ({o})")
    ns = np.geomspace(n.min() / 1.5, n.max() * 1.5, 80)
    ax.plot(ns, isoflop.loss_at_compute(f, ns, c), color=cmap(i), lw=0.8, alpha=0.6)


def _isoflop(isos, metric, ylabel):
  """Left: iso-FLOP curves with the optimum per budget; right: N_opt against the budget."""
  fig, (ax, bx) = _axes(2)
  titles = []
  for o, s in isos.items():
    r, f, ls = s["isoflop"], s["isoflop"]["fit"], LINE.get(o, ":")
    _isoflop_curves(ax, s["_iso"], metric, f, ls, o)
    per = r["per_budget"]
    b = np.array([p["budget"] for p in per])
    no = np.array([p["n_opt"] for p in per])
    lo, hi = (np.array([p["n_opt_ci"][j] for p in per]) for j in (0, 1))
    ax.errorbar(no, isoflop.loss_at_compute(f, no, b), xerr=[no - lo, hi - no], fmt="*",
                color="k", ms=9, capsize=3, label=f"optimum per budget, {100 * s['ci']:.0f}% CI "
                f"({o})")
    bx.errorbar(b, no, yerr=[no - lo, hi - no], fmt="o", capsize=3, label=f"N_opt ({o})")
    bs = np.geomspace(b.min() / 1.5, b.max() * 1.5, 20)
    bx.plot(bs, no[0] * (bs / b[0]) ** r["a"], "k", ls=ls, lw=1, label=f"N_opt ∝ C^{r['a']:.3f} "
            f"({o})")
    titles.append(f"{o}: a = {r['a']:.3f} [{100 * s['ci']:.0f}% CI {r['a_ci'][0]:.3f}, "
                  f"{r['a_ci'][1]:.3f}]")
  ax.set(xscale="log", xlabel="model size N (forward Gflops per image)", ylabel=f"final {ylabel}",
         title="iso-FLOP curves (lines: parametric L(N, D) fit)")
  _legend(ax, title=_seed_note([m for s in isos.values() for m in s["_iso"]], metric),
          outside=False)
  bx.set(xscale="log", yscale="log", xlabel="training compute budget C (Gflops)",
         ylabel="N_opt (Gflops per image)", title="; ".join(titles))
  _legend(bx, title="bars: CI of N_opt (parametric bootstrap)", outside=False)
  return fig


def figures(groups, metric, ylabel, out, suffix) -> list:
  """The section's figures for one metric; groups = {objective: (members, stats)}. -> names.

  Each is saved as out/<metric>_<kind><suffix>.png and .svg; the names come back in drawing order.
  """
  made, style = [], _styles({o: ms for o, (ms, _) in groups.items()})
  grid = {o: [m for m in ms if m.budget is None and m.has(metric)] for o, (ms, _) in groups.items()}

  def save(fig, kind):
    _save(fig, out, f"{metric}_{kind}{suffix}", made)

  if any(grid.values()):
    save(_vs_gflops(grid, metric, ylabel, style), "vs_gflops")
    save(_vs_steps(grid, metric, ylabel, style), "vs_steps")
    save(_vs_compute(grid, groups, metric, ylabel, style), "vs_compute")
  preds = {o: s for o, (_, s) in groups.items() if s.get("prediction")}
  if preds:
    save(_prediction(preds, metric, ylabel), "prediction")
  isos = {o: s for o, (_, s) in groups.items() if s.get("isoflop")}
  if isos:
    save(_isoflop(isos, metric, ylabel), "isoflop")
  return made
