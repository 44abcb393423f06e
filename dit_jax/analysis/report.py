"""The results report of a scaling sweep: figures, results.md and a JSON summary from its rows.

Like with like. FIDs of different feature networks (`fid_metric`), sample counts
(`fid_num_samples`) or reference statistics (`fid_reference_fingerprint`) are different quantities:
the report has one section per combination of them. Within a section, each objective is one group:
ddpm and flow share the figures as separate series, every statistic is per group (their val_loss
is not even the same loss). Inside a section the runs must
share `batch_size`, and the grid runs (`budget_gflops` null) their final step: a sweep trained
differently is another experiment, so that is a ValueError naming the field, not a silent split.
Iso-FLOP runs (`budget_gflops` set) differ in steps by design and feed only the iso-FLOP analysis.

A member is a model (grid) or a (model, budget) pair (iso-FLOP); its runs are its seeds. A failed
run (status failed) or one without a final row is listed in results.md, never dropped silently;
failed rows carry no metric fields, so the list is report-wide.

The statistics are scaling_fit's. rho: Spearman of Gflops vs seed-mean final metric over the DiTs,
CI by resampling each model's seeds (none with one seed). Law: metric = a·C^-b (FID) or e + a·C^-b
(val_loss, which has an irreducible term: IRREDUCIBLE) fitted to the compute-optimal frontier of the
DiTs' evaluation points (seed means per (member, step)) with a bootstrap over models; its band is
the pointwise percentile interval of the bootstrap replicates' curves, a confidence band for the
mean law, not an interval for new runs. Prediction check: the law fitted without the held-out model
(default: the DiT of largest final compute) against its seed-mean final metric, with scaling_fit's
prediction interval at its final compute (its residual scatter is that of the frontier's seed means,
so it is an interval for a seed mean, not for one seed). The U-Nets are drawn and tabled but are in
none of these: the law is the DiTs'.

Figures (PNG and SVG) per metric present (fid, val_loss): <metric>_vs_gflops, _vs_steps,
_vs_compute, _prediction (with a prediction check), _isoflop (with iso-FLOP runs); with more than
one section each name ends in _<fid_metric>_<fid_num_samples>_<fid_reference_fingerprint>.
"""
import collections
import json
import math
import pathlib

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from dit_jax import files
from dit_jax import models
from dit_jax.analysis import scaling_fit

METRICS = ("fid", "val_loss")
# Metrics whose law has an irreducible term, y = e + a·C^-b: a denoising loss cannot reach 0 (even
# the exact posterior-mean denoiser has an ε-MSE > 0 at every t), so a pure power law through its
# fast-falling early points extrapolates below any loss a model can reach (measured: the 3-seed
# default's held-out DiT-Nano/2 at 0.0418 against a pure law's 90 % interval [0.0013, 0.0385]).
# FID keeps the paper's pure power law.
IRREDUCIBLE = ("val_loss",)
SECTION_FIELDS = ("fid_metric", "fid_num_samples", "fid_reference_fingerprint")
MARKERS = {1: "D", 2: "o", 4: "s", 8: "^", 16: "v", 32: "<"}
FILL = {"ddpm": "full", "flow": "none"}
LINE = {"ddpm": "-", "flow": "--"}
NAN = math.nan


def read(paths) -> list[dict]:
  """The rows of several results.jsonl files; a run in two files must have the same rows there."""
  rows, seen = [], {}
  for path in paths:
    if not pathlib.Path(path).is_file():
      raise ValueError(f"{path}: no such file")
    by_run = collections.defaultdict(list)
    for i, r in enumerate(files.read_jsonl(path)):
      if "run" not in r:
        raise ValueError(f"{path}: row {i + 1} has no 'run' field")
      by_run[r["run"]].append(r)
    for run, rs in by_run.items():
      text = json.dumps(rs, sort_keys=True)  # as text: NaN != NaN would make equal rows differ
      if run in seen:
        if seen[run][1] != text:
          raise ValueError(f"run {run!r} is in {seen[run][0]} and {path} with different rows")
        continue  # the same run copied into two files: once
      seen[run] = (path, text)
      rows.extend(rs)
  return rows


def _normalise(row) -> dict:
  """Fills what older rows lack: family/size/patch from the registry, objective ddpm, seed 0."""
  r = dict(row)
  if r.get("status", "ok") == "ok" and not all(k in r for k in ("family", "size", "patch")):
    family, size, patch = models.parse(r["model"])
    r = dict(dict(family=family.name, size=size, patch=patch), **r)
  r["objective"] = r.get("objective") or "ddpm"
  r["seed"] = 0 if r.get("seed") is None else r["seed"]
  r["budget_gflops"] = r.get("budget_gflops")
  return r


def _one_value(field, runs, what):
  """Raises unless every run's final row has the same `field` (missing counts as a value)."""
  vals = collections.OrderedDict()
  for rs in runs:
    vals.setdefault(json.dumps(rs[-1].get(field)), rs[-1]["run"])
  if len(vals) > 1:
    got = ", ".join(f"{v} ({run})" for v, run in vals.items())
    raise ValueError(f"{what}: runs differ in {field}: {got}; report them separately")


class Member:
  """One model (or model at one budget) of a group: its seeds' runs as step x seed arrays."""

  def __init__(self, runs):
    first = runs[0][-1]
    self.model, self.family, self.size = first["model"], first["family"], first["size"]
    self.patch, self.params, self.gflops = first["patch"], first.get("params"), first["gflops"]
    self.budget = first["budget_gflops"]
    self.label = self.model if self.budget is None else f"{self.model} @ {self.budget:.4g} GF"
    seeds = [rs[-1]["seed"] for rs in runs]
    if len(set(seeds)) < len(seeds):
      raise ValueError(f"{self.label}: two runs with the same seed "
                       f"({[rs[-1]['run'] for rs in runs]})")
    self.runs, self.seeds = [rs[-1]["run"] for rs in runs], seeds
    self.steps = sorted({r["step"] for rs in runs for r in rs})
    pos = {s: i for i, s in enumerate(self.steps)}
    self.values = {m: np.full((len(self.steps), len(runs)), NAN) for m in METRICS}
    comp = np.full((len(self.steps), len(runs)), NAN)
    self.finals = {m: np.full(len(runs), NAN) for m in METRICS}
    for j, rs in enumerate(runs):
      for r in rs:
        for m in METRICS:
          self.values[m][pos[r["step"]], j] = _num(r.get(m))
        comp[pos[r["step"]], j] = _num(r.get("train_compute_gflops"))
      for m in METRICS:
        self.finals[m][j] = _num(rs[-1].get(m))
    self.compute = _nanmean(comp, axis=1)
    self.final_compute = float(self.compute[pos[runs[0][-1]["step"]]])
    self.final_step = runs[0][-1]["step"]
    self.batch_size = first.get("batch_size")

  def has(self, metric) -> bool:
    return bool(np.isfinite(self.finals[metric]).any())

  def final(self, metric):
    """(mean, sample sd, n) over seeds of the final metric; sd NaN with one seed."""
    return _mean_sd(self.finals[metric])


def _num(v) -> float:
  return NAN if v is None else float(v)


def _nanmean(a, axis):
  ok = np.isfinite(a)
  with np.errstate(invalid="ignore"):
    return np.where(ok.any(axis), np.nansum(a, axis) / ok.sum(axis), NAN)


def _mean_sd(v):
  v = np.asarray(v, float)
  v = v[np.isfinite(v)]
  if not v.size:
    return NAN, NAN, 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else NAN, int(v.size)


def organise(rows):
  """-> ({section key: {objective: [Member]}}, problems): like-with-like checked, failures listed."""
  by_run = collections.defaultdict(list)
  for r in rows:
    by_run[r["run"]].append(_normalise(r))
  problems, sections = [], collections.defaultdict(lambda: collections.defaultdict(list))
  for run, rs in by_run.items():
    ok = [r for r in rs if r.get("status", "ok") == "ok"]
    bad = [r for r in rs if r.get("status", "ok") != "ok"]
    if not any(r.get("final") for r in ok):
      if bad:
        problems.append(f"failed: {run}: {bad[-1].get('error') or 'no error recorded'}")
      elif ok:
        last = max(ok, key=lambda r: r["step"])
        problems.append(f"missing: {run}: no final row (last evaluation at step {last['step']} "
                        f"of {last.get('num_train_steps', '?')})")
      continue
    if bad:
      problems.append(f"retried: {run} failed ({bad[-1].get('error')}) before it finished")
    steps = {}
    for r in ok:
      if r["step"] in steps and json.dumps(steps[r["step"]], sort_keys=True) != json.dumps(
          r, sort_keys=True):
        raise ValueError(f"run {run!r}: two different rows for step {r['step']}")
      steps[r["step"]] = r
    ok = sorted(steps.values(), key=lambda r: r["step"])
    if not ok[-1].get("final"):
      raise ValueError(f"run {run!r}: evaluations after its final row (step {ok[-1]['step']})")
    for f in SECTION_FIELDS + ("objective", "seed", "budget_gflops", "model"):
      # A validation-only row (no FID at that step) has no fid_metric: missing is not a value.
      if len({json.dumps(r.get(f)) for r in ok if r.get(f) is not None}) > 1:
        raise ValueError(f"run {run!r}: its rows differ in {f}")
    sections[tuple(ok[-1].get(f) for f in SECTION_FIELDS)][ok[-1]["objective"]].append(ok)
  out = {}
  for key, groups in sections.items():
    what = f"section {dict(zip(SECTION_FIELDS, key))}"
    all_runs = [rs for g in groups.values() for rs in g]
    _one_value("batch_size", all_runs, what)
    grid_runs = [rs for rs in all_runs if rs[-1]["budget_gflops"] is None]
    _one_value("step", grid_runs, what + " (final step of the grid runs)")
    _one_value("num_train_steps", grid_runs, what + " (grid runs)")
    out[key] = {}
    for objective, runs in groups.items():
      cells = collections.defaultdict(list)
      for rs in runs:
        cells[(rs[-1]["model"], rs[-1]["budget_gflops"])].append(rs)
      for v in cells.values():
        v.sort(key=lambda rs: rs[-1]["seed"])  # seeds in order, whichever finished first
      out[key][objective] = sorted((Member(v) for v in cells.values()),
                                   key=lambda m: (m.budget or 0, m.gflops))
  return out, problems


def _points(members, metric):
  """Seed means per (member, step): compute, value, member label (finite ones only)."""
  C, y, g = [], [], []
  for m in members:
    mean = _nanmean(m.values[metric], axis=1)
    for c, v in zip(m.compute, mean):
      if np.isfinite(c) and np.isfinite(v) and c > 0:
        C.append(c), y.append(v), g.append(m.label)
  return np.array(C), np.array(y), np.array(g)


def _fit_frontier(members, metric, n_boot, ci, seed):
  """(fit, frontier indices, points) of the power law on the frontier, or (None, reason)."""
  C, y, g = _points(members, metric)
  idx = scaling_fit.frontier(C, y) if len(C) else np.array([], int)
  offset = metric in IRREDUCIBLE
  need = 4 if offset else 3
  if len(idx) < need or len(set(g[idx])) < 2:  # a bootstrap over one model would show no spread
    return None, f"no power law: {len(idx)} frontier points from {len(set(g[idx]))} model(s) " \
        f"(needs {need} from 2)"
  try:
    fit = scaling_fit.fit_power_law(C[idx], y[idx], offset=offset, n_boot=n_boot, ci=ci,
                                    seed=seed, groups=g[idx])
  except ValueError as e:
    return None, f"no power law: {e}"
  return fit, (idx, C, y, g)


def _chinchilla(f, n, c):
  """The parametric L(N, D) at compute c (D = c / (k·N)): the fitted iso-FLOP curve."""
  return f["E"] + f["A"] / n ** f["alpha"] + f["B"] / (c / (f["k"] * n)) ** f["beta"]


def _band(fit, xs):
  """Pointwise percentile interval of the bootstrap replicates' curves: a band for the mean law."""
  bt = fit.boot[np.isfinite(fit.boot).all(axis=1)]
  curves = bt[:, 2:3] + bt[:, 0:1] * xs[None, :] ** -bt[:, 1:2]
  q = 50.0 * (1.0 - fit.ci)
  return np.percentile(curves, [q, 100.0 - q], axis=0)


def _law_summary(fit):
  out = dict(a=fit.a, b=fit.b, b_ci=fit.b_ci, a_ci=fit.a_ci, n_points=fit.n, r2=fit.r2)
  return dict(out, e=fit.e, e_ci=fit.e_ci) if fit.offset else out


def analyse(members, metric, holdout, n_boot, ci, seed) -> dict:
  """The statistics of one group and metric; keys with a leading '_' are for the figures only."""
  grid = [m for m in members if m.budget is None and m.has(metric)]
  dits = [m for m in grid if m.family == "DiT"]
  out = dict(ci=ci, rho=NAN, rho_ci=(NAN, NAN), rho_n=len(dits), rho_note="", law=None, law_note="",
             prediction=None, prediction_note="", isoflop=None, isoflop_note="")
  if len(dits) >= 3:
    seeds = max(len(m.seeds) for m in dits)
    y = np.full((len(dits), seeds), NAN)
    for i, m in enumerate(dits):
      y[i, :len(m.seeds)] = m.finals[metric]
    r = scaling_fit.spearman_with_ci([m.gflops for m in dits], y, n_boot=n_boot, ci=ci, seed=seed)
    out.update(rho=r["rho"], rho_ci=(r["lo"], r["hi"]), rho_per_seed=r["per_seed"])
    if not np.isfinite(r["lo"]):
      out["rho_note"] = "no CI: one seed per model, no seed noise to resample"
  else:
    out["rho_note"] = f"not computed: {len(dits)} DiT models (needs 3)"
  fit, info = _fit_frontier(dits, metric, n_boot, ci, seed)
  if fit is None:
    out["law_note"] = info
  else:
    out.update(law=_law_summary(fit), _fit=fit, _frontier=info)
  name = holdout if holdout is not None else (
      max(dits, key=lambda m: m.final_compute).model if dits else None)
  held = [m for m in dits if m.model == name]
  if holdout is False or name is None:
    out["prediction_note"] = "no prediction check (none asked for)" if holdout is False else \
        "no prediction check: no DiT models"
  elif not held:
    out["prediction_note"] = f"no prediction check: {name} is not a DiT grid model of this group"
  else:
    h = held[0]
    fit_h, info_h = _fit_frontier([m for m in dits if m is not h], metric, n_boot, ci, seed)
    if fit_h is None:
      out["prediction_note"] = f"no prediction check without {name}: {info_h}"
    else:
      lo, hi = fit_h.prediction_interval(h.final_compute, ci, seed=seed)
      mean, sd, n = h.final(metric)
      out["prediction"] = dict(
          model=name, compute=h.final_compute, predicted=float(fit_h.predict(h.final_compute)),
          lo=float(lo), hi=float(hi), measured=mean, measured_sd=sd, n_seeds=n,
          seeds=dict(zip(map(str, h.seeds), h.finals[metric].tolist())),
          inside=bool(lo <= mean <= hi), law=_law_summary(fit_h), formula=fit_h.formula())
      out.update(_pfit=fit_h, _pfrontier=info_h, _held=h)
  iso = [m for m in members if m.budget is not None and m.has(metric)]
  if iso:
    out.update(_isoflop(iso, metric, n_boot, ci, seed))
  return out


def _isoflop(iso, metric, n_boot, ci, seed) -> dict:
  """isoflop_optimum on every finished iso-FLOP run (seeds as repeated runs), N = Gflops/image."""
  B, N, L, D = [], [], [], []
  for m in iso:
    for v in m.finals[metric]:
      B.append(m.budget), N.append(m.gflops), L.append(v)
      D.append(m.final_step * m.batch_size if m.batch_size else NAN)
  d = np.array(D) if np.isfinite(D).all() else None  # images seen; else budget/N
  try:
    r = scaling_fit.isoflop_optimum(B, N, L, d_R=d, n_boot=n_boot, ci=ci, seed=seed)
  except (ValueError, np.linalg.LinAlgError) as e:
    return dict(isoflop_note=f"no iso-FLOP fit: {e}")
  par, pb = r["parametric"], r["parabola"]
  per = [dict(budget=p["budget"], n_opt=p["n_opt"], n_opt_ci=p["n_opt_ci"])
         for p in par["per_budget"]]
  return dict(isoflop=dict(method=r["method"], a=r["a"], a_ci=r["a_ci"], per_budget=per,
                           parabola_a=pb["a"], parabola_a_ci=pb["a_ci"],
                           fit={k: par[k] for k in ("E", "A", "alpha", "B", "beta", "k")}),
              _iso=iso)


# --- Figures ---
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
  lo, hi = _band(fit, xs)
  ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0,
                  label=f"{100 * fit.ci:.0f}% band of the mean law (bootstrap over models){tag}")


def figures(groups, metric, ylabel, out, suffix) -> list:
  """The section's figures for one metric; groups = {objective: (members, stats)}. -> names."""
  made, style = [], _styles({o: ms for o, (ms, _) in groups.items()})
  grid = {o: [m for m in ms if m.budget is None and m.has(metric)] for o, (ms, _) in groups.items()}
  all_grid = [m for ms in grid.values() for m in ms]
  if all_grid:
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
    _save(fig, out, f"{metric}_vs_gflops{suffix}", made)

    fig, ax = _axes()
    for o, ms in grid.items():
      for m in ms:
        v = m.values[metric]
        ok = np.isfinite(v).sum(1)
        sd = np.array([np.nanstd(r, ddof=1) if k > 1 else NAN for r, k in zip(v, ok)])
        ax.errorbar(m.steps, _nanmean(v, axis=1), yerr=None if np.isnan(sd).all() else sd,
                    capsize=2, **style(m, o))
    ax.set(xlabel="training steps", ylabel=ylabel, title=f"{ylabel} during training")
    _legend(ax, title=_seed_note(all_grid, metric))
    _save(fig, out, f"{metric}_vs_steps{suffix}", made)

    fig, ax = _axes()
    for o, ms in grid.items():
      for m in ms:
        st = style(m, o)
        ax.plot(m.compute, _nanmean(m.values[metric], axis=1), alpha=0.5, lw=0.8, **st)
      stats = groups[o][1]
      if "_frontier" in stats:
        idx, C, y, _ = stats["_frontier"]
        ls = LINE.get(o, ":")
        ax.plot(C[idx], y[idx], color="k", ls=ls, lw=2, alpha=0.4, label=f"frontier ({o})")
        xs = np.geomspace(C.min(), C.max(), 60)
        _draw_law(ax, stats["_fit"], xs, "crimson", ls, f" ({o})" if len(groups) > 1 else "")
    ax.set(xscale="log", yscale="log", ylabel=ylabel, title=f"{ylabel} vs training compute",
           xlabel="training compute C (Gflops = 3 · Gflops · batch · steps)")
    _legend(ax, title="points: seed means per (model, step); law fitted to the DiT frontier")
    _save(fig, out, f"{metric}_vs_compute{suffix}", made)

  preds = {o: s for o, (_, s) in groups.items() if s.get("prediction")}
  if preds:
    fig, ax = _axes()
    for o, s in preds.items():
      idx, C, y, _ = s["_pfrontier"]
      p, h = s["prediction"], s["_held"]
      ax.plot(C[idx], y[idx], "o", color="0.5", ms=4, label=f"frontier without {p['model']} ({o})")
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
    _save(fig, out, f"{metric}_prediction{suffix}", made)

  isos = {o: s for o, (_, s) in groups.items() if s.get("isoflop")}
  if isos:
    fig, (ax, bx) = _axes(2)
    titles = []
    for o, s in isos.items():
      iso, r = s["_iso"], s["isoflop"]
      budgets = sorted({m.budget for m in iso})
      cmap = matplotlib.colormaps["plasma"].resampled(len(budgets) + 1)
      f = r["fit"]
      for i, c in enumerate(budgets):
        ms = sorted((m for m in iso if m.budget == c), key=lambda m: m.gflops)
        n = np.array([m.gflops for m in ms])
        stats = [m.final(metric) for m in ms]
        ax.errorbar(n, [t[0] for t in stats], yerr=[t[1] if t[2] > 1 else 0 for t in stats],
                    color=cmap(i), marker="o", ls=LINE.get(o, ":"), capsize=2,
                    label=f"C = {c:.3g} GF ({o})")
        ns = np.geomspace(n.min() / 1.5, n.max() * 1.5, 80)
        ax.plot(ns, _chinchilla(f, ns, c), color=cmap(i), lw=0.8, alpha=0.6)
      per = r["per_budget"]
      b = np.array([p["budget"] for p in per])
      no = np.array([p["n_opt"] for p in per])
      lo, hi = (np.array([p["n_opt_ci"][j] for p in per]) for j in (0, 1))
      ax.errorbar(no, _chinchilla(f, no, b), xerr=[no - lo, hi - no], fmt="*", color="k", ms=9,
                  capsize=3, label=f"optimum per budget, {100 * s['ci']:.0f}% CI ({o})")
      bx.errorbar(b, no, yerr=[no - lo, hi - no], fmt="o", capsize=3, label=f"N_opt ({o})")
      bs = np.geomspace(b.min() / 1.5, b.max() * 1.5, 20)
      bx.plot(bs, no[0] * (bs / b[0]) ** r["a"], "k", ls=LINE.get(o, ":"), lw=1,
              label=f"N_opt ∝ C^{r['a']:.3f} ({o})")
      titles.append(f"{o}: a = {r['a']:.3f} [{100 * s['ci']:.0f}% CI {r['a_ci'][0]:.3f}, "
                    f"{r['a_ci'][1]:.3f}]")
    ax.set(xscale="log", xlabel="model size N (forward Gflops per image)", ylabel=f"final {ylabel}",
           title="iso-FLOP curves (lines: parametric L(N, D) fit)")
    _legend(ax, title=_seed_note([m for s in isos.values() for m in s["_iso"]], metric),
            outside=False)
    bx.set(xscale="log", yscale="log", xlabel="training compute budget C (Gflops)",
           ylabel="N_opt (Gflops per image)", title="; ".join(titles))
    _legend(bx, title="bars: CI of N_opt (parametric bootstrap)", outside=False)
    _save(fig, out, f"{metric}_isoflop{suffix}", made)
  return made


# --- results.md and the summary ---
def _f(x, fmt=".4g") -> str:
  return "–" if x is None or not np.isfinite(x) else format(x, fmt).replace("-", "−")


def _cell(mean, sd, n) -> str:
  if n == 0:
    return "–"
  return f"{_f(mean)} ± {_f(sd, '.2g')} (n={n})" if n > 1 else f"{_f(mean)} (n=1)"


def _group_md(title, members, stats, labels, fig_names) -> list:
  """One group's table and statistics as markdown lines."""
  metrics = list(stats)
  lines = [f"## {title}", "", "| model | seeds | params (M) | Gflops | final step | train compute "
           "(Gflops) | " + " | ".join(f"final {labels[m]}" for m in metrics) + " |",
           "|---|---|---:|---:|---:|---:|" + "---:|" * len(metrics)]
  for m in members:
    params = "–" if m.params is None else f"{m.params / 1e6:.2f}"
    lines.append(f"| {m.label} | {', '.join(map(str, m.seeds))} | {params} | {m.gflops:.4g} | "
                 f"{m.final_step} | {m.final_compute:.4g} | "
                 + " | ".join(_cell(*m.final(k)) for k in metrics) + " |")
  for metric, s in stats.items():
    name, pc = labels[metric], f"{100 * s['ci']:.0f} %"
    lines += ["", f"**{name}**", ""]
    if np.isfinite(s["rho"]):
      lo, hi = s["rho_ci"]
      ci_text = s["rho_note"] or f"{pc} CI over seeds [{_f(lo, '.3f')}, {_f(hi, '.3f')}]"
      lines.append(f"- Spearman ρ(Gflops, final {name}) over the {s['rho_n']} DiTs (seed means): "
                   f"{_f(s['rho'], '.3f')}; {ci_text}")
    else:
      lines.append(f"- Spearman ρ: {s['rho_note']}")
    if s["law"]:
      w = s["law"]
      law_name = "FID" if metric == "fid" else name
      lead = f"{w['e']:.4g} + " if "e" in w else ""
      floor = (f", irreducible e = {w['e']:.4g} [{pc} CI {_f(w['e_ci'][0])}, {_f(w['e_ci'][1])}]"
               if "e" in w else "")
      lines.append(f"- Law on the compute-optimal frontier of the DiTs' evaluation points "
                   f"({w['n_points']} points, bootstrap over models): {law_name} = {lead}"
                   f"{w['a']:.4g}·C^−{w['b']:.4g}, b = {w['b']:.3f} [{pc} CI "
                   f"{_f(w['b_ci'][0], '.3f')}, {_f(w['b_ci'][1], '.3f')}]{floor}, R² (log) "
                   f"{w['r2']:.3f}; C in Gflops")
    else:
      lines.append(f"- Law: {s['law_note']}")
    p = s["prediction"]
    if p:
      seeds = ", ".join(f"seed {k}: {_f(v)}" for k, v in p["seeds"].items())
      lines.append(f"- Prediction check, law fitted without {p['model']} (b = {p['law']['b']:.3f}):"
                   f" predicted {_f(p['predicted'])} at its final C = {p['compute']:.4g} Gflops, "
                   f"{pc} prediction interval [{_f(p['lo'])}, {_f(p['hi'])}]; measured seed mean "
                   f"{_f(p['measured'])} ({seeds}): "
                   + ("**inside**" if p["inside"] else "**outside**: the law does not predict it"))
    else:
      lines.append(f"- {s['prediction_note']}")
    r = s["isoflop"]
    if r:
      per = "; ".join(f"C = {q['budget']:.4g}: N_opt = {_f(q['n_opt'])} [{_f(q['n_opt_ci'][0])}, "
                      f"{_f(q['n_opt_ci'][1])}]" for q in r["per_budget"])
      lines.append(f"- Iso-FLOP (parametric L(N, D), Chinchilla Approach 3): N_opt ∝ C^a, a = "
                   f"{_f(r['a'], '.3f')} [{pc} CI {_f(r['a_ci'][0], '.3f')}, "
                   f"{_f(r['a_ci'][1], '.3f')}]; per budget (Gflops; N in Gflops per image): "
                   f"{per}. Parabolas (Approach 2): a = {_f(r['parabola_a'], '.3f')}")
    elif s["isoflop_note"]:
      lines.append(f"- {s['isoflop_note']}")
  lines += [""] + [f"![{n}]({n}.png)" for n in fig_names] + [""]
  return lines


def _clean(x):
  """JSON-ready: numpy to Python, NaN to None, '_'-keys (figure data) dropped."""
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items() if not str(k).startswith("_")}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_clean(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def write(rows, out_dir, *, holdout=None, ci=0.9, n_boot=1000, seed=0, plots=True) -> dict:
  """Figures (PNG and SVG), results.md and the returned JSON-ready summary of a sweep's rows.

  holdout: a DiT model name for the prediction check (all its seeds held out), None for the DiT of
  largest final compute in each group, False for no check. Raises ValueError on rows that mix what
  cannot be compared (see the module docstring) or hold no finished run. plots=False: results.md
  and the summary only (drawing is most of the time).
  """
  sections, problems = organise(rows)
  if not sections:
    raise ValueError("no finished run to report" + "".join(f"; {p}" for p in problems))
  if holdout:
    known = {m.model for g in sections.values() for ms in g.values() for m in ms
             if m.family == "DiT" and m.budget is None}
    if holdout not in known:
      raise ValueError(f"holdout {holdout!r} is not a DiT grid model of these rows: "
                       f"{sorted(known)}")
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  n_runs = len({r["run"] for r in rows})
  md = ["# Scaling results", "", f"{len(rows)} rows of {n_runs} runs. Intervals are "
        f"{100 * ci:.0f} % percentile bootstraps ({n_boot} replicates, seed {seed}); ± and error "
        "bars are the sample sd over seeds (none with one seed). Sections never mix feature "
        "networks, sample counts or FID references.", ""]
  summary = dict(rows=len(rows), runs=n_runs, ci=ci, n_boot=n_boot, seed=seed, failed=problems,
                 groups=[], figures=[])
  for key, groups in sorted(sections.items(), key=lambda kv: json.dumps(kv[0])):
    info = dict(zip(SECTION_FIELDS, key))
    suffix = "" if len(sections) == 1 else "_" + "_".join(
        "".join(c if c.isalnum() else "-" for c in str(v)) for v in key if v is not None)
    labels = dict(fid=info["fid_metric"] or "fid", val_loss="val_loss")
    stats = {o: {k: analyse(ms, k, holdout, n_boot, ci, seed) for k in METRICS
                 if any(m.has(k) for m in ms)} for o, ms in groups.items()}
    names = []
    for k in METRICS:
      gs = {o: (ms, stats[o][k]) for o, ms in groups.items() if k in stats[o]}
      if gs and plots:
        names += figures(gs, k, labels[k], out, suffix)
    summary["figures"] += names
    samples = f"{info['fid_num_samples']} samples" if info["fid_num_samples"] else "samples: n/a"
    for o, ms in groups.items():
      ref = info["fid_reference_fingerprint"]
      title = f"{labels['fid']}, {samples}{f' vs reference {ref}' if ref else ''} · objective {o}"
      md += _group_md(title, ms, stats[o], labels, names if o == next(iter(groups)) else [])
      summary["groups"].append(dict(info, objective=o, members=[m.label for m in ms],
                                    failed=problems, metrics=stats[o]))
  md += ["## Failed or missing runs", ""] + ([f"- {p}" for p in problems] or ["none"]) + [""]
  files.atomic_write_text(out / "results.md", "\n".join(md))
  return _clean(summary)
