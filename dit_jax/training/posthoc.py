"""Post-hoc EMA in the training loop: snapshots of the tracked EMAs, the params the evaluators see,
and the choice of the final profile (the math is phema.py).

With `ema.sigma_rels` set, the tracked EMAs (TrainState.phema) are saved at every
ceil(num_train_steps / ema.num_snapshots) steps and at the last one to
`workdir/phema/<step:08d>.npz` (one file per step holding every tracked profile; written
atomically by process 0, so a killed run that resumes re-writes at most the one it missed).
Intermediate evaluations use the tracked EMA of the last σ_rel; at the last step every
`ema.candidates` profile is reconstructed from the snapshots, scored with the validation loss, and
the lowest is evaluated and saved as `workdir/phema/selection.json` (tools/sample.py and
`train.load_trained` read it). Every evaluation records its profile: `ema` ('decay' | 'posthoc'),
`ema_decay` or `ema_sigma_rel`, and on the final one `ema_selection` ({σ_rel: val_loss}) and
`ema_condition` (the worst condition number of the solves).
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from dit_jax import files
from dit_jax.training import phema as phema_lib

SNAPSHOT_DIR = "phema"
SELECTION_FILE = "selection.json"


def enabled(ema) -> bool:
  """Whether post-hoc EMA is on (`ema`: config.ema, None for a config made before it existed)."""
  return ema is not None and bool(tuple(ema.sigma_rels))


def gammas(ema) -> tuple:
  """The exponents γ of the tracked profiles (() when off)."""
  return tuple(float(g) for g in phema_lib.sigma_rel_to_gamma(list(ema.sigma_rels))) \
      if enabled(ema) else ()


def snapshot_due(ema, step: int, last: int) -> bool:
  if not enabled(ema) or step <= 0:
    return False
  every = math.ceil(last / ema.num_snapshots) if last else 0
  return step == last or (every > 0 and step % every == 0)


def snapshot_path(workdir, step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / SNAPSHOT_DIR / f"{step:08d}.npz"


def write_snapshot(ema, workdir, step: int, phema: tuple, only_if_missing: bool = False) -> None:
  """Saves the tracked EMAs after `step` (every process takes part; process 0 writes)."""
  path = snapshot_path(workdir, step)
  if only_if_missing and path.exists():
    return
  trees = multihost_utils.process_allgather(phema, tiled=True) if jax.process_count() > 1 \
      else jax.device_get(phema)
  if jax.process_index() == 0:
    arrays = {"sigma_rels": np.asarray(tuple(ema.sigma_rels), np.float64)}
    for i, tree in enumerate(trees):
      for k, v in traverse_util.flatten_dict(tree, sep="/").items():
        arrays[f"{i}/{k}"] = np.asarray(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_save_npz(path, **arrays)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"dit_jax.posthoc.write_snapshot.{step}")


def _load(path, index: int):
  """Profile `index` of a snapshot file as a tree of functions, each loading its one leaf (so a
  reconstruction holds one leaf of each snapshot at a time, not whole trees)."""
  def read(f):
    prefix = f"{index}/"
    return traverse_util.unflatten_dict(
        {k[len(prefix):]: lambda k=k: files.read_npz(path, lambda g: np.asarray(g[k]))
         for k in f.files if k.startswith(prefix)}, sep="/")
  return files.read_npz(path, read)


def read_snapshots(workdir, upto: int) -> list:
  """The phema.Snapshot of every saved (step, σ_rel) with 0 < step <= upto; params load lazily."""
  out = []
  for path in sorted((pathlib.Path(workdir) / SNAPSHOT_DIR).glob("*.npz")):
    if not path.stem.isdigit() or not 0 < int(path.stem) <= upto:
      continue
    sigma_rels = files.read_npz(path, lambda f: [float(s) for s in f["sigma_rels"]])
    out += [phema_lib.Snapshot(int(path.stem), s, lambda p=path, i=i: _load(p, i))
            for i, s in enumerate(sigma_rels)]
  return out


def reconstruct(workdir, step: int, sigma_rels) -> tuple:
  """({σ_rel: numpy params} at `step` from the snapshots up to it, condition number)."""
  snapshots = read_snapshots(workdir, step)
  if not snapshots or max(s.step for s in snapshots) != step:
    raise FileNotFoundError(f"no post-hoc EMA snapshot of step {step} in "
                            f"{pathlib.Path(workdir) / SNAPSHOT_DIR}")
  return phema_lib.reconstruct(snapshots, sigma_rels)


def like(tree, reference):
  """Numpy `tree` as global arrays laid out as `reference`'s (device arrays)."""
  return jax.tree.map(lambda x, r: jax.make_array_from_callback(
      x.shape, r.sharding, lambda idx, x=x: np.asarray(x, r.dtype)[idx]), tree, reference)


def provenance(ema, ema_decay: float) -> dict:
  """The run-level EMA fields of a results row (the evaluated profile is per row)."""
  if enabled(ema):
    return dict(ema="posthoc", ema_tracked=[float(s) for s in ema.sigma_rels])
  return dict(ema="decay", ema_decay=ema_decay)


class Profile:
  """The params the evaluators see at a step, and the fields that say which EMA they are."""

  def __init__(self, ema, ema_decay: float, workdir, last: int, val_evaluator):
    self._ema, self._decay, self._workdir, self._last = ema, ema_decay, workdir, last
    self._val = val_evaluator
    self._final = None  # (step, params, scalars, texts) of the selection, computed once

  def params(self, state, step: int) -> tuple:
    """(params, numeric fields, text fields) for the evaluations of `step`."""
    if not enabled(self._ema):
      return state.ema_params, dict(ema_decay=self._decay), dict(ema="decay")
    if step != self._last:
      sigma = float(self._ema.sigma_rels[-1])
      return state.phema[-1], dict(ema_sigma_rel=sigma), dict(ema="posthoc")
    if self._final is None or self._final[0] != step:
      self._final = (step, *self._select(state, step))
    return self._final[1:]

  def _select(self, state, step: int) -> tuple:
    """Reconstructs every candidate, scores it on the validation loss, keeps the lowest."""
    candidates = [float(s) for s in self._ema.candidates]
    trees, cond = reconstruct(self._workdir, step, candidates)
    losses = {}
    for sigma in candidates:
      losses[sigma] = float(self._val.run(like(trees[sigma], state.ema_params), step)["val_loss"])
    best = min(candidates, key=lambda s: (not math.isfinite(losses[s]), losses[s]))
    selection = {repr(s): v for s, v in losses.items()}
    logging.info("post-hoc EMA at step %d: val_loss by σ_rel %s, chose %s (condition %.3g)",
                 step, selection, best, cond)
    if jax.process_index() == 0:
      files.atomic_write_text(
          pathlib.Path(self._workdir) / SNAPSHOT_DIR / SELECTION_FILE,
          json.dumps(dict(step=step, sigma_rel=best, val_loss=selection, condition=cond)))
    return (like(trees[best], state.ema_params), dict(ema_sigma_rel=best, ema_condition=cond),
            dict(ema="posthoc", ema_selection=json.dumps(selection)))


def chosen(ema, workdir, state, step: int):
  """The params sampling uses at `step`: the selected profile when post-hoc EMA chose one there,
  else the last tracked profile (post-hoc on) or the traditional EMA."""
  if not enabled(ema):
    return state.ema_params
  path = pathlib.Path(workdir) / SNAPSHOT_DIR / SELECTION_FILE
  picked = json.loads(path.read_text()) if path.exists() else {}
  if picked.get("step") != step:
    return state.phema[-1]
  trees, _ = reconstruct(workdir, step, picked["sigma_rel"])
  return like(trees[float(picked["sigma_rel"])], state.ema_params)
