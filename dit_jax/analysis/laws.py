"""The statistics of one group and metric: rho, the law, its prediction check, the iso-FLOP
optimum (bootstrap, power_law and isoflop on arrays built from the members).

rho: Spearman of Gflops vs seed-mean final metric over the DiTs, CI by resampling each model's seeds
(none with one seed). Law: metric = a·C^-b (FID, FID∞, KID) or e + a·C^-b (val_loss, which has an
irreducible term: IRREDUCIBLE), fitted to the DiTs' seed-mean points (per member and step) that the
fit rules keep (Rules: by default final points only, so no warm-up or early-transient point; all
kept points when they are final ones, else their compute-optimal frontier), with a bootstrap over
models; its band (PowerLawFit.band) is the pointwise percentile interval of the bootstrap
replicates' curves, a confidence band for the mean law, not an interval for new runs. Prediction
check: the law fitted on the DiTs whose final compute is <= 1/Rules.compute_ratio of the held-out
model's (default: the DiT of largest final compute) against its seed-mean final metric, with the
fit's prediction interval at its final compute (its residual scatter is that of seed means, so it is
an interval for a seed mean, not for one seed), the error in % and the interval's half-width in %.
Iso-FLOP: isoflop_optimum over the finished iso-FLOP runs. The U-Nets are in none of these: the law
is the DiTs'.
"""
import dataclasses
import math

import numpy as np

from dit_jax.analysis import bootstrap
from dit_jax.analysis import isoflop
from dit_jax.analysis import power_law
from dit_jax.analysis import rows

# Metrics whose law has an irreducible term, y = e + a·C^-b: a denoising loss cannot reach 0 (even
# the exact posterior-mean denoiser has an ε-MSE > 0 at every t), so a pure power law through its
# fast-falling early points extrapolates below any loss a model can reach (measured: the 3-seed
# default's held-out DiT-Nano/2 at 0.0418 against a pure law's 90 % interval [0.0013, 0.0385]).
# FID keeps the paper's pure power law.
IRREDUCIBLE = ("val_loss",)
NAN = math.nan


@dataclasses.dataclass(frozen=True)
class Rules:
  """Which points a law may use and what the prediction check extrapolates, fixed before a run
  (config.sweep.fit; tools/plot_scaling.py's flags). A point (seed mean of one member at one
  evaluation step) is kept when step >= min_fraction x its run's final step and step >= min_step:
  the warm-up and the early transient, where the loss falls for reasons other than model size,
  are out. With every kept point a final one (min_fraction 1, the default) the law is fitted to
  every member's final point; with learning curves in, to their compute-optimal frontier. The
  prediction check fits only members whose final compute is <= 1/compute_ratio of the held-out's.
  """
  min_fraction: float = 1.0
  min_step: int = 0
  compute_ratio: float = 4.0

  def __post_init__(self):
    if not 0 <= self.min_fraction <= 1 or self.min_step < 0 or self.compute_ratio < 1:
      raise ValueError(f"fit rules: min_fraction in [0, 1], min_step >= 0 and compute_ratio >= 1, "
                       f"got {self.min_fraction}, {self.min_step}, {self.compute_ratio}")

  def text(self) -> str:
    rule = f"step ≥ {self.min_fraction:g} × the run's final step"
    return rule + (f" and ≥ {self.min_step}" if self.min_step else "")


def _points(members, metric, rules):
  """Seed means per (member, step) kept by the rules: compute, value, member label, step, whether
  final; and the counts (kept, removed by the rules, non-positive values dropped)."""
  C, y, g, st, fin, removed, nonpos = [], [], [], [], [], 0, 0
  for m in members:
    mean = rows.nanmean(m.values[metric], axis=1)
    for c, v, step in zip(m.compute, mean, m.steps):
      if not (np.isfinite(c) and np.isfinite(v) and c > 0):
        continue
      if step < rules.min_fraction * m.final_step or step < rules.min_step:
        removed += 1
      elif v <= 0:  # an unbiased estimate (KID) can fall below 0; a power law in log y cannot
        nonpos += 1
      else:
        C.append(c), y.append(v), g.append(m.label), st.append(step)
        fin.append(step == m.final_step)
  return (np.array(C), np.array(y), np.array(g), np.array(st, int), np.array(fin, bool),
          dict(kept=len(C), removed=removed, nonpositive=nonpos))


def _fit_frontier(members, metric, n_boot, ci, seed, rules):
  """(fit, (indices, C, y, g, info)) of the power law on the rules' points (all of them when all
  are final, else their frontier), or (None, reason)."""
  C, y, g, st, fin, counts = _points(members, metric, rules)
  why = f"{counts['removed']} point(s) removed by the rule ({rules.text()})"
  if counts["nonpositive"]:
    why += f", {counts['nonpositive']} non-positive value(s) dropped"
  if not len(C):
    if not counts["removed"]:
      return None, "no law: no DiT evaluation point" + (f" ({why})" if counts["nonpositive"] else "")
    return None, f"no law: every point is inside the excluded transient ({why})"
  idx = np.arange(len(C)) if fin.all() else power_law.frontier(C, y)
  offset = metric in IRREDUCIBLE
  need = 4 if offset else 3
  if len(idx) < need or len(set(g[idx])) < 2:  # a bootstrap over one model would show no spread
    return None, f"no power law: {len(idx)} points from {len(set(g[idx]))} model(s) " \
        f"(needs {need} from 2; {why})"
  try:
    fit = power_law.fit_power_law(C[idx], y[idx], offset=offset, n_boot=n_boot, ci=ci,
                                  seed=seed, groups=g[idx])
  except ValueError as e:
    return None, f"no power law: {e}"
  used = [f"{g[i]} @ {st[i]}" for i in idx]
  info = dict(counts, used=used, rule=rules.text(), frontier=not fin.all())
  return fit, (idx, C, y, g, info)


def _law_summary(fit, info):
  out = dict(a=fit.a, b=fit.b, b_ci=fit.b_ci, a_ci=fit.a_ci, n_points=fit.n, r2=fit.r2,
             points=info[4])
  return dict(out, e=fit.e, e_ci=fit.e_ci) if fit.offset else out


def _rho(dits, metric, n_boot, ci, seed) -> dict:
  """Spearman's rho over the DiTs with its seed CI, or the note saying why there is none."""
  if len(dits) < 3:
    return dict(rho_note=f"not computed: {len(dits)} DiT models (needs 3)")
  seeds = max(len(m.seeds) for m in dits)
  y = np.full((len(dits), seeds), NAN)
  for i, m in enumerate(dits):
    y[i, :len(m.seeds)] = m.finals[metric]
  r = bootstrap.spearman_with_ci([m.gflops for m in dits], y, n_boot=n_boot, ci=ci, seed=seed)
  out = dict(rho=r["rho"], rho_ci=(r["lo"], r["hi"]), rho_per_seed=r["per_seed"])
  if not np.isfinite(r["lo"]):
    out["rho_note"] = "no CI: one seed per model, no seed noise to resample"
  return out


def _prediction(dits, metric, holdout, n_boot, ci, seed, rules) -> dict:
  """The prediction check of the held-out DiT (see the module docstring), or its note."""
  name = holdout if holdout is not None else (
      max(dits, key=lambda m: m.final_compute).model if dits else None)
  held = [m for m in dits if m.model == name]
  if holdout is False or name is None:
    return dict(prediction_note="no prediction check (none asked for)" if holdout is False else
                "no prediction check: no DiT models")
  if not held:
    return dict(prediction_note=f"no prediction check: {name} is not a DiT grid model of this "
                "group")
  h = held[0]
  limit = h.final_compute / rules.compute_ratio
  fitted = [m for m in dits if m is not h and m.final_compute <= limit * (1 + 1e-9)]
  fit_h, info_h = _fit_frontier(fitted, metric, n_boot, ci, seed, rules)
  if fit_h is None:
    return dict(prediction_note=f"no prediction check of {name} from the {len(fitted)} DiT(s) "
                f"of final compute ≤ 1/{rules.compute_ratio:g} of its: {info_h}")
  lo, hi = fit_h.prediction_interval(h.final_compute, ci, seed=seed)
  mean, sd, n = h.final(metric)
  pred = float(fit_h.predict(h.final_compute))
  largest = max(m.final_compute for m in fitted)
  prediction = dict(
      model=name, compute=h.final_compute, predicted=pred, lo=float(lo), hi=float(hi),
      measured=mean, measured_sd=sd, n_seeds=n, error_pct=100 * (pred - mean) / mean,
      half_width_pct=100 * (hi - lo) / 2 / pred, extrapolation=h.final_compute / largest,
      fitted_members=[m.label for m in fitted],
      seeds=dict(zip(map(str, h.seeds), h.finals[metric].tolist())),
      inside=bool(lo <= mean <= hi), law=_law_summary(fit_h, info_h), formula=fit_h.formula())
  return dict(prediction=prediction, _pfit=fit_h, _pfrontier=info_h, _held=h, _rules=rules)


def _isoflop(iso, metric, n_boot, ci, seed) -> dict:
  """isoflop_optimum on every finished iso-FLOP run (seeds as repeated runs), N = Gflops/image."""
  B, N, L, D = [], [], [], []
  for m in iso:
    for v in m.finals[metric]:
      B.append(m.budget), N.append(m.gflops), L.append(v)
      D.append(m.final_step * m.batch_size if m.batch_size else NAN)
  d = np.array(D) if np.isfinite(D).all() else None  # images seen; else budget/N
  try:
    r = isoflop.isoflop_optimum(B, N, L, d_R=d, n_boot=n_boot, ci=ci, seed=seed)
  except (ValueError, np.linalg.LinAlgError) as e:
    return dict(isoflop_note=f"no iso-FLOP fit: {e}")
  par, pb = r["parametric"], r["parabola"]
  per = [dict(budget=p["budget"], n_opt=p["n_opt"], n_opt_ci=p["n_opt_ci"])
         for p in par["per_budget"]]
  bracketed = [p["budget"] for p in pb["per_budget"] if p["bracketed"]]
  return dict(isoflop=dict(method=r["method"], a=r["a"], a_ci=r["a_ci"], per_budget=per,
                           parabola_a=pb["a"], parabola_a_ci=pb["a_ci"],
                           parabola_per_budget=[
                               dict(budget=p["budget"], n_opt=p["n_opt"], n_opt_ci=p["n_opt_ci"],
                                    bracketed=p["bracketed"]) for p in pb["per_budget"]],
                           budgets=sorted({p["budget"] for p in pb["per_budget"]}),
                           bracketed=bracketed,
                           fit={k: par[k] for k in ("E", "A", "alpha", "B", "beta", "k")}),
              _iso=iso)


def analyse(members, metric, holdout, n_boot, ci, seed, rules=Rules()) -> dict:
  """The statistics of one group and metric; keys with a leading '_' are for the figures only.

  holdout: a DiT model name, None for the DiT of largest final compute, False for no check.
  rules: which points the laws use (Rules).
  """
  grid = [m for m in members if m.budget is None and m.has(metric)]
  dits = [m for m in grid if m.family == "DiT"]
  out = dict(ci=ci, rho=NAN, rho_ci=(NAN, NAN), rho_n=len(dits), rho_note="", law=None, law_note="",
             prediction=None, prediction_note="", isoflop=None, isoflop_note="")
  out.update(_rho(dits, metric, n_boot, ci, seed))
  fit, info = _fit_frontier(dits, metric, n_boot, ci, seed, rules)
  if fit is None:
    out["law_note"] = info
  else:
    out.update(law=_law_summary(fit, info), _fit=fit, _frontier=info)
  out.update(_prediction(dits, metric, holdout, n_boot, ci, seed, rules))
  iso = [m for m in members if m.budget is not None and m.has(metric)]
  if iso:
    out.update(_isoflop(iso, metric, n_boot, ci, seed))
  return out
