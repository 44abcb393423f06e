"""The pure half of training: train state, optimizer, shardings, `train_step` and its jit.

`train_step(state, batch) -> (state, metrics)` is a pure function; the loop around it (data,
checkpoints, evaluators, signals) is `train.py`. This module imports jax, flax and optax only, so it
runs (and is tested) without TensorFlow, clu or orbax. Shardings come from the parameters' logical
axis names (sharding.py) via `jax.eval_shape`, before any parameter exists.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from dit_jax import models
from dit_jax import sharding as sharding_lib
from dit_jax.models import mup
from dit_jax.training import phema as phema_lib


@flax.struct.dataclass
class TrainState:
  """Everything that evolves during training; a pytree that is checkpointed whole."""
  step: jax.Array  # int32: number of batches consumed (the data pipeline's position).
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] base key; step s uses fold_in(rng, s), so resuming needs no rng state.
  nonfinite_streak: jax.Array  # int32: consecutive skipped (non-finite) updates.
  nonfinite_total: jax.Array  # int32: all skipped updates.
  # The tracked power-function EMAs of config.ema.sigma_rels, in that order (() = post-hoc EMA off).
  phema: tuple = ()


SCHEDULES = ("constant", "cosine", "cooldown")


def check_config(optim, ema_decay: float) -> None:
  """The optimisation fields: `optim` (config.optim) and the EMA decay."""
  if not optim.lr > 0:
    raise ValueError(f"optim.lr must be positive, got {optim.lr}")
  if optim.weight_decay < 0 or optim.grad_clip < 0 or optim.warmup_steps < 0:
    raise ValueError("optim.weight_decay, optim.grad_clip and optim.warmup_steps must be >= 0 "
                     f"(got {optim.weight_decay}, {optim.grad_clip}, {optim.warmup_steps})")
  if not (0 <= optim.b1 < 1 and 0 <= optim.b2 < 1) or optim.eps <= 0:
    raise ValueError(f"optim.b1/b2 must be in [0, 1) and optim.eps > 0 (got {optim.b1}, "
                     f"{optim.b2}, {optim.eps})")
  if optim.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={optim.schedule!r}: use one of {SCHEDULES}")
  if optim.schedule == "cooldown" and not 0 < optim.cooldown_fraction <= 1:
    raise ValueError(f"optim.cooldown_fraction must be in (0, 1], got {optim.cooldown_fraction}")
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")


def learning_rate_schedule(optim, num_steps: int = 0) -> optax.Schedule:
  """The lr at each step: a linear warm-up from 0 over optim.warmup_steps, then

  constant (the paper's), cosine (to 0 at num_steps, the run's length) or cooldown (constant, then
  linear to 0 over the last optim.cooldown_fraction of num_steps: Hägele et al. 2024's
  constant + cool-down). The decaying two need num_steps, the run's num_train_steps; an object
  without a `schedule` field (tools' ad-hoc optimisers) is constant."""
  kind = getattr(optim, "schedule", "constant")
  warm = min(optim.warmup_steps, num_steps) if kind != "constant" else optim.warmup_steps
  if kind == "constant":
    main = optax.constant_schedule(optim.lr)
  elif num_steps < 1:
    raise ValueError(f"optim.schedule={kind!r} decays to 0 at the run's end: give num_steps")
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(optim.lr, max(num_steps - warm, 1))
  else:
    cool = max(int(round(optim.cooldown_fraction * num_steps)), 1)
    flat = max(num_steps - warm - cool, 0)
    main = optax.join_schedules([optax.constant_schedule(optim.lr),
                                 optax.linear_schedule(optim.lr, 0.0, cool)], [flat])
  if warm > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warm), main], [warm])
  return main


def create_optimizer(optim, lr_scales: Optional[dict] = None,
                     num_steps: int = 0) -> optax.GradientTransformation:
  """AdamW (torch's defaults b1 0.9, b2 0.999, eps 1e-8), optional global-norm clipping, on
  learning_rate_schedule(optim, num_steps).

  lr_scales ({param path: factor}, `models.lr_scales(model)`: μP's per-parameter lr) multiplies
  each parameter's Adam direction before the decoupled weight decay and the schedule: optax's
  adamw chain with one transform inserted (`MuAdamW`'s lr / m with weight_decay x m)."""
  lr = learning_rate_schedule(optim, num_steps)
  if lr_scales is None:
    tx = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay)
  else:
    tx = optax.chain(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
                     mup.scale_updates(lr_scales), optax.add_decayed_weights(optim.weight_decay),
                     optax.scale_by_learning_rate(lr))
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx


def _boxed_state(model: nn.Module, tx, seed_key, num_phema: int = 0) -> TrainState:
  init_key, train_key = jax.random.split(seed_key)
  params = models.init_params(model, init_key)  # logically partitioned boxes
  zero = jnp.zeros((), jnp.int32)
  # EMA starts as a copy of the initial params, as DiT's train.py; so do the power-function EMAs
  # (their first update, at t = 1, replaces them by the first updated params).
  return TrainState(step=zero, params=params, ema_params=params, opt_state=tx.init(params),
                    rng=train_key, nonfinite_streak=zero, nonfinite_total=zero,
                    phema=(params,) * num_phema)


def state_shardings(model: nn.Module, tx, mesh, rules=sharding_lib.DEFAULT_RULES,
                    num_phema: int = 0):
  """(abstract unboxed TrainState, its NamedShardings), from eval_shape: no parameter is built.
  `num_phema`: how many power-function EMAs the state tracks (len(config.ema.sigma_rels))."""
  abstract_boxed = jax.eval_shape(functools.partial(_boxed_state, model, tx, num_phema=num_phema),
                                  jax.random.PRNGKey(0))
  shardings = sharding_lib.logical_shardings(abstract_boxed, mesh, rules)
  return nn.unbox(abstract_boxed), shardings


def create_train_state(model: nn.Module, tx, mesh, seed: int,
                       rules=sharding_lib.DEFAULT_RULES, num_phema: int = 0) -> tuple:
  """(TrainState initialised directly into its shardings, shardings)."""
  _, shardings = state_shardings(model, tx, mesh, rules, num_phema)
  init = jax.jit(lambda key: nn.unbox(_boxed_state(model, tx, key, num_phema)),
                 out_shardings=shardings)
  return init(jax.random.PRNGKey(seed)), shardings


def train_step(state: TrainState, batch: dict, *, model: nn.Module, objective,
               tx: optax.GradientTransformation,
               ema_decay: float, lr_fn: Optional[optax.Schedule] = None,
               batch_spec: Optional[NamedSharding] = None, phema_gammas: tuple = ()) -> tuple:
  """One AdamW step on the objective's loss; a non-finite loss or gradient skips the update.

  `phema_gammas`: the exponents γ of the state's power-function EMAs (state.phema), updated with
  β_t = (1 - 1/t)^(γ+1) at t = step + 1 (phema.py; time in steps).

  `objective` is an objective's process (`objectives.from_config(config).process`: a
  `diffusion.Diffusion` or a `flow.Flow`): both draw per-example noise and times and give the
  per-example loss terms."""
  x0 = batch["image"]
  y = batch["label"] if models.reads_labels(model) else None  # class labels or caption ids
  key = jax.random.fold_in(state.rng, state.step)
  k_noise, k_t, k_drop = jax.random.split(key, 3)
  noise, t_B = objective.draw_noise_and_t(k_noise, k_t, x0.shape)
  if batch_spec is not None:
    noise = jax.lax.with_sharding_constraint(noise, batch_spec)
    t_B = jax.lax.with_sharding_constraint(t_B, sharding_lib.leading_axis(batch_spec))

  def loss_fn(params):
    def model_fn(x_t, t_orig):
      return model.apply({"params": params}, x_t, t_orig, y, train=True,
                         rngs={"label_dropout": k_drop})
    terms = objective.training_losses(model_fn, x0, t_B, noise)
    return jnp.mean(terms["loss"]), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: e * ema_decay + (1.0 - ema_decay) * p, state.ema_params, params)
    return state.replace(params=params, ema_params=ema, opt_state=opt_state,
                         phema=_update_phema(state.phema, params, phema_gammas, state.step + 1))

  # A skipped step keeps params, EMA and optimizer state as they were. lax.cond (not jnp.where over
  # every leaf) runs only the taken branch, so a finite step pays no extra passes over the state.
  new_state = jax.lax.cond(finite, update, lambda s: s, state)
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  new_state = new_state.replace(
      step=state.step + 1, nonfinite_streak=streak,
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  metrics = dict(loss=loss, mse=jnp.mean(terms["mse"]), vb=jnp.mean(terms["vb"]),
                 grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32), nonfinite_streak=streak,
                 nonfinite_total=new_state.nonfinite_total)
  if lr_fn is not None:
    metrics["lr"] = lr_fn(state.step)
  return new_state, metrics


def _update_phema(phema: tuple, params, gammas: tuple, t) -> tuple:
  """The power-function EMAs after the step that made `params` (t: steps taken, >= 1)."""
  out = []
  for tree, gamma in zip(phema, gammas, strict=True):
    w = phema_lib.ema_weight(gamma, t)
    out.append(jax.tree.map(lambda e, p, w=w: e + w * (p - e), tree, params))
  return tuple(out)


def batch_shardings(mesh) -> dict:
  return {"image": sharding_lib.batch_sharding(mesh), "label": sharding_lib.batch_sharding(mesh)}


def jit_train_step(model, objective, tx, mesh, shardings, ema_decay: float,
                   lr_fn: Optional[optax.Schedule] = None, phema_gammas: tuple = ()) -> Callable:
  """train_step jitted with state/batch shardings and the old state's buffers donated."""
  fn = functools.partial(train_step, model=model, objective=objective, tx=tx, ema_decay=ema_decay,
                         lr_fn=lr_fn, batch_spec=sharding_lib.batch_sharding(mesh),
                         phema_gammas=tuple(float(g) for g in phema_gammas))
  return jax.jit(fn, in_shardings=(shardings, batch_shardings(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
