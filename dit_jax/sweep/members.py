"""The sweep's members: the grid (model size x patch size, plus extra models) x objective x seed,
at equal steps or, with `sweep.budgets`, at equal training compute; and each member's training
config, made from the sweep config.

A member is one training run in `<workdir>/<run>/`, named
`<model>[-<objective>][-b<budget>][-<parameterization>][-lr<lr>]-s<seed>`: `sweep.parameterizations`
and `sweep.lrs` (both empty by default: the config's own) cross the grid with parameterisations
(sp, mup) and learning rates, for learning-rate transfer (configs/dit_sweep.py:mup_transfer).
"""
from __future__ import annotations

import dataclasses
import math
import re

import ml_collections

from dit_jax import models
from dit_jax import objectives
from dit_jax.models import flops
from dit_jax.models import mup
from dit_jax.sweep import devices


# The most steps an iso-FLOP budget may plan for one member (sweep.max_steps): 5x the paper's 400K.
MAX_STEPS = 2_000_000


@dataclasses.dataclass(frozen=True)
class Member:
  """One training run of the sweep."""
  run: str
  model: str
  objective: str
  seed: int
  steps: int
  budget: float | None = None
  parameterization: str = ""  # '' = the config's
  lr: float | None = None  # None = the config's optim.lr


def model_names(sweep: ml_collections.ConfigDict) -> list[str]:
  """The grid: a DiT for every size and patch, then the extra (e.g. U-Net) models."""
  return models.names("DiT", sweep.sizes, sweep.patches) + list(sweep.extra_models)


def isoflop_plan(budgets_gflops, model_gflops: dict, batch_size: int) -> list:
  """Steps per (budget, model), training compute = 3 x forward Gflops x images
  (the DiT paper's measure, flops.training_gflops); a budget that buys a model no step skips it."""
  plan = []
  for budget in budgets_gflops:
    for name, g in model_gflops.items():
      per_step = flops.training_gflops(g, batch_size)
      steps = int(math.floor(budget / per_step + 0.5))  # round half up, not to even
      if steps < 1:
        continue
      plan.append(dict(budget=float(budget), model=name, steps=steps,
                       images=steps * batch_size, compute=steps * per_step))
  return plan


def _check_budgets(sweep, budget_plan: list, gflops: dict, batch_size: int) -> None:
  """Every budget buys some model at least one step, and no member more than sweep.max_steps."""
  for budget in sweep.budgets:
    if not any(p["budget"] == float(budget) for p in budget_plan):
      cheapest = min(flops.training_gflops(g, batch_size) for g in gflops.values())
      raise ValueError(f"sweep.budgets: {float(budget):g} Gflops buys no model a single training "
                       f"step (the cheapest step costs {cheapest:.4g} Gflops at batch {batch_size})")
  limit = sweep.get("max_steps", MAX_STEPS)
  too_long = [p for p in budget_plan if p["steps"] > limit]
  if too_long:
    p = max(too_long, key=lambda p: p["steps"])
    raise ValueError(f"sweep.budgets: {p['budget']:g} Gflops plans {p['model']} at {p['steps']:,} "
                     f"steps, more than sweep.max_steps={limit:,}; lower the budget or "
                     "raise sweep.max_steps")


def plan(sweep, num_train_steps: int, batch_size: int, gflops: dict) -> list[Member]:
  """Every member of `sweep` (config.sweep), in order: budget, model, objective, seed; each trains
  num_train_steps, or with sweep.budgets the steps that spend its budget at batch_size (a budget
  that buys no model a step, or a member more than sweep.max_steps, is a ValueError)."""
  out = []
  steps = {(None, m): num_train_steps for m in gflops}
  budgets = [None]
  if sweep.budgets:
    budgets = [float(b) for b in sweep.budgets]
    budget_plan = isoflop_plan(budgets, gflops, batch_size)
    _check_budgets(sweep, budget_plan, gflops, batch_size)
    steps = {(p["budget"], p["model"]): p["steps"] for p in budget_plan}
  for budget in budgets:
    for model in gflops:
      if (budget, model) not in steps:
        continue  # the budget buys this model less than one step
      for objective in sweep.objectives:
        for param, lr in _settings(sweep):
          for seed in sweep.seeds:
            run = model + ("" if objective == "ddpm" else f"-{objective}")
            run += "" if budget is None else f"-b{budget:g}"
            run += (f"-{param}" if param else "") + ("" if lr is None else f"-lr{lr:g}")
            out.append(Member(run + f"-s{seed}", model, objective, int(seed),
                              steps[(budget, model)], budget, param, lr))
  return out


def setting(run: str) -> str:
  """The parameterisation and learning rate a run's name carries ('mup lr 0.002'; '' when the
  sweep set neither): the report keeps such runs apart, as it does objectives."""
  param = re.search(r"-(sp|mup)-(?:lr|s\d+$)", run)
  lr = re.search(r"-lr([^-]+(?:-\d+)?)-s\d+$", run)
  return " ".join(([param.group(1)] if param else []) + ([f"lr {lr.group(1)}"] if lr else []))


def _settings(sweep) -> list:
  """(parameterization, lr) pairs of sweep.parameterizations x sweep.lrs ('' / None: the
  config's)."""
  params = tuple(sweep.get("parameterizations", ())) or ("",)
  lrs = tuple(float(x) for x in sweep.get("lrs", ())) or (None,)
  return [(p, lr) for p in params for lr in lrs]


def select(members: list[Member], member: str) -> list[Member]:
  """All members, or those chosen by index ('3'), run ('DiT-S/4-s0') or model ('DiT-S/4')."""
  if member in ("", None):
    return members
  if str(member).isdigit():
    i = int(member)
    if i >= len(members):
      raise ValueError(f"sweep.member={i}, but the sweep has {len(members)} members")
    return [members[i]]
  chosen = [m for m in members if member in (m.run, m.model)]
  if not chosen:
    raise ValueError(f"sweep.member={member!r} is not in the sweep: {[m.run for m in members]}")
  return chosen


def run_dir_name(run: str) -> str:
  return run.replace("/", "_")


def member_config(config: ml_collections.ConfigDict, m: Member) -> ml_collections.ConfigDict:
  """The training config of one member: the sweep config with the member's fields set and no
  `sweep` block. Whether it learns Sigma is its objective's rule (flow never does)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  del cfg["sweep"]
  cfg.model, cfg.seed, cfg.diffusion.objective = m.model, m.seed, m.objective
  cfg.num_train_steps = m.steps
  cfg.learn_sigma = objectives.family(m.objective).learns_sigma(config.learn_sigma)
  if m.parameterization:
    cfg.parameterization = m.parameterization
  if m.lr is not None:
    cfg.optim.lr = m.lr
  if m.budget is not None:  # iso-FLOP members are evaluated once, at the end
    for ev in ("grid", "fid", "val"):
      if cfg.eval[ev].every_steps:
        cfg.eval[ev].every_steps = m.steps
  return cfg


# What each tuple of the sweep block holds, and an example of its flag's value.
TUPLE_FIELDS = {"sizes": ((str,), "('S','B')"), "patches": ((int,), "(8,4,2)"),
                "extra_models": ((str,), "('UNet-B',)"), "seeds": ((int,), "(0,1,2)"),
                "objectives": ((str,), "('ddpm',)"), "budgets": ((int, float), "(300,900)"),
                "parameterizations": ((str,), "('sp','mup')"), "lrs": ((int, float), "(1e-3,2e-3)")}


def _check_types(s) -> None:
  """The sweep's tuples hold what they name (a flag like `sweep.patches=abc` parses as a string)."""
  for field, (types, example) in TUPLE_FIELDS.items():
    value = s.get(field, ())
    if not isinstance(value, (tuple, list)):
      raise ValueError(f"sweep.{field}={value!r}: expected a tuple, e.g. {example}")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, types)]
    if bad:
      what = {int: "an integer", str: "a name"}.get(types[0]) if len(types) == 1 else "a number"
      raise ValueError(f"sweep.{field}={tuple(value)!r}: {bad[0]!r} is not {what}; e.g. "
                       f"{example}")
  limit = s.get("max_steps", MAX_STEPS)
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
    raise ValueError(f"sweep.max_steps={limit!r}: a positive number of steps")


def fit_rules(s):
  """The report's fit rules, analysis.laws.Rules of config.sweep.fit (its defaults where a field is
  absent). Imported here, not at the top: a training run does not import the analysis stack."""
  from dit_jax.analysis import laws  # pylint: disable=import-outside-toplevel
  given = dict(s.get("fit", {}))
  known = [f.name for f in dataclasses.fields(laws.Rules)]
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(f"sweep.fit: unknown field {unknown[0]!r}; the fit rules are {known}")
  for name, value in given.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"sweep.fit.{name}={value!r}: a number")
  return laws.Rules(**given)


def check_config(s, eval_cfg) -> None:
  """The sweep block `s` (config.sweep), and what a sweep needs of the training config's `eval_cfg`
  (config.eval): an evaluation to record."""
  _check_types(s)
  fit_rules(s)
  if not model_names(s) or not s.seeds or not s.objectives:
    raise ValueError("the sweep has no members: set sweep.sizes and sweep.patches (or "
                     "sweep.extra_models), sweep.seeds and sweep.objectives")
  for p in s.patches:
    if int(p) < 1:
      raise ValueError(f"sweep.patches: {p} is not a patch size")
  if len(set(s.seeds)) != len(s.seeds) or min(s.seeds) < 0:
    raise ValueError(f"sweep.seeds={tuple(s.seeds)}: distinct seeds >= 0")
  if s.workers < 0 or any(float(b) <= 0 for b in s.budgets):
    raise ValueError(f"sweep.workers must be >= 0 and sweep.budgets positive (got {s.workers}, "
                     f"{tuple(s.budgets)})")
  for objective in s.objectives:
    objectives.family(objective, field="sweep.objectives")
  devices.check_config(s)
  for p in s.get("parameterizations", ()):
    if p not in mup.PARAMETERIZATIONS:
      raise ValueError(f"sweep.parameterizations: unknown parameterization {p!r}; use one of "
                       f"{mup.PARAMETERIZATIONS}")
  if any(not float(lr) > 0 for lr in s.get("lrs", ())):
    raise ValueError(f"sweep.lrs={tuple(s.lrs)}: learning rates must be positive")
  q, v = eval_cfg.fid, eval_cfg.val
  if not ((q.every_steps > 0 and q.num_samples > 0) or v.every_steps > 0):
    raise ValueError("a sweep records one row per evaluation: set eval.fid.every_steps and "
                     f"eval.fid.num_samples > 0, or eval.val.every_steps > 0 (got "
                     f"{q.every_steps}, {q.num_samples}, {v.every_steps})")
