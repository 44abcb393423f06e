"""The statistics of one group and metric: rho, the law on the frontier, its prediction check,
the iso-FLOP optimum (bootstrap, power_law and isoflop on arrays built from the members).

rho: Spearman of Gflops vs seed-mean final metric over the DiTs, CI by resampling each model's seeds
(none with one seed). Law: metric = a·C^-b (FID) or e + a·C^-b (val_loss, which has an irreducible
term: IRREDUCIBLE) fitted to the compute-optimal frontier of the DiTs' evaluation points (seed means
per (member, step)) with a bootstrap over models; its band (PowerLawFit.band) is the pointwise
percentile interval of the bootstrap replicates' curves, a confidence band for the mean law, not an
interval for new runs. Prediction check: the law fitted without the held-out model (default: the DiT
of largest final compute) against its seed-mean final metric, with the fit's prediction interval at
its final compute (its residual scatter is that of the frontier's seed means, so it is an interval
for a seed mean, not for one seed). Iso-FLOP: isoflop_optimum over the finished iso-FLOP runs. The
U-Nets are in none of these: the law is the DiTs'.
"""
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


def _points(members, metric):
  """Seed means per (member, step): compute, value, member label (finite ones only)."""
  C, y, g = [], [], []
  for m in members:
    mean = rows.nanmean(m.values[metric], axis=1)
    for c, v in zip(m.compute, mean):
      if np.isfinite(c) and np.isfinite(v) and c > 0:
        C.append(c), y.append(v), g.append(m.label)
  return np.array(C), np.array(y), np.array(g)


def _fit_frontier(members, metric, n_boot, ci, seed):
  """(fit, frontier indices, points) of the power law on the frontier, or (None, reason)."""
  C, y, g = _points(members, metric)
  idx = power_law.frontier(C, y) if len(C) else np.array([], int)
  offset = metric in IRREDUCIBLE
  need = 4 if offset else 3
  if len(idx) < need or len(set(g[idx])) < 2:  # a bootstrap over one model would show no spread
    return None, f"no power law: {len(idx)} frontier points from {len(set(g[idx]))} model(s) " \
        f"(needs {need} from 2)"
  try:
    fit = power_law.fit_power_law(C[idx], y[idx], offset=offset, n_boot=n_boot, ci=ci,
                                  seed=seed, groups=g[idx])
  except ValueError as e:
    return None, f"no power law: {e}"
  return fit, (idx, C, y, g)


def _law_summary(fit):
  out = dict(a=fit.a, b=fit.b, b_ci=fit.b_ci, a_ci=fit.a_ci, n_points=fit.n, r2=fit.r2)
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


def _prediction(dits, metric, holdout, n_boot, ci, seed) -> dict:
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
  fit_h, info_h = _fit_frontier([m for m in dits if m is not h], metric, n_boot, ci, seed)
  if fit_h is None:
    return dict(prediction_note=f"no prediction check without {name}: {info_h}")
  lo, hi = fit_h.prediction_interval(h.final_compute, ci, seed=seed)
  mean, sd, n = h.final(metric)
  prediction = dict(
      model=name, compute=h.final_compute, predicted=float(fit_h.predict(h.final_compute)),
      lo=float(lo), hi=float(hi), measured=mean, measured_sd=sd, n_seeds=n,
      seeds=dict(zip(map(str, h.seeds), h.finals[metric].tolist())),
      inside=bool(lo <= mean <= hi), law=_law_summary(fit_h), formula=fit_h.formula())
  return dict(prediction=prediction, _pfit=fit_h, _pfrontier=info_h, _held=h)


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
  return dict(isoflop=dict(method=r["method"], a=r["a"], a_ci=r["a_ci"], per_budget=per,
                           parabola_a=pb["a"], parabola_a_ci=pb["a_ci"],
                           fit={k: par[k] for k in ("E", "A", "alpha", "B", "beta", "k")}),
              _iso=iso)


def analyse(members, metric, holdout, n_boot, ci, seed) -> dict:
  """The statistics of one group and metric; keys with a leading '_' are for the figures only.

  holdout: a DiT model name, None for the DiT of largest final compute, False for no check.
  """
  grid = [m for m in members if m.budget is None and m.has(metric)]
  dits = [m for m in grid if m.family == "DiT"]
  out = dict(ci=ci, rho=NAN, rho_ci=(NAN, NAN), rho_n=len(dits), rho_note="", law=None, law_note="",
             prediction=None, prediction_note="", isoflop=None, isoflop_note="")
  out.update(_rho(dits, metric, n_boot, ci, seed))
  fit, info = _fit_frontier(dits, metric, n_boot, ci, seed)
  if fit is None:
    out["law_note"] = info
  else:
    out.update(law=_law_summary(fit), _fit=fit, _frontier=info)
  out.update(_prediction(dits, metric, holdout, n_boot, ci, seed))
  iso = [m for m in members if m.budget is not None and m.has(metric)]
  if iso:
    out.update(_isoflop(iso, metric, n_boot, ci, seed))
  return out
