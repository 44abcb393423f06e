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
from dit_jax.sweep import members as members_lib
from dit_jax.sweep import results
from dit_jax.training import fingerprint
from dit_jax import sharding as sharding_lib
from dit_jax.data import sources
from dit_jax.training import train
from dit_jax.sweep import workers


def describe_model(cfg: ml_collections.ConfigDict, source) -> dict:
  """family, size, patch, params, gflops (paper convention), xla_gflops of the member on the
  data; the config checks that need the data run here, for every member before any trains."""
  model = config_check.check_with_data(cfg, source)
  return models.describe(model, cfg.model)


def preflight(config, workdir: pathlib.Path):
  """Every member's config checked (with the data), before anything trains: (members, infos)."""
  members_lib.check_config(config)
  # Checks the data (and a text run's captions) before anything compiles.
  source = captions.training_source(config, sources.create_source(config.data))
  infos = {}
  for name in members_lib.model_names(config.sweep):
    cfg = members_lib.member_config(config, name)
    for objective in config.sweep.objectives:
      cfg.diffusion.objective = objective
      cfg.learn_sigma = config.learn_sigma and objective == "ddpm"
      config_check.check(cfg)
      info = describe_model(cfg, source)
    infos[name] = dict(model=name, **info)
  members = members_lib.select(members_lib.plan(config, {n: i["gflops"] for n, i in infos.items()}), config.sweep.member)
  for m in members:  # a member trained before under another config is never resumed silently
    fingerprint.check_same_config(workdir / members_lib.run_dir_name(m.run) / "config.json",
                              members_lib.member_config(config, m), write=False)
  return members, infos, source


def warm_caches(config, member: members_lib.Member, source) -> None:
  """Makes the feature network and FID reference statistics the members will load (training the
  dataset CNN the first time), in this process, so that concurrent workers do not each make them."""
  cfg = members_lib.member_config(config, member)
  if cfg.eval.fid.every_steps > 0 and cfg.eval.fid.num_samples > 0:
    evaluators.feature_network_and_reference(cfg, source, sharding_lib.create_mesh(cfg.mesh_shape))


def _collect(config, m: members_lib.Member, info: dict, run_dir, data_kind) -> list[dict]:
  cfg = members_lib.member_config(config, m)
  extra = dict(results.provenance(cfg, data_kind), budget_gflops=m.budget)
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
      fp = fingerprint.fingerprint(members_lib.member_config(config, m))
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

  def finish(m: members_lib.Member, seconds: float, error: str | None) -> None:
    rows = []
    if error is None:
      try:
        rows = _collect(config, m, infos[m.model], workdir / members_lib.run_dir_name(m.run), data_kind)
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
    jobs = [(m.run, members_lib.member_config(config, m).to_dict(), str(workdir / members_lib.run_dir_name(m.run)))
            for m in order]

    def on_done(run, code, seconds):
      if code != workers.PREEMPTED:
        finish(by_run[run], seconds, None if code == 0 else
               workers.last_error(workdir / members_lib.run_dir_name(run), code))
    if not workers.run_pool(jobs, config.sweep.workers, on_done):
      logging.warning("sweep: SIGTERM; the running members saved their checkpoints, re-run the "
                      "sweep to resume them")
    return failed
  for m in todo:
    t0 = time.perf_counter()
    try:
      state = train.train_and_evaluate(members_lib.member_config(config, m), workdir / members_lib.run_dir_name(m.run))
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
