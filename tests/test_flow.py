"""Tests for dit_jax.objectives.flow and flow_sampling: SiT, diffusers and Gaussian closed forms.

The SiT references below are float64 numpy transcriptions of willisma/SiT `transport/path.py`
(ICPlan, GVPCPlan), `transport/transport.py` (Transport, Sampler) and `transport/integrators.py`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.models import dit as dit_lib
from dit_jax.objectives import flow as flow_lib
from dit_jax.objectives import flow_sampling as fs
from dit_jax.objectives import per_example

# --- SiT, transcribed -------------------------------------------------------------------------

def sit_alpha(path, t):  # path.py ICPlan / GVPCPlan.compute_alpha_t
  return (t, np.ones_like(t)) if path == "linear" else (np.sin(t * np.pi / 2),
                                                        np.pi / 2 * np.cos(t * np.pi / 2))


def sit_sigma(path, t):  # compute_sigma_t
  return (1 - t, -np.ones_like(t)) if path == "linear" else (np.cos(t * np.pi / 2),
                                                             -np.pi / 2 * np.sin(t * np.pi / 2))


def sit_ratio(path, t):  # compute_d_alpha_alpha_ratio_t
  return 1 / t if path == "linear" else np.pi / (2 * np.tan(t * np.pi / 2))


def sit_compute_drift(path, x, t):  # ICPlan.compute_drift: (-drift, diffusion)
  sigma_t, d_sigma_t = sit_sigma(path, t)
  return -sit_ratio(path, t) * x, sit_ratio(path, t) * sigma_t ** 2 - sigma_t * d_sigma_t


def sit_compute_diffusion(path, x, t, form, norm):  # ICPlan.compute_diffusion
  forms = {"constant": lambda: norm + 0 * t,
           "SBDM": lambda: norm * sit_compute_drift(path, x, t)[1],
           "sigma": lambda: norm * sit_sigma(path, t)[0], "linear": lambda: norm * (1 - t),
           "decreasing": lambda: 0.25 * (norm * np.cos(np.pi * t) + 1) ** 2,
           "increasing-decreasing": lambda: norm * np.sin(np.pi * t) ** 2}  # SiT: 'inccreasing-'
  return forms[form]()


def sit_plan(path, t, x0, x1):  # ICPlan.plan (compute_xt, compute_ut)
  (a, da), (s, ds) = sit_alpha(path, t), sit_sigma(path, t)
  return a * x1 + s * x0, da * x1 + ds * x0


def sit_score(path, prediction, out, x, t):  # Transport.get_score (+ get_score_from_velocity)
  if prediction == "noise":
    return out / -sit_sigma(path, t)[0]
  (a, da), (s, ds) = sit_alpha(path, t), sit_sigma(path, t)
  return (a / da * out - x) / (s ** 2 - a / da * ds * s)


def sit_ode_drift(path, prediction, out, x, t):  # Transport.get_drift: velocity_ode / noise_ode
  if prediction == "velocity":
    return out
  drift_mean, drift_var = sit_compute_drift(path, x, t)
  return -drift_mean + drift_var * (out / -sit_sigma(path, t)[0])


def sit_sde_drift(path, prediction, out, x, t, form, norm):  # Sampler.__get_sde_diffusion_and_drift
  return (sit_ode_drift(path, prediction, out, x, t)
          + sit_compute_diffusion(path, x, t, form, norm) * sit_score(path, prediction, out, x, t))


def sit_check_interval(prediction, eps, diffusion_form="SBDM", sde=False, last_step_size=0.0):
  t0, t1 = 0, 1  # Transport.check_interval, linear / GVP branch
  if prediction != "velocity" or sde:
    t0 = eps if (diffusion_form == "SBDM" and sde) or prediction != "velocity" else 0
    t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
  return t0, t1


# --- Gaussian data N(mu, sd^2) per channel: exact posteriors --------------------------------

MU = np.array([1.0, -2.0, 0.5, 3.0])
SD = np.array([0.5, 1.0, 0.75, 1.5])


def gauss_model(path, prediction, xp=jnp):
  """The exact model output for Gaussian data, with V = a^2 sd^2 + s^2:
  E[x1|x] = mu + a sd^2 / V (x - a mu), E[x0|x] = s / V (x - a mu); velocity da E[x1] + ds E[x0].
  """
  sin, cos = (np.sin, np.cos) if xp is np else (jnp.sin, jnp.cos)

  def fn(x, t_B):
    t = xp.reshape(t_B, (-1,) + (1,) * (x.ndim - 1))
    if path == "linear":
      (a, da), (s, ds) = (t, 1.0), (1 - t, -1.0)
    else:
      (a, da), (s, ds) = ((sin(t * np.pi / 2), np.pi / 2 * cos(t * np.pi / 2)),
                          (cos(t * np.pi / 2), -np.pi / 2 * sin(t * np.pi / 2)))
    var = a ** 2 * SD ** 2 + s ** 2
    x1, x0 = MU + a * SD ** 2 / var * (x - a * MU), s / var * (x - a * MU)
    return {"velocity": da * x1 + ds * x0, "noise": x0, "data": x1}[prediction].astype(x.dtype)
  return fn


def check_moments(x, rel=0.01):
  mean, std = x.reshape(-1, 4).mean(0), x.reshape(-1, 4).std(0)
  np.testing.assert_array_less(np.abs(mean - MU), rel * np.abs(MU))
  np.testing.assert_array_less(np.abs(std / SD - 1), rel)


def rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(path="vp"), dict(prediction="score"), dict(time_sampling="beta"),
    dict(time_sampling="logit_normal", logit_std=0.0), dict(logit_mean=0.5),
    dict(time_sampling="logit_normal", logit_mean=float("nan")), dict(shift=0.0),
    dict(shift=float("inf")), dict(train_eps=1e-5), dict(prediction="noise", train_eps=0.0),
    dict(prediction="data", sample_eps=0.6), dict(timestep_scale=-1.0), dict(learn_sigma=True),
    dict(shift="3")])
def test_create_rejects(kwargs):
  with pytest.raises(ValueError):
    flow_lib.create(**kwargs)


def test_create_defaults_follow_sit():
  f = flow_lib.create()
  assert (f.path, f.prediction, f.train_eps, f.sample_eps) == ("linear", "velocity", 0.0, 0.0)
  assert flow_lib.create(prediction="noise").train_eps == 1e-3  # SiT's create_transport


@pytest.mark.parametrize("prediction", ["velocity", "noise"])
@pytest.mark.parametrize("sde,form,size", [(False, "sigma", 0.0), (True, "SBDM", 0.04),
                                           (True, "sigma", 0.04), (True, "sigma", 0.0)])
def test_intervals_match_sit_check_interval(prediction, sde, form, size):
  f = flow_lib.create(prediction=prediction, train_eps=2e-3 if prediction == "noise" else None,
                      sample_eps=3e-3)
  assert f.sample_interval(sde, form, size) == pytest.approx(
      sit_check_interval(prediction, 3e-3, form, sde, size))
  assert f.train_interval() == pytest.approx(sit_check_interval(prediction, f.train_eps))


# --- SiT: training target, ODE drift, SDE drift / diffusion, one SDE step -------------------

@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("prediction", ["velocity", "noise", "data"])
def test_training_losses_match_sit_plan(path, prediction):
  f = flow_lib.create(path=path, prediction=prediction, timestep_scale=1000.0)
  x1, x0, t = rand(5, 4, 4, 3, seed=1), rand(5, 4, 4, 3, seed=2), np.array([0, .1, .5, .9, 1.])
  seen = {}

  def model_fn(x_t, t_model):
    seen["x_t"], seen["t"] = x_t, t_model
    return jnp.tanh(x_t) * 0.5
  terms = f.training_losses(model_fn, x1, jnp.asarray(t, jnp.float32), x0)
  xt_ref, ut_ref = sit_plan(path, t[:, None, None, None], x0.astype(np.float64), x1)
  target = {"velocity": ut_ref, "noise": x0, "data": x1}[prediction]
  want = ((np.tanh(xt_ref) * 0.5 - target) ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(seen["x_t"], xt_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(seen["t"], 1000 * t, rtol=1e-6)
  np.testing.assert_allclose(terms["loss"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(terms["mse"], terms["loss"])
  np.testing.assert_array_equal(terms["vb"], np.zeros(5))
  with pytest.raises(ValueError, match="learn_sigma=False"):  # a 2C (learned-sigma) output
    f.training_losses(lambda x, t: jnp.concatenate([x, x], -1), x1, jnp.asarray(t), x0)


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("prediction", ["velocity", "noise"])
@pytest.mark.parametrize("form", fs.DIFFUSION_FORMS)
def test_drifts_and_diffusion_match_sit(path, prediction, form):
  f = flow_lib.create(path=path, prediction=prediction)
  x, out, z = rand(4, 3, 3, 2, seed=3), rand(4, 3, 3, 2, seed=4), rand(4, 3, 3, 2, seed=5)
  t = np.array([0.05, 0.3, 0.6, 0.95])
  t64, x64, o64 = t[:, None, None, None], x.astype(np.float64), out.astype(np.float64)
  t_B = jnp.asarray(t, jnp.float32)
  tol = dict(rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(f.to_velocity(out, x, t_B), sit_ode_drift(path, prediction, o64, x64,
                                                                       t64), **tol)
  np.testing.assert_allclose(f.to_score(out, x, t_B), sit_score(path, prediction, o64, x64, t64),
                             **tol)
  w = sit_compute_diffusion(path, x64, t64, form, 1.3)
  np.testing.assert_allclose(fs.sde_diffusion(f, t_B, 4, form, 1.3), np.broadcast_to(w, t64.shape),
                             **tol)
  drift = sit_sde_drift(path, prediction, o64, x64, t64, form, 1.3)
  np.testing.assert_allclose(fs.sde_drift(f, out, x, t_B, form, 1.3), drift, rtol=5e-5, atol=5e-5)
  # integrators.py sde.__Euler_Maruyama_step at one t (all examples share t), dt = 0.02.
  i = 1
  x_new, mean = fs.euler_maruyama_step(f, out[i:i + 1], x[i:i + 1], jnp.float32(t[i]),
                                       jnp.float32(t[i] + 0.02), z[i:i + 1], form, 1.3)
  mean_ref = x64[i] + drift[i] * 0.02
  np.testing.assert_allclose(mean[0], mean_ref, rtol=5e-5, atol=5e-5)
  np.testing.assert_allclose(x_new[0], mean_ref + np.sqrt(2 * w[i]) * z[i] * np.sqrt(0.02),
                             rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("kind", ["mean", "tweedie", "euler"])
def test_last_steps_match_sit(kind):
  f = flow_lib.create(path="gvp")
  x, out, t = rand(1, 3, 3, 2, seed=6), rand(1, 3, 3, 2, seed=7), 0.96
  x64, o64 = x.astype(np.float64), out.astype(np.float64)
  (a, _), (s, _) = sit_alpha("gvp", t), sit_sigma("gvp", t)
  want = {"mean": x64 + sit_sde_drift("gvp", "velocity", o64, x64, t, "sigma", 1.0) * 0.04,
          "euler": x64 + o64 * 0.04,  # Sampler.__get_last_step
          "tweedie": x64 / a + s ** 2 / a * sit_score("gvp", "velocity", o64, x64, t)}[kind]
  got = fs.apply_last_step(f, out, x, jnp.float32(t), kind, 0.04)
  np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-5)


def test_sde_sample_matches_sit_loop():
  """SiT's sample_sde with N grid points = N - 1 Euler-Maruyama steps here, then the Mean step."""
  f, n = flow_lib.create(), 11
  shape, rng = (2, 4, 4, 4), jax.random.PRNGKey(3)
  model = gauss_model("linear", "velocity")
  got = fs.sde_sample(model, f, shape, rng, num_steps=n - 1)
  rng_init, rng_steps = jax.random.split(rng)
  normal = jax.jit(per_example.per_example_normal, static_argnums=1)
  x = np.asarray(normal(rng_init, shape), np.float64)
  ts = np.linspace(0, 1 - 0.04, n)  # integrators.py sde: linspace(t0, t1, num_steps)
  npm = gauss_model("linear", "velocity", xp=np)
  for i, ti in enumerate(ts[:-1]):
    tb = np.full(2, ti)
    drift = sit_sde_drift("linear", "velocity", npm(x, tb), x, ti, "sigma", 1.0)
    w = sit_compute_diffusion("linear", x, ti, "sigma", 1.0)
    z = np.asarray(normal(jax.random.fold_in(rng_steps, i), shape))
    x = x + drift * (ts[1] - ts[0]) + np.sqrt(2 * w) * z * np.sqrt(ts[1] - ts[0])
  x = x + sit_sde_drift("linear", "velocity", npm(x, np.full(2, ts[-1])), x, ts[-1], "sigma",
                        1.0) * 0.04
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)


# --- conversions, validation loss ------------------------------------------------------------

@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_conversions_round_trip(path):
  f = flow_lib.create(path=path)
  x1, x0 = rand(6, 2, 2, 3, seed=8), rand(6, 2, 2, 3, seed=9)
  t = jnp.linspace(0.05, 0.95, 6)
  x_t, v = f.interpolate(x1, x0, t), f.velocity_target(x1, x0, t)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  close(f.data_from_velocity(x_t, t, v), x1)
  close(f.noise_from_velocity(x_t, t, v), x0)
  close(f.velocity_from_noise(x_t, t, x0), v)
  close(f.velocity_from_data(x_t, t, x1), v)
  close(f.data_from_noise(x_t, t, x0), x1)
  close(f.noise_from_data(x_t, t, x1), x0)


def test_val_loss_is_velocity_mse():
  x1, x0, t = rand(3, 4, 4, 2, seed=10), rand(3, 4, 4, 2, seed=11), jnp.full((3,), 0.9)
  noise_model = flow_lib.create(prediction="noise")
  exact = noise_model.val_loss(lambda x, tm: jnp.asarray(x0), x1, t, x0)
  np.testing.assert_allclose(exact, 0.0, atol=1e-10)
  vel = flow_lib.create()
  off = vel.val_loss(lambda x, tm: vel.validation_target(x1, x0, t) + 0.1, x1, t, x0)
  np.testing.assert_allclose(off, 0.01, rtol=1e-4)


# --- time sampling -----------------------------------------------------------------------------

def test_logit_normal_matches_scipy_and_shift_maps_quantiles():
  key, n, m, s = jax.random.PRNGKey(0), 20000, 0.3, 0.8
  t = np.asarray(flow_lib.create(time_sampling="logit_normal", logit_mean=m, logit_std=s)
                 .draw_t(key, n), np.float64)
  # SD3: the noise level 1 - t is logit-normal(m, s), i.e. logit(1 - t) ~ N(m, s^2).
  assert scipy.stats.kstest(np.log((1 - t) / t), scipy.stats.norm(m, s).cdf).pvalue > 1e-3
  shifted = np.asarray(flow_lib.create(time_sampling="logit_normal", logit_mean=m, logit_std=s,
                                       shift=3.0).draw_t(key, n), np.float64)
  sig = 1 - t
  np.testing.assert_allclose(shifted, 1 - 3 * sig / (1 + 2 * sig), atol=2e-6)
  q = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
  sig_q = scipy.special.expit(m + s * scipy.stats.norm.ppf(1 - q))  # t's q-quantile
  np.testing.assert_allclose(np.quantile(shifted, q), 1 - 3 * sig_q / (1 + 2 * sig_q), atol=0.01)
  u = np.asarray(flow_lib.create().draw_t(key, n))
  assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3
  noise = flow_lib.create(prediction="noise", train_eps=0.1).draw_t(key, n)
  assert 0.1 <= float(noise.min()) and float(noise.max()) <= 0.9  # SiT: U[eps, 1 - eps]


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_draws_are_per_example(time_sampling):
  f = flow_lib.create(time_sampling=time_sampling, shift=2.0)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  noise16, t16 = f.draw_noise_and_t(k1, k2, (16, 4, 4, 2))
  noise5, t5 = f.draw_noise_and_t(k1, k2, (5, 4, 4, 2))
  np.testing.assert_array_equal(t16[:5], t5)
  np.testing.assert_array_equal(noise16[:5], noise5)
  assert len(np.unique(np.asarray(t16))) == 16
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = jax.jit(lambda k: f.draw_t(k, 16), out_shardings=NamedSharding(mesh, P("data")))(k2)
  np.testing.assert_allclose(sharded, t16, rtol=1e-6)  # jit may fuse the shift: an ulp apart


# --- diffusers FlowMatchEulerDiscreteScheduler ------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [4, 28])
def test_grid_and_euler_step_match_diffusers(shift, n):
  ref = FlowMatchEulerDiscreteScheduler(shift=shift)
  ref.set_timesteps(n)
  times = fs.diffusers_time_grid(n, shift)
  np.testing.assert_allclose(1 - times, ref.sigmas.numpy(), atol=1e-6)
  np.testing.assert_allclose(1000 * (1 - times[:-1]), ref.timesteps.numpy(), rtol=1e-6)
  f = flow_lib.create()
  x, v = rand(2, 4, 4, 3, seed=12), rand(2, 4, 4, 3, seed=13)
  for i in (0, n // 2, n - 1):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    ref.set_begin_index(i)
    # diffusers' velocity is d x / d sigma = noise - data: minus ours.
    want = ref.step(torch.from_numpy(-v), ref.timesteps[i], torch.from_numpy(x)).prev_sample
    got = fs.euler_step(f, v, x, jnp.float32(times[i]), jnp.float32(times[i + 1]))
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
  # The whole loop, with the exact Gaussian velocity.
  shape, model = (2, 4, 4, 4), gauss_model("linear", "velocity")
  got = fs.ode_sample(model, f, shape, jax.random.PRNGKey(0), num_steps=n, schedule="diffusers",
                      shift=shift, x_init=jnp.asarray(rand(*shape, seed=14)))
  ref = FlowMatchEulerDiscreteScheduler(shift=shift)
  ref.set_timesteps(n)
  x = torch.from_numpy(rand(*shape, seed=14))
  for ts, sig in zip(ref.timesteps, ref.sigmas):
    v = np.asarray(model(jnp.asarray(x.numpy()), jnp.full((2,), 1 - float(sig))))
    x = ref.step(torch.from_numpy(-v), ts, x).prev_sample
  np.testing.assert_allclose(got, x.numpy(), rtol=1e-5, atol=1e-5)


# --- Gaussian closed forms ---------------------------------------------------------------------

def euler_map(path, times):
  """Exact Euler map x_N = A z + B per channel: the Gaussian velocity is a x + b at each t."""
  a_coef, b_coef = np.ones(4), np.zeros(4)
  for t, t_next in zip(times[:-1], times[1:]):
    (a, da), (s, ds) = sit_alpha(path, t), sit_sigma(path, t)
    var = a ** 2 * SD ** 2 + s ** 2
    slope = (da * a * SD ** 2 + ds * s) / var
    h = t_next - t
    a_coef, b_coef = ((1 + h * slope) * a_coef,
                      (1 + h * slope) * b_coef + h * (da * MU - slope * a * MU))
  return a_coef, b_coef


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_euler_matches_its_exact_discrete_map(path):
  f, shape = flow_lib.create(path=path), (4, 8, 8, 4)
  z = rand(*shape, seed=15)
  errs = []
  for n in (2, 4, 8):
    got = np.asarray(fs.ode_sample(gauss_model(path, "velocity"), f, shape, jax.random.PRNGKey(0),
                                   num_steps=n, x_init=jnp.asarray(z)))
    a, b = euler_map(path, fs.time_grid(n))
    np.testing.assert_allclose(got, a * z + b, rtol=1e-5, atol=1e-5)
    errs.append(np.abs(a - SD) + np.abs(b - MU))  # the std and mean error of the sampled law
  errs = np.array(errs)
  assert errs.min() > 1e-3  # Euler is visibly off at few steps ...
  np.testing.assert_allclose(errs[1] / errs[2], 2.0, rtol=0.3)  # ... and first order


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("method,n", [("euler", 400), ("heun", 12)])
def test_ode_reproduces_gaussian_moments(path, method, n):
  f, shape = flow_lib.create(path=path), (16, 64, 64, 4)
  x = fs.ode_sample(gauss_model(path, "velocity"), f, shape, jax.random.PRNGKey(4), method=method,
                    num_steps=n)
  check_moments(np.asarray(x, np.float64))


@pytest.mark.parametrize("prediction", ["noise", "data"])
def test_ode_with_other_predictions(prediction):
  f, shape = flow_lib.create(prediction=prediction, train_eps=1e-3, sample_eps=1e-3), (4, 8, 8, 4)
  z = jnp.asarray(rand(*shape, seed=16))
  key = jax.random.PRNGKey(0)
  via_pred = fs.ode_sample(gauss_model("linear", prediction), f, shape, key, method="heun",
                           num_steps=8, x_init=z, return_trajectory=True)
  via_vel = fs.ode_sample(gauss_model("linear", "velocity"), flow_lib.create(), shape, key,
                          method="heun", num_steps=8, x_init=z)
  x, traj = via_pred
  assert traj.shape == (9,) + shape
  np.testing.assert_array_equal(traj[0], z)
  np.testing.assert_array_equal(traj[-1], x)
  np.testing.assert_allclose(x, via_vel, atol=0.02)  # [1e-3, 1 - 1e-3] instead of [0, 1]


def sde_moments(n, size=0.04):
  """Exact mean / std of SiT's Euler-Maruyama ('sigma' diffusion, Mean last step) on Gaussian data:
  the drift v + w * score is linear in x, so each step maps (m, var) in closed form."""
  ts, m, var = np.linspace(0, 1 - size, n + 1), np.zeros(4), np.ones(4)
  for k, t in enumerate(ts):
    (a, da), (s, ds) = sit_alpha("linear", t), sit_sigma("linear", t)
    v_ab = a ** 2 * SD ** 2 + s ** 2
    slope = (da * a * SD ** 2 + ds * s) / v_ab - s / v_ab  # velocity + w score, w = sigma_t
    icpt = da * MU - (da * a * SD ** 2 + ds * s) / v_ab * a * MU + s * a * MU / v_ab
    h = ts[k + 1] - t if k < n else size
    noise_var = 2 * s * h if k < n else 0.0  # the last step adds no noise
    m, var = (1 + h * slope) * m + h * icpt, (1 + h * slope) ** 2 * var + noise_var
  return m, np.sqrt(var)


def test_sde_reproduces_gaussian_moments():
  f, shape = flow_lib.create(), (16, 64, 64, 4)
  x = np.asarray(fs.sde_sample(gauss_model("linear", "velocity"), f, shape,
                               jax.random.PRNGKey(5), num_steps=249), np.float64).reshape(-1, 4)
  m, sd = sde_moments(249)
  se = SD / np.sqrt(x.shape[0])
  np.testing.assert_array_less(np.abs(x.mean(0) - m), 4 * se)
  np.testing.assert_array_less(np.abs(x.std(0) - sd), 4 * se / np.sqrt(2))
  # SiT's SDE is biased (the Mean last step drops the noise left at t = 0.96) by up to ~1 %.
  np.testing.assert_array_less(np.abs(sd / SD - 1), 0.015)
  np.testing.assert_allclose(m, MU, rtol=1e-6)


def test_sharded_sampling_does_not_depend_on_batch():
  f, model = flow_lib.create(), gauss_model("linear", "velocity")
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  run = jax.jit(lambda rng: fs.sde_sample(model, f, (8, 4, 4, 4), rng, num_steps=3,
                                          sharding=NamedSharding(mesh, P("data"))))
  small = fs.sde_sample(model, f, (3, 4, 4, 4), jax.random.PRNGKey(6), num_steps=3)
  np.testing.assert_allclose(run(jax.random.PRNGKey(6))[:3], small, rtol=1e-6, atol=1e-6)


# --- guidance and the sample fn ----------------------------------------------------------------

def test_guidance_interval_applies_to_all_channels_inside_only():
  f = flow_lib.create()
  fake = lambda x, t, y: x * (1.0 + y[:, None, None, None]) + t[:, None, None, None]
  x, y = rand(4, 2, 2, 3, seed=17), jnp.array([1, 2, 3, 1])
  fn = fs.guided_model_fn(fake, f, y, 0, 4.0, (0.2, 0.6))
  t = jnp.array([0.1, 0.2, 0.6, 0.7])
  cond, uncond = fake(x, t, y), fake(x, t, jnp.zeros(4, jnp.int32))
  want = np.where(np.array([0, 1, 1, 0])[:, None, None, None], uncond + 4 * (cond - uncond), cond)
  np.testing.assert_allclose(fn(x, t), want, rtol=1e-6)
  np.testing.assert_allclose(fn(x, jnp.full((4,), 0.9)), fake(x, jnp.full((4,), 0.9), y))
  np.testing.assert_allclose(fs.guided_model_fn(fake, f, y, 0, 4.0)(x, t),
                             uncond + 4 * (cond - uncond), rtol=1e-6)
  with pytest.raises(ValueError):
    fs.guided_model_fn(fake, f, y, 0, 4.0, (0.7, 0.2))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_make_flow_sample_fn(learn_sigma):
  model = dit_lib.DiT(input_size=8, in_channels=2, patch_size=4, hidden_size=32, depth=1,
                      num_heads=2, num_classes=3, learn_sigma=learn_sigma)
  params = nn.unbox(dit_lib.init_params(model, jax.random.PRNGKey(0)))
  leaves, treedef = jax.tree.flatten(params)  # perturbed: the zero-initialised output layer
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape)
                              for p, k in zip(leaves, keys)])
  labels, rng = jnp.array([0, 1, 2, 1]), jax.random.PRNGKey(8)
  # A learn_sigma network is sampled from its first C channels (SiT's checkpoints).
  method, interval = ("euler_maruyama", None) if learn_sigma else ("euler", (0.0, 0.7))
  sample = fs.make_flow_sample_fn(model, flow_lib.create(), method=method, num_steps=4,
                                  cfg_scale=3.0, guidance_interval=interval)
  x4 = sample(params, labels, rng, (4, 8, 8, 2))
  x2 = sample(params, labels[:2], rng, (2, 8, 8, 2))
  assert x4.shape == (4, 8, 8, 2) and np.isfinite(np.asarray(x4)).all()
  np.testing.assert_allclose(x4[:2], x2, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError):
    fs.make_flow_sample_fn(model, flow_lib.create(), method="dopri5")
  with pytest.raises(ValueError, match="SBDM"):
    fs.make_flow_sample_fn(model, flow_lib.create(), method="euler_maruyama",
                           diffusion_form="SBDM")


@pytest.mark.slow
def test_flow_overfits_a_batch_of_mnist(shared_data):
  """A tiny DiT trained with the velocity objective memorises 8 real MNIST digits (as the DDPM
  overfit tests do): the velocity MSE at fixed times and noise falls at least 3x."""
  import optax
  from tests.helpers import mnist_batch
  x0, y = mnist_batch(shared_data, n=8, size=14)
  x0 = x0[:, :12, :12]  # patch 4 tiles 12 px
  model = dit_lib.DiT(input_size=12, in_channels=1, patch_size=4, hidden_size=64, depth=2,
                      num_heads=2, num_classes=10, learn_sigma=False)
  f = flow_lib.create()
  params = nn.unbox(jax.jit(lambda k: dit_lib.init_params(model, k))(jax.random.key(0)))
  apply = lambda p, x, t: model.apply({"params": p}, x, t, jnp.asarray(y))
  opt = optax.adam(2e-3)
  t_eval = f.fixed_times(4 * 8).reshape(4, 8)
  noise_eval = jax.random.normal(jax.random.key(100), (4,) + x0.shape)
  evaluate = jax.jit(lambda p: jnp.mean(jnp.stack([
      f.val_loss(lambda x, t: apply(p, x, t), x0, t_eval[i], noise_eval[i]) for i in range(4)])))

  @jax.jit
  def step(p, s, rng):
    noise, t_B = f.draw_noise_and_t(*jax.random.split(rng), x0.shape)
    g = jax.grad(lambda q: f.training_losses(lambda x, t: apply(q, x, t), x0, t_B,
                                             noise)["loss"].mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  before, state = float(evaluate(params)), opt.init(params)
  for i in range(300):
    params, state = step(params, state, jax.random.fold_in(jax.random.key(1), i))
  after = float(evaluate(params))
  print(f"flow overfit: velocity MSE {before:.4f} -> {after:.4f}")
  assert after <= before / 3, (before, after)


# --- A flow-trained run through tools/sample.py ------------------------------------------------

def test_sample_tool_uses_the_flow_sampler_of_a_flow_run(tmp_path):
  """tools/sample.py on a diffusion.objective=flow workdir draws with the flow sampler (its grid
  equals the flow Heun sampler's, and differs from what DDPM gives the same params), and refuses a
  DDPM-only sampler or a DDPM respacing with one line."""
  import subprocess
  import sys

  from PIL import Image

  from dit_jax import objectives
  from dit_jax.data import images
  from dit_jax.objectives import sampling
  from dit_jax.training import train
  from tests.helpers import REPO, main_cmd, subprocess_env

  work = tmp_path / "flow"
  subprocess.run(main_cmd(work, "--config.diffusion.objective=flow", "--config.learn_sigma=False",
                          "--config.num_train_steps=2", "--config.checkpoint_every_steps=2"),
                 env=subprocess_env(1), check=True, capture_output=True, cwd=REPO)
  tool = [sys.executable, "tools/sample.py", f"--workdir={work}", "--num=4", "--steps=3",
          "--cfg_scale=1.0"]
  out = subprocess.run(tool + [f"--out={tmp_path / 'grid.png'}"], env=subprocess_env(1),
                       capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "(flow heun, 3 steps" in out.stdout

  run = train.load_trained(work)
  labels, shape = jnp.arange(4) % 10, (4,) + tuple(run.data_state["image_shape"])
  flow = objectives.from_config(run.config)
  heun = flow.sample_fn(run.model, steps="3", cfg_scale=1.0, data_kind="images")
  want = np.asarray(images.grid(np.asarray(images.quantize(
      heun(run.params, labels, jax.random.PRNGKey(0), shape)))))
  got = np.asarray(Image.open(tmp_path / "grid.png"))
  np.testing.assert_array_equal(got, want[..., 0])
  ddpm = objectives.Ddpm(run.config.diffusion, False, "auto")
  other = sampling.make_sample_fn(run.model, ddpm.respaced("3"), cfg_scale=1.0)
  wrong = np.asarray(images.grid(np.asarray(images.quantize(
      other(run.params, labels, jax.random.PRNGKey(0), shape)))))
  assert not np.array_equal(wrong, want)  # the comparison above can tell the samplers apart

  for flags, message in ((["--sampler=ddim"], "a flow-trained run samples with one of"),
                         (["--steps=ddim50"], "--steps='ddim50': with the flow objective"),
                         (["--step=999"], "no checkpoint at step 999"),
                         (["--labels=3,x"], "--labels='3,x': comma-separated class numbers")):
    bad = subprocess.run(tool + flags, env=subprocess_env(1), capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
