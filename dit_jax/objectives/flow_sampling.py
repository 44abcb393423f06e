"""Samplers for a `Flow`: Euler / Heun ODE and SiT's Euler-Maruyama SDE (lax.scan), guidance.

Time runs from t = 0 (noise) to t = 1 (data), as in `dit_jax.objectives.flow`. `model_fn(x_BxHxWxC, t_B)` is
a closure over params and conditioning that receives `flow.model_timesteps(t)` and returns the
network output in the Flow's prediction type (C channels). `num_steps` counts integration intervals:
Euler and Euler-Maruyama call the model num_steps times (+1 for an SDE last step), Heun 2 num_steps.
SiT's `num_steps` counts grid points instead: its ODE with N takes N - 1 steps, and its SDE with N
takes N - 1 Euler-Maruyama steps plus the last step, i.e. num_steps = N - 1 here.

Noise is per example (`per_example.per_example_normal`): example i's draws depend only on (rng, i,
step), so samples do not depend on the batch size or its sharding.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import sharding as sharding_lib
from dit_jax.objectives.flow import Flow, broadcast_t, shift_sigma, shift_time
from dit_jax.objectives.per_example import per_example_normal
from dit_jax.objectives.sampling import cfg_mix, cfg_model_fn, cond_and_uncond, start

METHODS = ("euler", "heun", "euler_maruyama")
SCHEDULES = ("uniform", "diffusers")
# SiT's path.compute_diffusion forms (SiT spells the last 'inccreasing-decreasing' in its table, so
# its own CLI choice 'increasing-decreasing' raises there; here it is the spelled-out name).
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = (None, "mean", "tweedie", "euler")


# Time grids (float64 numpy, increasing from noise to data).

def time_grid(num_steps: int, t0: float = 0.0, t1: float = 1.0, shift: float = 1.0) -> np.ndarray:
  """num_steps + 1 times from t0 to t1: SiT's uniform grid, its noise level SD3-shifted in between.

  The shift acts on the unit grid before it is mapped onto [t0, t1], so the ends stay put.
  """
  u = np.linspace(0.0, 1.0, int(num_steps) + 1, dtype=np.float64)
  return t0 + (t1 - t0) * shift_time(u, float(shift))


def diffusers_time_grid(num_steps: int, shift: float = 1.0,
                        num_train_timesteps: int = 1000) -> np.ndarray:
  """1 - FlowMatchEulerDiscreteScheduler.sigmas (with its terminal 0) for num_steps steps.

  diffusers spaces its sigmas linearly from 1 to its shifted sigma_min = shift(1 / T_train), shifts
  them again and appends 0: for shift = 1 and 4 steps, sigmas 1, .667, .334, .001, 0.
  """
  sigma_min = float(np.float32(shift_sigma(np.float32(1.0 / num_train_timesteps),
                                            np.float32(shift))))
  sigmas = np.linspace(1.0, sigma_min, int(num_steps), dtype=np.float64)
  sigmas = shift_sigma(sigmas, float(shift)).astype(np.float32).astype(np.float64)
  return 1.0 - np.append(sigmas, 0.0)


# ODE and SDE terms.

def sde_diffusion(flow: Flow, t_B, ndim: int, form: str = "sigma", norm: float = 1.0):
  """SiT's diffusion coefficient w(t) [B, 1, ..] (compute_diffusion); the noise is sqrt(2 w dt)."""
  alpha, sigma, d_alpha, d_sigma = flow.coefficients(t_B, ndim)
  t = broadcast_t(t_B, ndim)
  if form == "constant":
    return jnp.full_like(t, norm)
  if form == "SBDM":  # (d_alpha / alpha) sigma^2 - sigma d_sigma: infinite at t = 0.
    return norm * (d_alpha / alpha * sigma ** 2 - sigma * d_sigma)
  if form == "sigma":
    return norm * sigma
  if form == "linear":
    return norm * (1.0 - t)
  if form == "decreasing":
    return 0.25 * (norm * jnp.cos(math.pi * t) + 1.0) ** 2
  if form == "increasing-decreasing":
    return norm * jnp.sin(math.pi * t) ** 2
  raise ValueError(f"unknown diffusion_form {form!r}; use one of {DIFFUSION_FORMS}")


def sde_drift(flow: Flow, model_out, x, t_B, form: str = "sigma", norm: float = 1.0):
  """SiT's SDE drift: velocity + w(t) * score."""
  return (flow.to_velocity(model_out, x, t_B)
          + sde_diffusion(flow, t_B, x.ndim, form, norm) * flow.to_score(model_out, x, t_B))


def euler_step(flow: Flow, model_out, x, t, t_next):
  """x + (t_next - t) v(x, t)."""
  return x + (t_next - t) * flow.to_velocity(model_out, x, jnp.full((x.shape[0],), t))


def euler_maruyama_step(flow: Flow, model_out, x, t, t_next, noise, form="sigma", norm=1.0):
  """SiT's Euler-Maruyama step: (mean + sqrt(2 w dt) noise, mean) with mean = x + drift dt."""
  t_B = jnp.full((x.shape[0],), t)
  dt = t_next - t
  mean = x + sde_drift(flow, model_out, x, t_B, form, norm) * dt
  return mean + jnp.sqrt(2.0 * sde_diffusion(flow, t_B, x.ndim, form, norm) * dt) * noise, mean


def apply_last_step(flow: Flow, model_out, x, t, kind: Optional[str], size: float, form="sigma",
                    norm=1.0):
  """SiT's final SDE step from t = 1 - size: 'mean' (drift, no noise), 'euler' (ODE drift),
  'tweedie' (E[x1 | x_t]) or None (x as it is)."""
  t_B = jnp.full((x.shape[0],), t)
  if kind is None:
    return x
  if kind == "mean":
    return x + sde_drift(flow, model_out, x, t_B, form, norm) * size
  if kind == "euler":
    return x + flow.to_velocity(model_out, x, t_B) * size
  if kind == "tweedie":
    return flow.to_data(model_out, x, t_B)
  raise ValueError(f"unknown last_step {kind!r}; use one of {LAST_STEPS}")


# Argument checks (eager, with the names the caller used).

def _real(v):
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_steps(num_steps):
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  return int(num_steps)


def _check_shift(shift):
  if not (_real(shift) and math.isfinite(shift) and shift > 0):
    raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
  return float(shift)


def _check_interval(interval):
  if interval is None:
    return None
  try:
    lo, hi = (float(v) for v in interval)
  except (TypeError, ValueError):
    raise ValueError(f"guidance_interval must be None or (lo, hi), got {interval!r}") from None
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"guidance_interval {interval!r} must satisfy 0 <= lo <= hi <= 1 (flow time: "
                     "0 = noise, 1 = data)")
  return lo, hi


def _check_sde(flow, form, norm, kind, size):
  if form not in DIFFUSION_FORMS:
    raise ValueError(f"unknown diffusion_form {form!r}; use one of {DIFFUSION_FORMS}")
  if not (_real(norm) and math.isfinite(norm) and norm >= 0):
    raise ValueError(f"diffusion_norm must be a finite number >= 0, got {norm!r}")
  if kind not in LAST_STEPS:
    raise ValueError(f"unknown last_step {kind!r}; use one of {LAST_STEPS}")
  if kind is not None and not (_real(size) and 0 < size < 1):
    raise ValueError(f"last_step_size must be in (0, 1) with last_step={kind!r}, got {size!r}")
  t0, t1 = flow.sample_interval(sde=True, diffusion_form=form,
                                last_step_size=size if kind is not None else 0.0)
  if form == "SBDM" and t0 == 0.0:
    raise ValueError("the SBDM diffusion (d_alpha/alpha) sigma^2 - sigma d_sigma is infinite at "
                     "t = 0: create the Flow with sample_eps > 0 (SiT's velocity default is 0)")
  if not t0 < t1:
    raise ValueError(f"SDE interval [{t0}, {t1}] is empty (sample_eps / last_step_size too large)")
  return t0, t1


# Sampling loops.

def _run(step_fn, shape, rng, times, x_init, sharding, return_trajectory, finish=None):
  shape, x, rng_steps, constrain = start(shape, rng, x_init, sharding)
  times = jnp.asarray(times, jnp.float32)

  def body(x, inputs):
    t, t_next, i = inputs
    x_next = constrain(step_fn(x, t, t_next, lambda: constrain(
        per_example_normal(jax.random.fold_in(rng_steps, i), shape))))
    return x_next, (x_next if return_trajectory else None)

  steps = (times[:-1], times[1:], jnp.arange(times.shape[0] - 1, dtype=jnp.int32))
  x_last, traj = jax.lax.scan(body, x, steps)
  parts = [x[None], traj] if return_trajectory else []
  if finish is not None:
    x_last = constrain(finish(x_last))
    parts.append(x_last[None])
  if return_trajectory:
    return x_last, jnp.concatenate(parts)
  return x_last


def ode_sample(model_fn: Callable, flow: Flow, shape, rng: jax.Array, *, method: str = "euler",
               num_steps: int = 50, shift: float = 1.0, schedule: str = "uniform", x_init=None,
               sharding=None, return_trajectory: bool = False):
  """Fixed-step Euler or Heun on dx/dt = v(x, t) from noise at t0 to data at t1; returns x.

  schedule 'uniform': SiT's grid on flow.sample_interval() ([0, 1] for a velocity model), with the
  noise level SD3-shifted by `shift`; 'diffusers': FlowMatchEulerDiscreteScheduler's grid (velocity
  models only). return_trajectory: also return the states [num_steps + 1, *shape], x_init first.
  """
  if method not in ("euler", "heun"):
    raise ValueError(f"ODE method {method!r}: use 'euler' or 'heun' (or sde_sample)")
  num_steps, shift = _check_steps(num_steps), _check_shift(shift)
  if schedule == "uniform":
    times = time_grid(num_steps, *flow.sample_interval(sde=False), shift)
  elif schedule == "diffusers":
    if flow.prediction != "velocity":
      raise ValueError("the diffusers schedule runs t from 0 to 1, where a "
                       f"{flow.prediction} model's velocity is infinite; use schedule='uniform'")
    times = diffusers_time_grid(num_steps, shift)
  else:
    raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")

  def velocity(x, t):
    t_B = jnp.full((x.shape[0],), t)
    return flow.to_velocity(model_fn(x, flow.model_timesteps(t_B)), x, t_B)

  def step(x, t, t_next, _):
    v = velocity(x, t)
    if method == "euler":
      return x + (t_next - t) * v
    x_euler = x + (t_next - t) * v
    return x + 0.5 * (t_next - t) * (v + velocity(x_euler, t_next))

  return _run(step, shape, rng, times, x_init, sharding, return_trajectory)


def sde_sample(model_fn: Callable, flow: Flow, shape, rng: jax.Array, *, num_steps: int = 249,
               diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
               last_step: Optional[str] = "mean", last_step_size: float = 0.04, shift: float = 1.0,
               x_init=None, sharding=None, return_trajectory: bool = False):
  """SiT's Euler-Maruyama SDE sampler (sample_sde) on dx = [v + w s] dt + sqrt(2 w) dW; returns x.

  Defaults are SiT's sample.py SDE defaults (250 grid points, 'sigma' diffusion, 'Mean' last step
  of size 0.04). The grid spans flow.sample_interval(sde=True, ...) with num_steps + 1 points, then
  `last_step` takes the final step to t = 1 (see `apply_last_step`). return_trajectory: also return
  the states, x_init first and the last step's result last ([num_steps + 2, *shape] with one).
  """
  num_steps, shift = _check_steps(num_steps), _check_shift(shift)
  t0, t1 = _check_sde(flow, diffusion_form, diffusion_norm, last_step, last_step_size)
  times = time_grid(num_steps, t0, t1, shift)

  def out_at(x, t):
    return model_fn(x, flow.model_timesteps(jnp.full((x.shape[0],), t)))

  def step(x, t, t_next, draw_noise):
    x_next, _ = euler_maruyama_step(flow, out_at(x, t), x, t, t_next, draw_noise(),
                                    diffusion_form, diffusion_norm)
    return x_next

  finish = None
  if last_step is not None:
    t1_32 = jnp.float32(t1)
    finish = lambda x: apply_last_step(flow, out_at(x, t1_32), x, t1_32, last_step,
                                       last_step_size, diffusion_form, diffusion_norm)
  return _run(step, shape, rng, times, x_init, sharding, return_trajectory, finish)


# Guidance.

def guided_model_fn(model_fn_xty: Callable, flow: Flow, y, null_label, scale: float,
                    interval: Optional[tuple] = None) -> Callable:
  """Classifier-free guidance (cfg_mix), only for flow times t in [lo, hi].

  Guiding the raw output is guiding the velocity: every prediction type converts to a velocity by
  the same affine map for the conditional and unconditional halves. Without an interval this is
  cfg_model_fn (x's C channels guided; a learned variance, which sampling drops, conditional); with
  one, every output channel is mixed, and when no example is inside only the conditional pass
  runs, via lax.cond.
  """
  interval = _check_interval(interval)
  guided = cfg_model_fn(model_fn_xty, y, null_label, scale)
  if interval is None:
    return guided
  y = jnp.asarray(y)
  lo_m = flow.model_timesteps(jnp.float32(interval[0]))
  hi_m = flow.model_timesteps(jnp.float32(interval[1]))

  def fn(x, t_model_B):
    inside_B = (t_model_B >= lo_m) & (t_model_B <= hi_m)

    def with_guidance(_):
      cond, uncond = cond_and_uncond(model_fn_xty, x, t_model_B, y, null_label)
      mixed = cfg_mix(cond, uncond, scale)  # all channels, also a learned variance's
      return jnp.where(inside_B.reshape((-1,) + (1,) * (x.ndim - 1)), mixed, cond)

    return jax.lax.cond(jnp.any(inside_B), with_guidance,
                        lambda _: model_fn_xty(x, t_model_B, y), None)

  return fn


def make_flow_sample_fn(model, flow: Flow, *, method: str = "euler", num_steps: int = 50,
                        cfg_scale: float = 1.0, guidance_interval: Optional[tuple] = None,
                        shift: float = 1.0, schedule: str = "uniform",
                        diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
                        last_step: Optional[str] = "mean", last_step_size: float = 0.04,
                        mesh=None) -> Callable:
  """jitted (params, labels_B, rng, x_shape) -> samples, as sampling.make_sample_fn; cfg_scale != 1
  guides a class-conditional model. A 2C-channel (learn_sigma) network, e.g. a converted SiT
  checkpoint, is sampled from its first C channels, as SiT does. With `mesh` the samples come back
  replicated."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
  _check_steps(num_steps)
  _check_shift(shift)
  if not (_real(cfg_scale) and math.isfinite(cfg_scale)):
    raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
  guidance_interval = _check_interval(guidance_interval)
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
  if method == "euler_maruyama":
    if schedule != "uniform":
      raise ValueError("the SDE sampler uses SiT's uniform grid; schedule must be 'uniform'")
    _check_sde(flow, diffusion_form, diffusion_norm, last_step, last_step_size)
  out = sharding_lib.replicated(mesh) if mesh is not None else None
  num_classes = getattr(model, "num_classes", 0)

  @functools.partial(jax.jit, static_argnums=(3,), out_shardings=out)
  def sample(params, y_B, rng, shape):
    apply = lambda x, t, y: model.apply({"params": params}, x, t, y)
    if num_classes and cfg_scale != 1.0:
      fn = guided_model_fn(apply, flow, y_B, num_classes, cfg_scale, guidance_interval)
    else:
      fn = lambda x, t: apply(x, t, y_B if num_classes else None)

    def fn_c(x, t):
      o = fn(x, t)
      return o[..., :x.shape[-1]] if o.shape[-1] == 2 * x.shape[-1] else o

    if method == "euler_maruyama":
      return sde_sample(fn_c, flow, shape, rng, num_steps=num_steps,
                        diffusion_form=diffusion_form, diffusion_norm=diffusion_norm,
                        last_step=last_step, last_step_size=last_step_size, shift=shift)
    return ode_sample(fn_c, flow, shape, rng, method=method, num_steps=num_steps, shift=shift,
                      schedule=schedule)

  return sample
