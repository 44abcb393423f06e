"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", §3 and App. C): the power-function EMA profiles and their least-squares reconstruction.

A power-function EMA with exponent γ averages the parameters seen up to time t with weights
∝ τ^γ on [0, t]. Its width relative to t, σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))), names the profile
(EDM2's Eq. 123): σ_rel 0.05 ↔ γ ≈ 16.97, 0.10 ↔ γ ≈ 6.94. σ_rel falls monotonically in γ, from
1/sqrt(12) ≈ 0.2887 at γ = 0 (a uniform average of all of training), so γ > 0 ⇔ 0 < σ_rel < 1/√12.

Training tracks a few profiles with β_t = (1 - 1/t)^(γ+1) (Eq. 127) and saves them at snapshot
times; any other profile at the last snapshot time is then the least-squares combination of the
snapshots (Algorithm 3): the snapshot profiles' Gram matrix A, their inner products B with the
target, X = A⁻¹ B, columns normalised to sum 1.

Time unit: training steps. The update that produces the parameters after step t (t = 1, 2, ...)
uses β_t with t_delta = 1; EDM2 counts images with t_delta = the batch, and in both the first
update has t = t_delta (β = 0: the EMA becomes the first updated parameters), so t = 0 (where
1/t is singular) is never used. A snapshot taken after step t has offset t.

numpy (float64) for the solve, jax.numpy for β inside the jitted step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

# σ_rel of γ = 0 (a uniform average): the largest σ_rel with γ >= 0.
MAX_SIGMA_REL = float(np.sqrt(1.0 / 12.0))


def check_config(ema, val, val_size: int) -> None:
  """`ema` (config.ema) against `val` (config.eval.val) and data.val_size: the candidates are
  scored on the validation loss, so post-hoc EMA needs it on."""
  sigma_rels, candidates = tuple(ema.sigma_rels), tuple(ema.candidates)
  if not sigma_rels:
    return
  for name, values in (("ema.sigma_rels", sigma_rels), ("ema.candidates", candidates)):
    bad = [s for s in values if not 0.0 < s < MAX_SIGMA_REL]
    if bad:
      raise ValueError(f"{name}={values}: every σ_rel must be in (0, {MAX_SIGMA_REL:.4f}) "
                       f"(1/sqrt(12), where the power-function exponent γ reaches 0); got {bad}")
  if len(set(sigma_rels)) != len(sigma_rels):
    raise ValueError(f"ema.sigma_rels={sigma_rels} has repeated profiles")
  if not candidates:
    raise ValueError("ema.candidates is empty: post-hoc EMA (ema.sigma_rels set) needs at least "
                     "one σ_rel to reconstruct and score")
  if ema.num_snapshots < 1:
    raise ValueError(f"ema.num_snapshots must be >= 1, got {ema.num_snapshots}")
  if not (val.every_steps > 0 and val_size > 0):
    raise ValueError(
        f"ema.sigma_rels={sigma_rels} (post-hoc EMA) scores its candidates on the validation "
        f"loss: set eval.val.every_steps > 0 and data.val_size > 0 (got "
        f"{val.every_steps}, {val_size}), or ema.sigma_rels=() for the traditional EMA")


def gamma_to_sigma_rel(gamma):
  """σ_rel of the power-function profile with exponent γ (EDM2 Eq. 123)."""
  gamma = np.float64(gamma)
  return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
  """γ of σ_rel: σ_rel² (γ+2)²(γ+3) = γ+1 is the cubic γ³ + 7γ² + (16 - σ⁻²)γ + (12 - σ⁻²) = 0,
  whose largest real root is γ (EDM2 Eq. 126)."""
  sigma_rel = np.asarray(sigma_rel, np.float64)
  inv = sigma_rel.reshape(-1) ** -2
  roots = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]) for v in inv]
  gamma = [r[np.abs(r.imag) < 1e-6 * (1 + np.abs(r.real))].real.max() for r in roots]
  return np.asarray(gamma, np.float64).reshape(sigma_rel.shape)


def ema_weight(gamma: float, t):
  """1 - β_t, β_t = (1 - 1/t)^(γ+1), the weight of the new parameters after step t >= 1 (t = 1:
  weight 1). In log space, so 1 - β stays accurate in float32 when 1/t is below its epsilon."""
  t = jnp.asarray(t, jnp.float32)
  return -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / t))


def power_function_response(t: int, sigma_rel: float, length: int) -> np.ndarray:
  """The discrete profile of σ_rel at time t: weights ∝ τ^γ on τ = 0..t (0 after t) over
  `length` steps, normalised to sum 1."""
  gamma = float(sigma_rel_to_gamma(sigma_rel))
  tau = np.arange(length, dtype=np.float64)
  w = np.where(tau <= t, (tau / t) ** gamma, 0.0)
  return w / w.sum()


def power_function_correlation(t_a, sigma_a, t_b, sigma_b):
  """∫ p_a p_b of two normalised continuous profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]:
  (γa+1)(γb+1) / ((γa+γb+1) max(t)) x (min(t)/max(t))^γ of the longer one (EDM2 Eq. 151)."""
  g_a, g_b = sigma_rel_to_gamma(sigma_a), sigma_rel_to_gamma(sigma_b)
  t_a, t_b = np.float64(t_a), np.float64(t_b)
  longer_gamma = np.where(t_a < t_b, g_b, g_a)
  ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
  return ((g_a + 1) * (g_b + 1) * ratio ** longer_gamma
          / ((g_a + g_b + 1) * np.maximum(t_a, t_b)))


def solve_coefficients(in_t, in_sigma, out_t, out_sigma) -> tuple:
  """(X [inputs, outputs], condition number of the Gram matrix): out_j ≈ Σ_i X[i, j] in_i, the
  least-squares fit of each output profile by the input profiles, columns summing to 1."""
  in_t, in_sigma = (np.asarray(a, np.float64).reshape(-1) for a in
                    np.broadcast_arrays(in_t, in_sigma))
  out_t, out_sigma = (np.asarray(a, np.float64).reshape(-1) for a in
                      np.broadcast_arrays(out_t, out_sigma))
  gram = power_function_correlation(in_t[:, None], in_sigma[:, None], in_t[None], in_sigma[None])
  cross = power_function_correlation(in_t[:, None], in_sigma[:, None], out_t[None],
                                     out_sigma[None])
  x = np.linalg.solve(gram, cross)
  return x / x.sum(axis=0, keepdims=True), float(np.linalg.cond(gram))


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """A tracked EMA at the end of step `step`: `params` is its tree, or a function returning its
  tree whose leaves may be functions loading that leaf (posthoc.py's snapshot files)."""
  step: int
  sigma_rel: float
  params: Union[Any, Callable[[], Any]]


def _leaf(x) -> np.ndarray:
  return np.asarray(x() if callable(x) else x, np.float64)


def reconstruct(snapshots: Sequence[Snapshot], out_sigma_rel) -> tuple:
  """({σ_rel: params} at the last snapshot step, condition number of the solve) for each of
  `out_sigma_rel` (a float or a sequence), from snapshots at steps <= that step. Leaf by leaf: one
  leaf of every snapshot at a time in float64, every output in float32, so memory is the outputs
  plus one leaf (7 candidates of DiT-XL/2: 19 GB, not the 38 GB of float64 whole trees)."""
  outs = [float(out_sigma_rel)] if np.ndim(out_sigma_rel) == 0 else [float(s) for s in
                                                                      out_sigma_rel]
  snapshots = [s for s in snapshots if s.step > 0]
  if not snapshots:
    raise ValueError("no snapshot to reconstruct from")
  t_out = max(s.step for s in snapshots)
  coef, cond = solve_coefficients([s.step for s in snapshots], [s.sigma_rel for s in snapshots],
                                  t_out, outs)
  flat = [jax.tree.flatten(s.params() if callable(s.params) else s.params) for s in snapshots]
  treedef = flat[0][1]
  if any(d != treedef for _, d in flat):
    raise ValueError("the snapshots do not hold the same parameter tree")
  outputs = [[] for _ in outs]
  for k in range(treedef.num_leaves):
    acc = None
    for c, (snapshot_leaves, _) in zip(coef, flat):
      x = _leaf(snapshot_leaves[k])
      term = c.reshape((-1,) + (1,) * x.ndim) * x[None]
      acc = term if acc is None else acc + term
    for j, out in enumerate(outputs):
      out.append(acc[j].astype(np.float32))
  return {s: jax.tree.unflatten(treedef, out) for s, out in zip(outs, outputs)}, cond
