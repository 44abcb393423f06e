"""The scaling sweep: model size x patch size (plus U-Nets) x objective x seed, at equal steps or
at equal compute.

A member is one training run (`train.train_and_evaluate`) in `<workdir>/<run>/`, named
`<model>[-<objective>][-b<budget>]-s<seed>`. `sweep.seeds` repeats every model with other
initialisations, data orders and training noise (evaluation noise and labels stay common:
`eval.seed`); `sweep.objectives` trains each with DDPM and/or flow; `sweep.budgets` (Gflops) turns
the grid into an iso-FLOP sweep: each model gets the steps that spend each budget. After a member
finishes, one row per evaluation goes to `<workdir>/results.jsonl` (results.py). At the end the
sweep writes its plots and results.md into the workdir (report.py).

Every member's config is checked before any trains. Re-running skips members whose final row is
there with the same config fingerprint, resumes an interrupted one, and refuses to mix configs.
`sweep.workers = N` trains N members at once, one per core (workers.py).
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
import traceback

import jax
import ml_collections
from absl import logging

from dit_jax.data import captions
from dit_jax import config_check
from dit_jax.evaluation import evaluators
from dit_jax import files
from dit_jax import models
from dit_jax.analysis import report
from dit_jax.sweep import results
from dit_jax.training import fingerprint
from dit_jax.analysis import scaling_fit
from dit_jax import sharding as sharding_lib
from dit_jax.data import sources
from dit_jax.training import train
from dit_jax.sweep import workers


@dataclasses.dataclass(frozen=True)
class Member:
  """One training run of the sweep."""
  run: str
  model: str
  objective: str
  seed: int
  steps: int
  budget: float | None = None


def model_names(sweep: ml_collections.ConfigDict) -> list[str]:
  """The grid: a DiT for every size and patch, then the extra (e.g. U-Net) models."""
  return models.names("DiT", sweep.sizes, sweep.patches) + list(sweep.extra_models)


def plan(config, gflops: dict) -> list[Member]:
  """Every member, in order: budget, model, objective, seed."""
  sweep, out = config.sweep, []
  steps = {(None, m): config.num_train_steps for m in gflops}
  budgets = [None]
  if sweep.budgets:
    budgets = [float(b) for b in sweep.budgets]
    steps = {(p["budget"], p["model"]): p["steps"] for p in
             scaling_fit.isoflop_plan(budgets, gflops, config.batch_size)}
  for budget in budgets:
    for model in gflops:
      if (budget, model) not in steps:
        continue  # the budget buys this model less than one step
      for objective in sweep.objectives:
        for seed in sweep.seeds:
          run = model + ("" if objective == "ddpm" else f"-{objective}")
          run += ("" if budget is None else f"-b{budget:g}") + f"-s{seed}"
          out.append(Member(run, model, objective, int(seed), steps[(budget, model)], budget))
  return out


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


def member_config(config: ml_collections.ConfigDict, m) -> ml_collections.ConfigDict:
  """The training config of one member: the sweep config with the member's fields set and no
  `sweep` block. Flow members train without learned Sigma (a DDPM-only output)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  del cfg["sweep"]
  if isinstance(m, str):  # a model name alone: the config's own seed and objective
    cfg.model = m
    return cfg
  cfg.model, cfg.seed, cfg.diffusion.objective = m.model, m.seed, m.objective
  cfg.num_train_steps = m.steps
  if m.objective == "flow":
    cfg.learn_sigma = False
  if m.budget is not None:  # iso-FLOP members are evaluated once, at the end
    for ev in ("grid", "fid", "val"):
      if cfg.eval[ev].every_steps:
        cfg.eval[ev].every_steps = m.steps
  return cfg


def describe_model(cfg: ml_collections.ConfigDict, source) -> dict:
  """family, size, patch, params, gflops (paper convention), xla_gflops of the member on the
  data; the config checks that need the data run here, for every member before any trains."""
  model = config_check.check_with_data(cfg, source)
  return models.describe(model, cfg.model)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The sweep block, and what a sweep needs of the training config: an evaluation to record."""
  s = config.sweep
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
  q, v = config.eval.fid, config.eval.val
  if not ((q.every_steps > 0 and q.num_samples > 0) or v.every_steps > 0):
    raise ValueError("a sweep records one row per evaluation: set eval.fid.every_steps and "
                     f"eval.fid.num_samples > 0, or eval.val.every_steps > 0 (got "
                     f"{q.every_steps}, {q.num_samples}, {v.every_steps})")


def preflight(config, workdir: pathlib.Path):
  """Every member's config checked (with the data), before anything trains: (members, infos)."""
  check_config(config)
  # Checks the data (and a text run's captions) before anything compiles.
  source = captions.training_source(config, sources.create_source(config.data))
  infos = {}
  for name in model_names(config.sweep):
    cfg = member_config(config, name)
    for objective in config.sweep.objectives:
      cfg.diffusion.objective = objective
      cfg.learn_sigma = config.learn_sigma and objective == "ddpm"
      config_check.check(cfg)
      info = describe_model(cfg, source)
    infos[name] = dict(model=name, **info)
  members = select(plan(config, {n: i["gflops"] for n, i in infos.items()}), config.sweep.member)
  for m in members:  # a member trained before under another config is never resumed silently
    fingerprint.check_same_config(workdir / run_dir_name(m.run) / "config.json",
                              member_config(config, m), write=False)
  return members, infos, source


def warm_caches(config, member: Member, source) -> None:
  """Makes the feature network and FID reference statistics the members will load (training the
  dataset CNN the first time), in this process, so that concurrent workers do not each make them."""
  cfg = member_config(config, member)
  if cfg.eval.fid.every_steps > 0 and cfg.eval.fid.num_samples > 0:
    evaluators.feature_network_and_reference(cfg, source, sharding_lib.create_mesh(cfg.mesh_shape))


def _collect(config, m: Member, info: dict, run_dir, data_kind) -> list[dict]:
  cfg = member_config(config, m)
  extra = dict(results.provenance(cfg, data_kind), budget_gflops=m.budget)
  rows = results.evaluation_rows(m.run, run_dir, info, extra)
  if not rows or rows[-1]["step"] != m.steps:
    raise RuntimeError(f"training finished without its final evaluation at step {m.steps}")
  rows[-1]["final"] = True
  return rows


def _failed(m: Member, error: str, seconds: float) -> dict:
  return dict(run=m.run, model=m.model, objective=m.objective, seed=m.seed, budget_gflops=m.budget,
              status="failed", error=error, wall_s=seconds)


class _Progress:
  """One line per finished member with an ETA from the work left (steps x Gflops, a proxy)."""

  def __init__(self, members, infos):
    self.cost = {m.run: m.steps * (infos[m.model]["gflops"] + 0.005) for m in members}
    self.total, self.done, self.t0, self.n = sum(self.cost.values()), 0.0, time.time(), 0

  def finished(self, m: Member, seconds: float, rows) -> None:
    self.done += self.cost[m.run]
    self.n += 1
    elapsed = time.time() - self.t0
    eta = elapsed * (self.total - self.done) / max(self.done, 1e-9)
    last = rows[-1] if rows else {}
    score = " ".join(f"{k} {last[k]:.4g}" for k in ("fid", "val_loss") if k in last)
    if jax.process_index() == 0:
      print(f"sweep [{self.n}/{len(self.cost)}] {m.run}: {score or 'failed'} in {seconds:.0f} s; "
            f"elapsed {elapsed:.0f} s, ETA ~{eta:.0f} s", flush=True)


def run(config: ml_collections.ConfigDict, workdir) -> list[str]:
  """Trains every selected member that is not finished, then writes the report; returns the runs
  that failed."""
  workdir = pathlib.Path(workdir)
  members, infos, source = preflight(config, workdir)
  with files.WorkdirLock(workdir):
    path = workdir / "results.jsonl"
    done = {r["run"]: r.get("config_fingerprint") for r in files.read_jsonl(path)
            if r.get("final") and r.get("status") == "ok"}
    todo = []
    for m in members:
      fp = fingerprint.fingerprint(member_config(config, m))
      if m.run in done and done[m.run] not in (fp, None):
        raise ValueError(f"{path} holds {m.run} made with another config (fingerprint "
                         f"{done[m.run]}, now {fp}); use a new workdir")
      if m.run not in done:
        todo.append(m)
    if jax.process_index() == 0:
      print(f"sweep: {len(members)} members, {len(todo)} to train ({len(members) - len(todo)} "
            f"finished) in {workdir}", flush=True)
    if todo and config.sweep.workers > 0:
      warm_caches(config, todo[0], source)
    failed = _train_all(config, workdir, todo, infos, source.kind, path)
    rows = files.read_jsonl(path) if jax.process_index() == 0 else []
    if rows:
      report.write(rows, workdir)
  return failed


def _train_all(config, workdir, todo, infos, data_kind, path) -> list[str]:
  progress, failed, by_run = _Progress(todo, infos), [], {m.run: m for m in todo}

  def finish(m: Member, seconds: float, error: str | None) -> None:
    rows = []
    if error is None:
      try:
        rows = _collect(config, m, infos[m.model], workdir / run_dir_name(m.run), data_kind)
      except (RuntimeError, ValueError) as e:
        error = str(e)
    if error is not None:
      failed.append(m.run)
      rows = [_failed(m, error, seconds)]
      logging.error("sweep: %s failed: %s", m.run, error)
    if jax.process_index() == 0:
      files.append_jsonl(path, rows)
    progress.finished(m, seconds, rows if error is None else [])

  if config.sweep.workers > 0:
    # Longest first (by the progress line's cost proxy), so no long member runs alone at the end.
    order = sorted(todo, key=lambda m: -progress.cost[m.run])
    jobs = [(m.run, member_config(config, m).to_dict(), str(workdir / run_dir_name(m.run)))
            for m in order]

    def on_done(run, code, seconds):
      if code != workers.PREEMPTED:
        finish(by_run[run], seconds, None if code == 0 else
               workers.last_error(workdir / run_dir_name(run), code))
    if not workers.run_pool(jobs, config.sweep.workers, on_done):
      logging.warning("sweep: SIGTERM; the running members saved their checkpoints, re-run the "
                      "sweep to resume them")
    return failed
  for m in todo:
    t0 = time.perf_counter()
    try:
      state = train.train_and_evaluate(member_config(config, m), workdir / run_dir_name(m.run))
    except Exception as e:  # pylint: disable=broad-except
      logging.error("sweep: %s: %s", m.run, traceback.format_exc())
      finish(m, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
      continue
    if state is not None and int(jax.device_get(state.step)) < m.steps:
      # SIGTERM (preemption): the member saved a checkpoint and returned early. Stop here rather
      # than start the next member; re-running the command resumes this one.
      logging.warning("sweep: %s stopped at step %d of %d (SIGTERM); its checkpoint is saved, "
                      "re-run the sweep to resume", m.run, int(jax.device_get(state.step)), m.steps)
      break
    finish(m, time.perf_counter() - t0, None)
  return failed
