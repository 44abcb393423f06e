"""Rectified flow / SiT stochastic interpolants: paths, predictions, time sampling and losses.

Time convention (SiT's, willisma/SiT `transport/path.py`): t in [0, 1], t = 0 is pure noise and
t = 1 is data. With data x1 and standard-normal noise x0 the path is

  x_t = alpha_t * x1 + sigma_t * x0,   linear: alpha = t, sigma = 1 - t (rectified flow)
                                       gvp:    alpha = sin(pi t / 2), sigma = cos(pi t / 2)

and the velocity (what a 'velocity' model regresses, and the ODE drift) is
u_t = d_alpha_t * x1 + d_sigma_t * x0, integrated from t = 0 (noise) to t = 1 (data).
SD3 / diffusers count the other way: their sigma (noise level) is 1 - t on the linear path, and
their velocity d x / d sigma = x0 - x1 is minus ours. The logit-normal (m, s) and the shift are
SD3's, defined on that noise level sigma = 1 - t (m > 0 or shift > 1 weights noisy times more):

  sigma = sigmoid(m + s n), n ~ N(0, 1);  sigma' = shift sigma / (1 + (shift - 1) sigma);
  t = 1 - sigma'

The network is conditioned on `model_timesteps(t) = timestep_scale * t` (SiT: the raw t, scale 1).
train_eps / sample_eps follow SiT's `Transport.check_interval`: a velocity model trains and
solves the ODE on all of [0, 1]; noise and data models stay in [eps, 1 - eps], where their
conversions to a velocity are finite.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from dit_jax.objectives.per_example import mean_flat, per_example_normal

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "data")
TIME_SAMPLINGS = ("uniform", "logit_normal")
# SiT's create_transport default for noise (and here data) models on the linear and GVP paths.
DEFAULT_EPS = 1e-3


def shift_sigma(sigma, shift: float):
  """SD3's timestep shift of a noise level: shift * sigma / (1 + (shift - 1) * sigma)."""
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def shift_time(u, shift: float):
  """The shift in SiT time: 1 - shift_sigma(1 - u), written to stay exact near u = 0."""
  return u / (1.0 + (shift - 1.0) * (1.0 - u))


def broadcast_t(t_B, ndim: int):
  """t as float32 [B, 1, ..., 1] to broadcast against an ndim-array."""
  t_B = jnp.asarray(t_B, jnp.float32)
  return t_B.reshape(t_B.shape + (1,) * (ndim - t_B.ndim))


@flax.struct.dataclass
class Flow:
  """A stochastic interpolant (path, prediction type, how t is drawn). Build with `create`.

  Every field is static, so a Flow is a leafless pytree: close over it in jitted functions.
  """
  path: str = flax.struct.field(pytree_node=False)
  prediction: str = flax.struct.field(pytree_node=False)
  time_sampling: str = flax.struct.field(pytree_node=False)
  logit_mean: float = flax.struct.field(pytree_node=False)
  logit_std: float = flax.struct.field(pytree_node=False)
  shift: float = flax.struct.field(pytree_node=False)
  train_eps: float = flax.struct.field(pytree_node=False)
  sample_eps: float = flax.struct.field(pytree_node=False)
  timestep_scale: float = flax.struct.field(pytree_node=False)

  # Path coefficients.

  def coefficients(self, t_B, ndim: int):
    """(alpha, sigma, d_alpha, d_sigma) at t, shaped [B, 1, ..., 1] for ndim-arrays."""
    t = broadcast_t(t_B, ndim)
    if self.path == "linear":
      one = jnp.ones_like(t)
      return t, 1.0 - t, one, -one
    half_pi = math.pi / 2
    return (jnp.sin(half_pi * t), jnp.cos(half_pi * t),
            half_pi * jnp.cos(half_pi * t), -half_pi * jnp.sin(half_pi * t))

  def interpolate(self, x_data, noise, t_B):
    """x_t = alpha_t x1 + sigma_t x0."""
    if noise.shape != x_data.shape:
      raise ValueError(f"noise shape {noise.shape} != data shape {x_data.shape}")
    alpha, sigma, _, _ = self.coefficients(t_B, x_data.ndim)
    return alpha * x_data + sigma * noise

  def velocity_target(self, x_data, noise, t_B):
    """u_t = d_alpha_t x1 + d_sigma_t x0 (SiT's compute_ut)."""
    _, _, d_alpha, d_sigma = self.coefficients(t_B, x_data.ndim)
    return d_alpha * x_data + d_sigma * noise

  def training_target(self, x_data, noise, t_B):
    """What the network regresses onto: the velocity, the noise x0 or the data x1."""
    if self.prediction == "velocity":
      return self.velocity_target(x_data, noise, t_B)
    return noise if self.prediction == "noise" else x_data

  # Conversions. [x_t; v] = [[alpha, sigma], [d_alpha, d_sigma]] [x1; x0] with determinant
  # alpha d_sigma - sigma d_alpha = -1 (linear) or -pi/2 (gvp), so velocity <-> (data, noise) is
  # exact at every t; noise -> data divides by alpha (0 at t = 0), data -> noise by sigma (0 at 1).

  def _det(self):
    return -1.0 if self.path == "linear" else -math.pi / 2

  def data_from_velocity(self, x_t, t_B, v):
    """x1 = (d_sigma x_t - sigma v) / det."""
    _, sigma, _, d_sigma = self.coefficients(t_B, x_t.ndim)
    return (d_sigma * x_t - sigma * v) / self._det()

  def noise_from_velocity(self, x_t, t_B, v):
    """x0 = (alpha v - d_alpha x_t) / det."""
    alpha, _, d_alpha, _ = self.coefficients(t_B, x_t.ndim)
    return (alpha * v - d_alpha * x_t) / self._det()

  def data_from_noise(self, x_t, t_B, noise):
    """x1 = (x_t - sigma x0) / alpha."""
    alpha, sigma, _, _ = self.coefficients(t_B, x_t.ndim)
    return (x_t - sigma * noise) / alpha

  def noise_from_data(self, x_t, t_B, x_data):
    """x0 = (x_t - alpha x1) / sigma."""
    alpha, sigma, _, _ = self.coefficients(t_B, x_t.ndim)
    return (x_t - alpha * x_data) / sigma

  def velocity_from_noise(self, x_t, t_B, noise):
    """u = d_alpha x1 + d_sigma x0 with x1 from the noise (SiT's noise_ode drift)."""
    _, _, d_alpha, d_sigma = self.coefficients(t_B, x_t.ndim)
    return d_alpha * self.data_from_noise(x_t, t_B, noise) + d_sigma * noise

  def velocity_from_data(self, x_t, t_B, x_data):
    """u = d_alpha x1 + d_sigma x0 with x0 from the data."""
    _, _, d_alpha, d_sigma = self.coefficients(t_B, x_t.ndim)
    return d_alpha * x_data + d_sigma * self.noise_from_data(x_t, t_B, x_data)

  def check_output(self, model_out, x_t):
    """The model output as float32; it must have x_t's shape (C channels, no learned sigma)."""
    if tuple(model_out.shape) != tuple(x_t.shape):
      raise ValueError(
          f"model output {tuple(model_out.shape)} does not fit x_t {tuple(x_t.shape)}: a flow "
          f"model predicts exactly C={x_t.shape[-1]} channels ({self.prediction}); build the "
          "network with learn_sigma=False")
    return model_out.astype(jnp.float32)

  def to_velocity(self, model_out, x_t, t_B):
    """The velocity (ODE drift) implied by a model output of this Flow's prediction type."""
    out = self.check_output(model_out, x_t)
    if self.prediction == "velocity":
      return out
    if self.prediction == "noise":
      return self.velocity_from_noise(x_t, t_B, out)
    return self.velocity_from_data(x_t, t_B, out)

  def to_data(self, model_out, x_t, t_B):
    """The data estimate E[x1 | x_t] implied by a model output."""
    out = self.check_output(model_out, x_t)
    if self.prediction == "velocity":
      return self.data_from_velocity(x_t, t_B, out)
    if self.prediction == "noise":
      return self.data_from_noise(x_t, t_B, out)
    return out

  def to_noise(self, model_out, x_t, t_B):
    """The noise estimate E[x0 | x_t] implied by a model output."""
    out = self.check_output(model_out, x_t)
    if self.prediction == "velocity":
      return self.noise_from_velocity(x_t, t_B, out)
    if self.prediction == "noise":
      return out
    return self.noise_from_data(x_t, t_B, out)

  def to_score(self, model_out, x_t, t_B):
    """The score grad log p_t(x_t) = -E[x0 | x_t] / sigma_t (infinite at t = 1)."""
    _, sigma, _, _ = self.coefficients(t_B, x_t.ndim)
    return -self.to_noise(model_out, x_t, t_B) / sigma

  # Time.

  def train_interval(self) -> tuple[float, float]:
    """[t0, t1] of training times (SiT's check_interval with eval=False, sde=False)."""
    if self.prediction == "velocity":
      return 0.0, 1.0
    return self.train_eps, 1.0 - self.train_eps

  def sample_interval(self, sde: bool = False, diffusion_form: str = "sigma",
                      last_step_size: float = 0.0) -> tuple[float, float]:
    """[t0, t1] a sampler integrates over (SiT's check_interval with eval=True).

    ODE: a velocity model uses [0, 1], others [eps, 1 - eps]. SDE: t0 = eps for SBDM or a
    non-velocity model (else 0); t1 = 1 - last_step_size, or 1 - eps without a last step.
    """
    eps = self.sample_eps
    if not sde:
      return (0.0, 1.0) if self.prediction == "velocity" else (eps, 1.0 - eps)
    t0 = eps if (diffusion_form == "SBDM" or self.prediction != "velocity") else 0.0
    t1 = 1.0 - eps if last_step_size == 0 else 1.0 - last_step_size
    return t0, t1

  def draw_t(self, key: jax.Array, batch: int) -> jax.Array:
    """Training times, float32 [batch]; example i's t depends only on fold_in(key, i)."""
    keys_B = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    if self.time_sampling == "uniform":
      u_B = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_B)
    else:
      n_B = jax.vmap(lambda k: jax.random.normal(k, (), jnp.float32))(keys_B)
      u_B = jax.nn.sigmoid(-(self.logit_mean + self.logit_std * n_B))  # 1 - sigmoid(m + s n)
    if self.shift != 1.0:
      u_B = shift_time(u_B, self.shift)
    t0, t1 = self.train_interval()
    return (t0 + (t1 - t0) * u_B).astype(jnp.float32)

  def draw_noise_and_t(self, k_noise: jax.Array, k_t: jax.Array, shape) -> tuple:
    """(noise [shape], t [B]), each example's draw from (key, example index) only."""
    return per_example_normal(k_noise, shape), self.draw_t(k_t, shape[0])

  def model_timesteps(self, t_B: jax.Array) -> jax.Array:
    """What the network's timestep embedding gets: timestep_scale * t (SiT: t itself)."""
    return jnp.asarray(t_B, jnp.float32) * self.timestep_scale

  # Losses.

  def training_losses(self, model_fn: Callable, x_data, t_B, noise) -> dict:
    """Per-example dict(loss, mse, vb), each [B]: MSE to the prediction target; vb is zero.

    `model_fn(x_t, model_timesteps(t))` returns the network output (C channels).
    """
    x_t = self.interpolate(x_data, noise, t_B)
    out = self.check_output(model_fn(x_t, self.model_timesteps(t_B)), x_t)
    target = self.training_target(x_data, noise, t_B).astype(jnp.float32)
    mse = mean_flat((out - target) ** 2)
    return dict(loss=mse, mse=mse, vb=jnp.zeros_like(mse))

  def validation_target(self, x_data, noise, t_B):
    """The velocity at (x1, x0, t): what `val_loss` compares against, whatever the prediction."""
    return self.velocity_target(x_data, noise, t_B)

  name = "flow"

  def fixed_times(self, n: int) -> jax.Array:
    """n times spread evenly over the training interval: the same stratified set for every model."""
    lo, hi = self.train_interval()
    return (lo + (jnp.arange(n, dtype=jnp.float32) + 0.5) * (hi - lo) / n).astype(jnp.float32)

  def validation_losses(self, model_fn: Callable, x_data, t_B, noise) -> dict:
    """dict(loss, mse, vb=0) [B] of the velocity MSE at fixed t and noise (see `val_loss`)."""
    mse = self.val_loss(model_fn, x_data, t_B, noise)
    return dict(loss=mse, mse=mse, vb=jnp.zeros_like(mse))

  def val_loss(self, model_fn: Callable, x_data, t_B, noise) -> jax.Array:
    """Velocity MSE [B] at the given fixed t and noise (outputs converted to a velocity first)."""
    x_t = self.interpolate(x_data, noise, t_B)
    v = self.to_velocity(model_fn(x_t, self.model_timesteps(t_B)), x_t, t_B)
    return mean_flat((v - self.validation_target(x_data, noise, t_B).astype(jnp.float32)) ** 2)


def _finite(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name}={value!r}: must be a real number")
  v = float(value)
  bad = (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
         or (hi is not None and (v >= hi if hi_open else v > hi)))
  if bad:
    rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"{name}={value!r}: must be a finite number in {rng}")
  return v


def create(path: str = "linear", prediction: str = "velocity", time_sampling: str = "uniform",
           logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0,
           train_eps: float | None = None, sample_eps: float | None = None,
           timestep_scale: float = 1.0, learn_sigma: bool = False) -> Flow:
  """Builds a Flow; SiT's defaults: linear path, velocity prediction, uniform t.

  logit_mean / logit_std: SD3's m, s (on the noise level 1 - t); SD3 trains with m = 0, s = 1.
  shift: SD3's timestep shift of the training times (1 = none). train_eps / sample_eps: None gives
  SiT's defaults (0 for velocity, 1e-3 otherwise); a velocity model trains on all of [0, 1], so
  train_eps must be 0 for it. learn_sigma must be False: a flow has no variance to learn (SiT keeps
  the 2C-channel head but never trains the extra channels); it is an argument so a trainer's config
  fails here, loudly.
  """
  if path not in PATHS:
    raise ValueError(f"path={path!r}: unknown path; use one of {PATHS}")
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction={prediction!r}: unknown prediction; use one of {PREDICTIONS}")
  if time_sampling not in TIME_SAMPLINGS:
    raise ValueError(f"time_sampling={time_sampling!r}: unknown time sampling; use one of "
                     f"{TIME_SAMPLINGS}")
  logit_mean = _finite("logit_mean", logit_mean)
  logit_std = _finite("logit_std", logit_std, lo=0.0, lo_open=True)
  if time_sampling != "logit_normal" and (logit_mean != 0.0 or logit_std != 1.0):
    raise ValueError(f"logit_mean, logit_std: set, but time_sampling={time_sampling!r}; they only "
                     "apply to 'logit_normal'")
  shift = _finite("shift", shift, lo=0.0, lo_open=True)
  default = 0.0 if prediction == "velocity" else DEFAULT_EPS
  train_eps = default if train_eps is None else _finite("train_eps", train_eps, 0.0, 0.5, False,
                                                        True)
  sample_eps = default if sample_eps is None else _finite("sample_eps", sample_eps, 0.0, 0.5,
                                                          False, True)
  if prediction == "velocity" and train_eps != 0.0:
    raise ValueError(f"train_eps={train_eps} has no effect with velocity prediction (SiT trains a "
                     "velocity model on all of [0, 1]); leave it None or 0")
  if prediction != "velocity" and (train_eps == 0.0 or sample_eps == 0.0):
    end = "t = 0 (alpha = 0)" if prediction == "noise" else "t = 1 (sigma = 0)"
    raise ValueError(f"train_eps, sample_eps=({train_eps}, {sample_eps}): must be > 0, a "
                     f"{prediction} model's velocity is infinite at {end}")
  timestep_scale = _finite("timestep_scale", timestep_scale, lo=0.0, lo_open=True)
  if bool(learn_sigma):
    raise ValueError(f"learn_sigma={learn_sigma!r}: a flow model predicts no variance; build the "
                     "network with learn_sigma=False")
  return Flow(path=path, prediction=prediction, time_sampling=time_sampling,
              logit_mean=logit_mean, logit_std=logit_std, shift=shift, train_eps=train_eps,
              sample_eps=sample_eps, timestep_scale=timestep_scale)
