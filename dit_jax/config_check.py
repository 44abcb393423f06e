"""Every config check, in one fixed order, before any data is read or anything compiles.

Each concept keeps its check next to its factory (`models.check_config`, `train_step.check_config`,
`evaluators.check_config`, `objectives.from_config`, ...) and reads only its own sub-config; this
module hands each its part of the root config, decides the order and runs them:

1. `check(config)`: fields that need neither data nor devices (renamed fields first);
2. `check_with_data(config, source)`: the model and the evaluators against the data's shape (a
   text run's source is the caption source: `captions.training_source` checked the class names,
   template and caption length when it built it);
3. `check_devices(batch_size, eval.fid, mesh)`: batch sizes against the mesh, right after the mesh
   exists.

`train.train_and_evaluate` runs all three before it builds a feature network or compiles; the sweep
runs 1 and 2 for every member up front.
"""
from __future__ import annotations

import difflib
import importlib.util
import pathlib
import sys

from flax import traverse_util

from dit_jax import errors
from dit_jax import models
from dit_jax import objectives
from dit_jax import sharding as sharding_lib
from dit_jax.data import captions
from dit_jax.data import splits
from dit_jax.evaluation import evaluators
from dit_jax.training import distributed
from dit_jax.training import phema
from dit_jax.training import train_step

# Fields that were renamed: an old name in a config file or on the command line is an error that
# names the new one, never silently ignored.
RENAMED = {
    "eval_every_steps": "eval.grid.every_steps and eval.fid.every_steps",
    "eval.num_grid_samples": "eval.grid.num_samples",
    "eval.respacing": "eval.grid.respacing and eval.fid.respacing",
    "eval.cfg_scale": "eval.grid.cfg_scale",
    "eval.fid_num_samples": "eval.fid.num_samples",
    "eval.fid_batch_size": "eval.fid.batch_size",
    "eval.fid_cfg_scale": "eval.fid.cfg_scale",
    "eval.feature_network": "eval.fid.feature_network",
    "eval.fid_reference": "eval.fid.reference",
    "eval.fid_reference_size": "eval.fid.reference_size",
    "eval.fid_cache_dir": "eval.fid.cache_dir",
}


def renamed_message(old: str) -> str:
  return f"config field {old} was renamed: use {RENAMED[old]}"


def _load_config_file(spec: str):
  """The config `--config=PATH[:PRESET]` names, loaded as ml_collections' config_flags would."""
  path, _, preset = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise ValueError(f"--config={spec}: no config file {path!r} (from {pathlib.Path.cwd()})")
  module_spec = importlib.util.spec_from_file_location("_dit_jax_checked_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _last_overrides(argv) -> list:
  """argv with each `--config.FIELD` override kept only where it is given last: ml_collections
  appends a repeated tuple override to the first (`sweep.patches=(8,4)` then `=(2,)` gave
  (8, 4, 2)); the last value wins, as it does for every scalar flag."""
  def field(a):
    return a[len("--config."):].split("=", 1)[0] if a.startswith("--config.") else None
  last = {field(a): i for i, a in enumerate(argv) if field(a)}
  out, skip = [], False
  for i, a in enumerate(argv):
    if skip:
      skip = False
      continue
    if field(a) and last[field(a)] != i:
      skip = "=" not in a  # the two-token form `--config.FIELD VALUE`
      continue
    out.append(a)
  return out


def checked_argv(prog: str) -> None:
  """sys.argv[1:] through check_argv before flag parsing; a bad override is one line naming it,
  exit code 2 (errors.py)."""
  try:
    sys.argv[1:] = check_argv(sys.argv[1:])
  except ValueError as e:
    errors.exit_user_error(prog, e)


def check_argv(argv) -> list:
  """The command line before flag parsing: the config file exists, and every `--config.FIELD`
  override is a field of it (renamed ones name their new name, typos the nearest fields), so a
  mistyped flag is one line, not a traceback after the config dump. Returns argv with repeated
  overrides reduced to their last value."""
  argv = _last_overrides(list(argv))
  specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  specs += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
  fields = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  for field in fields:
    if field in RENAMED:
      raise ValueError(renamed_message(field))
  if not specs:
    return argv
  try:
    config = _load_config_file(specs[-1])
  except ValueError as e:  # an unknown preset
    raise ValueError(f"--config={specs[-1]}: {e}") from None
  for field in fields:
    if not _has(config, field):
      leaves = traverse_util.flatten_dict(config.to_dict(), sep=".")
      same_depth = sorted(k for k in leaves if k.count(".") == field.count("."))
      close = difflib.get_close_matches(field, same_depth, n=3, cutoff=0.6)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      raise ValueError(f"--config.{field}: {specs[-1]} has no field {field!r}{hint}")
  return argv


def _has(node, dotted: str) -> bool:
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def check(config) -> None:
  """Config errors that need no data or devices, in a fixed order."""
  for old in RENAMED:
    if _has(config, old):
      raise ValueError(renamed_message(old))
  if config.batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {config.batch_size}")
  if config.num_train_steps < 0:
    raise ValueError(f"num_train_steps must be >= 0, got {config.num_train_steps}")
  if config.log_every_steps < 1:
    raise ValueError(f"log_every_steps must be >= 1, got {config.log_every_steps}")
  if config.checkpoint_every_steps < 0 or config.keep_checkpoints < 0:
    raise ValueError(f"checkpoint_every_steps and keep_checkpoints must be >= 0 (0 = never / all), "
                     f"got {config.checkpoint_every_steps}, {config.keep_checkpoints}")
  if config.max_nonfinite_streak < 1:
    raise ValueError(f"max_nonfinite_streak must be >= 1, got {config.max_nonfinite_streak}")
  if config.seed < 0:
    raise ValueError(f"seed must be >= 0, got {config.seed}")
  if len(tuple(config.mesh_shape)) != len(sharding_lib.MESH_AXES):
    raise ValueError(f"mesh_shape {tuple(config.mesh_shape)} must have {len(sharding_lib.MESH_AXES)}"
                     f" entries, for axes {sharding_lib.MESH_AXES}")
  train_step.check_config(config.optim, config.ema_decay)
  captions.check_config(config.get("text"), config.class_conditional)
  models.check_config(models.model_config(config))  # with text on: whether it reads a context
  objectives.from_config(config)  # diffusion.* / flow.*, and the samplers of eval.grid, eval.fid
  splits.check_config(config.data)
  evaluators.check_config(config.eval, config.data.val_size)
  phema.check_config(config.ema, config.eval.val, config.data.val_size)
  distributed.check_config(config.distributed)


def check_with_data(config, source):
  """The model for this data (returned, validated) and the evaluators that depend on it."""
  captions.check_with_data(config.get("text"), source)
  model = models.create(models.model_config(config), source.image_shape, source.num_classes,
                        tokenizer=captions.tokenizer_of(source))
  evaluators.check_with_data(config.eval, config.data, source)
  return model


def check_devices(batch_size: int, q, mesh) -> None:
  """Batch sizes (the training batch, `q`: config.eval.fid) against the mesh's data-parallel
  size."""
  sharding_lib.check_batch(batch_size, mesh)
  n = sharding_lib.data_parallel_size(mesh)
  if q.every_steps and q.num_samples and q.batch_size % n:
    raise ValueError(f"eval.fid.batch_size={q.batch_size} is not divisible by the data-parallel "
                     f"size {n}")
