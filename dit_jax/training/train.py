"""The training loop: setup, restore-or-init, compile, then steps with logs, checkpoints, evaluators.

The step itself is pure and lives in `train_step.py`; this module is the edge that touches the
outside world. `train_and_evaluate(config, workdir)` runs the config checks
in `config_check`'s order: every field that needs no data first (nothing is read before they pass),
then the data is read and the model and evaluators are checked against it, then the batch sizes
against the mesh; no feature network is built and nothing compiles before all three have passed.
It then runs the same code on one CPU and on a multi-host mesh. Re-running resumes from the
workdir's latest checkpoint; SIGTERM saves and returns. `load_trained(workdir)` reads a run back
for sampling.

A workdir holds config.json, checkpoints/ (orbax: the whole TrainState and the data state), a text
run's tokenizer.json, metrics.jsonl and TensorBoard events, samples/, and with post-hoc EMA
(config.ema.sigma_rels, posthoc.py) phema/: the tracked EMAs' snapshots and the selected profile.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions

from dit_jax import config_check
from dit_jax import files
from dit_jax import models
from dit_jax import objectives
from dit_jax import sharding as sharding_lib
from dit_jax.data import captions
from dit_jax.data import pipeline as pipeline_lib
from dit_jax.data import sources
from dit_jax.data import splits
from dit_jax.evaluation import evaluators as evaluators_lib
from dit_jax.models import flops
from dit_jax.training import checkpoint as checkpoint_lib
from dit_jax.training import distributed
from dit_jax.training import fingerprint
from dit_jax.training import hardware
from dit_jax.training import metric_log
from dit_jax.training import posthoc
from dit_jax.training import train_step as step_lib


class NonFiniteError(RuntimeError):
  """Training produced non-finite losses or gradients too many steps in a row."""


def due(step: int, every: int, last: int) -> bool:
  """Whether a periodic action (every `every` steps and at the last step; 0 = never) runs now."""
  return every > 0 and (step % every == 0 or step == last)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the loop does what (the root config's loop fields, read once by setup)."""
  num_train_steps: int
  log_every_steps: int
  checkpoint_every_steps: int
  max_nonfinite_streak: int
  record_batch_hashes: bool
  ema_decay: float
  peak_tflops_per_device: float


@dataclasses.dataclass
class Run:
  """What setup builds for one training run; nothing here holds device arrays yet. The loop reads
  the schedule and these sub-configs, never the root config."""
  schedule: Schedule
  eval_cfg: ml_collections.ConfigDict  # config.eval: the evaluators'
  data_cfg: ml_collections.ConfigDict  # config.data: the FID reference's identity
  optim: ml_collections.ConfigDict  # config.optim: the learning-rate schedule
  hparams: dict  # the root config's scalars, for TensorBoard
  objective: Any  # objectives.from_config(config)
  workdir: pathlib.Path
  source: Any  # the whole dataset (FID references are computed from it)
  train_source: Any  # what the pipeline reads: the source less the held-out split
  val_source: Any  # the held-out split (data.val_size), or None
  model: Any
  mesh: Any
  tx: Any
  rules: tuple  # logical axis -> mesh axis
  abstract_state: Any
  shardings: Any
  pipeline: Any
  ckpt: checkpoint_lib.Checkpointer
  data_state: dict  # what a resumed run and tools/sample.py need besides the arrays
  lock: files.WorkdirLock  # held until the run returns
  ema_cfg: ml_collections.ConfigDict  # config.ema: post-hoc EMA (posthoc.py)

  @property
  def lead(self) -> bool:
    return jax.process_index() == 0


def setup(config: ml_collections.ConfigDict, workdir) -> Run:
  """Checks the config (all of it, before anything is built), then data, model, mesh, state."""
  config_check.check(config)
  distributed.maybe_initialize(config.distributed)
  source = captions.training_source(config.get("text"), sources.create_source(config.data))
  model = config_check.check_with_data(config, source)
  mesh = sharding_lib.create_mesh(config.mesh_shape)
  config_check.check_devices(config.batch_size, config.eval.fid, mesh)
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {workdir} is a file, not a directory")
  lock = files.WorkdirLock(workdir, f".lock.{jax.process_index()}").__enter__()
  if jax.process_index() == 0:
    try:  # only an identical config resumes (or starts) here
      fingerprint.check_same_config(workdir / "config.json", config)
    except ValueError:
      lock.__exit__()
      raise
    if captions.tokenizer_of(source) is not None:  # sampling a text run needs its vocabulary
      captions.save_tokenizer(workdir, captions.tokenizer_of(source))
  tx = step_lib.create_optimizer(config.optim, models.lr_scales(model), config.num_train_steps)
  rules = tuple(tuple(r) for r in config.logical_axis_rules) if config.logical_axis_rules else \
      sharding_lib.DEFAULT_RULES
  abstract_state, shardings = step_lib.state_shardings(model, tx, mesh, rules,
                                                       len(config.ema.sigma_rels))
  train_source, val_source = splits.split(source, config.data.val_size, config.data.val_seed)
  pipeline = pipeline_lib.Pipeline(train_source, config.batch_size, config.seed,
                                   sharding_lib.batch_sharding(mesh))
  logging.info("data: %s", sources.describe(source))
  logging.info("mesh: %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
               jax.process_count())
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", config.keep_checkpoints,
                                     async_save=config.async_checkpoints)
  data_state = dict(seed=config.seed, global_batch_size=config.batch_size,
                    image_shape=list(source.image_shape), num_classes=source.num_classes,
                    kind=source.kind, scaling_factor=source.scaling_factor)
  hparams = {k: v for k, v in config.to_dict().items() if not isinstance(v, (dict, list, tuple))}
  schedule = Schedule(**{f.name: config[f.name] for f in dataclasses.fields(Schedule)})
  return Run(schedule, config.eval, config.data, config.optim, hparams,
             objectives.from_config(config), workdir, source, train_source, val_source, model, mesh,
             tx, rules, abstract_state, shardings, pipeline, ckpt, data_state, lock, config.ema)


def restore_or_init(run: Run):
  """The latest checkpoint's state (checked against the config), or a fresh sharded init."""
  latest = run.ckpt.latest_step()
  seed, batch_size = run.data_state["seed"], run.data_state["global_batch_size"]
  if latest is None:
    return step_lib.create_train_state(run.model, run.tx, run.mesh, seed, run.rules,
                                       len(run.ema_cfg.sigma_rels))[0]
  latest, state, saved = run.ckpt.restore_newest_readable(
      checkpoint_lib.abstract_with_shardings(run.abstract_state, run.shardings))
  if (saved["seed"], saved["global_batch_size"]) != (seed, batch_size):
    raise ValueError(f"checkpoint in {run.ckpt.directory} was written with data seed/batch "
                     f"{saved['seed']}/{saved['global_batch_size']}, the config says "
                     f"{seed}/{batch_size}; use a new workdir")
  logging.info("restored step %d from %s", latest, run.ckpt.directory)
  return state


def compile_step(run: Run, state):
  """(the compiled train step, seconds it took)."""
  step_fn = step_lib.jit_train_step(run.model, run.objective.process, run.tx, run.mesh,
                                    run.shardings, run.schedule.ema_decay,
                                    step_lib.learning_rate_schedule(
                                        run.optim, run.schedule.num_train_steps),
                                    posthoc.gammas(run.ema_cfg))
  bs = step_lib.batch_shardings(run.mesh)
  batch = dict(
      image=jax.ShapeDtypeStruct(run.pipeline.image_shape, jnp.float32, sharding=bs["image"]),
      label=jax.ShapeDtypeStruct(run.pipeline.label_shape, jnp.int32, sharding=bs["label"]))
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  return compiled, time.perf_counter() - t0


class BatchHashes:
  """sha256 of each batch's part on this process (its shards in device order), one JSON per line."""

  def __init__(self, path):
    self._out = files.JsonlAppender(path)

  def write(self, step: int, batch) -> None:
    h = hashlib.sha256()
    for k in sorted(batch):
      for shard in sorted(batch[k].addressable_shards, key=lambda s: s.device.id):
        h.update(np.asarray(shard.data).tobytes())
    self._out.write({"step": step, "sha256": h.hexdigest()})

  def close(self) -> None:
    self._out.close()


def last_good(run: Run) -> str:
  step = run.ckpt.latest_step()
  if step is None:
    return "No checkpoint was written before it (a re-run starts from step 0)."
  return f"The last checkpoint (step {step}) holds the last good state."


def check_streak(run: Run, metrics, upto: int) -> int:
  """The non-finite streak of `metrics`; raises NonFiniteError once it reaches the limit."""
  streak = int(jax.device_get(metrics["nonfinite_streak"]))
  if streak >= run.schedule.max_nonfinite_streak:
    run.ckpt.wait()
    raise NonFiniteError(
        f"{streak} consecutive steps (up to step {upto}) had a non-finite loss or gradient; "
        f"their updates were skipped. {last_good(run)} Lower the learning rate, set "
        f"optim.grad_clip, or compute in float32.")
  return streak


def save(run: Run, state, step: int, force: bool = False) -> None:
  if run.ckpt.save(step, state, dict(run.data_state, next_step=step), force=force):
    logging.info("checkpoint %d started", step)


def evaluate(run: Run, evaluators, state, step: int, writer, wall_t0: float,
             profile: posthoc.Profile) -> None:
  """Runs the evaluators due at `step` on the EMA params `profile` gives and writes their
  scalars, each with the EMA profile it was evaluated with."""
  evaluators = [ev for ev in evaluators
                if due(step, ev.every_steps, run.schedule.num_train_steps)]
  if not evaluators:
    return
  params, fields, texts = profile.params(state, step)
  writer.write_texts(step, texts)
  for ev in evaluators:
    t0 = time.perf_counter()
    scores = ev.run(params, step)
    if scores:
      scores.update(eval_time_s=time.perf_counter() - t0,
                    wall_s=time.perf_counter() - wall_t0, **fields)  # since this run began
      writer.write_scalars(step, scores)
      logging.info("step %d %s: %s", step, ev.name, scores)


def unfinished(run: Run, evaluators, step: int) -> list:
  """The evaluators due at `step` whose scalars metrics.jsonl lacks: a run killed after the
  checkpoint of `step` but before (or during) its evaluation redoes them on resume."""
  done = {k for r in files.read_jsonl(run.workdir / "metrics.jsonl") if r.get("step") == step
          for k in r}
  return [ev for ev in evaluators if ev.key not in done]


def _start_logging(run: Run, state, start: int, compile_s: float):
  """The writer and the log window; the run's size and compile time go in first."""
  writer = metric_log.create_writer(run.workdir, run.schedule.num_train_steps, start)
  if start == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams(run.hparams)
  gflops = models.gflops(run.model)
  n_params = flops.count_params(state.params)
  logging.info("%s: %.2fM params, %.3f Gflops/image, train step compiled in %.1f s",
               run.hparams["model"], n_params / 1e6, gflops, compile_s)
  writer.write_scalars(start, dict(compile_time_s=compile_s, num_params=n_params,
                                   gflops_per_image=gflops))
  peak = hardware.peak_flops_per_device(run.schedule.peak_tflops_per_device) * jax.device_count()
  log = metric_log.MetricLog(writer, start=start, batch_size=run.pipeline.global_batch_size,
                             gflops=gflops, peak_flops=peak, mesh=run.mesh)
  return writer, log


def train_and_evaluate(config: ml_collections.ConfigDict, workdir):
  """Trains (resuming from workdir's latest checkpoint), logs, evaluates, checkpoints; returns the
  final TrainState."""
  wall_t0 = time.perf_counter()
  run = setup(config, workdir)
  try:
    return _train(run, wall_t0)
  finally:
    run.lock.__exit__()


def _train(run: Run, wall_t0: float):
  """The loop of `train_and_evaluate` once setup has passed."""
  sched = run.schedule
  state = restore_or_init(run)
  start, last = int(jax.device_get(state.step)), sched.num_train_steps
  compiled, compile_s = compile_step(run, state)
  writer, log = _start_logging(run, state, start, compile_s)
  evaluators = evaluators_lib.create(run.eval_cfg, run.data_cfg, run.objective, run.source,
                                     run.model, run.mesh, run.workdir, run.val_source)
  hooks = [periodic_actions.ReportProgress(num_train_steps=last, writer=writer,
                                           every_steps=sched.log_every_steps)] if run.lead else []
  preempt = distributed.Preemption()
  profile = posthoc.Profile(run.ema_cfg, sched.ema_decay, run.workdir, last,
                            next((ev for ev in evaluators if ev.name == "val"), None))
  hashes = BatchHashes(run.workdir / f"batch_hashes.{jax.process_index()}.jsonl") \
      if sched.record_batch_hashes else None
  if start > 0:
    if posthoc.snapshot_due(run.ema_cfg, start, last):  # killed between the step and its save
      posthoc.write_snapshot(run.ema_cfg, run.workdir, start, state.phema, only_if_missing=True)
    evaluate(run, unfinished(run, evaluators, start), state, start, writer, wall_t0, profile)
  prev = None
  try:
    for step, batch in zip(range(start, last), run.pipeline.iterate(start)):
      if hashes is not None:
        hashes.write(step, batch)
      state, metrics = compiled(state, batch)
      if prev is not None:  # the previous step's streak, read while the device runs this one
        check_streak(run, prev, step - 1)
      prev = metrics
      log.add(metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      if due(done, sched.log_every_steps, last):
        log.write(done, state.params)
      if posthoc.snapshot_due(run.ema_cfg, done, last):  # before the checkpoint of `done`
        posthoc.write_snapshot(run.ema_cfg, run.workdir, done, state.phema)
      # Never checkpoint while updates are being skipped: the last good checkpoint stays newest.
      if (sched.checkpoint_every_steps and done % sched.checkpoint_every_steps == 0
          and int(jax.device_get(metrics["nonfinite_streak"])) == 0):
        save(run, state, done)
      evaluate(run, evaluators, state, done, writer, wall_t0, profile)
      if preempt.reached(done):
        logging.warning("SIGTERM: saving step %d and exiting", done)
        if int(jax.device_get(metrics["nonfinite_streak"])) == 0:
          save(run, state, done, force=True)
        break
    if prev is not None:
      check_streak(run, prev, int(jax.device_get(state.step)) - 1)
    final = int(jax.device_get(state.step))
    if not preempt.requested and final == last and sched.checkpoint_every_steps:
      save(run, state, final, force=True)  # the end of training is always kept
  finally:
    run.ckpt.close()
    writer.flush()
    preempt.restore()
    if hashes is not None:
      hashes.close()
  return state


@dataclasses.dataclass
class Trained:
  """A training run read back from its workdir: what sampling needs."""
  config: ml_collections.ConfigDict
  model: Any
  params: Any  # the EMA params (post-hoc EMA: the selected profile, posthoc.chosen)
  data_state: dict  # image_shape, num_classes, kind, scaling_factor, ... (see setup)
  step: int
  tokenizer: Any  # text.Tokenizer of a text run, else None


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config.json a training run wrote into its workdir."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: --workdir must be a training workdir")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_trained(workdir, step: int | None = None) -> Trained:
  """The EMA params of a workdir's checkpoint `step` (default latest) and the model they belong to."""
  workdir = pathlib.Path(workdir)
  config = load_config(workdir)
  tokenizer = captions.load_tokenizer(workdir, config.get("text"))
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True)
  try:
    saved = sorted(ckpt.all_steps())
    if not saved:
      raise FileNotFoundError(f"no complete checkpoint in {workdir / 'checkpoints'}")
    step = ckpt.latest_step() if step is None else step
    if step not in saved:
      raise FileNotFoundError(f"no checkpoint at step {step} in {workdir / 'checkpoints'}; saved "
                              f"steps: {saved}")
    data_state = ckpt.restore_data_state(step)
    model = models.create(models.model_config(config), tuple(data_state["image_shape"]),
                          data_state["num_classes"], tokenizer=tokenizer)
    mesh = sharding_lib.create_mesh((-1, 1, 1))
    tx = step_lib.create_optimizer(config.optim, models.lr_scales(model), config.num_train_steps)
    ema = config.get("ema")
    abstract, shardings = step_lib.state_shardings(
        model, tx, mesh, num_phema=len(ema.sigma_rels) if posthoc.enabled(ema) else 0)
    state, _ = ckpt.restore(step, checkpoint_lib.abstract_with_shardings(abstract, shardings))
  finally:
    ckpt.close()
  return Trained(config, model, posthoc.chosen(ema, workdir, state, step), data_state, step,
                 tokenizer)
