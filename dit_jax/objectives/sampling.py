"""Samplers for a `Diffusion`: DDPM ancestral and DDIM loops (lax.scan), classifier-free guidance.

`model_fn(x_BxHxWxC, t_B) -> out_BxHxWx(C or 2C)` is a closure over params and any conditioning
(class labels, text context); it always receives ORIGINAL timesteps. Wrap a sampler in `jax.jit`
with the params as an argument (not closed over) so new params do not recompile:

  @jax.jit
  def sample(params, y_B, rng):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, y_B)
    return sampling.ddpm_sample(model_fn, diffusion, (B, 32, 32, 4), rng)

`make_sample_fn(model, diffusion, ...)` builds exactly that for a DiT-like model (labels, guidance,
clipping, trajectory, replicated output on a mesh), as evaluation and tools/sample.py need.

Noise is drawn per example: example i's noise depends only on (rng, i, step), so it differs between
examples and between devices, and the result does not depend on how the batch is sharded.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dit_jax import sharding as sharding_lib
from dit_jax.objectives.diffusion import Diffusion, extract
from dit_jax.objectives.per_example import per_example_normal


def ddpm_step(diffusion: Diffusion, model_out, x_t, t_B, noise, clip_denoised: bool = False):
  """One ancestral step x_t -> x_{t-1} (no noise at t = 0); returns (x_prev, pred_x0)."""
  out = diffusion.p_mean_variance(model_out, x_t, t_B, clip_denoised=clip_denoised)
  nonzero = (t_B != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x_t.ndim - 1))
  x_prev = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
  return x_prev, out["pred_x0"]


def ddim_step(diffusion: Diffusion, model_out, x_t, t_B, noise, eta: float = 0.0,
              clip_denoised: bool = False):
  """One DDIM step (Song et al. eq. 12) with stochasticity eta; returns (x_prev, pred_x0)."""
  out = diffusion.p_mean_variance(model_out, x_t, t_B, clip_denoised=clip_denoised)
  # eps re-derived from the (possibly clipped) x0, so clipping and x0/v models stay consistent.
  eps = out["eps"]
  # sigma^2 = eta^2 (1 - abar_prev) / (1 - abar) (1 - abar / abar_prev), which is eta^2 times the
  # posterior variance; tabulated in float64 to avoid float32 cancellation at small t.
  var = eta ** 2 * extract(diffusion.posterior_variance, t_B, x_t.ndim)
  direction = jnp.sqrt(jnp.maximum(
      extract(diffusion.one_minus_alphas_cumprod_prev, t_B, x_t.ndim) - var, 0.0))
  sqrt_abar_prev = extract(diffusion.sqrt_alphas_cumprod_prev, t_B, x_t.ndim)
  mean = out["pred_x0"] * sqrt_abar_prev + direction * eps
  sigma = jnp.sqrt(var)
  nonzero = (t_B != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return mean + nonzero * sigma * noise, out["pred_x0"]


def _check_shape(shape, x_T):
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2 or min(shape) < 1:
    raise ValueError(f"shape must be (B, ..., C) with positive sizes, got {shape}")
  if x_T is not None and tuple(x_T.shape) != shape:
    raise ValueError(f"x_T shape {tuple(x_T.shape)} != requested shape {shape}")
  return shape


def start(shape, rng, x_T, sharding) -> tuple:
  """What every sampling loop starts from: (shape, x_T, the per-step key, the sharding
  constraint); x_T is per-example noise from the first half of `rng` unless given."""
  shape = _check_shape(shape, x_T)
  rng_init, rng_steps = jax.random.split(rng)
  constrain = ((lambda x: jax.lax.with_sharding_constraint(x, sharding)) if sharding is not None
               else (lambda x: x))
  x_start = per_example_normal(rng_init, shape) if x_T is None else x_T.astype(jnp.float32)
  return shape, constrain(x_start), rng_steps, constrain


def _sample_loop(step_fn, model_fn, diffusion, shape, rng, x_T, sharding, progressive):
  shape, x_start, rng_steps, constrain = start(shape, rng, x_T, sharding)

  def body(x, i):
    t_B = jnp.full((shape[0],), i, jnp.int32)
    model_out = model_fn(x, diffusion.model_timesteps(t_B))
    noise = constrain(per_example_normal(jax.random.fold_in(rng_steps, i), shape))
    x_prev, pred_x0 = step_fn(model_out, x, t_B, noise)
    x_prev = constrain(x_prev)
    # scan stacks the per-step outputs; the carry is the same x_prev, so the last entry is x_0.
    return x_prev, ((x_prev, constrain(pred_x0)) if progressive else None)

  steps = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  x, stacked = jax.lax.scan(body, x_start, steps)
  if not progressive:
    return x
  return dict(sample=x, x_T=x_start, trajectory=stacked[0], pred_x0=stacked[1], t=steps)


def ddpm_sample(model_fn: Callable, diffusion: Diffusion, shape, rng: jax.Array, *,
                clip_denoised: bool = False, x_T=None, sharding=None, progressive: bool = False):
  """Ancestral DDPM sampling over all steps of `diffusion` (respace it for fewer); returns x_0.

  clip_denoised clamps each x_0 prediction to [-1, 1] before the posterior mean (ADM's pixel
  sampler); DiT's latents leave it off. x_T: optional starting noise (else drawn from rng).
  sharding: e.g. NamedSharding(mesh, P("data")) to keep the batch sharded through the loop.

  progressive=True returns a dict instead of x_0 (ADM's p_sample_loop_progressive, stacked):
  sample x_0 [B, ...]; x_T the start [B, ...]; trajectory [S, B, ...], x after each of the S steps
  (x_{t-1}, so trajectory[-1] is sample); pred_x0 [S, B, ...], each step's x_0 prediction (clipped
  if clip_denoised); t [S], each step's process index (S - 1 .. 0). It holds S + 1 batches of x.
  """
  def step(model_out, x, t_B, noise):
    return ddpm_step(diffusion, model_out, x, t_B, noise, clip_denoised)
  return _sample_loop(step, model_fn, diffusion, shape, rng, x_T, sharding, progressive)


def ddim_sample(model_fn: Callable, diffusion: Diffusion, shape, rng: jax.Array, *,
                eta: float = 0.0, clip_denoised: bool = False, x_T=None, sharding=None,
                progressive: bool = False):
  """DDIM sampling over all steps of `diffusion` (e.g. respacing "ddim50" or "50"); returns x_0.

  clip_denoised clamps x_0 and re-derives eps from it, as ADM's ddim_sample; progressive as in
  `ddpm_sample` (ADM's ddim_sample_loop_progressive).
  """
  def step(model_out, x, t_B, noise):
    return ddim_step(diffusion, model_out, x, t_B, noise, eta, clip_denoised)
  return _sample_loop(step, model_fn, diffusion, shape, rng, x_T, sharding, progressive)


def cond_and_uncond(model_fn_xty: Callable, x, t_B, y, null_label) -> tuple:
  """(conditional, unconditional) outputs of one batched call on [x; x], [t; t], [y; null], null
  being `null_label` broadcast to y."""
  b = x.shape[0]
  null = jnp.broadcast_to(jnp.asarray(null_label, y.dtype), y.shape)
  out = model_fn_xty(jnp.concatenate([x, x]), jnp.concatenate([t_B, t_B]),
                     jnp.concatenate([y, null]))
  return out[:b], out[b:]


def cfg_mix(cond, uncond, scale):
  """Classifier-free guidance's mixing rule, uncond + scale * (cond - uncond), in cond's dtype."""
  return (uncond + scale * (cond - uncond)).astype(cond.dtype)


def cfg_model_fn(model_fn_xty: Callable, y, null_label, scale, guide_channels: int | None = None
                 ) -> Callable:
  """Classifier-free guidance as a `model_fn(x, t)`: uncond + scale * (cond - uncond).

  One batched call on [x; x] with [y; null]. `y` is any per-example conditioning [B, ...] (labels,
  text context) and `null_label` its unconditional value (DiT: num_classes), broadcast to y.
  guide_channels=None guides all C channels of the prediction (C = x's channels; the standard
  rule); the remaining channels (the learned variance) come from the conditional half.
  guide_channels=3 reproduces the official DiT sampler, which guides only channels 0-2 of the 4
  latent channels (DiT#41): channel 3 is then the unguided conditional prediction. It must lie in
  1..C: guiding the variance channels is not guidance.
  """
  y = jnp.asarray(y)
  if guide_channels is not None and (int(guide_channels) != guide_channels or guide_channels < 1):
    raise ValueError(f"guide_channels={guide_channels!r}: expected None or an int >= 1")

  def guided(x, t_B):
    b, c = x.shape[0], x.shape[-1]
    if y.shape[0] != b:
      raise ValueError(f"conditioning has batch {y.shape[0]} but x has batch {b}")
    # The prediction has x's C channels; a learned-sigma model appends C variance channels.
    if guide_channels is not None and guide_channels > c:
      raise ValueError(f"guide_channels={guide_channels} outside [1, {c}]: only the C = {c} "
                       "prediction channels (x's channels) can be guided, not the learned variance")
    n = c if guide_channels is None else int(guide_channels)
    cond, uncond = cond_and_uncond(model_fn_xty, x, t_B, y, null_label)
    if cond.shape[-1] not in (c, 2 * c):
      raise ValueError(f"model output has {cond.shape[-1]} channels; expected {c} (the "
                       f"prediction) or {2 * c} (prediction and learned variance) for x's {c}")
    mixed = cfg_mix(cond[..., :n], uncond[..., :n], scale)
    return jnp.concatenate([mixed, cond[..., n:]], axis=-1)

  return guided


SAMPLERS = ("ddpm", "ddim")


def make_sample_fn(model, diffusion: Diffusion, *, sampler: str = "ddpm", cfg_scale: float = 1.0,
                   guide_channels: int | None = None, eta: float = 0.0,
                   clip_denoised: bool = False, progressive: bool = False, mesh=None,
                   null_label=None) -> Callable:
  """jitted (params, labels_B, rng, x_shape) -> samples of a DiT or U-Net; cfg_scale != 1 guides.

  Labels are guided against `null_label`, by default the null class of a class-conditional model
  (num_classes; an unconditional model ignores labels). A model whose labels are something else
  passes it: a text.TextConditioned reads caption ids (B, L), null_label=tokenizer.null_tokens().
  clip_denoised: True for pixel-space models (ADM), False for latents (DiT). progressive: return
  ddpm_sample's dict with the trajectory instead of x_0. With `mesh` the samples come back
  replicated, so every process can read them (multi-host).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; use 'ddpm' or 'ddim'")
  out = sharding_lib.replicated(mesh) if mesh is not None else None
  if null_label is None and getattr(model, "num_classes", 0):
    null_label = model.num_classes
  conditional = null_label is not None

  @functools.partial(jax.jit, static_argnums=(3,), out_shardings=out)
  def sample(params, y_B, rng, shape):
    if conditional and cfg_scale != 1.0:
      fn = cfg_model_fn(lambda x, t, y: model.apply({"params": params}, x, t, y), y_B,
                        null_label, cfg_scale, guide_channels)
    else:
      fn = lambda x, t: model.apply({"params": params}, x, t, y_B if conditional else None)
    if sampler == "ddpm":
      return ddpm_sample(fn, diffusion, shape, rng, clip_denoised=clip_denoised,
                         progressive=progressive)
    return ddim_sample(fn, diffusion, shape, rng, eta=eta, clip_denoised=clip_denoised,
                       progressive=progressive)

  return sample
