"""Config fingerprints: which fields of a training config can change a number, and the check that
refuses to resume (or extend, or merge) a run under a config that differs in one of them.

`fingerprint(config)` is a sha256 of every field outside `NOT_FINGERPRINTED`; results rows carry it
and re-runs compare fingerprints, never names alone.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

from flax import traverse_util

from dit_jax import files

# Fields that cannot change a result: where things go, how often they are logged or saved, how the
# work is laid out over devices and processes. Everything else is part of the fingerprint.
NOT_FINGERPRINTED = ("workdir", "distributed", "async_checkpoints", "keep_checkpoints",
                     "checkpoint_every_steps", "log_every_steps", "record_batch_hashes",
                     "peak_tflops_per_device", "mesh_shape", "logical_axis_rules",
                     "eval.fid.cache_dir", "data.num_workers", "data.max_in_memory_gb",
                     "data.tfds_probe_timeout_s", "data.tfds_data_dir")


def fingerprinted(config_json: str) -> dict:
  """The result-changing fields of a config (its JSON), flattened to dotted names."""
  flat = traverse_util.flatten_dict(json.loads(config_json), sep=".")
  # attention_impl='auto' hashes as '' (the default before 'auto'): on the CPU it computes exactly
  # that, so fingerprints of CPU runs did not change; like the platform, the per-backend pick is
  # not fingerprinted, and each results row records it (attention_impl, dense_backward).
  if flat.get("attention_impl") == "auto":
    flat["attention_impl"] = ""
  # Fields of a feature that is off change no number: leaving them out keeps the fingerprints of
  # runs made before the feature existed (and of committed rows) valid.
  off = []
  if flat.get("parameterization", "sp") == "sp":
    off += ["parameterization", "mup"]  # SP, the default: no μP block
  if not (flat.get("eval.fid.every_steps") and flat.get("eval.fid.num_samples")):
    # FID off: KID and FID∞ (computed from FID's features) are off too
    off += ["eval.fid.kid_subsets", "eval.fid.kid_subset_size", "eval.fid.fid_inf_points"]
  if flat.get("optim.schedule", "constant") == "constant":
    off += ["optim.schedule", "optim.cooldown_fraction"]  # the paper's constant lr
  if not flat.get("ema.sigma_rels"):
    off += ["ema"]  # the traditional EMA only: no post-hoc EMA block
  return {k: v for k, v in flat.items() if not _named(k, NOT_FINGERPRINTED + tuple(off))}


def _named(key: str, names) -> bool:
  """Whether the dotted `key` is one of `names` or a field inside one of them."""
  return any(key == n or key.startswith(n + ".") for n in names)


def fingerprint(config) -> str:
  """sha256 (16 hex digits) of the result-changing fields of a training config."""
  fields = fingerprinted(config.to_json_best_effort())
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def changed_fields(old: dict, new: dict) -> list[str]:
  """The dotted names whose values differ between two `fingerprinted` field dicts."""
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _extends(saved_steps: int, steps: int, config_json: str, path, write: bool) -> bool:
  """Whether `config` extends the run saved at `path` (only num_train_steps differs, and it is
  raised): training goes on from the last checkpoint, as the DiT paper reads one run at many steps.
  The constant learning-rate schedule (warm-up, then constant: train_step.learning_rate_schedule)
  does not read num_train_steps, so the steps already taken are the new run's; a schedule that does
  (cosine, cooldown: a decay to the end) is refused, as is lowering it."""
  schedule = json.loads(config_json).get("optim", {}).get("schedule", "constant")
  if schedule != "constant" and steps != saved_steps:
    raise ValueError(f"num_train_steps={steps}: {path.parent} was trained with optim.schedule="
                     f"{schedule!r}, which decays to 0 at its {saved_steps} steps; the steps taken "
                     "are not those of a longer run: use a new workdir")
  if steps < saved_steps:
    raise ValueError(f"num_train_steps={steps}: {path.parent} was configured for "
                     f"{saved_steps} steps; a run can be extended, not shortened (sample an earlier "
                     "checkpoint with tools/sample.py --step instead)")
  if write:
    files.atomic_write_text(path, config_json)
  return True


def check_same_config(path, config, write: bool = True) -> None:
  """Refuses to continue a run whose saved config (`path`, JSON) differs in a result-changing
  field, except a raised num_train_steps (`_extends`: the saved config is updated); writes the
  config when there is none yet (unless write=False)."""
  path = pathlib.Path(path)
  if path.exists():
    try:
      saved = fingerprinted(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e.msg}); move it away or use a new workdir"
                       ) from None
    changed = changed_fields(saved, fingerprinted(config.to_json_best_effort()))
    if changed == ["num_train_steps"] and _extends(
        saved["num_train_steps"], config.num_train_steps, config.to_json_best_effort(indent=1),
        path, write):
      return
    if changed:
      show = ", ".join(f"{k}" for k in changed[:8]) + (" ..." if len(changed) > 8 else "")
      raise ValueError(f"{path.parent} was trained with another config ({len(changed)} field(s) "
                       f"differ: {show}); use a new workdir, or restore those fields to resume")
    return
  if write:
    files.atomic_write_text(path, config.to_json_best_effort(indent=1))
