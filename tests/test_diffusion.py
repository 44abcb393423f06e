"""Tests for dit_jax.objectives.diffusion against diffusers, torch, scipy and closed-form Gaussian results."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dit_jax.objectives import diffusion as dd

T = 1000


# Schedules: diffusers keeps its tables in float32, so 1e-6 is the float32 precision of both.

@pytest.mark.parametrize("schedule,diffusers_name", [("linear", "linear"),
                                                     ("cosine", "squaredcos_cap_v2")])
def test_schedule_tables_match_diffusers(schedule, diffusers_name):
  diff = dd.create(schedule=schedule, learn_sigma=False)
  ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=diffusers_name)
  np.testing.assert_allclose(diff.betas, ref.betas.numpy(), atol=1e-6, rtol=0)
  np.testing.assert_allclose(diff.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6, rtol=0)
  # diffusers' fixed_small variance (its posterior variance), for every t > 0. Its float32
  # 1 - abar_t / abar_{t-1} cancels (4e-4 relative at t = 1), hence an absolute tolerance.
  ref_post = np.array([ref._get_variance(t, variance_type="fixed_small").item()
                       for t in range(1, T)])
  np.testing.assert_allclose(diff.posterior_variance[1:], ref_post, atol=1e-6, rtol=0)


def test_linear_schedule_endpoints_and_alias():
  diff = dd.create()
  assert diff.betas[0] == pytest.approx(1e-4) and diff.betas[-1] == pytest.approx(0.02)
  assert diff.num_timesteps == T and diff.learn_sigma and diff.prediction == "eps"
  np.testing.assert_array_equal(dd.get_betas("squaredcos_cap_v2", 50), dd.get_betas("cosine", 50))
  # ADM scales the linear schedule by 1000 / T so other T keep the same total noise.
  np.testing.assert_allclose(dd.linear_betas(250)[[0, -1]], [4e-4, 0.08])


# Respacing (ADM respace.py).

def test_space_timesteps_250_matches_diffusers_linspace():
  # ADM's "250" strides (T - 1) / 249 from 0; no exact .5 ties occur (999/249 = 333/83, odd
  # denominator), so it equals round(linspace(0, 999, 250)): diffusers' "linspace" spacing.
  ref = DDPMScheduler(num_train_timesteps=T, timestep_spacing="linspace")
  ref.set_timesteps(250)
  kept = dd.space_timesteps(T, "250")
  assert kept == sorted(ref.timesteps.tolist())
  assert len(kept) == 250 and kept[0] == 0 and kept[-1] == T - 1
  assert dd.space_timesteps(T, 250) == kept


def test_space_timesteps_ddim_matches_diffusers_leading():
  ref = DDIMScheduler(num_train_timesteps=T)  # "leading": arange(50) * 20
  ref.set_timesteps(50)
  assert dd.space_timesteps(T, "ddim50") == sorted(ref.timesteps.tolist()) == list(range(0, T, 20))
  with pytest.raises(ValueError, match="integer stride"):
    dd.space_timesteps(T, "ddim300")


def test_space_timesteps_sections_hand_derived():
  # The docstring example of ADM's space_timesteps (T = 300, "10,15,20"), derived by hand from its
  # rule: section i covers [start, start + 100); stride (100 - 1) / (count - 1) is accumulated in
  # float and rounded half-to-even. Section 2's 8th step is at 7 * 99/14 = 49.5 in exact arithmetic,
  # but the float sum lands just below (49.4999...), so ADM keeps 149, not 150.
  expected = ([0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
              + [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199]
              + [200, 205, 210, 216, 221, 226, 231, 236, 242, 247, 252, 257, 263, 268, 273, 278,
                 283, 289, 294, 299])
  assert dd.space_timesteps(300, "10,15,20") == expected
  np.testing.assert_array_equal(dd.create(respacing="").timestep_map, np.arange(T))


def test_space_timesteps_empty_means_no_respacing():
  for empty in ("", " ", None):
    assert dd.space_timesteps(T, empty) == list(range(T))
    np.testing.assert_array_equal(dd.create(respacing=empty).timestep_map, np.arange(T))
  assert dd.space_timesteps(T, "") == dd.space_timesteps(T, str(T)) == dd.space_timesteps(T, T)
  np.testing.assert_array_equal(dd.create(respacing="").betas, dd.create().betas)


def test_space_timesteps_bad_input():
  with pytest.raises(ValueError, match="cannot take"):
    dd.space_timesteps(T, "2000")
  with pytest.raises(ValueError, match="expected"):
    dd.space_timesteps(T, "fast")
  with pytest.raises(ValueError, match="at least 2"):
    dd.create(respacing="1")


def test_respaced_process_keeps_noise_levels():
  base = dd.create()
  spaced = dd.create(respacing="250")
  kept = np.asarray(spaced.timestep_map)
  np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
  # Betas recomputed from alpha-bar: the product over kept steps reproduces alpha-bar.
  np.testing.assert_allclose(np.cumprod(1 - spaced.betas), spaced.alphas_cumprod, rtol=1e-10)
  assert spaced.betas[0] == base.betas[0] and spaced.betas[1] > base.betas[4]
  # The model is called with the ORIGINAL timestep.
  np.testing.assert_array_equal(spaced.model_timesteps(jnp.array([0, 1, 249])), [0, 4, 999])


# Forward process and parameterisations.

def diffusers_in_float64(ref):
  """diffusers' scheduler with its alpha-bar cumprod taken in float64 over its own (float32) betas.

  In float32 its 1 - abar cancels to ~4e-6 absolute error in sqrt(1 - abar) at t = 1, above the
  1e-6 we compare at; the formulas are unchanged.
  """
  ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), 0)
  ref.one = torch.tensor(1.0, dtype=torch.float64)
  if hasattr(ref, "final_alpha_cumprod"):
    ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
  return ref


def test_q_sample_and_v_match_diffusers():
  diff = dd.create(learn_sigma=False)
  ref = diffusers_in_float64(DDPMScheduler(num_train_timesteps=T))
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (6, 4, 4, 3)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 1, 10, 500, 998, 999])
  to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2), np.float64))
  from_torch = lambda a: a.numpy().transpose(0, 2, 3, 1)
  want = from_torch(ref.add_noise(to_torch(x0), to_torch(noise), torch.from_numpy(t)))
  np.testing.assert_allclose(diff.q_sample(x0, t, noise), want, atol=1e-6)
  want_v = from_torch(ref.get_velocity(to_torch(x0), to_torch(noise), torch.from_numpy(t)))
  np.testing.assert_allclose(diff.get_v(x0, noise, t), want_v, atol=1e-6)


def test_parameterisation_round_trips():
  diff = dd.create()
  rng = np.random.default_rng(1)
  x0 = rng.uniform(-1, 1, (4, 2, 2, 3)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 100, 600, 999])
  x_t = diff.q_sample(x0, t, noise)
  np.testing.assert_allclose(diff.predict_x0_from_eps(x_t, t, noise), x0, atol=2e-4)
  np.testing.assert_allclose(diff.predict_eps_from_x0(x_t, t, x0), noise, atol=2e-4)
  v = diff.get_v(x0, noise, t)
  np.testing.assert_allclose(diff.predict_x0_from_v(x_t, t, v), x0, atol=1e-5)


def test_q_posterior_is_gaussian_conditioning():
  """q(x_{t-1} | x_t, x_0) against conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
  diff = dd.create(respacing="50")
  x0 = np.array([0.3], np.float32).reshape(1, 1, 1, 1)
  x_t = np.array([-0.7], np.float32).reshape(1, 1, 1, 1)
  for t in [1, 7, 49]:
    a, a_prev = diff.alphas_cumprod[t], diff.alphas_cumprod_prev[t]
    # x_{t-1} = sqrt(a_prev) x0 + e1, x_t = sqrt(a / a_prev) x_{t-1} + e2.
    var_prev, gain, var_step = 1 - a_prev, math.sqrt(a / a_prev), 1 - a / a_prev
    cov = gain * var_prev
    var_t = gain ** 2 * var_prev + var_step
    mean_want = math.sqrt(a_prev) * 0.3 + cov / var_t * (-0.7 - math.sqrt(a) * 0.3)
    var_want = var_prev - cov ** 2 / var_t
    mean, var, log_var = diff.q_posterior_mean_variance(x0, x_t, np.array([t]))
    np.testing.assert_allclose(float(mean[0, 0, 0, 0]), mean_want, rtol=1e-5)
    np.testing.assert_allclose(float(var[0, 0, 0, 0]), var_want, rtol=1e-5)
    np.testing.assert_allclose(float(log_var[0, 0, 0, 0]), math.log(var_want), rtol=1e-5)


def test_sample_t_uniform():
  diff = dd.create(respacing="250")
  t = np.asarray(diff.sample_t(jax.random.key(0), 100_000))
  assert t.dtype == np.int32 and t.min() == 0 and t.max() == 249
  counts = np.bincount(t, minlength=250)
  assert scipy.stats.chisquare(counts).pvalue > 1e-4


def test_create_bad_input():
  with pytest.raises(ValueError, match="noise schedule"):
    dd.create(schedule="quadratic")
  with pytest.raises(ValueError, match="prediction"):
    dd.create(prediction="score")
  with pytest.raises(ValueError, match="channels"):
    dd.create().p_mean_variance(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)), jnp.zeros(2, int))


# VLB pieces against torch and scipy.

def test_normal_kl_matches_torch():
  rng = np.random.default_rng(2)
  m1, m2 = rng.normal(size=(2, 100))
  lv1, lv2 = rng.uniform(-8, 2, size=(2, 100))
  want = torch.distributions.kl_divergence(
      torch.distributions.Normal(torch.tensor(m1), torch.tensor(np.exp(0.5 * lv1))),
      torch.distributions.Normal(torch.tensor(m2), torch.tensor(np.exp(0.5 * lv2)))).numpy()
  got = dd.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_approx_standard_normal_cdf_error():
  x = np.linspace(-8, 8, 20001)
  err = np.abs(np.asarray(dd.approx_standard_normal_cdf(jnp.asarray(x, jnp.float32)))
               - scipy.stats.norm.cdf(x))
  assert err.max() < 2e-4  # the tanh approximation's own error (1.8e-4 in float64)


def test_discretized_gaussian_log_likelihood_matches_scipy():
  """Bins of width 2/255 around each 8-bit value, open-ended at -1 and 1, vs scipy's exact CDF.

  Each bin probability is a difference of two approximate CDFs, so it is within 2 * 2e-4 of the
  exact one; on bins holding >= 5% of the mass that is <= 1% relative, so log-probs agree to 1e-2.
  """
  x_K = np.arange(256) / 127.5 - 1.0
  for mean, log_scale in [(0.0, math.log(0.01)), (0.37, math.log(0.05)), (-0.9, math.log(0.2)),
                          (0.98, math.log(0.03)), (-1.2, math.log(0.1))]:
    x = jnp.asarray(x_K, jnp.float32)
    got = np.asarray(dd.discretized_gaussian_log_likelihood(
        x, jnp.full_like(x, mean), jnp.full_like(x, log_scale)), np.float64)
    # The approximate CDF telescopes over the partition: probabilities sum to one.
    assert np.exp(got).sum() == pytest.approx(1.0, abs=1e-5)
    edges = np.concatenate([[-np.inf], x_K[:-1] + 1 / 255, [np.inf]])
    want_p = np.diff(scipy.stats.norm.cdf(edges, mean, math.exp(log_scale)))
    np.testing.assert_allclose(np.exp(got), want_p, atol=4e-4)
    big = want_p > 0.05
    assert big.any()
    np.testing.assert_allclose(got[big], np.log(want_p[big]), atol=1e-2)
  # The open end bins: x = -1 takes all mass below -1 + 1/255.
  got = dd.discretized_gaussian_log_likelihood(jnp.array([-1.0, 1.0]), jnp.array([-1.5, 1.5]),
                                               jnp.log(jnp.array([0.1, 0.1])))
  np.testing.assert_allclose(got, np.log(scipy.stats.norm.cdf(0.5 / 0.1 + 1 / 25.5)), atol=1e-5)


def _adm_log_likelihood_float64(x, means, log_scales):
  """ADM's discretized_gaussian_log_likelihood (guided_diffusion/losses.py) in float64."""
  x, means, log_scales = (np.asarray(a, np.float64) for a in (x, means, log_scales))
  cdf = lambda z: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z ** 3)))
  inv_std = np.exp(-log_scales)
  cdf_plus = cdf(inv_std * (x - means + 1 / 255))
  cdf_min = cdf(inv_std * (x - means - 1 / 255))
  return np.where(x < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                  np.where(x > 0.999, np.log(np.maximum(1.0 - cdf_min, 1e-12)),
                           np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))


def test_discretized_log_likelihood_far_tails_match_adm_in_float64():
  """Means k sigma off every 8-bit value, both sides, vs ADM's formula in float64.

  float32 tanh is exactly -1 past u ~ 8, so a 0.5 (1 + tanh) CDF is 0 from ~5 sigma out and the
  1e-12 floor replaced log-probs like -17 by -27.6 (3.632 instead of 3.567 bits/dim in one report).
  The float64 reference is exact to ~1e-16 / p, so the cases stay above p ~ 1e-11 or deep below
  the floor (both -27.63).
  """
  x_K = np.arange(256) / 127.5 - 1.0
  for sigma in (0.1, 0.02, 0.005):
    for k in (0.0, 0.4, 2.0, 4.0, 5.0, 5.5, 6.0, 20.0):
      for sign in (-1.0, 1.0):
        x = jnp.asarray(x_K, jnp.float32)
        means = x + jnp.float32(sign * k * sigma)
        log_scales = jnp.full_like(x, np.log(sigma))
        got = np.asarray(dd.discretized_gaussian_log_likelihood(x, means, log_scales), np.float64)
        # The reference sees the same float32 inputs.
        want = _adm_log_likelihood_float64(x, means, log_scales)
        # atol: a probability near 1 is held to float32's spacing there (6e-8), in ADM as here.
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=3e-7,
                                   err_msg=f"sigma={sigma} k={k} sign={sign}")
  # A pixel at -1 or +1 with the mean 5 sigma inside: ~ -16.6 nats, not the -27.6 of the floor.
  sigma = 0.1
  x = jnp.array([-1.0, 1.0])
  means = jnp.array([-1.0 + 5 * sigma, 1.0 - 5 * sigma])
  log_scales = jnp.full((2,), np.log(sigma), jnp.float32)
  got = np.asarray(dd.discretized_gaussian_log_likelihood(x, means, log_scales))
  want = _adm_log_likelihood_float64(x, means, log_scales)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert -17.0 < got.min() and got.max() < -16.0


def test_decoder_nll_of_a_far_off_prediction_matches_adm_in_float64():
  """vb_terms_bpd at t = 0 (the decoder NLL, bits/dim) for x_0 predictions 3-7 sigma off."""
  diff = dd.create()
  rng = np.random.default_rng(8)
  x0 = (rng.integers(0, 256, (4, 8, 8, 3)) / 127.5 - 1.0).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.zeros(4, np.int32)
  x_t = diff.q_sample(x0, t, noise)
  sigma0 = float(np.exp(0.5 * diff.posterior_log_variance_clipped[0]))
  # An eps prediction whose posterior mean (x_0 coefficient ~1 at t = 0) misses by 3-7 sigma.
  offset = sigma0 * rng.uniform(3, 7, x0.shape) * rng.choice([-1, 1], x0.shape)
  eps = noise - offset / diff.sqrt_recipm1_alphas_cumprod[0]
  out = jnp.concatenate([jnp.asarray(eps, jnp.float32), jnp.zeros_like(x_t)], -1)
  got = np.asarray(diff.vb_terms_bpd(out, x0, x_t, t), np.float64)
  pm = diff.p_mean_variance(out, x_t, t)
  want = -_adm_log_likelihood_float64(x0, pm["mean"], 0.5 * pm["log_variance"]).mean(
      (1, 2, 3)) / np.log(2.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


# Training losses.

def _toy_model(learn_sigma):
  def model_fn(x_t, t):
    out = jnp.tanh(x_t * (1.0 + t[:, None, None, None] / 1000.0))
    return jnp.concatenate([out, 0.5 * out], -1) if learn_sigma else out
  return model_fn


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_losses_terms(prediction):
  diff = dd.create(prediction=prediction, respacing="")
  rng = np.random.default_rng(3)
  x0 = rng.uniform(-1, 1, (5, 4, 4, 2)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 1, 250, 700, 999])
  model_fn = _toy_model(True)
  losses = diff.training_losses(model_fn, x0, t, noise)
  x_t = diff.q_sample(x0, t, noise)
  out = model_fn(x_t, t)
  target = {"eps": noise, "x0": x0, "v": diff.get_v(x0, noise, t)}[prediction]
  np.testing.assert_allclose(losses["mse"], np.mean((target - out[..., :2]) ** 2, (1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(losses["vb"], diff.vb_terms_bpd(out, x0, x_t, t), rtol=1e-5,
                             atol=1e-7)  # float32 cancellation in tiny late-t KLs
  np.testing.assert_allclose(losses["loss"], losses["mse"] + losses["vb"], rtol=1e-6)
  assert all(v.shape == (5,) for v in losses.values())
  assert np.all(np.asarray(losses["vb"]) > 0)


def test_vb_term_stops_gradient_to_mean():
  diff = dd.create()
  rng = np.random.default_rng(4)
  x0 = rng.uniform(-1, 1, (3, 4, 4, 2)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 300, 900])
  x_t = diff.q_sample(x0, t, noise)
  out0 = jnp.asarray(rng.normal(size=(3, 4, 4, 4)), jnp.float32) * 0.5

  def vb_of(out):
    return diff.training_losses(lambda *_: out, x0, t, noise)["vb"].sum()

  grad = jax.grad(vb_of)(out0)
  assert np.all(np.asarray(grad[..., :2]) == 0)  # mean channels learn from the MSE only
  assert np.abs(np.asarray(grad[..., 2:])).min() > 0
  # Without the stop-gradient the same VLB does move the mean.
  free = jax.grad(lambda o: diff.vb_terms_bpd(o, x0, x_t, t).sum())(out0)
  assert np.abs(np.asarray(free[..., :2])).max() > 0


def test_fixed_sigma_has_no_vb():
  diff = dd.create(learn_sigma=False)
  x0 = np.zeros((2, 2, 2, 3), np.float32)
  losses = diff.training_losses(_toy_model(False), x0, np.array([3, 4]), np.ones_like(x0))
  np.testing.assert_array_equal(losses["vb"], 0.0)
  with pytest.raises(ValueError, match="channels"):
    diff.training_losses(_toy_model(True), x0, np.array([3, 4]), np.ones_like(x0))


# The VLB of the exact model for Gaussian data equals the data's discretised NLL.

MU, SIGMA = 0.1, 0.2


def _optimal_reverse_tables():
  """Closed forms for data N(MU, SIGMA^2), from the 1000-step linear schedule (numpy, float64)."""
  betas = np.linspace(1e-4, 0.02, T)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1 - abar_prev) / (1 - abar)
  min_log = np.log(np.append(post_var[1], post_var[1:]))
  coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
  var_x0_given_xt = SIGMA ** 2 * (1 - abar) / (abar * SIGMA ** 2 + 1 - abar)
  # The true reverse step q(x_{t-1} | x_t) = E over x_0 | x_t of the posterior: its variance.
  reverse_var = post_var + coef1 ** 2 * var_x0_given_xt
  frac = (np.log(reverse_var) - min_log) / (np.log(betas) - min_log)
  return abar, 2 * frac - 1  # LEARNED_RANGE output v in [-1, 1]


def gaussian_eps(x_t, abar_t):
  """E[eps | x_t] for data N(MU, SIGMA^2): sqrt(1-a) (x_t - sqrt(a) MU) / (a SIGMA^2 + 1 - a)."""
  return jnp.sqrt(1 - abar_t) * (x_t - jnp.sqrt(abar_t) * MU) / (abar_t * SIGMA ** 2 + 1 - abar_t)


def test_vlb_of_exact_model_equals_discretised_nll():
  """Sum of all VLB terms (prior + 999 KLs + decoder NLL) for the exact eps and LEARNED_RANGE
  variance vs -E log2 P(data in the decoder's bin around x_0), data N(0.1, 0.2^2).

  Every expectation over (x_0, eps) is a 32x32 Gauss-Hermite product rule (exact for the KL terms,
  which are quadratic), so the comparison is deterministic. sigma = 0.2 is 25 bin widths, and
  P(|x_0| > 0.999) ~ 1e-5, so the open end bins carry no weight. The model's exact reverse chain
  makes its x_0 distribution the data's, so the VLB is an upper bound on that discretised NLL whose
  only slack is conditioning x_1 on "x_0 in a bin of width w = 2/255" instead of on x_0:
  KL ~ (ln(1+r) - r/(1+r))/2 with r = (w^2/12)/beta_0 = 0.051, i.e. 0.0009 bits/dim. We assert
  0 <= gap <= 0.002 bits. With fixed-large variance the same eps gives a looser bound (gap 0.13).
  """
  abar, var_values = _optimal_reverse_tables()
  n = 32
  z, w = np.polynomial.hermite_e.hermegauss(n)
  w = w / w.sum()
  x0_nodes = MU + SIGMA * z
  # Flatten (t, x0 node, noise node) into the batch, so mean_flat is per point and weights apply.
  t = np.repeat(np.arange(T), n * n).astype(np.int32)
  x0 = np.tile(np.repeat(x0_nodes, n), T).astype(np.float32).reshape(-1, 1, 1, 1)
  noise = np.tile(np.tile(z, n), T).astype(np.float32).reshape(-1, 1, 1, 1)
  weights = np.tile(np.outer(w, w).ravel(), T)

  learned, fixed = dd.create(learn_sigma=True), dd.create(learn_sigma=False)

  @jax.jit
  def terms(x0, noise, t, abar, var_values):
    x_t = learned.q_sample(x0, t, noise)
    a = abar[t][:, None, None, None]
    eps = gaussian_eps(x_t, a)
    var_out = jnp.broadcast_to(var_values[t][:, None, None, None], eps.shape)
    out = jnp.concatenate([eps, var_out], -1)
    return (learned.vb_terms_bpd(out, x0, x_t, t), fixed.vb_terms_bpd(eps, x0, x_t, t),
            learned.prior_bpd(x0))

  vb_learned, vb_fixed, prior = (np.asarray(a, np.float64) for a in terms(
      x0, noise, t, jnp.asarray(abar, jnp.float32), jnp.asarray(var_values, jnp.float32)))
  prior = np.sum(weights * prior) / T
  vlb_learned = np.sum(weights * vb_learned) + prior
  vlb_fixed = np.sum(weights * vb_fixed) + prior

  # The same bins as the decoder, integrated under the data density with scipy's exact CDF.
  lo = np.where(x0_nodes < -0.999, 0.0, scipy.stats.norm.cdf(x0_nodes - 1 / 255, MU, SIGMA))
  hi = np.where(x0_nodes > 0.999, 1.0, scipy.stats.norm.cdf(x0_nodes + 1 / 255, MU, SIGMA))
  nll_bits = np.sum(w * -np.log2(np.maximum(hi - lo, 1e-300)))
  # Sanity: w << sigma, so this is the differential entropy + log2(1/w) to within 1e-4.
  assert nll_bits == pytest.approx(0.5 * math.log2(2 * math.pi * math.e * SIGMA ** 2)
                                   - math.log2(2 / 255), abs=1e-4)

  gap = vlb_learned - nll_bits
  assert 0.0 <= gap <= 2e-3, (vlb_learned, nll_bits)
  assert vlb_fixed - nll_bits > 0.05, (vlb_fixed, nll_bits)
