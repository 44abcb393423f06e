"""The scaling fits (bootstrap, power_law, isoflop) on synthetic data whose true answer is known."""
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from dit_jax.analysis import bootstrap
from dit_jax.analysis import isoflop
from dit_jax.analysis import power_law
from dit_jax.sweep import members as members_lib


def _power_data(seed, a=50.0, b=0.2, sigma=0.1, C=np.geomspace(1, 1e4, 12)):
  rng = np.random.default_rng(seed)
  return C, a * C ** -b * np.exp(sigma * rng.standard_normal(len(C)))


# ---------------------------------------------------------------------------------------------
# Power laws


def test_power_law_no_offset_recovers_a_b():
  C, y = _power_data(0, sigma=0.05, C=np.geomspace(1, 1e4, 20))
  f = power_law.fit_power_law(C, y, n_boot=300)
  assert abs(f.b - 0.2) < 0.02
  assert abs(math.log(f.a / 50.0)) < 0.1
  assert f.e == 0.0 and f.n == 20 and f.r2 > 0.9
  assert f.b_ci[0] < 0.2 < f.b_ci[1] and f.a_ci[0] < 50.0 < f.a_ci[1]
  assert f.b_ci[1] - f.b_ci[0] < 0.03  # n=20 at 5 % noise pins b to about +-0.01
  np.testing.assert_allclose(f.predict([1.0, 1e4]), [f.a, f.a * 1e4 ** -f.b])
  text = f.formula("FID")
  assert text.startswith(f"FID = {f.a:.3g}·C^-{f.b:.3g} (b 90% CI [")
  lo, hi = (float(v) for v in text.split("[")[1].rstrip("])").split(","))
  assert lo == pytest.approx(f.b_ci[0], abs=0.01) and hi == pytest.approx(f.b_ci[1], abs=0.01)


def test_power_law_offset_recovers_e_a_b():
  rng = np.random.default_rng(1)
  C = np.geomspace(1, 1e6, 15)
  y = (3.0 + 40.0 * C ** -0.3) * np.exp(0.01 * rng.standard_normal(15))
  f = power_law.fit_power_law(C, y, offset=True, n_boot=300)
  assert abs(f.e - 3.0) < 0.1 and abs(f.a / 40.0 - 1) < 0.05 and abs(f.b - 0.3) < 0.01
  for (lo, hi), true in ((f.e_ci, 3.0), (f.a_ci, 40.0), (f.b_ci, 0.3)):
    assert lo < true < hi
  assert f.formula().startswith(f"y = {f.e:.3g} + {f.a:.3g}·C^-")
  # without the offset the same data reads as a much flatter law: the asymptote matters
  assert power_law.fit_power_law(C, y, n_boot=10).b < 0.2


def test_power_law_coverage_of_b_ci_and_prediction_interval():
  """90 % intervals over 100 draws (seeds 0..99): cover in >= 80, yet not absurdly wide."""
  b, n, c_new = 0.2, 12, 3e4  # c_new: held out, beyond the fitted range
  cover_b = cover_t = cover_boot = 0
  width_ratio = []
  for s in range(100):
    C, y = _power_data(s)
    y_new = 50.0 * c_new ** -b * math.exp(0.1 * np.random.default_rng(1000 + s).standard_normal())
    f = power_law.fit_power_law(C, y, n_boot=200, seed=s)
    cover_b += f.b_ci[0] <= b <= f.b_ci[1]
    lo, hi = f.prediction_interval(c_new)
    cover_t += lo <= y_new <= hi
    boot_fit = power_law.fit_power_law(C, y, n_boot=200, seed=s, pi_method="bootstrap")
    lo, hi = boot_fit.prediction_interval(c_new)
    cover_boot += lo <= y_new <= hi
    # analytic OLS t interval of the slope, for scale
    x = np.log(C)
    se = f.resid_sd / math.sqrt(((x - x.mean()) ** 2).sum())
    width_ratio.append((f.b_ci[1] - f.b_ci[0]) / (2 * stats.t.ppf(0.95, n - 2) * se))
  assert f.pi_method == "t"
  assert 80 <= cover_b <= 99, cover_b
  assert 80 <= cover_t <= 99, cover_t
  # the residual bootstrap undercovers at n=12 (0.83 over 500 draws; seeds 0..99 give 75), so it
  # is held to a lower bar here and is not the default where the exact t interval applies
  assert 70 <= cover_boot <= 99, cover_boot
  assert 0.7 < np.mean(width_ratio) < 1.3, np.mean(width_ratio)


def test_group_bootstrap_is_wider_for_correlated_rows():
  # 8 members x 4 seeds sharing a per-member offset: rows within a member are not independent
  rng = np.random.default_rng(3)
  member_C = np.geomspace(1, 1e4, 8)
  C = np.repeat(member_C, 4)
  shared = np.repeat(0.15 * rng.standard_normal(8), 4)
  y = 50.0 * C ** -0.2 * np.exp(shared + 0.02 * rng.standard_normal(32))
  groups = np.repeat(np.arange(8), 4)
  rows = power_law.fit_power_law(C, y, n_boot=500)
  clus = power_law.fit_power_law(C, y, n_boot=500, groups=groups)
  assert clus.b == rows.b and clus.pi_method == "bootstrap"
  w_rows, w_clus = np.diff(rows.b_ci)[0], np.diff(clus.b_ci)[0]
  assert w_clus > 1.5 * w_rows, (w_rows, w_clus)


def test_amplitude_is_computed_in_log_space_without_overflow():
  # a = a'·c0^b: a' = e^-2000 and c0^b = 1000^300 are 0 and inf in float64, their product e^72.3;
  # a runaway replicate's amplitude is inf, with no RuntimeWarning (warnings are errors here).
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert power_law.amplitude(-2000.0, 300.0, 1e3) == pytest.approx(
        math.exp(-2000 + 300 * math.log(1e3)), rel=1e-12)
    assert power_law.amplitude(0.0, 400.0, 1e3) == math.inf
    assert power_law.amplitude(0.0, -400.0, 1e3) == 0.0
  assert power_law.amplitude(math.log(3.0), 0.5, 4.0) == pytest.approx(6.0)


def test_power_law_rejects_too_few_sizes():
  with pytest.raises(ValueError, match="distinct C"):
    power_law.fit_power_law([1.0, 1.0, 2.0], [3.0, 2.0, 1.0], offset=True)


# ---------------------------------------------------------------------------------------------
# Spearman


def test_spearman_monotone_is_minus_one_with_point_ci():
  x = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
  y = 100.0 - 10 * np.arange(5)[:, None] + np.array([0.0, 1.0, 2.0])  # 3 seeds, order kept
  r = bootstrap.spearman_with_ci(x, y, n_boot=500)
  assert r["rho"] == pytest.approx(-1.0, abs=1e-12)
  assert r["lo"] == pytest.approx(-1.0, abs=1e-12) and r["hi"] == pytest.approx(-1.0, abs=1e-12)
  assert r["per_seed"] == pytest.approx([-1.0] * 3)


def test_spearman_noisy_ci_contains_rho_and_has_width():
  rng = np.random.default_rng(0)
  x = np.geomspace(1, 100, 8)
  y = -np.log(x)[:, None] + 1.0 * rng.standard_normal((8, 3))
  r = bootstrap.spearman_with_ci(x, y, n_boot=1000)
  assert r["rho"] == pytest.approx(stats.spearmanr(x, y.mean(axis=1)).statistic)
  assert r["lo"] <= r["rho"] <= r["hi"] and r["hi"] - r["lo"] > 0.1 and r["rho"] < -0.5


def test_spearman_missing_runs_and_single_seed():
  rng = np.random.default_rng(1)
  x = np.arange(1.0, 8.0)
  y = -x[:, None] + 2.0 * rng.standard_normal((7, 3))
  y[2, 1] = np.nan
  y[5] = np.nan  # a member with no finished run is dropped
  r = bootstrap.spearman_with_ci(x, y, n_boot=300)
  keep = np.arange(7) != 5
  assert r["rho"] == pytest.approx(stats.spearmanr(x[keep], np.nanmean(y[keep], axis=1)).statistic)
  ok = keep & np.isfinite(y[:, 1])
  assert r["per_seed"][1] == pytest.approx(stats.spearmanr(x[ok], y[ok, 1]).statistic)
  assert np.isfinite([r["lo"], r["hi"]]).all() and r["lo"] <= r["rho"] <= r["hi"]
  one = bootstrap.spearman_with_ci(x, y[:, :1])
  assert math.isnan(one["lo"]) and math.isnan(one["hi"]) and np.isfinite(one["rho"])


# ---------------------------------------------------------------------------------------------
# Frontier and plan


def test_frontier_hand_example():
  # (C, y): (2, 9) is beaten by (2, 8) at equal C; (5, 6) by (4, 5); (3, 8) ties (2, 8), not beaten
  C = np.array([5.0, 2.0, 1.0, 3.0, 2.0, 4.0, np.nan])
  y = np.array([6.0, 9.0, 10.0, 8.0, 8.0, 5.0, 1.0])
  assert power_law.frontier(C, y).tolist() == [2, 4, 3, 5]


def test_isoflop_plan_exact_steps():
  plan = members_lib.isoflop_plan([1e4, 1e6], {"S": 6.0, "B": 23.0, "XL": 119.0}, batch_size=256)
  got = [(p["budget"], p["model"], p["steps"]) for p in plan]
  # 1e4/(3*6*256)=2.17, 1e4/17664=0.57 -> 1, XL 0.11 -> skipped; 1e6: 217.01, 56.6, 10.9
  assert got == [(1e4, "S", 2), (1e4, "B", 1), (1e6, "S", 217), (1e6, "B", 57), (1e6, "XL", 11)]
  assert plan[3]["compute"] == 57 * 3 * 23.0 * 256 and plan[3]["images"] == 57 * 256


# ---------------------------------------------------------------------------------------------
# Iso-FLOP optimum

TRUE = dict(E=0.5, A=2.0, alpha=0.5, B=300.0, beta=0.3)  # asymmetric: a = 0.3/0.8 = 0.375
A_TRUE = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])


def _isoflop_runs(centre=1.0, noise=0.003, seed=0, budgets=(1e8, 1e9, 1e10, 1e11)):
  """Runs on an iso-FLOP grid in DiT units: N = forward Gflops, D = images, C = 3·N·D."""
  t, rng = TRUE, np.random.default_rng(seed)
  rows = []
  for c in budgets:
    n_opt = float(isoflop._n_opt([t[k] for k in ("E", "A", "alpha", "B", "beta")], c, 3.0))
    for n in centre * n_opt * np.geomspace(1 / 8, 8, 7):
      d = c / (3 * n)
      loss = t["E"] + t["A"] / n ** t["alpha"] + t["B"] / d ** t["beta"]
      rows.append((c, n, d, loss * math.exp(noise * rng.standard_normal())))
  return np.array(rows).T


@pytest.fixture(scope="module")
def centred():
  c, n, d, loss = _isoflop_runs()
  return isoflop.isoflop_optimum(c, n, loss, d_R=d, n_boot=100)


def test_isoflop_parametric_recovers_exponents(centred):
  p = centred["parametric"]
  assert centred["method"] == "parametric" and centred["a"] == p["a"]
  assert abs(p["alpha"] - TRUE["alpha"]) < 0.05 and abs(p["beta"] - TRUE["beta"]) < 0.03
  assert abs(p["a"] - A_TRUE) < 0.02
  assert p["a_ci"][0] < A_TRUE < p["a_ci"][1], p["a_ci"]
  # alpha's and beta's CIs are tight (~ +-0.005) and cover in 16 and 17 of 20 noise seeds at
  # nominal 90 %, so only their width is held to a number here
  assert 0 < np.diff(p["alpha_ci"])[0] < 0.03 and 0 < np.diff(p["beta_ci"])[0] < 0.03
  assert p["k"] == pytest.approx(3.0)
  t = [TRUE[k] for k in ("E", "A", "alpha", "B", "beta")]
  for row in p["per_budget"]:
    assert abs(math.log(row["n_opt"] / float(isoflop._n_opt(t, row["budget"], 3.0)))) < 0.15


def test_isoflop_parabola_on_centred_grid(centred):
  pb = centred["parabola"]
  assert pb["n_budgets"] == 4 and all(r["bracketed"] for r in pb["per_budget"])
  assert abs(pb["a"] - A_TRUE) < 0.05
  assert pb["a_ci"][0] < pb["a"] < pb["a_ci"][1]
  for r in pb["per_budget"]:
    assert r["n_opt_ci"][0] < r["n_opt"] < r["n_opt_ci"][1]


@pytest.mark.parametrize("centre", [1 / 64, 16.0])
def test_isoflop_off_centre_grid_is_flagged(centre):
  # every size is 8x-512x below (or 2x-128x above) the optimum: loss is monotone along the grid
  c, n, d, loss = _isoflop_runs(centre=centre)
  r = isoflop.isoflop_optimum(c, n, loss, d_R=d, n_boot=20, method="parabola")
  rows = r["parabola"]["per_budget"]
  assert not any(row["bracketed"] for row in rows)
  assert all(math.isnan(row["n_opt"]) and np.isfinite(row["vertex"]) for row in rows)
  if centre < 1:
    # the trap: a parabola through the monotone side still puts its vertex inside the sizes
    assert all(n[c == row["budget"]].min() < row["vertex"] < n[c == row["budget"]].max()
               for row in rows)
  assert r["parabola"]["n_budgets"] == 0 and math.isnan(r["a"])
  assert r["method"] == "parabola" and abs(r["parametric"]["a"] - A_TRUE) < 0.03


def test_isoflop_drifting_grid_biases_parabola_not_parametric():
  # grid centres drift 2x smaller per decade of compute (noise-free): each parabola's vertex is
  # pulled a different amount, so its exponent is off; the parametric fit is exact
  parts = [_isoflop_runs(centre=2.0 ** -i, noise=0.0, budgets=(c,))
           for i, c in enumerate((1e8, 1e9, 1e10, 1e11))]
  c, n, d, loss = np.concatenate(parts, axis=1)
  r = isoflop.isoflop_optimum(c, n, loss, d_R=d, n_boot=10)
  assert r["parabola"]["n_budgets"] == 3  # the 8x-off budget is flagged, not used
  assert abs(r["parabola"]["a"] - A_TRUE) > 0.04
  assert abs(r["a"] - A_TRUE) < 1e-4


def test_isoflop_seeds_and_default_d():
  # 3 seeds per (budget, size): the parabola bootstrap resamples seeds within each size
  runs = [_isoflop_runs(seed=s, noise=0.01, budgets=(1e8, 1e9, 1e10)) for s in range(3)]
  c, n, d, loss = np.concatenate(runs, axis=1)
  loss[5] = np.nan  # a failed run is dropped
  r = isoflop.isoflop_optimum(c, n, loss, n_boot=60)
  pb = r["parabola"]
  assert r["parametric"]["n"] == len(loss) - 1
  assert pb["n_budgets"] == 3 and abs(pb["a"] - A_TRUE) < 0.05 and pb["boot_valid"] == 1.0
  assert pb["a_ci"][0] < A_TRUE < pb["a_ci"][1] and pb["a_ci"][1] - pb["a_ci"][0] < 0.05
  assert abs(r["a"] - A_TRUE) < 0.03 and r["a_ci"][0] < A_TRUE < r["a_ci"][1]
  # D defaults to budget/N: the same fit up to the constant k (here 1 instead of 3)
  assert r["parametric"]["k"] == pytest.approx(1.0)
  r3 = isoflop.isoflop_optimum(c, n, loss, d_R=c / (3 * n), n_boot=5)
  assert r3["parametric"]["k"] == pytest.approx(3.0)
  r1 = isoflop.isoflop_optimum(c, n, loss, n_boot=5)
  assert r1["a"] == pytest.approx(r3["a"], abs=1e-6)
  for u, v in zip(r1["parametric"]["per_budget"], r3["parametric"]["per_budget"]):
    assert u["n_opt"] == pytest.approx(v["n_opt"], rel=1e-4)
