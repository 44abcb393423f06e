"""The compute-optimal model size per iso-FLOP budget: parametric L(N, D) fit and parabolas.

numpy + scipy only. Follows Hoffmann et al. 2022 (Chinchilla, arXiv:2203.15556) Approaches 2 and 3,
Approach 3 as re-done by Besiroglu et al. 2024 ("Chinchilla Scaling: a replication attempt",
arXiv:2404.10102): Huber loss (delta 1e-3) on log L with L = exp(LSE(a - alpha log N,
b - beta log D, e)), L-BFGS from a grid of starts, bootstrap CIs. Czech et al. 2026 ("Problems with
Chinchilla Approach 2", arXiv:2603.22339) show the parabola method is biased when the grid is
wide, off-centre, or the surface is asymmetric (alpha != beta): the parametric fit is the default.
"""
import itertools
import math

import numpy as np
from scipy import optimize

from dit_jax.analysis import bootstrap
from dit_jax.analysis import power_law

NAN = math.nan


# --- Parametric L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla Approach 3) ---
def _huber_obj(theta, xn, xd, ll, delta):
  """Sum of Huber(delta) of log-L residuals / delta, and its gradient; theta rows broadcast."""
  a, b, e, al, be = (theta[..., j:j + 1] for j in range(5))
  t1, t2 = a - al * xn, b - be * xd
  mx = np.maximum(np.maximum(t1, t2), e)
  w1, w2, w3 = np.exp(t1 - mx), np.exp(t2 - mx), np.exp(e - mx)
  s = w1 + w2 + w3
  r = mx + np.log(s) - ll  # log L_model - log L, via a stable log-sum-exp
  ar = np.abs(r)
  # dividing by delta keeps the objective O(sum |r|): Hoffmann et al.'s optimiser stopped early
  # on a badly scaled loss (Besiroglu et al.), so the scale matters for the stopping rule
  f = np.where(ar <= delta, 0.5 * r * r / delta, ar - 0.5 * delta).sum(-1)
  h = np.clip(r, -delta, delta) / (delta * s)
  g1, g2 = h * w1, h * w2
  g = np.stack([g1.sum(-1), g2.sum(-1), (h * w3).sum(-1), -(g1 * xn).sum(-1),
                -(g2 * xd).sum(-1)], axis=-1)
  return f, g


def _lbfgs(theta0, xn, xd, ll, delta):
  # alpha, beta >= 0: a negative exponent makes loss grow with scale and N_opt undefined
  r = optimize.minimize(_huber_obj, theta0, args=(xn, xd, ll, delta), jac=True,
                        method="L-BFGS-B", bounds=[(None, None)] * 3 + [(0.0, 5.0)] * 2,
                        options=dict(maxiter=2000, ftol=1e-14, gtol=1e-10))
  return r.x, r.fun


@bootstrap.one_blas_thread
def fit_chinchilla(N_R, D_R, L_R, groups=None, n_boot: int = 1000, ci: float = 0.9, seed: int = 0,
                   delta: float = 1e-3, n_starts: int = 8) -> dict:
  """Fit L = E + A/N^alpha + B/D^beta by Huber on log L from a grid of L-BFGS starts; bootstrap CIs.

  N and D are divided by their geometric means, and Besiroglu et al.'s start grid (alpha, beta in
  0..2, 5 x e, 6 x a and b) is placed around the median log L in those units, so one grid serves
  Gflops or parameters alike. The whole grid is scored and L-BFGS runs from the n_starts best
  (a shortcut, not in the paper); each bootstrap replicate starts from the full-data optimum.
  Returns dict(E, A, alpha, B, beta, a = beta/(alpha+beta), each with <name>_ci, n, objective,
  boot = (n_boot, 6) replicates of those six in that order).
  """
  N, D, L = (np.asarray(v, float) for v in (N_R, D_R, L_R))
  n0, d0 = math.exp(np.log(N).mean()), math.exp(np.log(D).mean())
  xn, xd, ll = np.log(N / n0), np.log(D / d0), np.log(L)
  m = float(np.median(ll))
  ab = m + np.array([-4.0, -3.0, -2.0, -1.0, 0.0, 1.0])
  grid = np.array(list(itertools.product(ab, ab, m + np.array([-3.0, -2.0, -1.0, -0.5, 0.0]),
                                         np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))))
  f0, _ = _huber_obj(grid, xn, xd, ll, delta)
  fits = [_lbfgs(grid[i], xn, xd, ll, delta) for i in np.argsort(f0)[:n_starts]]
  theta, fval = min(fits, key=lambda t: t[1])

  def natural(th):
    # back to un-normalised units: A/N^alpha = e^a' (N/n0)^-alpha
    a_, b_, e_, al, be = th
    return np.array([math.exp(e_), math.exp(a_) * n0 ** al, al, math.exp(b_) * d0 ** be, be,
                     be / (al + be) if al + be > 0 else NAN])

  draw = bootstrap.resampler(len(L), groups)
  rng = np.random.default_rng(seed)
  boot = np.array([natural(_lbfgs(theta, xn[i], xd[i], ll[i], delta)[0])
                   for i in (draw(rng) for _ in range(n_boot))]).reshape(n_boot, 6)
  names = ("E", "A", "alpha", "B", "beta", "a")
  out = dict(zip(names, map(float, natural(theta))))
  out.update({k + "_ci": bootstrap.interval(boot[:, j], ci) for j, k in enumerate(names)})
  out.update(n=len(L), objective=float(fval), ci=ci, boot=boot)
  return out


def loss_at_compute(fit, n, c):
  """The fitted L(N, D) at compute c (D = c / (k·N)): the iso-FLOP curve of budget c over sizes n.

  fit: a dict with E, A, alpha, B, beta and k (isoflop_optimum's 'parametric', or its subset).
  """
  return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / (c / (fit["k"] * n)) ** fit["beta"]


def _n_opt(row, C, k: float):
  """argmin_N L at compute C = k·N·D: G·(C/k)^(β/(α+β)), G = (αA/(βB))^(1/(α+β))."""
  _, A, alpha, B, beta = row[:5]
  with np.errstate(all="ignore"):  # a bootstrap replicate at alpha = beta = 0 gives NaN
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return G * (np.asarray(C, float) / k) ** (beta / (alpha + beta))


# --- Per-budget parabolas (Chinchilla Approach 2) ---
def _vertex(u, L):
  """Quadratic fit of L on u: (vertex u*, curvature c2, fitted values); u* NaN unless c2 > 0."""
  um = u.mean()  # centred, for conditioning
  c2, c1, c0 = np.polyfit(u - um, L, 2)
  return (um - c1 / (2 * c2) if c2 > 0 else NAN), c2, np.polyval([c2, c1, c0], u - um)


def _vertex_boot(u, loss, fitted, inv, n_sizes, n_boot, rng):
  """Bootstrap replicates of the vertex, or None when one budget's runs allow none."""
  cells = [np.flatnonzero(inv == j) for j in range(n_sizes)]
  if max(map(len, cells)) >= 2:
    # repeated runs (seeds) of one size: resample them within their cell, so every size stays
    # in the design; a size run once is held fixed (as in spearman_with_ci)
    boot = []
    for _ in range(n_boot):
      i = np.concatenate([cl[rng.integers(0, len(cl), len(cl))] for cl in cells])
      boot.append(_vertex(u[i], loss[i])[0])
    return boot
  if len(u) > 3:
    # one run per size: residual bootstrap on the fixed design (resampling 5 points would often
    # leave < 3 distinct sizes); residuals inflated by sqrt(n/(n-3)) for the fitted dof
    res = (loss - fitted) * math.sqrt(len(u) / (len(u) - 3))
    return [_vertex(u, fitted + res[rng.integers(0, len(u), len(u))])[0] for _ in range(n_boot)]
  return None


def _parabolas(budget, logn, L, n_boot, ci, rng):
  """Per budget: vertex of L vs log N, its bootstrap replicates, and whether it is bracketed."""
  rows = []
  for c in np.unique(budget):
    sel = np.flatnonzero(budget == c)
    u, loss = logn[sel], L[sel]
    row = dict(budget=float(c), n_points=len(sel), bracketed=False, n_opt=NAN,
               n_opt_ci=(NAN, NAN), vertex=NAN, curvature=NAN, boot=np.full(n_boot, NAN))
    rows.append(row)
    if len(np.unique(u)) < 3:
      continue
    v, c2, fitted = _vertex(u, loss)
    row.update(vertex=float(np.exp(v)) if np.isfinite(v) else NAN, curvature=float(c2))
    # bracketed: the vertex lies inside the sampled sizes AND the lowest (seed-mean) loss is at an
    # interior size; on a grid wholly to one side of the optimum the curve is monotone, yet a
    # parabola through it can still put its vertex inside the range (seen at 8x-512x off)
    sizes, inv = np.unique(u, return_inverse=True)
    lowest = np.argmin(np.bincount(inv, loss) / np.bincount(inv))
    row["bracketed"] = bool(np.isfinite(v) and u.min() <= v <= u.max()
                            and 0 < lowest < len(sizes) - 1)
    boot = _vertex_boot(u, loss, fitted, inv, len(sizes), n_boot, rng)
    if boot is None:
      continue
    row["boot"] = np.asarray(boot, float)
    if row["bracketed"]:
      row["n_opt"] = row["vertex"]
      row["n_opt_ci"] = tuple(np.exp(bootstrap.interval(row["boot"], ci)))
  return rows


@bootstrap.one_blas_thread
def isoflop_optimum(budget_R, n_R, loss_R, d_R=None, groups=None,
                    method: str = "parametric", n_boot: int = 1000, ci: float = 0.9,
                    seed: int = 0, delta: float = 1e-3, n_starts: int = 8) -> dict:
  """Optimal size N per iso-FLOP budget and the exponent a of N_opt ∝ C^a, by two methods.

  One row per run: budget (the iso-FLOP label, e.g. isoflop_plan's), N (forward Gflops or params),
  final loss, and D (training images or steps; None: budget/N, as C ∝ N·D and the constant goes
  into B). Repeated (budget, N) runs are seeds; `groups` clusters runs for the parametric bootstrap.
  'parametric' (default; Chinchilla Approach 3 as in Besiroglu et al. 2024): fit_chinchilla on all
  runs, a = beta/(alpha+beta), N_opt(C) analytically, CIs from the same bootstrap. It uses every
  run at once and no Taylor approximation, so it is not biased by a grid that is wide, off-centre,
  drifting or asymmetric, which the parabola method is (Czech et al. 2026).
  'parabola' (Approach 2): per budget L quadratic in log N, CI by resampling seeds within each size
  (or residuals with one run per size); n_opt is its vertex only when bracketed (vertex inside the
  sizes and the lowest loss at an interior size), else NaN with the vertex kept as 'vertex'; a is
  the OLS slope of log N_opt on log C over bracketed budgets, CI from the same replicates.
  Returns dict(method, a, a_ci (those of `method`), parametric=..., parabola=...).
  """
  if method not in ("parametric", "parabola"):
    raise ValueError(f"method must be 'parametric' or 'parabola', got {method!r}")
  budget, N, L = (np.asarray(v, float) for v in (budget_R, n_R, loss_R))
  D = budget / N if d_R is None else np.asarray(d_R, float)
  ok = np.isfinite(L) & (L > 0)  # a failed run (NaN loss) carries no information
  budget, N, L, D = budget[ok], N[ok], L[ok], D[ok]
  groups = None if groups is None else np.asarray(groups)[ok]
  rng = np.random.default_rng(seed)

  par = fit_chinchilla(N, D, L, groups=groups, n_boot=n_boot, ci=ci, seed=seed, delta=delta,
                       n_starts=n_starts)
  k = math.exp(np.mean(np.log(budget / (N * D))))  # C = k·N·D; exact when D is budget/N
  best = [par[name] for name in ("E", "A", "alpha", "B", "beta")]
  par["k"] = k
  par["per_budget"] = [
      dict(budget=float(c), n_opt=float(_n_opt(best, c, k)),
           n_opt_ci=bootstrap.interval([_n_opt(r, c, k) for r in par["boot"]], ci))
      for c in np.unique(budget)]

  rows = _parabolas(budget, np.log(N), L, n_boot, ci, rng)
  used = [r for r in rows if r["bracketed"]]
  pb = dict(per_budget=rows, n_budgets=len(used), a=NAN, a_ci=(NAN, NAN))
  if len(used) >= 2:
    lc = np.log([r["budget"] for r in used])
    pb["a"] = float(-power_law.fit_loglog(lc, np.log([r["n_opt"] for r in used]))[1])
    vb = np.stack([r["boot"] for r in used], axis=1)  # (n_boot, budgets), log N_opt
    ok = np.isfinite(vb).all(axis=1)
    pb["a_ci"] = bootstrap.interval([-power_law.fit_loglog(lc, v)[1] for v in vb[ok]], ci)
    pb["boot_valid"] = float(ok.mean())

  chosen = par if method == "parametric" else pb
  return dict(method=method, a=chosen["a"], a_ci=chosen["a_ci"], parametric=par, parabola=pb)
