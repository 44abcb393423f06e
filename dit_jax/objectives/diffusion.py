"""Gaussian diffusion (DDPM): schedules, respacing, q(x_t | x_0), posteriors, losses and the VLB.

Numbers follow openai/guided-diffusion (ADM) and facebookresearch/DiT `diffusion/`: schedules and
all derived coefficients are computed in float64 numpy once, and cast to float32 when indexed.

Timestep convention: every method takes `t` as an index into THIS process (0 .. num_timesteps - 1).
For a respaced process that index differs from the timestep the network was trained on; the model is
always called with `diffusion.model_timesteps(t)` (the ORIGINAL timestep), as ADM's `_WrappedModel`.
Without respacing the two coincide.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.objectives.per_example import mean_flat, per_example_keys, per_example_normal

PREDICTIONS = ("eps", "x0", "v")
SCHEDULES = ("linear", "cosine")
# DiT and diffusers call the ADM cosine schedule by its diffusers name.
_SCHEDULE_ALIASES = {"squaredcos_cap_v2": "cosine"}


def linear_betas(timesteps: int) -> np.ndarray:
  """Ho et al. linear betas 1e-4 -> 0.02, times 1000 / T (ADM) so any T keeps the total noise."""
  scale = 1000.0 / timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal cosine betas from alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)."""
  def alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1.0 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta)
                   for i in range(timesteps)], dtype=np.float64)


def get_betas(schedule: str, timesteps: int) -> np.ndarray:
  """Betas of a named schedule ('linear' or 'cosine', alias 'squaredcos_cap_v2')."""
  name = _SCHEDULE_ALIASES.get(schedule, schedule)
  if name == "linear":
    return linear_betas(timesteps)
  if name == "cosine":
    return cosine_betas(timesteps)
  raise ValueError(f"unknown noise schedule {schedule!r}; use one of {SCHEDULES} "
                   f"(or the alias 'squaredcos_cap_v2' for 'cosine')")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
  """ADM's respacing: the sorted original timesteps kept when taking `section_counts` steps.

  `section_counts` is "" (or None) for no respacing (all T steps), "N" (or an int) for N evenly
  spread steps including 0 and T - 1, "a,b,c" for a, b, c steps from consecutive equal sections of
  [0, T), or "ddimN" for DDIM's integer stride.
  """
  if section_counts is None or (isinstance(section_counts, str) and not section_counts.strip()):
    return list(range(num_timesteps))
  if isinstance(section_counts, int):
    section_counts = [section_counts]
  elif isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      want = section_counts[len("ddim"):]
      if not want.isdigit() or int(want) < 1:
        raise ValueError(f"respacing {section_counts!r}: 'ddimN' needs a step count N >= 1, "
                         "e.g. 'ddim50'")
      want = int(want)
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == want:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"respacing {section_counts!r}: no integer stride gives exactly {want} of "
                       f"{num_timesteps} steps; use a plain count like '{want}' instead")
    try:
      section_counts = [int(s) for s in section_counts.split(",")]
    except ValueError:
      raise ValueError(f"respacing {section_counts!r}: expected '', 'N', 'a,b,c' or 'ddimN'"
                       ) from None
  n_sections = len(section_counts)
  base, extra = divmod(num_timesteps, n_sections)
  kept, start = set(), 0
  for i, count in enumerate(section_counts):
    size = base + (1 if i < extra else 0)
    if count < 1 or count > size:
      raise ValueError(f"respacing: cannot take {count} steps from a section of {size} steps "
                       f"(T = {num_timesteps}, sections {list(section_counts)})")
    # The stride is accumulated in float and rounded half-to-even (Python's round), as ADM does;
    # a closed form (start + round(k * stride)) can differ by one step at exact .5 ties.
    stride = 1.0 if count == 1 else (size - 1) / (count - 1)
    pos = 0.0
    for _ in range(count):
      kept.add(start + round(pos))
      pos += stride
    start += size
  return sorted(kept)


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """ADM's tanh approximation of the normal CDF, 0.5 (1 + tanh(u)), written as sigmoid(2u)."""
  # The same function, but float32 tanh rounds to exactly -1 once u < -8 (torch: -9), which zeroes
  # the lower tail from ~5 sigma out; sigmoid keeps it down to ~1e-38.
  return jax.nn.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-probability (nats) of 8-bit values x in [-1, 1] under a Gaussian binned to width 2/255.

  The outermost bins extend to -inf / +inf, so the 256 bin probabilities sum to one. Values are
  ADM's (losses.py) including its 1e-12 floor on each probability, evaluated without float32
  cancellation: upper-tail masses come from the mirrored CDF (the approximation is symmetric,
  1 - cdf(z) = cdf(-z)) instead of as 1 - (a number near 1).
  """
  if not x.shape == means.shape == log_scales.shape:
    raise ValueError(f"shapes differ: x {x.shape}, means {means.shape}, "
                     f"log_scales {log_scales.shape}")
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  plus_in = inv_std * (centered + 1.0 / 255.0)
  min_in = inv_std * (centered - 1.0 / 255.0)
  cdf_plus = approx_standard_normal_cdf(plus_in)
  one_minus_cdf_min = approx_standard_normal_cdf(-min_in)
  # A bin below the mean takes its mass from the lower tail, one above from the upper tail, so
  # neither side subtracts two numbers near 1.
  cdf_delta = jnp.where(centered <= 0.0, cdf_plus - approx_standard_normal_cdf(min_in),
                        one_minus_cdf_min - approx_standard_normal_cdf(-plus_in))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(one_minus_cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_delta, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def extract(table: np.ndarray, t_B: jax.Array, ndim: int) -> jax.Array:
  """table[t] as float32, shaped [B, 1, ..., 1] to broadcast against an ndim-array."""
  values_B = jnp.asarray(table, jnp.float32)[t_B]
  return values_B.reshape(values_B.shape + (1,) * (ndim - 1))


@flax.struct.dataclass
class Diffusion:
  """A (possibly respaced) DDPM process: float64 coefficient tables plus static settings.

  A pytree: close over it in a jitted function, or pass it as an argument. Build with `create`.
  """
  # Every coefficient is tabulated in float64: formed in float32 from alpha-bar, terms like
  # 1 - abar cancel (4e-4 relative error at t = 1).
  betas: np.ndarray
  log_betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  one_minus_alphas_cumprod: np.ndarray
  one_minus_alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_alphas_cumprod_prev: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  fixed_large_log_variance: np.ndarray
  timestep_map: np.ndarray  # int32 [num_timesteps]: original timestep of each index.
  num_timesteps: int = flax.struct.field(pytree_node=False)
  original_num_timesteps: int = flax.struct.field(pytree_node=False)
  learn_sigma: bool = flax.struct.field(pytree_node=False)
  sigma_small: bool = flax.struct.field(pytree_node=False)
  prediction: str = flax.struct.field(pytree_node=False)

  def model_timesteps(self, t_B: jax.Array) -> jax.Array:
    """Original timesteps (what the network is conditioned on) for process indices t."""
    return jnp.asarray(self.timestep_map)[t_B]

  def sample_t(self, rng: jax.Array, batch: int) -> jax.Array:
    """Uniform training timesteps in [0, num_timesteps), int32 [batch]."""
    return jax.random.randint(rng, (batch,), 0, self.num_timesteps, dtype=jnp.int32)

  # Forward process.

  def q_mean_variance(self, x0, t_B):
    """Mean, variance and log-variance of q(x_t | x_0)."""
    return (extract(self.sqrt_alphas_cumprod, t_B, x0.ndim) * x0,
            extract(self.one_minus_alphas_cumprod, t_B, x0.ndim),
            jnp.log(extract(self.one_minus_alphas_cumprod, t_B, x0.ndim)))

  def q_sample(self, x0, t_B, noise):
    """Draws x_t ~ q(x_t | x_0) given the standard-normal noise."""
    if noise.shape != x0.shape:
      raise ValueError(f"noise shape {noise.shape} != x0 shape {x0.shape}")
    return (extract(self.sqrt_alphas_cumprod, t_B, x0.ndim) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t_B, x0.ndim) * noise)

  def q_posterior_mean_variance(self, x0, x_t, t_B):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    if x0.shape != x_t.shape:
      raise ValueError(f"x0 shape {x0.shape} != x_t shape {x_t.shape}")
    mean = (extract(self.posterior_mean_coef1, t_B, x_t.ndim) * x0
            + extract(self.posterior_mean_coef2, t_B, x_t.ndim) * x_t)
    return (mean, extract(self.posterior_variance, t_B, x_t.ndim),
            extract(self.posterior_log_variance_clipped, t_B, x_t.ndim))

  # Conversions between the eps, x0 and v parameterisations.

  def predict_x0_from_eps(self, x_t, t_B, eps):
    """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (extract(self.sqrt_recip_alphas_cumprod, t_B, x_t.ndim) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t_B, x_t.ndim) * eps)

  def predict_eps_from_x0(self, x_t, t_B, x0):
    """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""
    return ((extract(self.sqrt_recip_alphas_cumprod, t_B, x_t.ndim) * x_t - x0)
            / extract(self.sqrt_recipm1_alphas_cumprod, t_B, x_t.ndim))

  def predict_x0_from_v(self, x_t, t_B, v):
    """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    return (extract(self.sqrt_alphas_cumprod, t_B, x_t.ndim) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t_B, x_t.ndim) * v)

  def get_v(self, x0, noise, t_B):
    """The v-prediction target sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho)."""
    return (extract(self.sqrt_alphas_cumprod, t_B, x0.ndim) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, t_B, x0.ndim) * x0)

  def training_target(self, x0, noise, t_B):
    """What the network regresses onto: eps, x_0 or v, by `prediction`."""
    if self.prediction == "eps":
      return noise
    if self.prediction == "x0":
      return x0
    return self.get_v(x0, noise, t_B)

  # Reverse process.

  def split_output(self, model_out, x_t):
    """Splits a model output into (prediction [.., C], variance values [.., C] or None)."""
    c = x_t.shape[-1]
    want = 2 * c if self.learn_sigma else c
    if model_out.shape[:-1] != x_t.shape[:-1] or model_out.shape[-1] != want:
      raise ValueError(f"model output {model_out.shape} does not fit x_t {x_t.shape}: expected "
                       f"{want} channels (learn_sigma={self.learn_sigma}: "
                       f"{'2C, prediction then variance' if self.learn_sigma else 'C'})")
    if self.learn_sigma:
      return model_out[..., :c], model_out[..., c:]
    return model_out, None

  def p_mean_variance(self, model_out, x_t, t_B, clip_denoised: bool = False):
    """p(x_{t-1} | x_t) from one model output: dict(mean, variance, log_variance, pred_x0, eps).

    With learned Sigma the last C channels v in [-1, 1] interpolate the log-variance between the
    posterior variance (v = -1) and beta_t (v = +1) of THIS process (LEARNED_RANGE). `clip_denoised`
    clamps the x_0 prediction to [-1, 1] (pixels); DiT leaves it off on latents.
    """
    model_out = model_out.astype(jnp.float32)
    x_t = x_t.astype(jnp.float32)
    pred, var_values = self.split_output(model_out, x_t)
    if self.learn_sigma:
      min_log = extract(self.posterior_log_variance_clipped, t_B, x_t.ndim)
      max_log = extract(self.log_betas, t_B, x_t.ndim)
      frac = (var_values + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
    elif self.sigma_small:
      log_variance = jnp.broadcast_to(
          extract(self.posterior_log_variance_clipped, t_B, x_t.ndim), x_t.shape)
    else:
      log_variance = jnp.broadcast_to(
          extract(self.fixed_large_log_variance, t_B, x_t.ndim), x_t.shape)

    if self.prediction == "eps":
      pred_x0 = self.predict_x0_from_eps(x_t, t_B, pred)
    elif self.prediction == "x0":
      pred_x0 = pred
    else:
      pred_x0 = self.predict_x0_from_v(x_t, t_B, pred)
    if clip_denoised:
      pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t_B)
    return dict(mean=mean, variance=jnp.exp(log_variance), log_variance=log_variance,
                pred_x0=pred_x0, eps=self.predict_eps_from_x0(x_t, t_B, pred_x0))

  # Likelihood.

  def vb_terms_bpd(self, model_out, x0, x_t, t_B):
    """One VLB term per example in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or at t = 0
    the decoder NLL -log p(x_0 | x_1) with ADM's discretised Gaussian."""
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t_B)
    out = self.p_mean_variance(model_out, x_t, t_B, clip_denoised=False)
    kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
    kl = mean_flat(kl) / math.log(2.0)
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
        x0, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
    return jnp.where(t_B == 0, decoder_nll, kl)

  def prior_bpd(self, x0):
    """KL(q(x_T | x_0) || N(0, I)) in bits/dim per example: the VLB term no model can change."""
    t_B = jnp.full((x0.shape[0],), self.num_timesteps - 1, jnp.int32)
    mean, _, log_var = self.q_mean_variance(x0, t_B)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)

  # The objective interface (shared with flow.Flow, used by train_step and the validation loss).

  name = "ddpm"

  def draw_noise_and_t(self, k_noise, k_t, shape) -> tuple:
    """Per-example noise and timesteps: example i's draw depends on (key, i) only, so every example
    on every device differs, and the values do not depend on how the batch is sharded."""
    noise = per_example_normal(k_noise, shape)
    t_B = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.num_timesteps, jnp.int32))(
        per_example_keys(k_t, shape[0]))
    return noise, t_B

  def fixed_times(self, n: int) -> jax.Array:
    """n timesteps spread evenly over [0, T): the same stratified set for every model."""
    return ((jnp.arange(n) + 0.5) * self.num_timesteps / n).astype(jnp.int32)

  def validation_losses(self, model_fn: Callable, x0, t_B, noise) -> dict:
    """The training terms (mse on the target; vb with learned Sigma) at given t and noise."""
    return self.training_losses(model_fn, x0, t_B, noise)

  def training_losses(self, model_fn: Callable, x0, t_B, noise):
    """DiT's loss per example: dict(loss, mse, vb), each [B].

    mse regresses the `prediction` target; with learned Sigma, vb is the VLB term (bits/dim, no
    rescale, as DiT's LossType.MSE) computed with the mean channels stop-gradiented so only the
    variance learns from it; loss = mse + vb. `model_fn(x_t, t_original)` gets the ORIGINAL t.
    """
    x_t = self.q_sample(x0, t_B, noise)
    model_out = model_fn(x_t, self.model_timesteps(t_B))
    pred, var_values = self.split_output(model_out, x_t)
    target = self.training_target(x0, noise, t_B)
    mse = mean_flat((target.astype(jnp.float32) - pred.astype(jnp.float32)) ** 2)
    if self.learn_sigma:
      frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
      vb = self.vb_terms_bpd(frozen, x0, x_t, t_B)
    else:
      vb = jnp.zeros_like(mse)
    return dict(loss=mse + vb, mse=mse, vb=vb)


def create(schedule: str = "linear", timesteps: int = 1000,
           respacing: str | int | Sequence[int] = "", learn_sigma: bool = True,
           prediction: str = "eps", sigma_small: bool = False) -> Diffusion:
  """Builds a Diffusion; DiT's defaults: linear T=1000, learned Sigma, eps-prediction.

  respacing: "" (all T steps), "250", "10,15,20" or "ddim50" (see `space_timesteps`). Respaced betas
  are recomputed from alpha-bar so the kept steps keep their original noise levels.
  sigma_small: with fixed variance, use the posterior variance instead of beta_t (DiT: False).
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction {prediction!r} not supported; use one of {PREDICTIONS}")
  if not isinstance(timesteps, (int, np.integer)) or timesteps < 2:
    raise ValueError(f"timesteps must be an int >= 2, got {timesteps!r}")
  base_betas = get_betas(schedule, int(timesteps))
  base_abar = np.cumprod(1.0 - base_betas)
  kept = space_timesteps(int(timesteps), respacing)
  if len(kept) < 2:
    raise ValueError(f"respacing {respacing!r} keeps {len(kept)} step; keep at least 2")
  abar = base_abar[kept]
  abar_prev = np.append(1.0, abar[:-1])
  betas = 1.0 - abar / abar_prev
  posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
  return Diffusion(
      betas=betas,
      log_betas=np.log(betas),
      alphas_cumprod=abar,
      alphas_cumprod_prev=abar_prev,
      one_minus_alphas_cumprod=1.0 - abar,
      one_minus_alphas_cumprod_prev=1.0 - abar_prev,
      sqrt_alphas_cumprod=np.sqrt(abar),
      sqrt_alphas_cumprod_prev=np.sqrt(abar_prev),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
      posterior_variance=posterior_variance,
      # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value, as ADM.
      posterior_log_variance_clipped=np.log(
          np.append(posterior_variance[1], posterior_variance[1:])),
      posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
      posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
      # Fixed-large is beta_t, but at t = 0 the posterior variance of t = 1 (ADM: a better decoder
      # likelihood than beta_0); sampling never sees it (no noise at t = 0).
      fixed_large_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
      timestep_map=np.asarray(kept, np.int32),
      num_timesteps=len(kept),
      original_num_timesteps=int(timesteps),
      learn_sigma=bool(learn_sigma),
      sigma_small=bool(sigma_small),
      prediction=prediction,
  )
