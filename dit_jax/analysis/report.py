"""The results report of a scaling sweep: figures, results.md and a JSON summary from its rows.

read(paths) merges results.jsonl files into rows; write(rows, out_dir) reports them. The rows are
organised by rows.organise: one section per FID feature network, sample count and reference, one
group per objective within it (ddpm and flow share the figures as separate series, every statistic
is per group), members of a group are models or (model, budget) pairs with their seeds; rows that
cannot be compared are a ValueError, failed or unfinished runs are listed in results.md (failed rows
carry no metric fields, so the list is report-wide). The statistics of each group and metric are
laws.analyse's (rho, the law on the DiT frontier, the prediction check, the iso-FLOP optimum; the
U-Nets are drawn and tabled but are in none of them), the figures figures.figures's, the markdown
markdown's.

Figures (PNG and SVG) per metric present (fid, val_loss): <metric>_vs_gflops, _vs_steps,
_vs_compute, _prediction (with a prediction check), _isoflop (with iso-FLOP runs); with more than
one section each name ends in _<fid_metric>_<fid_num_samples>_<fid_reference_fingerprint>.
"""
import collections
import json
import math
import pathlib

import numpy as np

from dit_jax import files
from dit_jax.analysis import figures
from dit_jax.analysis import laws
from dit_jax.analysis import markdown
from dit_jax.analysis import rows as rows_lib


def read(paths) -> list[dict]:
  """The rows of several results.jsonl files; a run in two files must have the same rows there."""
  rows, seen = [], {}
  for path in paths:
    if not pathlib.Path(path).is_file():
      raise ValueError(f"{path}: no such file")
    by_run = collections.defaultdict(list)
    for i, r in enumerate(files.read_jsonl(path)):
      if "run" not in r:
        raise ValueError(f"{path}: row {i + 1} has no 'run' field")
      by_run[r["run"]].append(r)
    for run, rs in by_run.items():
      text = json.dumps(rs, sort_keys=True)  # as text: NaN != NaN would make equal rows differ
      if run in seen:
        if seen[run][1] != text:
          raise ValueError(f"run {run!r} is in {seen[run][0]} and {path} with different rows "
                           f"({_first_difference(seen[run][2], rs)}): two experiments that share "
                           "run names; report them separately (or rename one workdir's runs)")
        continue  # the same run copied into two files: once
      seen[run] = (path, text, rs)
      rows.extend(rs)
  return rows


def _first_difference(a: list, b: list) -> str:
  """Which fields of two runs' rows differ, the provenance (reference, data, feature network)
  first: e.g. 'fid_reference_fingerprint: 3f2a... vs 9c1b...'."""
  if len(a) != len(b):
    return f"{len(a)} vs {len(b)} rows"
  first = ("fid_reference_fingerprint", "data_name", "fid_metric", "config_fingerprint")
  for x, y in zip(a, b):
    keys = sorted(set(x) | set(y), key=lambda k: (k not in first, k))
    for k in keys:
      if json.dumps(x.get(k)) != json.dumps(y.get(k)):
        return f"{k}: {x.get(k)} vs {y.get(k)} at step {x.get('step')}"
  return "same fields, different order"


def _clean(x):
  """JSON-ready: numpy to Python, NaN to None, '_'-keys (figure data) dropped."""
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items() if not str(k).startswith("_")}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_clean(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def _check_holdout(holdout, sections):
  """Raises unless a named holdout is a DiT grid model of some section."""
  known = {m.model for g in sections.values() for ms in g.values() for m in ms
           if m.family == "DiT" and m.budget is None}
  if holdout not in known:
    raise ValueError(f"holdout {holdout!r} is not a DiT grid model of these rows: {sorted(known)}")


def _suffix(key, n_sections) -> str:
  """'' for a lone section, else _<its fields' values> in file-name-safe characters."""
  return "" if n_sections == 1 else "_" + "_".join(
      "".join(c if c.isalnum() else "-" for c in str(v)) for v in key if v is not None)


def write(rows, out_dir, *, holdout=None, ci=0.9, n_boot=1000, seed=0, plots=True,
          rules=laws.Rules()) -> dict:
  """Figures (PNG and SVG), results.md and the returned JSON-ready summary of a sweep's rows.

  holdout: a DiT model name for the prediction check (all its seeds held out), None for the DiT of
  largest final compute in each group, False for no check. Raises ValueError on rows that mix what
  cannot be compared (see rows.py) or hold no finished run. plots=False: results.md and the summary
  only (drawing is most of the time). rules: which points the laws use (laws.Rules).
  """
  sections, problems = rows_lib.organise(rows)
  if not sections:
    raise ValueError("no finished run to report" + "".join(f"; {p}" for p in problems))
  if holdout:
    _check_holdout(holdout, sections)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  n_runs = len({r["run"] for r in rows})
  md = markdown.header(len(rows), n_runs, ci, n_boot, seed, rules)
  summary = dict(rows=len(rows), runs=n_runs, ci=ci, n_boot=n_boot, seed=seed, failed=problems,
                 groups=[], figures=[], rules=vars(rules))
  for key, groups in sorted(sections.items(), key=lambda kv: json.dumps(kv[0])):
    info = dict(zip(rows_lib.SECTION_FIELDS, key))
    net = (info["fid_metric"] or "fid").removeprefix("fid")
    labels = dict(fid=info["fid_metric"] or "fid", fid_inf=f"fid_inf{net}", kid=f"kid{net}",
                  val_loss="val_loss")
    stats = {o: {k: laws.analyse(ms, k, holdout, n_boot, ci, seed, rules)
                 for k in rows_lib.METRICS if any(m.has(k) for m in ms)}
             for o, ms in groups.items()}
    names = []
    for k in rows_lib.METRICS:
      gs = {o: (ms, stats[o][k]) for o, ms in groups.items() if k in stats[o]}
      if gs and plots:
        names += figures.figures(gs, k, labels[k], out, _suffix(key, len(sections)))
    summary["figures"] += names
    samples = f"{info['fid_num_samples']} samples" if info["fid_num_samples"] else "samples: n/a"
    for o, ms in groups.items():
      ref = info["fid_reference_fingerprint"]
      title = f"{labels['fid']}, {samples}{f' vs reference {ref}' if ref else ''} · objective {o}"
      md += markdown.group(title, ms, stats[o], labels, names if o == next(iter(groups)) else [])
      summary["groups"].append(dict(info, objective=o, members=[m.label for m in ms],
                                    failed=problems, metrics=stats[o]))
  md += markdown.failures(problems)
  files.atomic_write_text(out / "results.md", "\n".join(md))
  return _clean(summary)
