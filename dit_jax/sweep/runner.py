"""The scaling sweep's run: check every member, train those not finished, collect their rows,
report.

The members (model size x patch size, plus U-Nets, x objective x seed, at equal steps or at equal
compute) and their training configs are `members.py`'s. Each member is one training run
(`train.train_and_evaluate`) in `<workdir>/<run>/`. `sweep.seeds` repeats every model with other
initialisations, data orders and training noise (evaluation noise and labels stay common:
`eval.seed`). After a member finishes, one row per evaluation goes to `<workdir>/results.jsonl`
(results.py). At the end the sweep writes its plots and results.md into the workdir
(analysis/report.py, imported only then: a training run never loads the analysis stack).

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

from dit_jax import config_check
from dit_jax import errors
from dit_jax import files
from dit_jax import models
from dit_jax import sharding as sharding_lib
from dit_jax.data import captions
from dit_jax.data import sources
from dit_jax.evaluation import evaluators
from dit_jax.models import flops
from dit_jax.sweep import devices
from dit_jax.sweep import members as members_lib
from dit_jax.sweep import progress as progress_lib
from dit_jax.sweep import results
from dit_jax.sweep import workers
from dit_jax.training import distributed
from dit_jax.training import fingerprint
from dit_jax.training import train


def preflight(config, workdir: pathlib.Path):
  """Every member's config checked (with the data), before anything trains: (members, their
  configs by run, model infos, the source)."""
  members_lib.check_config(config.sweep, config.eval)
  # Checks the data (and a text run's captions) before anything compiles.
  source = captions.training_source(config.get("text"), sources.create_source(config.data))
  infos = {}
  for name in members_lib.model_names(config.sweep):
    for objective in config.sweep.objectives:
      probe = members_lib.Member("", name, objective, config.seed, config.num_train_steps)
      cfg = members_lib.member_config(config, probe)
      config_check.check(cfg)
      model = config_check.check_with_data(cfg, source)
      for p in config.sweep.get("parameterizations", ()):  # e.g. a mup base width per model
        config_check.check(members_lib.member_config(config, dataclasses.replace(
            probe, parameterization=p)))
    # family, size, patch, params, gflops (paper convention), xla_gflops (a compile) of the model
    # on the data, counted once, with the last objective's model
    infos[name] = dict(model=name, **models.describe(model, name))
  gflops = {n: i["gflops"] for n, i in infos.items()}
  members = members_lib.select(
      members_lib.plan(config.sweep, config.num_train_steps, config.batch_size, gflops),
      config.sweep.member)
  if not members:
    raise ValueError("the sweep has no members to train (sweep.member, sweep.budgets)")
  configs = {m.run: members_lib.member_config(config, m) for m in members}
  for m in members:  # a member trained before under another config is never resumed silently
    fingerprint.check_same_config(workdir / members_lib.run_dir_name(m.run) / "config.json",
                                  configs[m.run], write=False)
  return members, configs, infos, source


def show_plan(members, infos, batch_size: int) -> None:
  """The plan, before anything trains: per model (and budget), its steps, seeds and compute."""
  plan = {}
  for m in members:
    plan.setdefault((m.model, m.budget, m.objective, m.steps), []).append(m.seed)
  for (model, budget, objective, steps), seeds in plan.items():
    pflops = flops.training_gflops(infos[model]["gflops"], batch_size) * steps / 1e6
    at = "" if budget is None else f" at budget {budget:g} Gflops"
    print(f"  plan: {model} ({objective}){at}: {steps:,} steps x {len(seeds)} seed(s), "
          f"{pflops:.4g} PFLOP each", flush=True)


def _collect(m: members_lib.Member, info: dict, extra: dict, run_dir) -> list[dict]:
  rows = results.evaluation_rows(m.run, run_dir, info, extra)
  if not rows or rows[-1]["step"] != m.steps:
    raise RuntimeError(f"training finished without its final evaluation at step {m.steps}")
  rows[-1]["final"] = True
  return rows


def _failed(m: members_lib.Member, error: str, seconds: float) -> dict:
  return dict(run=m.run, model=m.model, objective=m.objective, seed=m.seed, budget_gflops=m.budget,
              status="failed", error=error, wall_s=seconds)


class _Progress:
  """One line per finished member with an ETA from the work left (steps x Gflops, a proxy)."""

  def __init__(self, members, infos):
    self.cost = {m.run: m.steps * (infos[m.model]["gflops"] + 0.005) for m in members}
    self.total, self.done, self.t0, self.n = sum(self.cost.values()), 0.0, time.time(), 0

  def finished(self, m: members_lib.Member, seconds: float, rows) -> None:
    self.done += self.cost[m.run]
    self.n += 1
    elapsed = time.time() - self.t0
    eta = elapsed * (self.total - self.done) / max(self.done, 1e-9)
    last = rows[-1] if rows else {}
    score = " ".join(f"{k} {last[k]:.4g}" for k in ("fid", "val_loss") if k in last)
    if jax.process_index() == 0:
      print(f"sweep [{self.n}/{len(self.cost)}] {m.run}: {score or 'failed'} in {seconds:.0f} s; "
            f"elapsed {elapsed:.0f} s, ETA ~{eta:.0f} s", flush=True)


def _unfinished(members, configs, path) -> list:
  """The members without a final row in `path`; a final row made under another config is an
  error."""
  done = {r["run"]: r.get("config_fingerprint") for r in files.read_jsonl(path)
          if r.get("final") and r.get("status") == "ok"}
  todo = []
  for m in members:
    fp = fingerprint.fingerprint(configs[m.run])
    if m.run in done and done[m.run] not in (fp, None):
      raise ValueError(f"{path} holds {m.run} made with another config (fingerprint "
                       f"{done[m.run]}, now {fp}); use a new workdir")
    if m.run not in done:
      todo.append(m)
  return todo


def run(config: ml_collections.ConfigDict, workdir) -> list[str]:
  """Trains every selected member that is not finished, then writes the report; returns the runs
  that failed."""
  workdir = pathlib.Path(workdir)
  devices.prepare_parent(config.sweep)  # devices_per_member: leave the accelerators to workers
  # Before anything touches a device: preflight compiles cost analyses.
  distributed.maybe_initialize(config.distributed)
  members, configs, infos, source = preflight(config, workdir)
  with files.WorkdirLock(workdir):
    path = workdir / "results.jsonl"
    todo = _unfinished(members, configs, path)
    if jax.process_index() == 0:
      print(f"sweep: {len(members)} members, {len(todo)} to train ({len(members) - len(todo)} "
            f"finished) in {workdir}", flush=True)
      show_plan(todo, infos, config.batch_size)
    envs = devices.pool(config.sweep, jax.default_backend())  # devices_per_member (else None)
    num_workers = len(envs) if envs else config.sweep.workers
    if todo and num_workers > 0 and config.eval.fid.every_steps > 0 \
        and config.eval.fid.num_samples > 0:
      # The feature network and FID reference the members will load (training the dataset CNN
      # the first time), made here once, so that concurrent workers do not each make them.
      first = configs[todo[0].run]
      evaluators.feature_network_and_reference(first.eval, first.data, source,
                                               sharding_lib.create_mesh(first.mesh_shape))
    extras = {m.run: dict(results.provenance(configs[m.run], source.kind), budget_gflops=m.budget)
              for m in todo}
    failed, preempted = _train_all(configs, num_workers, workdir, todo, infos, extras, path,
                                   envs)
    if preempted:  # no report from half a sweep; the scheduler sees exit code 75 (errors.py)
      raise errors.Preempted(f"SIGTERM: the running members saved their checkpoints; re-run to "
                             f"resume the sweep in {workdir}")
    rows = files.read_jsonl(path) if jax.process_index() == 0 else []
    if rows:
      from dit_jax.analysis import report  # pylint: disable=import-outside-toplevel
      report.write(rows, workdir, rules=members_lib.fit_rules(config.sweep))
  return failed


def _train_all(configs, num_workers, workdir, todo, infos, extras, path, envs=None) -> tuple:
  """Trains `todo` (each with its configs[run]) in this process or in `num_workers` workers
  (started with `envs`: devices.pool): (the runs that failed, whether SIGTERM stopped the sweep)."""
  progress, failed, by_run = _Progress(todo, infos), [], {m.run: m for m in todo}
  run_dir = lambda run: workdir / members_lib.run_dir_name(run)
  # the live line (a TTY, workers only: an in-process member shows its own progress bar)
  live = progress_lib.Live(todo, run_dir, progress.cost,
                           enabled=num_workers > 0 and jax.process_index() == 0)

  def finish(m: members_lib.Member, seconds: float, error: str | None) -> None:
    rows = []
    if error is None:
      try:
        rows = _collect(m, infos[m.model], extras[m.run], run_dir(m.run))
      except (RuntimeError, ValueError) as e:
        error = str(e)
    if error is not None:
      failed.append(m.run)
      rows = [_failed(m, error, seconds)]
      logging.error("sweep: %s failed: %s", m.run, error)
    if jax.process_index() == 0:
      files.append_jsonl(path, rows)
    live.finished(m.run)
    progress.finished(m, seconds, rows if error is None else [])

  if num_workers > 0:
    # Longest first (by the progress line's cost proxy), so no long member runs alone at the end.
    order = sorted(todo, key=lambda m: -progress.cost[m.run])
    jobs = [(m.run, configs[m.run].to_dict(), str(run_dir(m.run))) for m in order]

    def on_done(run, code, seconds):
      if code != workers.PREEMPTED:
        finish(by_run[run], seconds,
               None if code == 0 else workers.last_error(run_dir(run), code))
    ok = workers.run_pool(jobs, num_workers, on_done, envs=envs, on_tick=live.poll)
    live.close()
    return failed, not ok
  for m in todo:
    t0 = time.perf_counter()
    try:
      state = train.train_and_evaluate(configs[m.run], run_dir(m.run))
    except Exception as e:  # pylint: disable=broad-except
      logging.error("sweep: %s: %s", m.run, traceback.format_exc())
      finish(m, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
      continue
    if state is not None and int(jax.device_get(state.step)) < m.steps:
      # SIGTERM (preemption): the member saved a checkpoint and returned early. Stop here rather
      # than start the next member; re-running the command resumes this one.
      logging.warning("sweep: %s stopped at step %d of %d (SIGTERM); its checkpoint is saved, "
                      "re-run the sweep to resume", m.run, int(jax.device_get(state.step)), m.steps)
      return failed, True
    finish(m, time.perf_counter() - t0, None)
  return failed, False
