"""The objective registry: the one place that knows the training objectives (DDPM, rectified flow).

`from_config(config)` checks `config.diffusion` / `config.flow` and returns one object per objective
that carries everything a caller would otherwise ask the objective's name for (as nanodo's
model_factory returns a model with its loss):

- `process`: a `diffusion.Diffusion` or a `flow.Flow`, with the same methods for the train step and
  the validation loss: per-example noise and times (`draw_noise_and_t`), the per-example loss terms
  (`training_losses`), a fixed stratified set of times (`fixed_times`) and the terms at given times
  and noise (`validation_losses`);
- `sample_fn(...)`: its sampler, one signature `(params, labels_B, rng, shape) -> samples`, and
  `check_sampling(...)`, the check of what a sampler is asked for (the evaluators' sub-configs and
  tools/sample.py's flags both go through it);
- `provenance(fid, data_kind)`: the results-row fields that say how its samples were drawn;
- `learns_sigma(requested)` (also a class method, for the sweep before a config exists): whether the
  model learns the reverse variance (DDPM's LEARNED_RANGE; never for flow).

DDPM: integer timesteps, eps (or x0 / v) prediction, learned Sigma with the hybrid loss; sampling with
ADM's respaced ancestral sampler or DDIM (`eval.*.respacing` steps). Flow: continuous t in [0, 1]
(SiT's convention, t = 1 is data), velocity prediction by default; sampling with an ODE (Euler or
Heun) or SiT's Euler-Maruyama SDE, `eval.*.respacing` integration steps.
"""
from __future__ import annotations

from typing import Any, Callable

from dit_jax import models
from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.objectives import flow as flow_lib
from dit_jax.objectives import flow_sampling
from dit_jax.objectives import sampling

FLOW_SAMPLERS = ("euler", "heun", "euler_maruyama")
DDPM_SAMPLERS = ("ddpm", "ddim")
CLIP_MODES = ("auto", "on", "off")


def clip_denoised(mode: str, data_kind: str) -> bool:
  """Clip x0 predictions to [-1, 1] while sampling: ADM's convention in pixel space (auto: on),
  DiT's on latents (auto: off)."""
  return data_kind != "latents" if mode == "auto" else mode == "on"


class Ddpm:
  """DDPM as in DiT/ADM (`config.diffusion`, `config.learn_sigma`)."""
  name = "ddpm"
  samplers = DDPM_SAMPLERS

  def __init__(self, diffusion_cfg, learn_sigma: bool, clip_mode: str):
    self._cfg, self._learn_sigma, self.clip_mode = diffusion_cfg, bool(learn_sigma), clip_mode
    self.process = self.respaced("")

  @classmethod
  def learns_sigma(cls, requested: bool) -> bool:
    return bool(requested)

  def respaced(self, respacing: str) -> diffusion_lib.Diffusion:
    """The process respaced to `respacing` steps (ADM's '250', 'ddim50'; '' = all)."""
    d = self._cfg
    return diffusion_lib.create(schedule=d.schedule, timesteps=d.timesteps, respacing=respacing,
                                learn_sigma=self._learn_sigma, prediction=d.prediction)

  def check_sampling(self, steps, guide_channels: int, where: str, steps_field: str) -> None:
    """`steps` must be a respacing ('250', 'ddim50'); errors name `where` + `steps_field`."""
    del guide_channels  # any count; checked against the eps channels with the data
    try:
      self.respaced(steps)
    except ValueError as e:
      raise ValueError(f"{where}{steps_field}={steps!r}: {e}") from None

  def sample_fn(self, model, *, steps: str, cfg_scale: float, guide_channels: int = 0,
                data_kind: str = "images", mesh=None, sampler: str = "", eta: float = 0.0
                ) -> Callable:
    """Ancestral DDPM (or DDIM with `sampler='ddim'`) over `steps` respaced steps."""
    return sampling.make_sample_fn(
        model, self.respaced(steps), sampler=sampler or "ddpm", cfg_scale=cfg_scale,
        guide_channels=guide_channels or None, eta=eta,
        clip_denoised=clip_denoised(self.clip_mode, data_kind), mesh=mesh,
        null_label=models.null_label(model))

  def provenance(self, fid, data_kind: str) -> dict:
    return dict(objective=self.name, fid_sampler="ddpm", fid_guide_channels=fid.guide_channels,
                clip_denoised=clip_denoised(self.clip_mode, data_kind))


class Flow:
  """Rectified flow / SiT's interpolants (`config.flow`)."""
  name = "flow"
  samplers = FLOW_SAMPLERS

  def __init__(self, flow_cfg, learn_sigma: bool, clip_mode: str):
    f = flow_cfg
    self._cfg, self.clip_mode = f, clip_mode
    self.process = flow_lib.create(path=f.path, prediction=f.prediction,
                                   time_sampling=f.time_sampling, logit_mean=f.logit_mean,
                                   logit_std=f.logit_std, shift=f.shift, learn_sigma=learn_sigma)

  @classmethod
  def learns_sigma(cls, requested: bool) -> bool:
    del requested
    return False  # a learned reverse variance is DDPM's

  def _interval(self):
    lo, hi = self._cfg.guidance_interval
    return None if (lo, hi) == (0.0, 1.0) else (float(lo), float(hi))

  def check_sampling(self, steps, guide_channels: int, where: str, steps_field: str) -> None:
    """`steps` must be a positive number of integration steps and `guide_channels` 0; errors
    name `where` + the field."""
    if guide_channels:
      raise ValueError(f"{where}guide_channels applies to DDPM's eps channels; the flow "
                       f"objective guides every channel (leave it at 0)")
    if not str(steps).isdigit() or int(steps) < 1:
      raise ValueError(f"{where}{steps_field}={steps!r}: with the flow objective it is the number "
                       f"of integration steps, a positive integer")

  def sample_fn(self, model, *, steps: str, cfg_scale: float, guide_channels: int = 0,
                data_kind: str = "images", mesh=None, sampler: str = "", eta: float = 0.0
                ) -> Callable:
    """The ODE (Euler, Heun) or SDE (Euler-Maruyama) sampler, `steps` integration steps."""
    del data_kind, eta  # flow samples are never clipped; eta is DDIM's
    if guide_channels:
      raise ValueError("guide_channels applies to DDPM's eps channels; flow guides every channel")
    return flow_sampling.make_flow_sample_fn(
        model, self.process, method=sampler or self._cfg.sampler, num_steps=int(steps),
        cfg_scale=cfg_scale, guidance_interval=self._interval(), mesh=mesh)

  def provenance(self, fid, data_kind: str) -> dict:
    del fid, data_kind
    return dict(objective=self.name, fid_sampler=self._cfg.sampler, fid_guide_channels=0,
                clip_denoised=False)


REGISTRY = {"ddpm": Ddpm, "flow": Flow}
OBJECTIVES = tuple(REGISTRY)


def family(name: str, field: str = "diffusion.objective"):
  """The objective class registered as `name` ('ddpm', 'flow'); an unknown name is an error that
  names the config `field` it came from."""
  if name not in REGISTRY:
    raise ValueError(f"{field}={name!r}: use one of {OBJECTIVES}")
  return REGISTRY[name]


def _check_flow(f, learn_sigma: bool, text_enabled: bool) -> None:
  """`f` (config.flow), and what the flow objective forbids of the rest of the config."""
  if text_enabled:
    raise ValueError("text conditioning (text.enabled) is implemented for the DDPM objective only")
  if learn_sigma:
    raise ValueError("learn_sigma=True applies to the DDPM objective only (a learned variance of "
                     "the reverse process); set learn_sigma=False for diffusion.objective='flow'")
  if f.sampler not in FLOW_SAMPLERS:
    raise ValueError(f"flow.sampler={f.sampler!r}: use one of {FLOW_SAMPLERS}")
  if len(tuple(f.guidance_interval)) != 2:
    raise ValueError(f"flow.guidance_interval={tuple(f.guidance_interval)}: need two numbers "
                     f"(lo, hi)")
  lo, hi = f.guidance_interval
  if not 0.0 <= lo < hi <= 1.0:
    raise ValueError(f"flow.guidance_interval={tuple(f.guidance_interval)}: need "
                     f"0 <= lo < hi <= 1 (flow time, 0 = noise)")


def from_config(config) -> Any:
  """The objective `config.diffusion.objective` names, its fields checked (diffusion.* or flow.*,
  and the eval.grid / eval.fid sampler fields it reads); needs no data or devices."""
  cls = family(config.diffusion.objective)
  if config.eval.clip_denoised not in CLIP_MODES:
    raise ValueError(f"eval.clip_denoised={config.eval.clip_denoised!r}: use one of {CLIP_MODES}")
  if cls is Flow:
    _check_flow(config.flow, config.learn_sigma, config.text.enabled)
    try:
      objective = Flow(config.flow, config.learn_sigma, config.eval.clip_denoised)
    except ValueError as e:  # flow.create names its argument: the field under flow.
      raise ValueError(f"flow.{e}") from None
  else:
    objective = Ddpm(config.diffusion, config.learn_sigma, config.eval.clip_denoised)
  for name in ("grid", "fid"):
    ev = config.eval[name]
    objective.check_sampling(ev.respacing, ev.guide_channels, f"eval.{name}.", "respacing")
  return objective
