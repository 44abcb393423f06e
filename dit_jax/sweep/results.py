"""Results rows: one per evaluation of a sweep member, each saying how it was measured.

A row holds the member's identity (run, model, family, size, patch, objective, seed, budget), its
cost (params, Gflops, training compute = 3 x Gflops x batch x step, the paper's measure), its
metrics (fid with fid_metric, the feature network's name, and beside it kid, kid_std, fid_inf and
fid_inf_slope of the same samples, null where not computed; val_loss; sFID/IS/P-R) and their
provenance: sample count, reference statistics (fingerprint, size), sampler and steps, guidance
and guided channels, clipping, the EMA (`ema`: 'decay' with ema_decay, or 'posthoc' with the
evaluated ema_sigma_rel, and at the end ema_selection and ema_condition: posthoc.py), and
`config_fingerprint`, a hash of every field of the member's config that can change a number.
Re-runs compare fingerprints, never names alone.
"""
from __future__ import annotations

import json
import math
import pathlib

from dit_jax import files
from dit_jax import objectives
from dit_jax.models import flops
from dit_jax.training import posthoc
from dit_jax.training.fingerprint import fingerprint

METRIC_PREFIXES = ("fid", "sfid", "is", "precision", "recall", "kid")
# Carried generically beside fid: `<name>_<feature net>` -> `<name>` (evaluation/unbiased.py).
BESIDE_FID = ("kid", "kid_std", "fid_inf", "fid_inf_slope")


def generic_fid(scores: dict) -> dict:
  """fid, fid_metric and the BESIDE_FID fields of one evaluation's `<metric>_<net>` scores ({}
  without a FID); those not computed (KID against a stats-only reference, fid_inf_points=0) None."""
  fids = {k: v for k, v in scores.items() if k.startswith("fid_") and not k.startswith("fid_inf_")}
  if not fids:
    return {}
  (metric, value), = fids.items()
  net = metric[len("fid_"):]
  return dict(fid=value, fid_metric=metric,
              **{name: scores.get(f"{name}_{net}") for name in BESIDE_FID})


def provenance(config, data_kind: str) -> dict:
  """How a member's metrics were measured, from its training config (its objective says how its
  samples were drawn)."""
  q, val = config.eval.fid, config.eval.val
  drawn = objectives.from_config(config).provenance(q, data_kind)
  return dict(
      objective=drawn["objective"], seed=config.seed, eval_seed=config.eval.seed,
      batch_size=config.batch_size, num_train_steps=config.num_train_steps,
      **posthoc.provenance(config.get("ema"), config.ema_decay), fid_num_samples=q.num_samples,
      fid_sampler=drawn["fid_sampler"], fid_steps=str(q.respacing),
      fid_cfg_scale=q.cfg_scale, fid_guide_channels=drawn["fid_guide_channels"],
      clip_denoised=drawn["clip_denoised"],
      val_num_examples=min(val.num_examples, config.data.val_size) if val.every_steps else 0,
      val_num_timesteps=val.num_timesteps if val.every_steps else 0,
      config_fingerprint=fingerprint(config))


def evaluation_rows(run: str, run_dir, info: dict, extra: dict) -> list[dict]:
  """One row per evaluated step in the member's metrics.jsonl (FID and validation rows of one
  step are merged; a step evaluated again after a resume keeps its newest values)."""
  run_dir = pathlib.Path(run_dir)
  by_step, speeds, profiles = {}, [], {}
  for m in files.read_jsonl(run_dir / "metrics.jsonl"):
    if "step" not in m:
      continue
    if "images_per_sec" in m:
      speeds.append(m["images_per_sec"])
    step = int(m["step"])
    scores = {k: v for k, v in m.items()
              if k.split("_")[0] in METRIC_PREFIXES or k.startswith("val_")}
    generic = generic_fid(scores)
    if generic:
      scores.update(generic, wall_s=m.get("wall_s", math.nan))
    if scores:
      by_step.setdefault(step, {}).update(scores)
    profiles.setdefault(step, {}).update(_ema_fields(m))
  reference = run_dir / "fid_reference.json"
  ref = json.loads(reference.read_text()) if reference.exists() else {}
  rows = []
  for step in sorted(by_step):
    by_step[step].update(profiles[step])  # the EMA profile each step was evaluated with
    rest = {k: v for k, v in extra.items() if k not in by_step[step]}
    rows.append(dict(run=run, **info, step=step,
                     train_compute_gflops=flops.training_gflops(info["gflops"],
                                                                extra["batch_size"], step),
                     images_per_s=sum(speeds) / len(speeds) if speeds else math.nan, status="ok",
                     **by_step[step], **rest, **ref))
  return rows


def _ema_fields(m: dict) -> dict:
  """The EMA profile fields of a metrics.jsonl line (posthoc.py: ema, ema_decay, ema_sigma_rel,
  ema_selection as JSON, ema_condition)."""
  out = {k: v for k, v in m.items() if k == "ema" or k.startswith("ema_")}
  if isinstance(out.get("ema_selection"), str):
    out["ema_selection"] = json.loads(out["ema_selection"])
  return out
