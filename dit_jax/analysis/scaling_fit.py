"""Scaling-law statistics on plain arrays: rank correlation, power laws, frontier, iso-FLOP optima.

numpy + scipy only; the caller builds the arrays from results rows. Every interval is a percentile
bootstrap unless a docstring says otherwise; `groups=` makes it a cluster bootstrap (whole groups,
e.g. the seeds of one member, are resampled together, since resampling correlated rows one by one
understates the spread).

The iso-FLOP part follows Hoffmann et al. 2022 (Chinchilla, arXiv:2203.15556) Approaches 2 and 3,
Approach 3 as re-done by Besiroglu et al. 2024 ("Chinchilla Scaling: a replication attempt",
arXiv:2404.10102): Huber loss (delta 1e-3) on log L with L = exp(LSE(a - alpha log N,
b - beta log D, e)), L-BFGS from a grid of starts, bootstrap CIs. Czech et al. 2026 ("Problems with
Chinchilla Approach 2", arXiv:2603.22339) show the parabola method is biased when the grid is
wide, off-centre, or the surface is asymmetric (alpha != beta): the parametric fit is the default.
"""
import contextlib
import dataclasses
import functools
import itertools
import math

import numpy as np
from scipy import optimize, stats

try:
  from threadpoolctl import threadpool_limits  # comes with scikit-learn
except ImportError:  # pragma: no cover
  threadpool_limits = None

NAN = math.nan


def _one_blas_thread(fn):
  """Run fn with BLAS on one thread: the solvers' 5x5 LAPACK calls cost ~15x more when OpenBLAS
  wakes its threads (measured 0.85 ms vs 0.06 ms per L-BFGS-B step on a busy 2-core machine)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    ctx = threadpool_limits(1, "blas") if threadpool_limits else contextlib.nullcontext()
    with ctx:
      return fn(*args, **kwargs)
  return wrapped


def _interval(samples, ci: float) -> tuple:
  """Central percentile interval of the finite samples; (nan, nan) when there are none."""
  s = np.asarray(samples, float)
  s = s[np.isfinite(s)]
  if s.size == 0:
    return (NAN, NAN)
  q = 50.0 * (1.0 - ci)
  lo, hi = np.percentile(s, [q, 100.0 - q])
  return (float(lo), float(hi))


def _resampler(n: int, groups=None):
  """draw(rng) -> row indices of one bootstrap sample: rows iid, or whole groups iid."""
  if groups is None:
    return lambda rng: rng.integers(0, n, n)
  _, inv = np.unique(np.asarray(groups), return_inverse=True)
  members = [np.flatnonzero(inv == g) for g in range(inv.max() + 1)]
  k = len(members)
  return lambda rng: np.concatenate([members[g] for g in rng.integers(0, k, k)])


def _rank_corr(rx, ry):
  """Pearson correlation of ranks along the last axis (= Spearman with average ranks)."""
  rx = rx - rx.mean(-1, keepdims=True)
  ry = ry - ry.mean(-1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    return (rx * ry).sum(-1) / np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))


def _spearman(x, y) -> float:
  return float(_rank_corr(stats.rankdata(x), stats.rankdata(y))) if len(x) >= 3 else NAN


# --- Rank correlation ---
def spearman_with_ci(x_M, y_MxS, n_boot: int = 2000, ci: float = 0.9, seed: int = 0) -> dict:
  """Spearman rho of x vs the seed-mean of y, CI by resampling each member's seeds independently.

  NaN in y is a missing run: a member's mean is over its finished seeds and the bootstrap resamples
  only those (a member with one is held fixed, one with none dropped). With fewer than 2 seeds
  there is no seed noise to resample, so lo and hi are NaN (a zero-width interval would claim
  certainty the data lacks). per_seed: rho of each seed column alone.
  """
  x = np.asarray(x_M, float)
  y = np.asarray(y_MxS, float).reshape(len(x), -1)
  keep = np.isfinite(x) & np.isfinite(y).any(axis=1)
  x, y = x[keep], y[keep]
  rho = _spearman(x, np.nanmean(y, axis=1)) if len(x) else NAN
  per_seed = []
  for s in range(y.shape[1]):
    ok = np.isfinite(y[:, s])
    per_seed.append(_spearman(x[ok], y[ok, s]))
  if y.shape[1] < 2 or np.isfinite(y).sum(axis=1).max(initial=0) < 2 or len(x) < 3:
    return dict(rho=rho, lo=NAN, hi=NAN, per_seed=per_seed)
  rng = np.random.default_rng(seed)
  boot = np.empty((n_boot, len(x)))
  for m in range(len(x)):
    v = y[m][np.isfinite(y[m])]
    boot[:, m] = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(axis=1)
  rhos = _rank_corr(stats.rankdata(x), stats.rankdata(boot, axis=1))
  lo, hi = _interval(rhos, ci)
  return dict(rho=rho, lo=lo, hi=hi, per_seed=per_seed)


# --- Power law y = e + a C^-b ---
def _fit_loglog(x, ly):
  """OLS of log y on x = log(C/C0): returns (log a', b) with y = a' (C/C0)^-b."""
  xm = x.mean()
  sxx = ((x - xm) ** 2).sum()
  slope = ((x - xm) * (ly - ly.mean())).sum() / sxx
  return ly.mean() - slope * xm, -slope


def _fit_offset(x, ly, starts):
  """min sum (log y - log(e + a' e^{-b x}))^2 over p = (log a', b, e), e >= 0, b >= 0."""
  def resid(p):
    return np.log(p[2] + np.exp(p[0] - p[1] * x)) - ly

  def jac(p):
    t = np.exp(p[0] - p[1] * x)
    m = p[2] + t
    return np.stack([t / m, -x * t / m, 1.0 / m], axis=1)

  # b >= 0: with a growing power term there is no asymptote e to estimate
  fits = [optimize.least_squares(resid, p0, jac=jac, bounds=([-np.inf, 0.0, 0.0], np.inf),
                                 x_scale="jac") for p0 in starts]
  return min(fits, key=lambda r: r.cost).x


@dataclasses.dataclass(frozen=True, eq=False)
class PowerLawFit:
  """y = e + a·C^-b fitted in log y (e = 0 without offset), with bootstrap CIs on a, b, e."""
  a: float
  b: float
  e: float
  a_ci: tuple
  b_ci: tuple
  e_ci: tuple
  n: int
  r2: float                # in log y
  resid_sd: float          # of log y, with n - p degrees of freedom
  ci: float
  offset: bool
  pi_method: str           # 't' (OLS t prediction interval) or 'bootstrap'
  boot: np.ndarray = dataclasses.field(repr=False)  # (n_boot, 3): a, b, e per replicate
  data: tuple = dataclasses.field(repr=False)       # (C, y) as fitted

  def predict(self, C):
    """Point prediction e + a·C^-b."""
    return self.e + self.a * np.asarray(C, float) ** (-self.b)

  def prediction_interval(self, C, ci: float | None = None, seed: int = 0) -> tuple:
    """(lo, hi) for a NEW run at C: parameter uncertainty plus the residual scatter of log y."""
    ci = self.ci if ci is None else ci
    C = np.asarray(C, float)
    p = 2 if not self.offset else 3
    if self.pi_method == "t":
      xl = np.log(self.data[0])
      xbar, sxx = xl.mean(), ((xl - xl.mean()) ** 2).sum()
      se = self.resid_sd * np.sqrt(1 + 1 / self.n + (np.log(C) - xbar) ** 2 / sxx)
      half = stats.t.ppf(0.5 + ci / 2, self.n - p) * se
      mid = np.log(self.predict(C))
      return np.exp(mid - half), np.exp(mid + half)
    # each replicate's prediction plus one residual of that replicate's fit over all the original
    # points, inflated by sqrt(n/(n-p)) for the fitted dof; in-bag residuals alone are overfit
    # (coverage 0.825 with them, 0.85 with all points, 0.90 for the t interval; n=12, 600 draws)
    rng = np.random.default_rng(seed)
    bt = self.boot[np.isfinite(self.boot).all(axis=1)]
    Cd, yd = self.data
    def logpred(c):
      return np.log(bt[:, 2:3] + bt[:, 0:1] * np.asarray(c, float).reshape(1, -1) ** -bt[:, 1:2])
    resid = np.log(yd)[None, :] - logpred(Cd)
    pick = rng.integers(0, self.n, (len(bt), C.size))
    eps = np.take_along_axis(resid, pick, axis=1) * math.sqrt(self.n / max(self.n - p, 1))
    draws = (logpred(C) + eps).reshape((len(bt),) + C.shape)
    q = 50.0 * (1.0 - ci)
    lo, hi = np.percentile(draws, [q, 100.0 - q], axis=0)
    return np.exp(lo), np.exp(hi)

  def formula(self, y_name: str = "y", c_name: str = "C") -> str:
    """E.g. 'FID = 41.2·C^-0.178 (b 90% CI [0.10, 0.25])'."""
    lead = f"{self.e:.3g} + " if self.offset else ""
    lo, hi = self.b_ci
    width = hi - lo if np.isfinite(hi - lo) and hi > lo else 0.1
    d = max(2, math.ceil(-math.log10(width)) + 1)  # enough decimals to tell lo from hi
    return (f"{y_name} = {lead}{self.a:.3g}·{c_name}^-{self.b:.3g} "
            f"(b {100 * self.ci:.0f}% CI [{lo:.{d}f}, {hi:.{d}f}])")


@_one_blas_thread
def fit_power_law(C_N, y_N, offset: bool = False, n_boot: int = 1000, ci: float = 0.9,
                  seed: int = 0, groups=None, pi_method: str = "auto") -> PowerLawFit:
  """Fit y = a·C^-b (OLS in log-log) or y = e + a·C^-b (NLS on log y, e >= 0), bootstrap CIs.

  The bootstrap resamples points, or whole `groups` when given (cluster bootstrap). pi_method
  'auto' uses the exact OLS t prediction interval for the no-offset fit without groups (it assumes
  independent points) and otherwise the bootstrap: replicate prediction plus a replicate residual,
  which undercovers at small n (about 0.84 for a nominal 0.90 at n=12-20).
  """
  if pi_method not in ("auto", "t", "bootstrap") or (pi_method == "t" and offset):
    raise ValueError(f"pi_method {pi_method!r}: 'auto', 'bootstrap', or 't' without offset")
  C, y = (np.asarray(v, float) for v in (C_N, y_N))
  ok = np.isfinite(C) & np.isfinite(y) & (C > 0) & (y > 0)
  C, y = C[ok], y[ok]
  groups = None if groups is None else np.asarray(groups)[ok]
  n, p = len(C), 3 if offset else 2
  if len(np.unique(C)) < p:
    raise ValueError(f"need >= {p} distinct C values, got {len(np.unique(C))}")
  c0 = math.exp(np.log(C).mean())  # normalise C so the optimiser sees O(1) numbers
  x, ly = np.log(C / c0), np.log(y)

  def fit(xs, lys, starts):
    if not offset:
      la, b = _fit_loglog(xs, lys)
      return np.array([la, b, 0.0])
    return _fit_offset(xs, lys, starts)

  def model(q, xs):
    return np.log(q[2] + np.exp(q[0] - q[1] * xs))

  la0, b0 = _fit_loglog(x, ly)
  # offset starts: the no-offset fit (e = 0), then fits of log(y - e0) for e0 below min y
  starts = [np.array([la0, max(b0, 0.0), 0.0])]
  for frac in (0.5, 0.9, 0.99):
    e0 = frac * y.min()
    la, b = _fit_loglog(x, np.log(y - e0))
    starts.append(np.array([la, max(b, 0.0), e0]))
  q = fit(x, ly, starts)
  res = ly - model(q, x)
  r2 = 1 - (res ** 2).sum() / ((ly - ly.mean()) ** 2).sum()
  resid_sd = math.sqrt((res ** 2).sum() / max(n - p, 1))

  draw = _resampler(n, groups)
  rng = np.random.default_rng(seed)
  boot = np.full((n_boot, 3), NAN)
  for i in range(n_boot):
    idx = draw(rng)
    if len(np.unique(x[idx])) >= p:  # else the draw does not identify the model: left NaN
      qi = fit(x[idx], ly[idx], [q])
      boot[i] = [math.exp(qi[0]) * c0 ** qi[1], qi[1], qi[2]]
  if pi_method == "auto":
    pi_method = "t" if (not offset and groups is None) else "bootstrap"
  return PowerLawFit(
      a=math.exp(q[0]) * c0 ** q[1], b=float(q[1]), e=float(q[2]),
      a_ci=_interval(boot[:, 0], ci), b_ci=_interval(boot[:, 1], ci),
      e_ci=_interval(boot[:, 2], ci), n=n, r2=float(r2), resid_sd=resid_sd, ci=ci, offset=offset,
      pi_method=pi_method, boot=boot, data=(C, y))


# --- Frontier ---
def frontier(C_N, y_N) -> np.ndarray:
  """Indices of the lower envelope: points with no other C' <= C and y' < y, sorted by C."""
  C, y = (np.asarray(v, float) for v in (C_N, y_N))
  idx = np.flatnonzero(np.isfinite(C) & np.isfinite(y))
  order = idx[np.lexsort((y[idx], C[idx]))]
  ys = y[order]
  # sorted by C then y, the running minimum at a point already covers every point with C' <= C
  # (those tied at C with a lower y come first), so a point is kept iff it is that minimum
  return order[ys <= np.minimum.accumulate(ys)]


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


@_one_blas_thread
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

  draw = _resampler(len(L), groups)
  rng = np.random.default_rng(seed)
  boot = np.array([natural(_lbfgs(theta, xn[i], xd[i], ll[i], delta)[0])
                   for i in (draw(rng) for _ in range(n_boot))]).reshape(n_boot, 6)
  names = ("E", "A", "alpha", "B", "beta", "a")
  out = dict(zip(names, map(float, natural(theta))))
  out.update({k + "_ci": _interval(boot[:, j], ci) for j, k in enumerate(names)})
  out.update(n=len(L), objective=float(fval), ci=ci, boot=boot)
  return out


def _n_opt(row, C, k: float):
  """argmin_N L at compute C = k·N·D: G·(C/k)^(β/(α+β)), G = (αA/(βB))^(1/(α+β))."""
  _, A, alpha, B, beta = row[:5]
  with np.errstate(all="ignore"):  # a bootstrap replicate at alpha = beta = 0 gives NaN
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return G * (np.asarray(C, float) / k) ** (beta / (alpha + beta))


# --- Iso-FLOP optimum: parametric (default) and per-budget parabolas (Chinchilla Approach 2) ---
def _vertex(u, L):
  """Quadratic fit of L on u: (vertex u*, curvature c2, fitted values); u* NaN unless c2 > 0."""
  um = u.mean()  # centred, for conditioning
  c2, c1, c0 = np.polyfit(u - um, L, 2)
  return (um - c1 / (2 * c2) if c2 > 0 else NAN), c2, np.polyval([c2, c1, c0], u - um)


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
    cells = [np.flatnonzero(inv == j) for j in range(len(sizes))]
    if max(map(len, cells)) >= 2:
      # repeated runs (seeds) of one size: resample them within their cell, so every size stays
      # in the design; a size run once is held fixed (as in spearman_with_ci)
      boot = []
      for _ in range(n_boot):
        i = np.concatenate([cl[rng.integers(0, len(cl), len(cl))] for cl in cells])
        boot.append(_vertex(u[i], loss[i])[0])
    elif len(sel) > 3:
      # one run per size: residual bootstrap on the fixed design (resampling 5 points would often
      # leave < 3 distinct sizes); residuals inflated by sqrt(n/(n-3)) for the fitted dof
      res = (loss - fitted) * math.sqrt(len(sel) / (len(sel) - 3))
      boot = [_vertex(u, fitted + res[rng.integers(0, len(sel), len(sel))])[0]
              for _ in range(n_boot)]
    else:
      continue
    row["boot"] = np.asarray(boot, float)
    if row["bracketed"]:
      row["n_opt"] = row["vertex"]
      row["n_opt_ci"] = tuple(np.exp(_interval(row["boot"], ci)))
  return rows


@_one_blas_thread
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
           n_opt_ci=_interval([_n_opt(r, c, k) for r in par["boot"]], ci))
      for c in np.unique(budget)]

  rows = _parabolas(budget, np.log(N), L, n_boot, ci, rng)
  used = [r for r in rows if r["bracketed"]]
  pb = dict(per_budget=rows, n_budgets=len(used), a=NAN, a_ci=(NAN, NAN))
  if len(used) >= 2:
    lc = np.log([r["budget"] for r in used])
    pb["a"] = float(-_fit_loglog(lc, np.log([r["n_opt"] for r in used]))[1])
    vb = np.stack([r["boot"] for r in used], axis=1)  # (n_boot, budgets), log N_opt
    ok = np.isfinite(vb).all(axis=1)
    pb["a_ci"] = _interval([-_fit_loglog(lc, v)[1] for v in vb[ok]], ci)
    pb["boot_valid"] = float(ok.mean())

  chosen = par if method == "parametric" else pb
  return dict(method=method, a=chosen["a"], a_ci=chosen["a_ci"], parametric=par, parabola=pb)
