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

import json
import pathlib
import time
import traceback

import jax
import ml_collections
from absl import logging

from dit_jax import data as data_lib
from dit_jax import flops as flops_lib
from dit_jax import train


def member_names(sweep: ml_collections.ConfigDict) -> list[str]:
  """The grid: DiT-<size>/<patch> for every size and patch, then the extra (e.g. U-Net) models."""
  names = [f"DiT-{s}/{p}" for s in sweep.sizes for p in sweep.patches]
  return names + list(sweep.extra_models)


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
  """params, gflops (paper convention) and xla_gflops of the member's model on the sweep's data."""
  model = train.create_model(cfg, source.image_shape, source.num_classes)
  return dict(params=flops_lib.count_params(flops_lib.abstract_params(model)),
              gflops=flops_lib.model_gflops(model), xla_gflops=flops_lib.model_xla_gflops(model))


def read_jsonl(path) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(results_path) -> set[str]:
  """Members whose final evaluation row is in results.jsonl."""
  return {r["run"] for r in read_jsonl(results_path) if r.get("final") and r.get("status") == "ok"}


def evaluation_rows(name: str, run_dir: pathlib.Path, info: dict, batch_size: int) -> list[dict]:
  """One row per evaluation the member's metrics.jsonl holds (the loop writes fid_<net> there)."""
  metrics = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "step" in m]
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
        run=name, model=name, patch=info["patch"], params=info["params"], gflops=info["gflops"],
        xla_gflops=info["xla_gflops"], step=step,
        train_compute_gflops=info["gflops"] * batch_size * step * 3, fid=value, fid_metric=metric,
        images_per_s=sum(speeds) / len(speeds) if speeds else float("nan"),
        wall_s=m.get("wall_s", float("nan")), status="ok",
        **{k: v for k, v in m.items() if k.split("_")[0] in ("sfid", "is", "precision", "recall")})
  return [rows[s] for s in sorted(rows)]


def append(path, rows) -> None:
  if jax.process_index() == 0 and rows:
    with open(path, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


def run(config: ml_collections.ConfigDict, workdir) -> list[str]:
  """Trains every selected member that is not finished; returns the names of the failed ones."""
  workdir = pathlib.Path(workdir)
  names = select(member_names(config.sweep), config.sweep.member)
  source = data_lib.create_source(config.data)  # checks the data before anything compiles
  infos = {}
  for name in names:  # every member's config errors surface here, before any training
    cfg = member_config(config, name)
    train.validate_config(cfg)
    infos[name] = dict(describe_model(cfg, source), patch=patch_of(name))
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


def patch_of(name: str) -> int:
  """The patch size of a DiT name; 1 for pixel-space U-Nets (no patching)."""
  return int(name.rsplit("/", 1)[1]) if name.startswith("DiT-") else 1
