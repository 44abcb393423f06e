"""The training objective behind one interface: DDPM (diffusion.py) or rectified flow (flow.py).

`config.diffusion.objective` picks it. `diffusion.Diffusion` and `flow.Flow` have the same methods
for the train step and the validation loss: per-example noise and times (`draw_noise_and_t`), the
per-example loss terms (`training_losses`), a fixed stratified set of times (`fixed_times`) and
the terms at given times and noise (`validation_losses`). This module builds either from the
config, checks its fields, and gives the evaluators a sampler with one signature,
`(params, labels_B, rng, shape) -> samples` (`make_sample_fn`).

DDPM: integer timesteps, eps (or x0 / v) prediction, learned Sigma with the hybrid loss; sampling
with ADM's respaced ancestral sampler (`eval.*.respacing` steps). Flow: continuous t in [0, 1]
(SiT's convention, t = 1 is data), velocity prediction by default; sampling with an ODE (Euler or
Heun) or SiT's Euler-Maruyama SDE, `eval.*.respacing` integration steps.
"""
from __future__ import annotations

from typing import Callable

from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.objectives import flow as flow_lib
from dit_jax.objectives import flow_sampling
from dit_jax import models
from dit_jax.objectives import sampling

OBJECTIVES = ("ddpm", "flow")
FLOW_SAMPLERS = ("euler", "heun", "euler_maruyama")
CLIP_MODES = ("auto", "on", "off")


def check_config(config) -> None:
  """`config.diffusion` and `config.flow`: the objective and what it allows."""
  objective = config.diffusion.objective
  if objective not in OBJECTIVES:
    raise ValueError(f"diffusion.objective={objective!r}: use one of {OBJECTIVES}")
  if config.eval.clip_denoised not in CLIP_MODES:
    raise ValueError(f"eval.clip_denoised={config.eval.clip_denoised!r}: use one of {CLIP_MODES}")
  if objective == "ddpm":
    diffusion_lib.from_config(config)  # schedule, timesteps, prediction
    return
  if config.text.enabled:
    raise ValueError("text conditioning (text.enabled) is implemented for the DDPM objective only")
  if config.learn_sigma:
    raise ValueError("learn_sigma=True applies to the DDPM objective only (a learned variance of "
                     "the reverse process); set learn_sigma=False for diffusion.objective='flow'")
  if config.flow.sampler not in FLOW_SAMPLERS:
    raise ValueError(f"flow.sampler={config.flow.sampler!r}: use one of {FLOW_SAMPLERS}")
  if config.eval.grid.guide_channels or config.eval.fid.guide_channels:
    raise ValueError("eval.*.guide_channels applies to DDPM's eps channels; the flow objective "
                     "guides every channel (leave it at 0)")
  lo, hi = config.flow.guidance_interval
  if not 0.0 <= lo < hi <= 1.0:
    raise ValueError(f"flow.guidance_interval={tuple(config.flow.guidance_interval)}: need "
                     f"0 <= lo < hi <= 1 (flow time, 0 = noise)")
  flow_from_config(config)  # path, prediction, time sampling, shift
  for name in ("grid", "fid"):
    steps = config.eval[name].respacing
    if not str(steps).isdigit() or int(steps) < 1:
      raise ValueError(f"eval.{name}.respacing={steps!r}: with the flow objective it is the number "
                       f"of integration steps, a positive integer")


def flow_from_config(config) -> flow_lib.Flow:
  f = config.flow
  return flow_lib.create(path=f.path, prediction=f.prediction, time_sampling=f.time_sampling,
                         logit_mean=f.logit_mean, logit_std=f.logit_std, shift=f.shift,
                         learn_sigma=config.learn_sigma)


def create(config):
  """The training objective the config names: a `diffusion.Diffusion` or a `flow.Flow`."""
  if config.diffusion.objective == "flow":
    return flow_from_config(config)
  return diffusion_lib.from_config(config)


def clip_denoised(config, data_kind: str) -> bool:
  """Clip x0 predictions to [-1, 1] while sampling: ADM's convention in pixel space (auto: on),
  DiT's on latents (auto: off)."""
  mode = config.eval.clip_denoised
  return data_kind != "latents" if mode == "auto" else mode == "on"


def _interval(config):
  lo, hi = config.flow.guidance_interval
  return None if (lo, hi) == (0.0, 1.0) else (float(lo), float(hi))


def make_sample_fn(config, ev, model, data_kind: str, mesh=None) -> Callable:
  """The evaluation sampler of evaluator config `ev` (eval.grid or eval.fid) for `model`."""
  if config.diffusion.objective == "flow":
    return flow_sampling.make_flow_sample_fn(
        model, flow_from_config(config), method=config.flow.sampler, num_steps=int(ev.respacing),
        cfg_scale=ev.cfg_scale, guidance_interval=_interval(config), mesh=mesh)
  return sampling.make_sample_fn(model, diffusion_lib.from_config(config, ev.respacing),
                                 cfg_scale=ev.cfg_scale, guide_channels=ev.guide_channels or None,
                                 clip_denoised=clip_denoised(config, data_kind), mesh=mesh,
                                 null_label=models.null_label(model))
