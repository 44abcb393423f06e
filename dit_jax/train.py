"""Training: the train state, the (sharded) train step and the loop with checkpoints and logging.

The core is pure: `train_step(state, batch) -> (state, metrics)`. Everything that touches the
outside world (data, checkpoints, signals, metric writers, sample grids) lives in
`train_and_evaluate`. The same code runs on one CPU and on a multi-host mesh: shardings come from
the parameters' logical axis names (sharding.py) via `jax.eval_shape`, before any parameter exists.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax import diffusion as diffusion_lib
from dit_jax import dit as dit_lib
from dit_jax import flops as flops_lib
from dit_jax import sampling
from dit_jax import sharding as sharding_lib

if TYPE_CHECKING:
  import ml_collections

# The loop's I/O dependencies (ml_collections, clu, tensorflow via data/clu, orbax) are imported where
# used, so the pure parts (state, step, sampling) import on a machine with only jax/flax/optax.

# Dense peak FLOP/s per chip for MFU, by jax device_kind substring (bf16 unless noted).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)


class NonFiniteError(RuntimeError):
  """Training produced non-finite losses or gradients too many steps in a row."""


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


def dtype_of(name: str):
  """'float32' / 'bfloat16' / 'float16' -> jnp dtype, with a clear error."""
  table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in table:
    raise ValueError(f"unknown dtype {name!r}; use one of {list(table)}")
  return table[name]


def create_model(config: ml_collections.ConfigDict, image_shape, num_classes: int):
  """The DiT (or U-Net, for names 'UNet-*') the config names, sized to the data."""
  h, w, c = image_shape
  if h != w:
    raise ValueError(f"DiT needs square inputs, the data gives {h}x{w}")
  if config.model.startswith("UNet-"):
    from dit_jax import unet  # pylint: disable=g-import-not-at-top
    return unet.create(config.model, input_size=h, in_channels=c,
                       num_classes=num_classes if config.class_conditional else 0,
                       class_dropout_prob=config.class_dropout_prob, learn_sigma=config.learn_sigma,
                       dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype))
  impl = config.attention_impl or None
  if impl not in (None, "xla", "cudnn"):
    raise ValueError(f"attention_impl {impl!r}: use '' (jax chooses), 'xla' or 'cudnn'")
  size, patch = dit_lib.parse_name(config.model)
  row = dit_lib.SIZES[size]
  # Width/depth/heads overrides give the off-table shapes of scaling-law sweeps.
  model = dit_lib.DiT(
      input_size=h, in_channels=c, patch_size=patch, depth=config.depth or row.depth,
      hidden_size=config.hidden_size or row.hidden_size, num_heads=config.num_heads or row.num_heads,
      num_classes=num_classes if config.class_conditional else 0,
      class_dropout_prob=config.class_dropout_prob, learn_sigma=config.learn_sigma,
      conditioning=config.conditioning, attention_impl=impl, scan_layers=config.scan_layers,
      remat=config.remat, dtype=dtype_of(config.dtype), param_dtype=dtype_of(config.param_dtype))
  model.validate()
  return model


def create_diffusion(config: ml_collections.ConfigDict, respacing="") -> diffusion_lib.Diffusion:
  return diffusion_lib.create(schedule=config.diffusion.schedule,
                              timesteps=config.diffusion.timesteps, respacing=respacing,
                              learn_sigma=config.learn_sigma,
                              prediction=config.diffusion.prediction)


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
  """Constant lr (the paper), after an optional linear warm-up."""
  if optim.warmup_steps > 0:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, optim.warmup_steps), optax.constant_schedule(optim.lr)],
        [optim.warmup_steps])
  return optax.constant_schedule(optim.lr)


def create_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW (torch's defaults b1 0.9, b2 0.999, eps 1e-8), optional global-norm clipping."""
  tx = optax.adamw(learning_rate_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                   weight_decay=optim.weight_decay)
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx


def init_params(model, key):
  """Boxed params of a DiT or a U-Net."""
  if isinstance(model, dit_lib.DiT):
    return dit_lib.init_params(model, key)
  from dit_jax import unet  # pylint: disable=g-import-not-at-top
  return unet.init_params(model, key)


def _boxed_state(model: dit_lib.DiT, tx, seed_key) -> TrainState:
  init_key, train_key = jax.random.split(seed_key)
  params = init_params(model, init_key)  # logically partitioned boxes
  zero = jnp.zeros((), jnp.int32)
  # EMA starts as a copy of the initial params, as DiT's train.py.
  return TrainState(step=zero, params=params, ema_params=params, opt_state=tx.init(params),
                    rng=train_key, nonfinite_streak=zero, nonfinite_total=zero)


def state_shardings(model: dit_lib.DiT, tx, mesh, rules=sharding_lib.DEFAULT_RULES):
  """(abstract unboxed TrainState, its NamedShardings), from eval_shape: no parameter is built."""
  abstract_boxed = jax.eval_shape(functools.partial(_boxed_state, model, tx),
                                  jax.random.PRNGKey(0))
  shardings = sharding_lib.logical_shardings(abstract_boxed, mesh, rules)
  return nn.unbox(abstract_boxed), shardings


def create_train_state(model: dit_lib.DiT, tx, mesh, seed: int,
                       rules=sharding_lib.DEFAULT_RULES) -> tuple:
  """(TrainState initialised directly into its shardings, shardings)."""
  _, shardings = state_shardings(model, tx, mesh, rules)
  init = jax.jit(lambda key: nn.unbox(_boxed_state(model, tx, key)), out_shardings=shardings)
  return init(jax.random.PRNGKey(seed)), shardings


def _per_example_keys(key, batch: int):
  """Example i's key depends only on (key, i): independent of the batch's sharding and device."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def draw_noise_and_t(k_noise, k_t, shape, num_timesteps: int) -> tuple:
  """Per-example noise and timesteps: example i's draw depends on (key, i) only, so every example
  on every device differs, and the values do not depend on how the batch is sharded."""
  noise = sampling.per_example_normal(k_noise, shape)
  t_B = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps, jnp.int32))(
      _per_example_keys(k_t, shape[0]))
  return noise, t_B


def train_step(state: TrainState, batch: dict, *, model: dit_lib.DiT,
               diffusion: diffusion_lib.Diffusion, tx: optax.GradientTransformation,
               ema_decay: float, lr_fn: Optional[optax.Schedule] = None,
               batch_spec: Optional[NamedSharding] = None) -> tuple:
  """One AdamW step on the diffusion loss; a non-finite loss or gradient skips the update."""
  x0 = batch["image"]
  y = batch["label"] if model.num_classes else None
  key = jax.random.fold_in(state.rng, state.step)
  k_noise, k_t, k_drop = jax.random.split(key, 3)
  noise, t_B = draw_noise_and_t(k_noise, k_t, x0.shape, diffusion.num_timesteps)
  if batch_spec is not None:
    noise = jax.lax.with_sharding_constraint(noise, batch_spec)
    t_B = jax.lax.with_sharding_constraint(
        t_B, NamedSharding(batch_spec.mesh, P(batch_spec.spec[0])))

  def loss_fn(params):
    def model_fn(x_t, t_orig):
      return model.apply({"params": params}, x_t, t_orig, y, train=True,
                         rngs={"label_dropout": k_drop})
    terms = diffusion.training_losses(model_fn, x0, t_B, noise)
    return jnp.mean(terms["loss"]), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: e * ema_decay + (1.0 - ema_decay) * p, state.ema_params, params)
    return state.replace(params=params, ema_params=ema, opt_state=opt_state)

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


def batch_shardings(mesh) -> dict:
  return {"image": sharding_lib.batch_sharding(mesh),
          "label": NamedSharding(mesh, P(sharding_lib.BATCH_AXES))}


def jit_train_step(model, diffusion, tx, mesh, shardings, ema_decay: float,
                   lr_fn: Optional[optax.Schedule] = None) -> Callable:
  """train_step jitted with state/batch shardings and the old state's buffers donated."""
  fn = functools.partial(train_step, model=model, diffusion=diffusion, tx=tx, ema_decay=ema_decay,
                         lr_fn=lr_fn, batch_spec=sharding_lib.batch_sharding(mesh))
  return jax.jit(fn, in_shardings=(shardings, batch_shardings(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))


# --- sampling for evaluation and tools/sample.py ---------------------------------------------

def make_sample_fn(model: dit_lib.DiT, diffusion: diffusion_lib.Diffusion, *, sampler: str = "ddpm",
                   cfg_scale: float = 1.0, guide_channels: Optional[int] = None,
                   eta: float = 0.0, mesh=None) -> Callable:
  """jitted (params, labels_B, rng, x_shape) -> samples; cfg_scale > 1 uses guidance.

  With `mesh` the samples come back replicated, so every process can read them (multi-host).
  """
  if sampler not in ("ddpm", "ddim"):
    raise ValueError(f"unknown sampler {sampler!r}; use 'ddpm' or 'ddim'")
  out = sharding_lib.replicated(mesh) if mesh is not None else None

  @functools.partial(jax.jit, static_argnums=(3,), out_shardings=out)
  def sample(params, y_B, rng, shape):
    if model.num_classes and cfg_scale != 1.0:
      fn = sampling.cfg_model_fn(
          lambda x, t, y: model.apply({"params": params}, x, t, y), y_B, model.num_classes,
          cfg_scale, guide_channels)
    else:
      fn = lambda x, t: model.apply({"params": params}, x, t, y_B if model.num_classes else None)
    if sampler == "ddpm":
      return sampling.ddpm_sample(fn, diffusion, shape, rng)
    return sampling.ddim_sample(fn, diffusion, shape, rng, eta=eta)

  return sample


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 as ADM: clamp(127.5 x + 128)."""
  return np.clip(127.5 * np.asarray(x, np.float32) + 128.0, 0, 255).astype(np.uint8)


def save_grid(images_BxHxWxC: np.ndarray, path, ncol: Optional[int] = None) -> None:
  """Writes uint8 images as one PNG grid (2-pixel gaps)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  x = np.asarray(images_BxHxWxC)
  b, h, w, c = x.shape
  ncol = ncol or int(np.ceil(np.sqrt(b)))
  nrow = -(-b // ncol)
  grid = np.zeros((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), np.uint8)
  for i in range(b):
    r, q = divmod(i, ncol)
    grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = x[i]
  Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


# --- the loop -------------------------------------------------------------------------------

def maybe_initialize_distributed(dist: ml_collections.ConfigDict) -> None:
  """jax.distributed: explicit coordinator from the config, or automatic on SLURM / TPU pods."""
  if jax.distributed.is_initialized():
    return
  if dist.coordinator_address:
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                               num_processes=dist.num_processes, process_id=dist.process_id)
  elif dist.auto and (int(os.environ.get("SLURM_NTASKS", "1")) > 1
                      or "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS"
                      in os.environ or os.environ.get("DIT_JAX_DISTRIBUTED") == "1"):
    # DIT_JAX_DISTRIBUTED=1 (tools/launch_tpu_pod.sh): a Cloud TPU VM pod, which JAX detects itself.
    jax.distributed.initialize()


def peak_flops_per_device(config) -> float:
  """Configured peak FLOP/s per device, else looked up by device kind (0 if unknown)."""
  if config.peak_tflops_per_device > 0:
    return config.peak_tflops_per_device * 1e12
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in kind.lower():
      return tflops * 1e12
  return 0.0


class JsonlWriter:
  """A clu MetricWriter that appends one JSON object per write to a file."""

  def __init__(self, path):
    self._f = open(path, "a", buffering=1)

  def write_scalars(self, step, scalars):
    self._f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    self._f.write(json.dumps({"step": int(step), **texts}) + "\n")

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass

  def write_hparams(self, hparams):
    self._f.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


def create_writer(workdir):
  """TensorBoard + logging (process 0 only) and metrics.jsonl in the workdir."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  class _Jsonl(JsonlWriter, metric_writers.MetricWriter):
    pass

  default = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() > 0:
    return default
  return metric_writers.MultiWriter([default, _Jsonl(pathlib.Path(workdir) / "metrics.jsonl")])


def validate_config(config) -> None:
  """Config errors that need no data or devices."""
  if config.batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {config.batch_size}")
  if config.num_train_steps < 0:
    raise ValueError(f"num_train_steps must be >= 0, got {config.num_train_steps}")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
  if config.max_nonfinite_streak < 1:
    raise ValueError("max_nonfinite_streak must be >= 1")
  if config.model.startswith("UNet-"):
    from dit_jax import unet  # pylint: disable=g-import-not-at-top
    unet.parse_name(config.model)
  else:
    dit_lib.parse_name(config.model)
  if config.conditioning not in dit_lib.CONDITIONINGS:
    raise ValueError(f"unknown conditioning {config.conditioning!r}; choose from "
                     f"{dit_lib.CONDITIONINGS}")


class _Preemption:
  """SIGTERM sets a flag (single process) or jax's preemption sync point (multi-host)."""

  def __init__(self):
    self.requested = False
    self._old = None
    if jax.process_count() == 1:
      try:
        self._old = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread
        self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is not running
        return False
    return self.requested

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _finite_mean(values) -> float:
  """Mean over the finite values (skipped steps excluded); NaN if there are none."""
  values = np.asarray(values, np.float64)
  ok = np.isfinite(values)
  return float(values[ok].mean()) if ok.any() else float("nan")


def _batch_hash(batch) -> str:
  """sha256 of this process's part of a batch (its shards in device order)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for k in sorted(batch):
    for shard in sorted(batch[k].addressable_shards, key=lambda s: s.device.id):
      h.update(np.asarray(shard.data).tobytes())
  return h.hexdigest()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from workdir's latest checkpoint), logs, samples, checkpoints; returns state."""
  wall_t0 = time.perf_counter()
  from dit_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from dit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  validate_config(config)
  maybe_initialize_distributed(config.distributed)
  workdir = pathlib.Path(workdir)
  lead = jax.process_index() == 0
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  source = data_lib.create_source(config.data)
  model = create_model(config, source.image_shape, source.num_classes)
  diffusion = create_diffusion(config)
  mesh = sharding_lib.create_mesh(config.mesh_shape)
  sharding_lib.check_batch(config.batch_size, mesh)
  tx = create_optimizer(config.optim)
  rules = tuple(tuple(r) for r in config.logical_axis_rules) if config.logical_axis_rules else \
      sharding_lib.DEFAULT_RULES
  abstract_state, shardings = state_shardings(model, tx, mesh, rules)
  pipeline = data_lib.Pipeline(source, config.batch_size, config.seed,
                               sharding_lib.batch_sharding(mesh))
  logging.info("data: %s", data_lib.describe(source))
  logging.info("mesh: %s over %d devices, %d processes", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", config.keep_checkpoints,
                                     async_save=config.async_checkpoints)
  # What a resumed run and tools/sample.py need besides the arrays.
  data_state = dict(seed=config.seed, global_batch_size=config.batch_size,
                    image_shape=list(source.image_shape), num_classes=source.num_classes,
                    kind=source.kind, scaling_factor=source.scaling_factor)
  latest = ckpt.latest_step()
  if latest is not None:
    state, saved = ckpt.restore(
        latest, checkpoint_lib.abstract_with_shardings(abstract_state, shardings))
    if (saved["seed"], saved["global_batch_size"]) != (config.seed, config.batch_size):
      raise ValueError(f"checkpoint in {ckpt.directory} was written with data seed/batch "
                       f"{saved['seed']}/{saved['global_batch_size']}, the config says "
                       f"{config.seed}/{config.batch_size}; use a new workdir")
    logging.info("restored step %d from %s", latest, ckpt.directory)
  else:
    state, _ = create_train_state(model, tx, mesh, config.seed, rules)
  start = int(jax.device_get(state.step))

  writer = create_writer(workdir)
  from clu import parameter_overview, periodic_actions  # pylint: disable=g-import-not-at-top
  if start == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if not isinstance(v, (dict, list, tuple))})

  lr_fn = learning_rate_schedule(config.optim)
  step_fn = jit_train_step(model, diffusion, tx, mesh, shardings, config.ema_decay, lr_fn)
  bs = batch_shardings(mesh)
  batch_abstract = dict(
      image=jax.ShapeDtypeStruct(pipeline.image_shape, jnp.float32, sharding=bs["image"]),
      label=jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=bs["label"]))
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch_abstract).compile()
  compile_s = time.perf_counter() - t0
  # The params' global norm is logged at log steps only: a pass over every parameter is a
  # noticeable share of a small model's step on CPU.
  param_norm = jax.jit(optax.tree.norm, out_shardings=sharding_lib.replicated(mesh))
  gflops = flops_lib.model_gflops(model)
  peak = peak_flops_per_device(config) * jax.device_count()
  n_params = flops_lib.count_params(state.params)
  logging.info("%s: %.2fM params, %.3f Gflops/image, train step compiled in %.1f s",
               config.model, n_params / 1e6, gflops, compile_s)
  writer.write_scalars(start, dict(compile_time_s=compile_s, num_params=n_params,
                                   gflops_per_image=gflops))

  sample_fn, evaluator = None, None
  if config.eval_every_steps > 0:
    sample_fn = make_sample_fn(model, create_diffusion(config, config.eval.respacing),
                               cfg_scale=config.eval.cfg_scale, mesh=mesh)
    if config.eval.fid_num_samples > 0:
      evaluator = _create_evaluator(config, source, model, mesh)
  hooks = []
  if lead:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                 writer=writer, every_steps=config.log_every_steps))
  preempt = _Preemption()
  hash_file = open(workdir / f"batch_hashes.{jax.process_index()}.jsonl", "a") \
      if config.record_batch_hashes else None

  def save(step, force=False):
    if ckpt.save(step, state, dict(data_state, next_step=step), force=force):
      logging.info("checkpoint %d started", step)

  def check_streak(metrics, upto):
    streak = int(jax.device_get(metrics["nonfinite_streak"]))
    if streak >= config.max_nonfinite_streak:
      ckpt.wait()
      raise NonFiniteError(
          f"{streak} consecutive steps (up to step {upto}) had a non-finite loss or gradient; "
          f"their updates were skipped. The last checkpoint ({ckpt.latest_step()}) holds the last "
          f"good state. Lower the learning rate, set optim.grad_clip, or compute in float32.")
    return streak

  pending, prev, window_t0, window_start = [], None, time.perf_counter(), start
  try:
    for step, batch in zip(range(start, config.num_train_steps), pipeline.iterate(start)):
      if hash_file is not None:
        hash_file.write(json.dumps({"step": step, "sha256": _batch_hash(batch)}) + "\n")
        hash_file.flush()
      state, metrics = compiled(state, batch)
      if prev is not None:  # the previous step's streak, read while the device runs this one
        check_streak(prev, step - 1)
      prev = metrics
      pending.append(metrics)
      done = step + 1
      for hook in hooks:
        hook(done)
      if done % config.log_every_steps == 0 or done == config.num_train_steps:
        host = jax.device_get(pending)
        dt = time.perf_counter() - window_t0
        summary = {k: _finite_mean([m[k] for m in host]) for k in host[-1]
                   if k not in ("nonfinite_streak", "nonfinite_total", "skipped")}
        summary["skipped"] = float(sum(m["skipped"] for m in host))
        summary["nonfinite_total"] = float(host[-1]["nonfinite_total"])
        summary["param_norm"] = float(param_norm(state.params))
        steps_per_s = (done - window_start) / dt
        summary.update(steps_per_sec=steps_per_s,
                       images_per_sec=steps_per_s * config.batch_size)
        if peak > 0:
          summary["mfu"] = 6.0 * gflops * 1e9 * config.batch_size * steps_per_s / peak
        writer.write_scalars(done, summary)
        pending, window_t0, window_start = [], time.perf_counter(), done
      # Never checkpoint while updates are being skipped: the last good checkpoint stays newest.
      if (config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0
          and int(jax.device_get(metrics["nonfinite_streak"])) == 0):
        save(done)
      if sample_fn is not None and (done % config.eval_every_steps == 0
                                    or done == config.num_train_steps):
        _evaluate(config, sample_fn, state, pipeline, source, model, done, workdir, writer)
        if evaluator is not None:
          t0 = time.perf_counter()
          scores = evaluator["run"](state.ema_params, done)
          scores["eval_time_s"] = time.perf_counter() - t0
          scores["wall_s"] = time.perf_counter() - wall_t0  # since this run (or resume) began
          writer.write_scalars(done, scores)
          logging.info("step %d: %s", done, scores)
      if preempt.reached(done):
        logging.warning("SIGTERM: saving step %d and exiting", done)
        if int(jax.device_get(metrics["nonfinite_streak"])) == 0:
          save(done, force=True)
        break
    if prev is not None:
      check_streak(prev, int(jax.device_get(state.step)) - 1)
    final = int(jax.device_get(state.step))
    if not preempt.requested and final == config.num_train_steps and config.checkpoint_every_steps:
      save(final, force=True)  # the end of training is always kept
  finally:
    ckpt.close()
    writer.flush()
    preempt.restore()
    if hash_file is not None:
      hash_file.close()
  return state


def _evaluate(config, sample_fn, state, pipeline, source, model, step, workdir, writer):
  """Samples a grid with the EMA params and writes it as PNG (process 0)."""
  n = config.eval.num_grid_samples
  labels = np.arange(n, dtype=np.int32) % max(source.num_classes, 1)
  shape = (n,) + tuple(pipeline.image_shape[1:])
  # Host (numpy) inputs: on a multi-host mesh jit treats them as replicated global values.
  rng = np.asarray(jax.random.fold_in(jax.random.PRNGKey(config.seed), 1_000_003))
  t0 = time.perf_counter()
  x = np.asarray(sample_fn(state.ema_params, labels, rng, shape))
  if source.kind == "latents":
    if not config.eval.vae_path:
      logging.info("step %d: latents sampled; set eval.vae_path to decode grids", step)
      return
    x = decode_latents(config.eval.vae_path, x, source.scaling_factor)
  if jax.process_index() == 0:
    out = pathlib.Path(workdir) / "samples"
    out.mkdir(exist_ok=True)
    save_grid(to_uint8(x), out / f"step_{step:08d}.png")
  writer.write_scalars(step, dict(sample_time_s=time.perf_counter() - t0))


def _create_evaluator(config, source, model, mesh) -> dict:
  """The sample-quality evaluator (evaluator.py) on EMA samples: {'run': (params, step) -> metrics}.

  Pixel data: reference statistics of the training source, cached per dataset/resolution/network.
  Latents: eval.fid_reference must name reference statistics (e.g. ADM's VIRTUAL_imagenet256 npz)
  and eval.vae_path the decoder.
  """
  from dit_jax import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from dit_jax import fid  # pylint: disable=g-import-not-at-top
  from dit_jax import inception  # pylint: disable=g-import-not-at-top
  ev = config.eval
  latents = source.kind == "latents"
  if latents and not (ev.fid_reference and ev.vae_path):
    raise ValueError("eval.fid_num_samples > 0 on latents needs eval.fid_reference (reference "
                     "statistics .npz, e.g. ADM's VIRTUAL_imagenet256_labeled.npz) and "
                     "eval.vae_path (the SD-VAE to decode samples)")
  n_ref = source.num_examples if ev.fid_reference_size <= 0 else min(ev.fid_reference_size,
                                                                      source.num_examples)

  def labelled_images():
    idx = np.arange(n_ref)
    return source.read(idx, np.zeros(n_ref, bool))

  data_cfg = dict(config.data.to_dict(), image_size=source.image_shape[0])
  name, feature_fn = fid.feature_network(
      data_cfg, ev.feature_network, cache_dir=ev.fid_cache_dir or None,
      labelled_images=None if latents else labelled_images, log=logging.info)
  if ev.fid_reference:
    reference = fid.load_reference(ev.fid_reference, name, feature_fn, mesh=mesh)
  else:
    cache = ev.fid_cache_dir or str(inception.default_cache_dir())
    reference = fid.cached_reference(cache, source.name, config.data.split, source.image_shape[0],
                                     name, feature_fn, lambda: labelled_images()[0], mesh=mesh,
                                     batch_size=ev.fid_batch_size)
  evaluator = evaluator_lib.Evaluator(
      name, feature_fn, reference, ev.fid_num_samples, ev.fid_batch_size,
      num_classes=model.num_classes or None, mesh=mesh, data_axis=sharding_lib.BATCH_AXES,
      progress=False)
  # Samples stay sharded over the batch (no replicated output); guidance as the paper's FID (1.5).
  sample = make_sample_fn(model, create_diffusion(config, ev.respacing), cfg_scale=ev.fid_cfg_scale)
  shape = (ev.fid_batch_size,) + tuple(source.image_shape)

  def run(params, step):
    def sample_fn(rng, labels):
      if labels is None:
        labels = np.zeros((ev.fid_batch_size,), np.int32)
      x = sample(params, labels, rng, shape)
      return decode_latents(ev.vae_path, x, source.scaling_factor) if latents else x
    return evaluator.run(sample_fn, jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step))

  return {"run": run}


@functools.lru_cache(maxsize=1)
def _vae(path):
  from dit_jax import vae  # pylint: disable=g-import-not-at-top
  module, params = vae.load_pretrained(path)
  return module, params, jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))


def decode_latents(vae_path, z, scaling_factor):
  """DiT latents -> images in [-1, 1] through the SD VAE."""
  _, params, decode = _vae(vae_path)
  return np.asarray(decode(params, jnp.asarray(z) / scaling_factor))
