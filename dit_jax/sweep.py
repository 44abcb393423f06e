"""The scaling sweep: DiT model size x patch size (plus U-Nets) at equal training steps.

Each member is an ordinary training run (`train.train_and_evaluate`) in `<workdir>/<member>/`; after it
finishes, one row per evaluation goes to `<workdir>/results.jsonl`:
run, model, patch, params, gflops, xla_gflops, step, train_compute_gflops (Gflops x batch x steps x 3,
the paper's measure), fid and fid_metric (named after its feature network), images_per_s, wall_s.
Re-running skips members whose final row is there, resumes an interrupted member from its checkpoint,
and records a member that fails as failed before going on to the next. SIGTERM (preemption) saves the
running member's checkpoint and ends the sweep without starting another member.
"""
from __future__ import annotations

import pathlib
import time
import traceback

import jax
import ml_collections
from absl import logging

from dit_jax import captions
from dit_jax import config_check
from dit_jax import files
from dit_jax import models
from dit_jax import sources
from dit_jax import train


def member_names(sweep: ml_collections.ConfigDict) -> list[str]:
  """The grid: a DiT for every size and patch, then the extra (e.g. U-Net) models."""
  return models.names("DiT", sweep.sizes, sweep.patches) + list(sweep.extra_models)


def select(names: list[str], member: str) -> list[str]:
  """All members, or one chosen by index ('3') or name ('DiT-S/4') for an array job."""
  if member in ("", None):
    return names
  if str(member).isdigit():
    i = int(member)
    if i >= len(names):
      raise ValueError(f"sweep.member={i}, but the sweep has {len(names)} members: {names}")
    return [names[i]]
  if member not in names:
    raise ValueError(f"sweep.member={member!r} is not in the sweep: {names}")
  return [member]


def run_dir_name(name: str) -> str:
  return name.replace("/", "_")


def member_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The training config of one member: the sweep config with `model` set and no `sweep` block."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  del cfg["sweep"]
  cfg.model = name
  return cfg


def describe_model(cfg: ml_collections.ConfigDict, source) -> dict:
  """family, patch, params, gflops (paper convention), xla_gflops of the member on the data; the
  config checks that need the data run here, for every member before any trains."""
  model = config_check.check_with_data(cfg, source)
  return models.describe(model, cfg.model)


def finished(results_path) -> set[str]:
  """Members whose final evaluation row is in results.jsonl."""
  return {r["run"] for r in files.read_jsonl(results_path)
          if r.get("final") and r.get("status") == "ok"}


def evaluation_rows(name: str, run_dir: pathlib.Path, info: dict, batch_size: int) -> list[dict]:
  """One row per evaluation the member's metrics.jsonl holds (the loop writes fid_<net> there)."""
  metrics = [m for m in files.read_jsonl(run_dir / "metrics.jsonl") if "step" in m]
  rows, speeds = {}, []
  for m in metrics:
    if "images_per_sec" in m:
      speeds.append(m["images_per_sec"])
    fids = {k: v for k, v in m.items() if k.startswith("fid_")}
    if not fids:
      continue
    (metric, value), = fids.items()
    step = int(m["step"])
    rows[step] = dict(  # a step evaluated again after a resume keeps its newest row
        run=name, model=name, family=info["family"], size=info["size"], patch=info["patch"],
        params=info["params"], gflops=info["gflops"],
        xla_gflops=info["xla_gflops"], step=step,
        train_compute_gflops=info["gflops"] * batch_size * step * 3, fid=value, fid_metric=metric,
        images_per_s=sum(speeds) / len(speeds) if speeds else float("nan"),
        wall_s=m.get("wall_s", float("nan")), status="ok",
        **{k: v for k, v in m.items() if k.split("_")[0] in ("sfid", "is", "precision", "recall")})
  return [rows[s] for s in sorted(rows)]


def append(path, rows) -> None:
  if jax.process_index() == 0:
    files.append_jsonl(path, rows)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The sweep block, and what a sweep needs of the training config: an evaluation to record."""
  if not member_names(config.sweep):
    raise ValueError("the sweep has no members: set sweep.sizes and sweep.patches (or "
                     "sweep.extra_models)")
  for p in config.sweep.patches:
    if int(p) < 1:
      raise ValueError(f"sweep.patches: {p} is not a patch size")
  q = config.eval.fid
  if not (q.every_steps > 0 and q.num_samples > 0):
    raise ValueError("a sweep records one row per evaluation: set eval.fid.every_steps and "
                     f"eval.fid.num_samples > 0 (got {q.every_steps}, {q.num_samples})")


def run(config: ml_collections.ConfigDict, workdir) -> list[str]:
  """Trains every selected member that is not finished; returns the names of the failed ones."""
  workdir = pathlib.Path(workdir)
  check_config(config)
  names = select(member_names(config.sweep), config.sweep.member)
  # Checks the data (and a text run's captions) before anything compiles.
  source = captions.training_source(config, sources.create_source(config.data))
  infos = {}
  for name in names:  # every member's config errors surface here, before any training
    cfg = member_config(config, name)
    config_check.check(cfg)
    infos[name] = describe_model(cfg, source)
  workdir.mkdir(parents=True, exist_ok=True)
  results = workdir / "results.jsonl"
  done, failed = finished(results), []
  for i, name in enumerate(names):
    if name in done:
      logging.info("sweep: %s already finished, skipped", name)
      continue
    logging.info("sweep: member %d/%d %s (%.4f Gflops)", i + 1, len(names), name,
                 infos[name]["gflops"])
    run_dir = workdir / run_dir_name(name)
    cfg = member_config(config, name)
    t0 = time.perf_counter()
    try:
      state = train.train_and_evaluate(cfg, run_dir)
    except Exception as e:  # pylint: disable=broad-except
      logging.error("sweep: %s failed: %s", name, traceback.format_exc())
      append(results, [dict(run=name, model=name, status="failed", error=f"{type(e).__name__}: {e}",
                            wall_s=time.perf_counter() - t0)])
      failed.append(name)
      continue
    if state is not None and int(jax.device_get(state.step)) < cfg.num_train_steps:
      # SIGTERM (preemption): the member saved a checkpoint and returned early. Stop here rather
      # than start the next member; re-running the command resumes this one.
      logging.warning("sweep: %s stopped at step %d of %d (SIGTERM); its checkpoint is saved, "
                      "re-run the sweep to resume", name, int(jax.device_get(state.step)),
                      cfg.num_train_steps)
      break
    rows = evaluation_rows(name, run_dir, infos[name], cfg.batch_size)
    if not rows:
      append(results, [dict(run=name, model=name, status="failed",
                            error="training finished without an evaluation (eval_every_steps?)")])
      failed.append(name)
      continue
    rows[-1]["final"] = True
    append(results, rows)
  return failed

