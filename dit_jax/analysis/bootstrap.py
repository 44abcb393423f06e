"""Bootstrap statistics on plain arrays: percentile intervals and bands, resampling, Spearman's rho.

numpy + scipy only. Every interval is a central percentile interval of bootstrap replicates;
`resampler(n, groups)` makes the bootstrap a cluster bootstrap (whole groups, e.g. the seeds of one
member, are resampled together, since resampling correlated rows one by one understates the
spread).
"""
import contextlib
import functools
import math

import numpy as np
from scipy import stats

try:
  from threadpoolctl import threadpool_limits  # comes with scikit-learn
except ImportError:  # pragma: no cover
  threadpool_limits = None

NAN = math.nan


def one_blas_thread(fn):
  """Run fn with BLAS on one thread: the solvers' 5x5 LAPACK calls cost ~15x more when OpenBLAS
  wakes its threads (measured 0.85 ms vs 0.06 ms per L-BFGS-B step on a busy 2-core machine)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    ctx = threadpool_limits(1, "blas") if threadpool_limits else contextlib.nullcontext()
    with ctx:
      return fn(*args, **kwargs)
  return wrapped


def band(replicates, ci: float):
  """(lo, hi): the central `ci` percentile interval over axis 0 (the replicates), pointwise.

  Replicates (k, ...) of a curve give its pointwise band, of a scalar its interval; no NaN filter.
  """
  q = 50.0 * (1.0 - ci)
  return np.percentile(replicates, [q, 100.0 - q], axis=0)


def interval(samples, ci: float) -> tuple:
  """Central percentile interval of the finite samples; (nan, nan) when there are none."""
  s = np.asarray(samples, float)
  s = s[np.isfinite(s)]
  if s.size == 0:
    return (NAN, NAN)
  lo, hi = band(s, ci)
  return (float(lo), float(hi))


def resampler(n: int, groups=None):
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
  lo, hi = interval(rhos, ci)
  return dict(rho=rho, lo=lo, hi=hi, per_seed=per_seed)
