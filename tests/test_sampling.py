"""Tests for dit_jax.objectives.sampling: steps vs diffusers, Gaussian data vs closed forms, sharding, CFG."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.objectives import diffusion as dd
from dit_jax.objectives import per_example, sampling

T = 1000
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_in_float64(ref):
  """diffusers' scheduler with alpha-bar cumprod'd in float64 from its own betas (same formulas).

  Its float32 1 - abar cancels to ~4e-6 absolute error at t = 1, above the 1e-6 compared at.
  """
  ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), 0)
  ref.one = torch.tensor(1.0, dtype=torch.float64)
  if hasattr(ref, "final_alpha_cumprod"):
    ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
  return ref


def nhwc_to_torch(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float64).transpose(0, 3, 1, 2)))


def torch_to_nhwc(a):
  return a.numpy().transpose(0, 2, 3, 1)


# One step against diffusers, same model output and noise.

@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("respacing", ["", "250"])
def test_ddpm_step_matches_diffusers(variance, prediction, respacing):
  diff = dd.create(respacing=respacing, learn_sigma=variance == "learned_range",
                   sigma_small=variance == "fixed_small", prediction=prediction)
  ref = DDPMScheduler(num_train_timesteps=T, variance_type=variance, clip_sample=False,
                      prediction_type=DIFFUSERS_PREDICTION[prediction],
                      timestep_spacing="linspace")
  if respacing:
    ref.set_timesteps(int(respacing))  # "linspace" spacing is ADM's "250" (see test_diffusion)
  diffusers_in_float64(ref)
  rng = np.random.default_rng(0)
  c = 3
  for t in [0, 1, 2, 37, diff.num_timesteps - 1]:
    x_t = rng.standard_normal((2, 4, 4, c)).astype(np.float32)
    out = rng.standard_normal((2, 4, 4, 2 * c if diff.learn_sigma else c)).astype(np.float32)
    out[..., c:] = np.tanh(out[..., c:]) if diff.learn_sigma else out[..., c:]
    orig_t = int(diff.timestep_map[t])
    gen = torch.Generator().manual_seed(t)
    want = ref.step(nhwc_to_torch(out), orig_t, nhwc_to_torch(x_t), generator=gen)
    # diffusers draws its noise with torch.randn(shape, generator) in the output's dtype.
    noise = torch_to_nhwc(torch.randn((2, c, 4, 4), generator=torch.Generator().manual_seed(t),
                                      dtype=torch.float64))
    got, pred_x0 = sampling.ddpm_step(diff, out, x_t, np.full(2, t), noise.astype(np.float32))
    np.testing.assert_allclose(got, torch_to_nhwc(want.prev_sample), atol=1e-6, rtol=1e-6,
                               err_msg=f"t={t}")
    np.testing.assert_allclose(pred_x0, torch_to_nhwc(want.pred_original_sample),
                               atol=1e-6, rtol=1e-5, err_msg=f"t={t}")


def test_ddpm_step_clipped_matches_diffusers():
  diff = dd.create(learn_sigma=False)
  ref = diffusers_in_float64(DDPMScheduler(num_train_timesteps=T, variance_type="fixed_large",
                                           clip_sample=True))
  rng = np.random.default_rng(1)
  x_t = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  out = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  want = ref.step(nhwc_to_torch(out), 500, nhwc_to_torch(x_t),
                  generator=torch.Generator().manual_seed(0))
  noise = torch_to_nhwc(torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64))
  got, pred_x0 = sampling.ddpm_step(diff, out, x_t, np.full(2, 500), noise.astype(np.float32),
                                    clip_denoised=True)
  assert np.abs(np.asarray(pred_x0)).max() == 1.0
  np.testing.assert_allclose(got, torch_to_nhwc(want.prev_sample), atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_step_matches_diffusers(eta, prediction):
  diff = dd.create(respacing="ddim50", learn_sigma=False, prediction=prediction)
  ref = DDIMScheduler(num_train_timesteps=T, clip_sample=False,
                      prediction_type=DIFFUSERS_PREDICTION[prediction])
  ref.set_timesteps(50)  # "leading" spacing 0, 20, ..., 980 = ADM's "ddim50"
  diffusers_in_float64(ref)
  rng = np.random.default_rng(2)
  for t in [0, 1, 25, 49]:
    x_t = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    out = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    want = ref.step(nhwc_to_torch(out), int(diff.timestep_map[t]), nhwc_to_torch(x_t), eta=eta,
                    variance_noise=nhwc_to_torch(noise))
    got, _ = sampling.ddim_step(diff, out, x_t, np.full(2, t), noise, eta=eta)
    np.testing.assert_allclose(got, torch_to_nhwc(want.prev_sample), atol=1e-6, rtol=1e-6,
                               err_msg=f"t={t}")


def test_ddim_ignores_learned_variance_channels():
  diff = dd.create(respacing="ddim50", learn_sigma=True)
  rng = np.random.default_rng(3)
  x_t = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
  out = rng.standard_normal((2, 2, 2, 6)).astype(np.float32)
  a, _ = sampling.ddim_step(diff, out, x_t, np.full(2, 20), np.zeros_like(x_t))
  out[..., 3:] = -out[..., 3:]
  b, _ = sampling.ddim_step(diff, out, x_t, np.full(2, 20), np.zeros_like(x_t))
  np.testing.assert_array_equal(a, b)


# Samplers on Gaussian data driven by the exact eps, vs closed forms.

# Per-channel data N(mu_c, sigma_c^2). |mu| >= 2 sigma so that 2% of mu is >= 5 Monte-Carlo standard
# errors on 65,536 samples per channel; sigma spans 0.5 .. 1.5 around unit-variance latents.
MU_C = np.array([1.0, -1.6, 2.0, 3.0])
SIGMA_C = np.array([0.5, 0.8, 1.0, 1.5])
SAMPLE_SHAPE = (1024, 8, 8, 4)


def _linear_tables():
  betas = np.linspace(1e-4, 0.02, T)
  abar = np.cumprod(1 - betas)
  return betas, abar


def _optimal_var_values():
  """LEARNED_RANGE output in [-1, 1] of the exact model, per (t, channel), on the 1000-step
  schedule (what a trained model outputs; under respacing it is reinterpreted, as in ADM)."""
  betas, abar = _linear_tables()
  abar_prev = np.append(1.0, abar[:-1])
  post = betas * (1 - abar_prev) / (1 - abar)
  min_log = np.log(np.append(post[1], post[1:]))[:, None]
  coef1 = (betas * np.sqrt(abar_prev) / (1 - abar))[:, None]
  s2 = SIGMA_C[None] ** 2
  a = abar[:, None]
  reverse_var = post[:, None] + coef1 ** 2 * s2 * (1 - a) / (a * s2 + 1 - a)
  frac = (np.log(reverse_var) - min_log) / (np.log(betas)[:, None] - min_log)
  return 2 * frac - 1  # [T, C]


def gaussian_model_fn(learn_sigma):
  """The exact denoiser for N(MU_C, SIGMA_C^2) data, called with ORIGINAL timesteps."""
  _, abar = _linear_tables()
  abar_T = jnp.asarray(abar, jnp.float32)
  var_values_TxC = jnp.asarray(_optimal_var_values(), jnp.float32)
  mu, s2 = jnp.asarray(MU_C, jnp.float32), jnp.asarray(SIGMA_C ** 2, jnp.float32)

  def model_fn(x, t):
    a = abar_T[t][:, None, None, None]
    eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s2 + 1 - a)
    if not learn_sigma:
      return eps
    var_out = jnp.broadcast_to(var_values_TxC[t][:, None, None, :], x.shape)
    return jnp.concatenate([eps, var_out], -1)
  return model_fn


def exact_output_moments(kept, rule, eta=0.0):
  """Mean and std per channel of the sampler's output, propagated in closed form (float64).

  Each step maps x linearly plus Gaussian noise (the exact eps is affine in x), so N(m, v) stays
  Gaussian: x_prev = K x + L + sqrt(nv) z. rule: "learned", "large", "small" (DDPM) or "ddim".
  """
  betas0, abar0 = _linear_tables()
  kept = np.asarray(kept)
  ab = abar0[kept]
  abp = np.append(1.0, ab[:-1])
  b = 1 - ab / abp
  post = b * (1 - abp) / (1 - ab)
  post_clipped = np.append(post[1], post[1:])
  frac = (_optimal_var_values() + 1) / 2
  m, v = np.zeros(4), np.ones(4)
  for i in reversed(range(len(kept))):
    a = ab[i]
    c = np.sqrt(1 - a) / (a * SIGMA_C ** 2 + 1 - a)
    eps_k, eps_l = c, -c * np.sqrt(a) * MU_C  # eps = eps_k x + eps_l
    x0_k, x0_l = (1 - np.sqrt(1 - a) * eps_k) / np.sqrt(a), -np.sqrt(1 - a) * eps_l / np.sqrt(a)
    if rule == "ddim":
      nv = eta ** 2 * post[i]
      direction = np.sqrt(1 - abp[i] - nv)
      k, l = np.sqrt(abp[i]) * x0_k + direction * eps_k, np.sqrt(abp[i]) * x0_l + direction * eps_l
    else:
      c1 = b[i] * np.sqrt(abp[i]) / (1 - a)
      c2 = (1 - abp[i]) * np.sqrt(1 - b[i]) / (1 - a)
      k, l = c1 * x0_k + c2, c1 * x0_l
      nv = {"large": b[i], "small": post[i],
            "learned": np.exp(frac[kept[i]] * np.log(b[i])
                              + (1 - frac[kept[i]]) * np.log(post_clipped[i]))}[rule]
    nv = nv if i > 0 else 0.0
    m, v = k * m + l, k * k * v + nv
  return m, np.sqrt(v)


def _moments(x):
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return x.mean(0), x.std(0), x.shape[0]


SAMPLERS = {
    # name: (respacing, sampler, variance rule, eta, checked against mu/sigma at 2%)
    "ddpm50_learned": ("50", "ddpm", "learned", 0.0, True),
    "ddpm250_learned": ("250", "ddpm", "learned", 0.0, True),
    "ddpm1000_learned": ("", "ddpm", "learned", 0.0, True),
    "ddpm250_fixed_large": ("250", "ddpm", "large", 0.0, True),
    "ddim50": ("ddim50", "ddim", "ddim", 0.0, False),
    "ddim250": ("ddim250", "ddim", "ddim", 0.0, True),
    "ddim50_eta1": ("ddim50", "ddim", "ddim", 1.0, False),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_gaussian_data_moments(name):
  """Samples of the exact model: moments equal the closed-form propagation of the sampler to
  4.5 Monte-Carlo standard errors, and reproduce (mu, sigma) to 2% where the discretisation allows.

  DDIM eta=0 with 50 steps is a first-order (Euler) step of the probability-flow ODE; for Gaussian
  data it shrinks sigma by 3-6% in closed form (diffusers' DDIMScheduler gives the same trajectory,
  see test_ddim_trajectory_matches_diffusers), so there we check the mean at 2% and sigma at 6%.
  DDIM eta=1 is DDPM with the small (posterior) variance: sigma 6-11% low at 50 steps.
  """
  respacing, kind, rule, eta, at_two_percent = SAMPLERS[name]
  diff = dd.create(respacing=respacing, learn_sigma=rule == "learned", sigma_small=rule == "small")
  model_fn = gaussian_model_fn(diff.learn_sigma)
  if kind == "ddpm":
    fn = jax.jit(lambda rng: sampling.ddpm_sample(model_fn, diff, SAMPLE_SHAPE, rng))
  else:
    fn = jax.jit(lambda rng: sampling.ddim_sample(model_fn, diff, SAMPLE_SHAPE, rng, eta=eta))
  mean, std, n = _moments(fn(jax.random.key(0)))
  print(f"{name}: mean/mu - 1 = {mean / MU_C - 1}, std/sigma - 1 = {std / SIGMA_C - 1}")
  want_mean, want_std = exact_output_moments(diff.timestep_map, rule, eta)
  assert np.all(np.abs(mean - want_mean) <= 4.5 * SIGMA_C / np.sqrt(n)), (mean, want_mean)
  np.testing.assert_allclose(std, want_std, rtol=4.5 / np.sqrt(2 * n))
  np.testing.assert_allclose(mean, MU_C, rtol=0.02)
  if at_two_percent:
    np.testing.assert_allclose(std, SIGMA_C, rtol=0.02)
  elif eta == 0.0:
    np.testing.assert_allclose(std, SIGMA_C, rtol=0.06)
    assert np.all(want_std < SIGMA_C * 0.98)  # the closed form itself is > 2% low


def test_ddim_trajectory_matches_diffusers():
  """50 deterministic DDIM steps from the same x_T: ours (float32) vs diffusers (float64)."""
  diff = dd.create(respacing="ddim50", learn_sigma=False)
  model_fn = gaussian_model_fn(False)
  x_T = np.random.default_rng(4).standard_normal((8, 2, 2, 4)).astype(np.float32)
  got = sampling.ddim_sample(model_fn, diff, x_T.shape, jax.random.key(0), x_T=jnp.asarray(x_T))
  ref = DDIMScheduler(num_train_timesteps=T, clip_sample=False)
  ref.set_timesteps(50)
  diffusers_in_float64(ref)
  x = nhwc_to_torch(x_T)
  for t in ref.timesteps.tolist():
    eps = model_fn(jnp.asarray(torch_to_nhwc(x), jnp.float32), jnp.full((8,), t))
    x = ref.step(nhwc_to_torch(eps), t, x, eta=0.0).prev_sample
  np.testing.assert_allclose(got, torch_to_nhwc(x), atol=2e-5)
  assert np.std(np.asarray(got)) > 0.5  # a real trajectory, not a collapse


# Sharded batches: distinct noise per example and per device, same result as unsharded.

def _label_model_fn_xty(x, t, y):
  """A class-conditional toy: the Gaussian eps shifted by the label (null label 10 is no shift)."""
  eps = gaussian_model_fn(True)(x, t)
  shift = jnp.where(y == 10, 0.0, 0.1 * y.astype(jnp.float32))[:, None, None, None]
  return eps + shift


def test_sharded_sampling_matches_unsharded_and_noise_is_distinct():
  devices = jax.devices()
  assert len(devices) == 8, "conftest provides 8 fake CPU devices"
  mesh = Mesh(np.array(devices), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  diff = dd.create(respacing="10")
  shape = (16, 4, 4, 4)
  y = jnp.arange(16) % 10

  def sample(y, rng, sharding):
    model_fn = sampling.cfg_model_fn(_label_model_fn_xty, y, 10, 1.5)
    return sampling.ddpm_sample(model_fn, diff, shape, rng, sharding=sharding)

  rng = jax.random.key(7)
  sharded_fn = jax.jit(lambda y, rng: sample(y, rng, batch_sharding),
                       in_shardings=(batch_sharding, None), out_shardings=batch_sharding)
  x_sharded = sharded_fn(jax.device_put(y, batch_sharding), rng)
  x_plain = jax.jit(lambda y, rng: sample(y, rng, None))(y, rng)
  assert x_sharded.sharding.is_equivalent_to(batch_sharding, 4)
  assert len({s.device for s in x_sharded.addressable_shards}) == 8
  np.testing.assert_allclose(np.asarray(x_sharded), np.asarray(x_plain), atol=1e-6)

  flat = np.asarray(x_sharded).reshape(16, -1)
  gaps = np.abs(flat[:, None] - flat[None]).max(-1) + np.eye(16)
  assert gaps.min() > 1e-2, "two examples came out identical"
  shards = [np.asarray(s.data) for s in x_sharded.addressable_shards]
  for i in range(8):
    for j in range(i + 1, 8):
      assert not np.allclose(shards[i], shards[j]), "two devices drew the same noise"

  # Example i depends only on (rng, i): a smaller batch reproduces the first rows.
  x_half = jax.jit(lambda y, rng: sampling.ddpm_sample(
      sampling.cfg_model_fn(_label_model_fn_xty, y, 10, 1.5), diff, (8, 4, 4, 4), rng))(y[:8], rng)
  np.testing.assert_allclose(np.asarray(x_half), np.asarray(x_plain)[:8], atol=1e-6)


def test_per_example_normal_is_sharding_invariant():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  key = jax.random.key(3)
  a = jax.jit(lambda k: per_example.per_example_normal(k, (32, 3, 3, 2)), out_shardings=sharding)(key)
  b = per_example.per_example_normal(key, (32, 3, 3, 2))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert abs(float(b.mean())) < 0.15 and abs(float(b.std()) - 1) < 0.1


def test_diffusion_is_a_jit_argument():
  """A Diffusion passed through jit (a pytree of tables) gives what closing over it gives."""
  diff = dd.create(respacing="10")
  model_fn = gaussian_model_fn(True)

  def run(diff, rng):
    x = sampling.ddpm_sample(model_fn, diff, (4, 2, 2, 4), rng)
    noise = jax.random.normal(rng, x.shape)
    losses = diff.training_losses(model_fn, x, diff.sample_t(rng, 4), noise)
    return x, losses["loss"], diff.prior_bpd(x)

  rng = jax.random.key(1)
  for a, b in zip(jax.jit(run)(diff, rng), jax.jit(lambda rng: run(diff, rng))(rng)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sampler_bad_input():
  diff = dd.create(respacing="10", learn_sigma=False)
  with pytest.raises(ValueError, match="x_T shape"):
    sampling.ddpm_sample(gaussian_model_fn(False), diff, (2, 4, 4, 4), jax.random.key(0),
                         x_T=jnp.zeros((3, 4, 4, 4)))
  with pytest.raises(ValueError, match="channels"):  # a learned-sigma model on a fixed process
    sampling.ddim_sample(gaussian_model_fn(True), diff, (2, 4, 4, 4), jax.random.key(0))


# Classifier-free guidance.

def _toy_xty(x, t, y):
  """Output 2C channels whose value depends on x, t and y (scalar labels or [L, D] context)."""
  y_b = y.reshape(y.shape[0], -1).astype(jnp.float32).sum(-1)[:, None, None, None]
  base = jnp.concatenate([x, -x], -1) * (1.0 + 0.1 * y_b) + 0.01 * t[:, None, None, None]
  return base + jnp.arange(2 * x.shape[-1], dtype=jnp.float32) * y_b


def _mix(cond, uncond, scale, n):
  """The guidance rule on the first n channels, in numpy."""
  return uncond[..., :n] + scale * (cond[..., :n] - uncond[..., :n])


def test_cfg_guides_all_prediction_channels_by_default():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((3, 2, 2, 4)), jnp.float32)
  t = jnp.array([5, 500, 999])
  y = jnp.array([1, 2, 3])
  cond = np.asarray(_toy_xty(x, t, y))
  uncond = np.asarray(_toy_xty(x, t, jnp.full(3, 10)))
  got = np.asarray(sampling.cfg_model_fn(_toy_xty, y, 10, 4.0)(x, t))
  np.testing.assert_allclose(got[..., :4], _mix(cond, uncond, 4.0, 4),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[..., 4:], cond[..., 4:])  # learned variance: conditional
  # Scale 1 is the conditional model.
  np.testing.assert_allclose(np.asarray(sampling.cfg_model_fn(_toy_xty, y, 10, 1.0)(x, t)), cond,
                             rtol=1e-6)


def test_cfg_official_three_channel_quirk():
  """guide_channels=3: DiT's forward_with_cfg guides eps channels 0-2 only (DiT#41); channel 3
  and the variance come from the conditional half, which is the half sample.py keeps."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 2, 2, 4)), jnp.float32)
  t = jnp.array([10, 20])
  y = jnp.array([4, 7])
  cond = np.asarray(_toy_xty(x, t, y))
  uncond = np.asarray(_toy_xty(x, t, jnp.full(2, 10)))
  got = np.asarray(sampling.cfg_model_fn(_toy_xty, y, 10, 1.5, guide_channels=3)(x, t))
  np.testing.assert_allclose(got[..., :3], _mix(cond, uncond, 1.5, 3),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[..., 3:], cond[..., 3:])
  full = np.asarray(sampling.cfg_model_fn(_toy_xty, y, 10, 1.5)(x, t))
  assert not np.allclose(full[..., 3], got[..., 3])


def test_cfg_with_context_arrays():
  """Text-style conditioning: y is [B, L, D] context and the null is one [L, D] embedding."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 2, 2, 3)), jnp.float32)
  t = jnp.array([1, 2])
  ctx = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32)
  null = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
  cond = np.asarray(_toy_xty(x, t, ctx))
  uncond = np.asarray(_toy_xty(x, t, jnp.broadcast_to(null, ctx.shape)))
  got = np.asarray(sampling.cfg_model_fn(_toy_xty, ctx, null, 3.0)(x, t))
  np.testing.assert_allclose(got[..., :3], _mix(cond, uncond, 3.0, 3),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="batch"):
    sampling.cfg_model_fn(_toy_xty, ctx[:1], null, 3.0)(x, t)
  with pytest.raises(ValueError, match="guide_channels"):
    sampling.cfg_model_fn(_toy_xty, ctx, null, 3.0, guide_channels=7)(x, t)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_cfg_guide_channels_bounded_by_the_prediction_channels(learn_sigma):
  """guide_channels in 1..C, C = x's (eps) channels; C+1 .. 2C would guide the learned variance."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((2, 2, 2, 3)), jnp.float32)
  t, y = jnp.array([1, 2]), jnp.array([4, 7])
  xty = _toy_xty if learn_sigma else (lambda x, t, y: _toy_xty(x, t, y)[..., :3])
  for n in (1, 3):
    got = np.asarray(sampling.cfg_model_fn(xty, y, 10, 2.0, guide_channels=n)(x, t))
    assert got.shape[-1] == (6 if learn_sigma else 3)
  for n in (4, 5, 6):
    with pytest.raises(ValueError, match=r"guide_channels=%d outside \[1, 3\]" % n):
      sampling.cfg_model_fn(xty, y, 10, 2.0, guide_channels=n)(x, t)
  for n in (0, -1, 1.5):
    with pytest.raises(ValueError, match="guide_channels"):
      sampling.cfg_model_fn(xty, y, 10, 2.0, guide_channels=n)
  with pytest.raises(ValueError, match="expected 3 .* or 6"):
    sampling.cfg_model_fn(lambda x, t, y: _toy_xty(x, t, y)[..., :5], y, 10, 2.0)(x, t)


# Clipping x_0 (ADM's pixel sampler) and the trajectory (ADM's *_sample_loop_progressive).

def _loop_noise(rng, shape, num_steps):
  """The sampler's draws: x_T from split(rng)[0], step i's noise from fold_in(split(rng)[1], i)."""
  rng_init, rng_steps = jax.random.split(rng)
  x_T = np.asarray(per_example.per_example_normal(rng_init, shape), np.float64)
  return x_T, {i: np.asarray(per_example.per_example_normal(jax.random.fold_in(rng_steps, i), shape),
                             np.float64) for i in range(num_steps)}


def _adm_loop_float64(diff, x_T, noise, sampler, clip_denoised, eta=0.0):
  """ADM's p_sample / ddim_sample loop in float64 on the exact Gaussian model (learned range).

  p_mean_variance: x_0 from eps, clamped to [-1, 1] if clip_denoised, BEFORE the posterior mean
  (and, for DDIM, before re-deriving eps). Returns the list of x after each step.
  """
  _, abar0 = _linear_tables()
  var_values = _optimal_var_values()
  x, out = x_T, []
  for i in reversed(range(diff.num_timesteps)):
    t0 = int(diff.timestep_map[i])
    a0 = abar0[t0]
    eps = np.sqrt(1 - a0) * (x - np.sqrt(a0) * MU_C) / (a0 * SIGMA_C ** 2 + 1 - a0)
    x0 = np.sqrt(1 / diff.alphas_cumprod[i]) * x - np.sqrt(1 / diff.alphas_cumprod[i] - 1) * eps
    if clip_denoised:
      x0 = np.clip(x0, -1, 1)
    if sampler == "ddpm":
      frac = (var_values[t0] + 1) / 2
      log_var = frac * diff.log_betas[i] + (1 - frac) * diff.posterior_log_variance_clipped[i]
      mean = diff.posterior_mean_coef1[i] * x0 + diff.posterior_mean_coef2[i] * x
      x = mean + (i != 0) * np.exp(0.5 * log_var) * noise[i]
    else:
      eps = (np.sqrt(1 / diff.alphas_cumprod[i]) * x - x0) / np.sqrt(1 / diff.alphas_cumprod[i] - 1)
      ab, abp = diff.alphas_cumprod[i], diff.alphas_cumprod_prev[i]
      sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
      x = (x0 * np.sqrt(abp) + np.sqrt(1 - abp - sigma ** 2) * eps
           + (i != 0) * sigma * noise[i])
    out.append(x)
  return out


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_clip_denoised_follows_adm_p_mean_variance(sampler, eta):
  """Data N(MU_C, SIGMA_C^2) lies mostly outside [-1, 1], so clipping x_0 changes every step."""
  diff = dd.create(respacing="10")
  shape, rng = (16, 2, 2, 4), jax.random.key(11)
  x_T, noise = _loop_noise(rng, shape, diff.num_timesteps)
  model_fn = gaussian_model_fn(True)
  run = {"ddpm": sampling.ddpm_sample,
         "ddim": lambda *a, **k: sampling.ddim_sample(*a, eta=eta, **k)}[sampler]
  got = {clip: np.asarray(jax.jit(lambda rng, clip=clip: run(
      model_fn, diff, shape, rng, clip_denoised=clip))(rng)) for clip in (False, True)}
  for clip in (False, True):
    want = _adm_loop_float64(diff, x_T, noise, sampler, clip, eta)[-1]
    np.testing.assert_allclose(got[clip], want, atol=2e-4, rtol=1e-4, err_msg=f"clip={clip}")
  gap = np.abs(got[True] - got[False]).max()
  assert gap > 0.5, gap  # the case is one where clipping matters
  # Clipped x_0 of 4-channel data with means 1 .. 3: the result sits near the clip range.
  assert np.abs(got[True]).max() < np.abs(got[False]).max()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("clip", [False, True])
def test_progressive_trajectory(sampler, clip):
  """Last trajectory entry == the non-progressive x_0 bitwise; every entry == a manual loop of
  jitted single steps on the same noise, and pred_x0 likewise, to float32 rounding (XLA fuses the
  scan body and a lone step differently: ~1 ulp, amplified by 1/sqrt(abar) in pred_x0)."""
  diff = dd.create(respacing="8")
  shape, rng = (4, 2, 2, 4), jax.random.key(12)
  model_fn = gaussian_model_fn(True)
  run = sampling.ddpm_sample if sampler == "ddpm" else functools.partial(sampling.ddim_sample,
                                                                         eta=0.5)
  final = jax.jit(lambda rng: run(model_fn, diff, shape, rng, clip_denoised=clip))(rng)
  prog = jax.jit(lambda rng: run(model_fn, diff, shape, rng, clip_denoised=clip,
                                 progressive=True))(rng)
  S = diff.num_timesteps
  assert prog["trajectory"].shape == prog["pred_x0"].shape == (S,) + shape
  np.testing.assert_array_equal(prog["t"], np.arange(S - 1, -1, -1))
  np.testing.assert_array_equal(np.asarray(prog["trajectory"][-1]), np.asarray(final))
  np.testing.assert_array_equal(np.asarray(prog["sample"]), np.asarray(final))

  x_T, noise = _loop_noise(rng, shape, S)
  np.testing.assert_array_equal(np.asarray(prog["x_T"]), x_T.astype(np.float32))
  step = sampling.ddpm_step if sampler == "ddpm" else functools.partial(sampling.ddim_step,
                                                                        eta=0.5)

  @jax.jit
  def one_step(x, i, noise):
    t_B = jnp.full((shape[0],), i, jnp.int32)
    return step(diff, model_fn(x, diff.model_timesteps(t_B)), x, t_B, noise,
                clip_denoised=clip)

  x = jnp.asarray(x_T, jnp.float32)
  for k, i in enumerate(range(S - 1, -1, -1)):
    x, pred_x0 = one_step(x, i, jnp.asarray(noise[i], jnp.float32))
    np.testing.assert_allclose(np.asarray(prog["trajectory"][k]), np.asarray(x), rtol=1e-5,
                               atol=1e-5, err_msg=f"step {k}")
    np.testing.assert_allclose(np.asarray(prog["pred_x0"][k]), np.asarray(pred_x0), rtol=1e-5,
                               atol=1e-5, err_msg=f"step {k}")
    if clip:
      assert np.abs(np.asarray(prog["pred_x0"][k])).max() <= 1.0


def _tiny_dit(num_classes=10, seed=0):
  """A tiny pixel DiT with every parameter perturbed (adaLN-Zero would otherwise output 0)."""
  from dit_jax.models import dit
  model = dit.DiT(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                  num_classes=num_classes)
  import flax.linen as nn
  params = nn.unbox(dit.init_params(model, jax.random.key(seed)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.2 * jax.random.normal(k, l.shape)
                                     for l, k in zip(leaves, keys)])
  return model, params


@pytest.mark.parametrize("sampler,cfg_scale,guide_channels", [
    ("ddpm", 1.0, None), ("ddpm", 3.0, None), ("ddim", 2.0, 2)])
def test_make_sample_fn_is_the_plain_composition(sampler, cfg_scale, guide_channels):
  """make_sample_fn (moved from train.py) at clip_denoised=False is bitwise the jitted sampler over
  cfg_model_fn it always was."""
  model, params = _tiny_dit()
  diff = dd.create(respacing="6")
  y, rng, shape = jnp.array([1, 4, 9]), jax.random.PRNGKey(3), (3, 8, 8, 3)
  got = sampling.make_sample_fn(model, diff, sampler=sampler, cfg_scale=cfg_scale,
                                guide_channels=guide_channels, eta=0.3)(params, y, rng, shape)

  @jax.jit
  def plain(params, y, rng):
    fn = (sampling.cfg_model_fn(lambda x, t, y: model.apply({"params": params}, x, t, y), y, 10,
                                cfg_scale, guide_channels) if cfg_scale != 1.0
          else lambda x, t: model.apply({"params": params}, x, t, y))
    if sampler == "ddpm":
      return sampling.ddpm_sample(fn, diff, shape, rng)
    return sampling.ddim_sample(fn, diff, shape, rng, eta=0.3)

  np.testing.assert_array_equal(np.asarray(got), np.asarray(plain(params, y, rng)))


def test_make_sample_fn_clip_progressive_mesh_and_bad_input():
  from dit_jax import sharding
  model, params = _tiny_dit()
  diff = dd.create(respacing="3")
  mesh = sharding.create_mesh((-1, 1, 1))
  y, rng, shape = jnp.arange(8) % 10, jax.random.PRNGKey(0), (8, 8, 8, 3)
  x = sampling.make_sample_fn(model, diff, cfg_scale=2.0, mesh=mesh)(params, y, rng, shape)
  assert x.sharding.is_fully_replicated
  prog = sampling.make_sample_fn(model, diff, cfg_scale=2.0, mesh=mesh, progressive=True,
                                 clip_denoised=True)(params, y, rng, shape)
  assert all(v.sharding.is_fully_replicated for v in jax.tree.leaves(prog))
  assert prog["trajectory"].shape == (3,) + shape and np.abs(prog["pred_x0"]).max() <= 1.0
  clipped = sampling.make_sample_fn(model, diff, cfg_scale=2.0, clip_denoised=True)(
      params, y, rng, shape)
  np.testing.assert_array_equal(np.asarray(prog["sample"]), np.asarray(clipped))
  assert np.abs(np.asarray(clipped) - np.asarray(x)).max() > 1e-2  # clipping mattered here
  with pytest.raises(ValueError, match="unknown sampler"):
    sampling.make_sample_fn(model, diff, sampler="euler")
  with pytest.raises(ValueError, match="guide_channels=4 outside"):
    sampling.make_sample_fn(model, diff, cfg_scale=2.0, guide_channels=4)(params, y, rng, shape)
