"""Small-sample metrics beside FID: KID and FID∞, from the same features as FID.

FID of N samples is biased upwards by roughly c/N, and c depends on the model, so FIDs of models
at a small N (the CPU sweep's 512) are not comparable to each other nor to the large-N value.

- KID (Bińkowski et al. 2018), as torch-fidelity's `metric_kid` (and clean-fid's kernel_distance)
  defines it: the unbiased MMD² (torch-fidelity's mmd_est='unbiased': the k(x, y) cross terms keep
  their diagonal) with the polynomial kernel k(x, y) = (x·y/d + 1)³, over `subsets` random subsets
  of `subset_size` rows of each set; the mean and the std (ddof=0) over subsets. Unlike
  torch-fidelity, which raises, the subset size is capped at min(subset_size, n_generated,
  n_reference). It needs the reference's features, not only its mean and covariance.
- FID∞ (Chong & Forsyth 2020, mchong6/FID_IS_infinity `calculate_FID_infinity`): FID_N of random
  subsets of the SAME generated features at `points` sample counts N, evenly spaced from n/4 to n
  (rounded, duplicates dropped, each >= 2; one subset per N, the largest being all n samples), fit
  FID_N = FID∞ + slope / N by least squares and read at 1/N = 0. The reference statistics stay
  those of the full reference. Small N (below the feature dimension) gives a rank-deficient
  covariance; the Fréchet distance (scipy's sqrtm) is still defined, so such N are kept.

Both draw their subsets from numpy generators of eval.seed (rng.KID_SUBSETS, rng.FID_INF_SUBSETS):
the same subsets at every step, deterministic.
"""
from __future__ import annotations

import numpy as np

from dit_jax import rng as rng_lib
from dit_jax.evaluation import fid

KID_DEGREE, KID_COEF0 = 3, 1.0  # torch-fidelity's defaults; gamma = 1 / d


def polynomial_kernel(x_NxD: np.ndarray, y_MxD: np.ndarray) -> np.ndarray:
  """k(x, y) = (x·y / d + 1)³ for every pair of rows (float64)."""
  x, y = np.asarray(x_NxD, np.float64), np.asarray(y_MxD, np.float64)
  return (x @ y.T / x.shape[1] + KID_COEF0) ** KID_DEGREE


def mmd2_unbiased(x_MxD: np.ndarray, y_MxD: np.ndarray) -> float:
  """torch-fidelity's unbiased MMD² of two sets of m rows each: the within-set kernel sums
  without their diagonals over m(m-1), minus twice the whole cross-kernel sum over m²."""
  m = len(x_MxD)
  if len(y_MxD) != m or m < 2:
    raise ValueError(f"MMD² needs two sets of the same size >= 2, got {len(x_MxD)} and {len(y_MxD)}")
  k_xx, k_yy = polynomial_kernel(x_MxD, x_MxD), polynomial_kernel(y_MxD, y_MxD)
  k_xy = polynomial_kernel(x_MxD, y_MxD)
  within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
  return float(within / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(gen_NxD, ref_MxD, subsets: int = 100, subset_size: int = 1000,
        rng: np.random.Generator | None = None) -> tuple[float, float, int]:
  """(mean, std, subset size used) of the unbiased MMD² over `subsets` random subset pairs of
  min(subset_size, N, M) rows each, drawn without replacement as torch-fidelity does."""
  rng = np.random.default_rng(0) if rng is None else rng
  n, m = len(gen_NxD), len(ref_MxD)
  size = min(subset_size, n, m)
  if subsets < 1 or size < 2:
    raise ValueError(f"KID needs subsets >= 1 and >= 2 rows in each set and subset, got "
                     f"subsets={subsets}, subset size {subset_size}, {n} and {m} rows")
  mmds = np.array([mmd2_unbiased(gen_NxD[rng.choice(n, size, replace=False)],
                                 ref_MxD[rng.choice(m, size, replace=False)])
                   for _ in range(subsets)])
  return float(mmds.mean()), float(mmds.std()), size


def fid_inf_counts(n: int, points: int) -> np.ndarray:
  """The sample counts of FID∞'s fit: `points` evenly spaced from n/4 to n, rounded, >= 2, distinct."""
  if points < 1 or n < 2:
    return np.zeros(0, int)
  return np.unique(np.maximum(2, np.round(np.linspace(n / 4, n, points)).astype(int)))


def fid_infinity(gen_NxD, mu_ref, sigma_ref, points: int = 10,
                 rng: np.random.Generator | None = None) -> dict | None:
  """{fid_inf, fid_inf_slope, counts, fids}: FID_N of one random subset of the generated features
  per N in fid_inf_counts, fit FID_N = fid_inf + fid_inf_slope / N; None with < 2 distinct N."""
  rng = np.random.default_rng(0) if rng is None else rng
  gen = np.asarray(gen_NxD, np.float64)
  counts = fid_inf_counts(len(gen), points)
  if len(counts) < 2:
    return None
  fids = np.array([fid.frechet_distance(*fid.statistics(gen[rng.choice(len(gen), c, replace=False)]),
                                        mu_ref, sigma_ref) for c in counts])
  slope, intercept = np.polyfit(1.0 / counts, fids, 1)
  return dict(fid_inf=float(intercept), fid_inf_slope=float(slope), counts=counts, fids=fids)


def check_config(q) -> None:
  """eval.fid's KID and FID∞ fields (`q`: eval.fid), with FID on."""
  if q.kid_subsets < 1:
    raise ValueError(f"eval.fid.kid_subsets must be >= 1, got {q.kid_subsets}")
  if q.kid_subset_size < 2:
    raise ValueError(f"eval.fid.kid_subset_size must be >= 2 (it is capped at the sample and "
                     f"reference sizes), got {q.kid_subset_size}")
  if q.fid_inf_points < 0 or q.fid_inf_points == 1:
    raise ValueError(f"eval.fid.fid_inf_points must be 0 (off) or >= 2 sample counts to fit FID "
                     f"on 1/N, got {q.fid_inf_points}")


def kid_unavailable(reference: fid.Reference) -> str | None:
  """Why KID cannot be computed against `reference` (None when it can)."""
  if reference.features is None or len(reference.features) < 2:
    return ("the FID reference holds only statistics (mu, sigma), no features or images, and KID "
            "needs the reference features")
  return None


def kid_note(reference: fid.Reference) -> dict:
  """{kid_note: why} for fid_reference.json (so for every results row) when KID cannot be
  computed against `reference`, else {}."""
  note = kid_unavailable(reference)
  return {} if note is None else {"kid_note": note}


def metrics(feature_name: str, pool_NxD: np.ndarray, reference: fid.Reference, q,
            eval_seed: int) -> dict[str, float]:
  """kid_<net>, kid_std_<net> (when the reference has features), fid_inf_<net> and
  fid_inf_slope_<net> (when eval.fid.fid_inf_points > 0) of the generated pool features;
  `q` is eval.fid (kid_subsets, kid_subset_size, fid_inf_points)."""
  out = {}
  if kid_unavailable(reference) is None:
    mean, std, _ = kid(pool_NxD, reference.features, q.kid_subsets, q.kid_subset_size,
                       rng_lib.numpy_rng(eval_seed, rng_lib.KID_SUBSETS))
    out[f"kid_{feature_name}"], out[f"kid_std_{feature_name}"] = mean, std
  fit = fid_infinity(pool_NxD, reference.mu, reference.sigma, q.fid_inf_points,
                     rng_lib.numpy_rng(eval_seed, rng_lib.FID_INF_SUBSETS))
  if fit is not None:
    out[f"fid_inf_{feature_name}"] = fit["fid_inf"]
    out[f"fid_inf_slope_{feature_name}"] = fit["fid_inf_slope"]
  return out
