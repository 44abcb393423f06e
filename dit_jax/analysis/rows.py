"""A sweep's results rows as report members: rows completed, checked like with like, organised.

Like with like. FIDs of different feature networks (`fid_metric`), sample counts
(`fid_num_samples`) or reference statistics (`fid_reference_fingerprint`) are different quantities:
the rows make one section per combination of them. Within a section, each objective is one group
(ddpm and flow: their val_loss is not even the same loss). Inside a section the runs must share
`batch_size`, and the grid runs (`budget_gflops` null) their final step: a sweep trained
differently is another experiment, so that is a ValueError naming the field, not a silent split.
Iso-FLOP runs (`budget_gflops` set) differ in steps by design.

A member is a model (grid) or a (model, budget) pair (iso-FLOP); its runs are its seeds. A failed
run (status failed) or one without a final row is returned as a problem, never dropped silently.
"""
import collections
import json
import math

import numpy as np

from dit_jax import models
from dit_jax.sweep import members

# The metrics a law can be fitted to: FID, its 1/N-extrapolation FID∞ and KID (unbiased at small
# N: evaluation/unbiased.py), and the held-out loss.
METRICS = ("fid", "fid_inf", "kid", "val_loss")
SECTION_FIELDS = ("fid_metric", "fid_num_samples", "fid_reference_fingerprint")
NAN = math.nan


def _normalise(row) -> dict:
  """Fills what older rows lack: family/size/patch from the registry, objective ddpm, seed 0."""
  r = dict(row)
  if r.get("status", "ok") == "ok" and not all(k in r for k in ("family", "size", "patch")):
    family, size, patch = models.parse(r["model"])
    r = dict(dict(family=family.name, size=size, patch=patch), **r)
  r["objective"] = r.get("objective") or "ddpm"
  r["seed"] = 0 if r.get("seed") is None else r["seed"]
  r["budget_gflops"] = r.get("budget_gflops")
  return r


def _one_value(field, runs, what):
  """Raises unless every run's final row has the same `field` (missing counts as a value)."""
  vals = collections.OrderedDict()
  for rs in runs:
    vals.setdefault(json.dumps(rs[-1].get(field)), rs[-1]["run"])
  if len(vals) > 1:
    got = ", ".join(f"{v} ({run})" for v, run in vals.items())
    raise ValueError(f"{what}: runs differ in {field}: {got}; report them separately")


def _num(v) -> float:
  return NAN if v is None else float(v)


def nanmean(a, axis):
  """Mean over `axis` of the finite entries; NaN where there are none (without a warning)."""
  ok = np.isfinite(a)
  with np.errstate(invalid="ignore"):
    return np.where(ok.any(axis), np.nansum(a, axis) / ok.sum(axis), NAN)


def _mean_sd(v):
  v = np.asarray(v, float)
  v = v[np.isfinite(v)]
  if not v.size:
    return NAN, NAN, 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else NAN, int(v.size)


class Member:
  """One model (or model at one budget) of a group: its seeds' runs as step x seed arrays."""

  def __init__(self, runs):
    first = runs[0][-1]
    self.model, self.family, self.size = first["model"], first["family"], first["size"]
    self.patch, self.params, self.gflops = first["patch"], first.get("params"), first["gflops"]
    self.budget = first["budget_gflops"]
    self.label = self.model if self.budget is None else f"{self.model} @ {self.budget:.4g} GF"
    seeds = [rs[-1]["seed"] for rs in runs]
    if len(set(seeds)) < len(seeds):
      raise ValueError(f"{self.label}: two runs with the same seed "
                       f"({[rs[-1]['run'] for rs in runs]})")
    self.seeds = seeds
    self.steps = sorted({r["step"] for rs in runs for r in rs})
    pos = {s: i for i, s in enumerate(self.steps)}
    self.values = {m: np.full((len(self.steps), len(runs)), NAN) for m in METRICS}
    comp = np.full((len(self.steps), len(runs)), NAN)
    self.finals = {m: np.full(len(runs), NAN) for m in METRICS}
    for j, rs in enumerate(runs):
      for r in rs:
        for m in METRICS:
          self.values[m][pos[r["step"]], j] = _num(r.get(m))
        comp[pos[r["step"]], j] = _num(r.get("train_compute_gflops"))
      for m in METRICS:
        self.finals[m][j] = _num(rs[-1].get(m))
    self.compute = nanmean(comp, axis=1)
    self.final_compute = float(self.compute[pos[runs[0][-1]["step"]]])
    self.final_step = runs[0][-1]["step"]
    # The EMA each seed's final row was evaluated with: the post-hoc σ_rel the sweep chose on the
    # validation loss, or the traditional decay ('decay 0.99'); None in rows older than either.
    self.ema = [_ema_label(rs[-1]) for rs in runs]
    self.batch_size = first.get("batch_size")

  def has(self, metric) -> bool:
    return bool(np.isfinite(self.finals[metric]).any())

  def final(self, metric):
    """(mean, sample sd, n) over seeds of the final metric; sd NaN with one seed."""
    return _mean_sd(self.finals[metric])


def _ema_label(row):
  if row.get("ema_sigma_rel") is not None:
    return f"σ_rel {row['ema_sigma_rel']:g}"
  return f"decay {row['ema_decay']:g}" if row.get("ema_decay") is not None else None


def _checked_run(run, rs, problems):
  """The run's ok rows by step, ending in its final row; None (a problem noted) if unfinished."""
  ok = [r for r in rs if r.get("status", "ok") == "ok"]
  bad = [r for r in rs if r.get("status", "ok") != "ok"]
  if not any(r.get("final") for r in ok):
    if bad:
      problems.append(f"failed: {run}: {bad[-1].get('error') or 'no error recorded'}")
    elif ok:
      last = max(ok, key=lambda r: r["step"])
      problems.append(f"missing: {run}: no final row (last evaluation at step {last['step']} "
                      f"of {last.get('num_train_steps', '?')})")
    return None
  if bad:
    problems.append(f"retried: {run} failed ({bad[-1].get('error')}) before it finished")
  steps = {}
  for r in ok:
    if r["step"] in steps and json.dumps(steps[r["step"]], sort_keys=True) != json.dumps(
        r, sort_keys=True):
      raise ValueError(f"run {run!r}: two different rows for step {r['step']}")
    steps[r["step"]] = r
  ok = sorted(steps.values(), key=lambda r: r["step"])
  if not ok[-1].get("final"):
    raise ValueError(f"run {run!r}: evaluations after its final row (step {ok[-1]['step']})")
  for f in SECTION_FIELDS + ("objective", "seed", "budget_gflops", "model"):
    # A validation-only row (no FID at that step) has no fid_metric: missing is not a value.
    if len({json.dumps(r.get(f)) for r in ok if r.get(f) is not None}) > 1:
      raise ValueError(f"run {run!r}: its rows differ in {f}")
  return ok


def _members(key, groups):
  """{objective: [Member]} of one section, its like-with-like fields checked."""
  what = f"section {dict(zip(SECTION_FIELDS, key))}"
  all_runs = [rs for g in groups.values() for rs in g]
  _one_value("batch_size", all_runs, what)
  grid_runs = [rs for rs in all_runs if rs[-1]["budget_gflops"] is None]
  _one_value("step", grid_runs, what + " (final step of the grid runs)")
  _one_value("num_train_steps", grid_runs, what + " (grid runs)")
  out = {}
  for objective, runs in groups.items():
    cells = collections.defaultdict(list)
    for rs in runs:
      cells[(rs[-1]["model"], rs[-1]["budget_gflops"])].append(rs)
    for v in cells.values():
      v.sort(key=lambda rs: rs[-1]["seed"])  # seeds in order, whichever finished first
    out[objective] = sorted((Member(v) for v in cells.values()),
                            key=lambda m: (m.budget or 0, m.gflops))
  return out


def organise(rows):
  """-> ({section key: {objective: [Member]}}, problems): like with like checked, failures noted."""
  by_run = collections.defaultdict(list)
  for r in rows:
    by_run[r["run"]].append(_normalise(r))
  problems, sections = [], collections.defaultdict(lambda: collections.defaultdict(list))
  for run, rs in by_run.items():
    ok = _checked_run(run, rs, problems)
    if ok is not None:
      # A sweep over parameterisations or learning rates (sweep.parameterizations, sweep.lrs): each
      # setting is its own group, as each objective is.
      group = " · ".join(filter(None, (ok[-1]["objective"], members.setting(run))))
      sections[tuple(ok[-1].get(f) for f in SECTION_FIELDS)][group].append(ok)
  return {key: _members(key, groups) for key, groups in sections.items()}, problems
