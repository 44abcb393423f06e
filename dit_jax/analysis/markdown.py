"""results.md's lines: the header, one table and statistics block per group, the failed runs."""
import numpy as np


def _f(x, fmt=".4g") -> str:
  return "–" if x is None or not np.isfinite(x) else format(x, fmt).replace("-", "−")


def _cell(mean, sd, n) -> str:
  if n == 0:
    return "–"
  return f"{_f(mean)} ± {_f(sd, '.2g')} (n={n})" if n > 1 else f"{_f(mean)} (n=1)"


def header(n_rows, n_runs, ci, n_boot, seed, rules) -> list:
  """The title, what the intervals and ± are, and the rules of the fits."""
  return ["# Scaling results", "", f"{n_rows} rows of {n_runs} runs. Intervals are "
          f"{100 * ci:.0f} % percentile bootstraps ({n_boot} replicates, seed {seed}); ± and error "
          "bars are the sample sd over seeds (none with one seed). Sections never mix feature "
          "networks, sample counts or FID references.", "",
          f"Fit rules (analysis.laws.Rules, fixed before the run): a law uses the seed-mean points "
          f"with {rules.text()} (the warm-up and early transient excluded), every member's when "
          "all are final points, else their compute-optimal frontier; the prediction check fits "
          f"only the DiTs whose final compute is ≤ 1/{rules.compute_ratio:g} of the held-out "
          "DiT's.", ""]


def failures(problems) -> list:
  """The failed or missing runs, or 'none'."""
  return ["## Failed or missing runs", ""] + ([f"- {p}" for p in problems] or ["none"]) + [""]


def _ema(m) -> str:
  """The final evaluations' EMA: one profile, or each seed's."""
  got = [e or "–" for e in m.ema]
  return got[0] if len(set(got)) == 1 else " / ".join(got)


def _table(title, members, metrics, labels) -> list:
  lines = [f"## {title}", "", "| model | seeds | params (M) | Gflops | final step | train compute "
           "(Gflops) | EMA (per seed) | " + " | ".join(f"final {labels[m]}" for m in metrics)
           + " |", "|---|---|---:|---:|---:|---:|---|" + "---:|" * len(metrics)]
  for m in members:
    params = "–" if m.params is None else f"{m.params / 1e6:.2f}"
    lines.append(f"| {m.label} | {', '.join(map(str, m.seeds))} | {params} | {m.gflops:.4g} | "
                 f"{m.final_step} | {m.final_compute:.4g} | {_ema(m)} | "
                 + " | ".join(_cell(*m.final(k)) for k in metrics) + " |")
  return lines


def _points(w) -> str:
  """Which points a law used and how many the rules removed."""
  p = w["points"]
  extra = f", {p['nonpositive']} non-positive dropped" if p["nonpositive"] else ""
  return (f"{p['kept']} points kept, {p['removed']} removed by the rule{extra}; fitted to "
          f"{'the frontier' if p['frontier'] else 'all of them'}: {', '.join(p['used'])}")


def _rho(s, name, pc) -> str:
  if not np.isfinite(s["rho"]):
    return f"- Spearman ρ: {s['rho_note']}"
  lo, hi = s["rho_ci"]
  ci_text = s["rho_note"] or f"{pc} CI over seeds [{_f(lo, '.3f')}, {_f(hi, '.3f')}]"
  return (f"- Spearman ρ(Gflops, final {name}) over the {s['rho_n']} DiTs (seed means): "
          f"{_f(s['rho'], '.3f')}; {ci_text}")


def _law(s, metric, name, pc) -> str:
  if not s["law"]:
    return f"- Law: {s['law_note']}"
  w = s["law"]
  law_name = "FID" if metric == "fid" else name
  lead = f"{w['e']:.4g} + " if "e" in w else ""
  floor = (f", irreducible e = {w['e']:.4g} [{pc} CI {_f(w['e_ci'][0])}, {_f(w['e_ci'][1])}]"
           if "e" in w else "")
  return (f"- Law of the DiTs ({w['n_points']} points, bootstrap over models): {law_name} = "
          f"{lead}{w['a']:.4g}·C^−{w['b']:.4g}, b = {w['b']:.3f} [{pc} CI "
          f"{_f(w['b_ci'][0], '.3f')}, {_f(w['b_ci'][1], '.3f')}]{floor}, R² (log) "
          f"{w['r2']:.3f}; C in Gflops. Points: {_points(w)}")


def _prediction(s, pc) -> str:
  p = s["prediction"]
  if not p:
    return f"- {s['prediction_note']}"
  seeds = ", ".join(f"seed {k}: {_f(v)}" for k, v in p["seeds"].items())
  return (f"- Prediction check of {p['model']}, law fitted on {', '.join(p['fitted_members'])} "
          f"(b = {p['law']['b']:.3f}; {p['extrapolation']:.2f}× beyond the largest fitted "
          f"compute): predicted {_f(p['predicted'])} at its final C = {p['compute']:.4g} Gflops, "
          f"{pc} prediction interval [{_f(p['lo'])}, {_f(p['hi'])}] (half-width "
          f"{p['half_width_pct']:.1f} %); measured seed mean {_f(p['measured'])} ({seeds}): "
          f"**error {p['error_pct']:+.1f} %**, "
          + ("**inside**" if p["inside"] else "**outside**: the law does not predict it"))


def _isoflop(s, pc) -> list:
  r = s["isoflop"]
  if not r:
    return [f"- {s['isoflop_note']}"] if s["isoflop_note"] else []
  def per(rows):
    return "; ".join(f"C = {q['budget']:.4g}: {_f(q['n_opt'])} [{_f(q['n_opt_ci'][0])}, "
                     f"{_f(q['n_opt_ci'][1])}]" for q in rows)
  return ["- Iso-FLOP, N_opt ∝ C^a (N in Gflops per image, C in Gflops), by two methods:",
          f"  - parametric L(N, D) (Chinchilla Approach 3): a = {_f(r['a'], '.3f')} [{pc} CI "
          f"{_f(r['a_ci'][0], '.3f')}, {_f(r['a_ci'][1], '.3f')}]; N_opt {per(r['per_budget'])}",
          f"  - parabolas in log N per budget (Approach 2): a = {_f(r['parabola_a'], '.3f')} "
          f"[{pc} CI {_f(r['parabola_a_ci'][0], '.3f')}, {_f(r['parabola_a_ci'][1], '.3f')}]; "
          f"minimum interior at {len(r['bracketed'])} of {len(r['budgets'])} budgets; N_opt "
          f"{per(r['parabola_per_budget'])}"]


def group(title, members, stats, labels, fig_names) -> list:
  """One group's table and statistics (stats: {metric: laws.analyse's}) and its figures' links."""
  lines = _table(title, members, list(stats), labels)
  for metric, s in stats.items():
    name, pc = labels[metric], f"{100 * s['ci']:.0f} %"
    lines += ["", f"**{name}**", ""]
    lines += [_rho(s, name, pc), _law(s, metric, name, pc), _prediction(s, pc)]
    lines += _isoflop(s, pc)
  lines += [""] + [f"![{n}]({n}.png)" for n in fig_names] + [""]
  return lines
