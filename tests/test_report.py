"""report: figures, results.md and summary from synthetic rows of a known law, and the CLI."""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dit_jax.analysis import laws
from dit_jax.analysis import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The single-seed default sweep as committed on 2026-11-27 (rows without family/size/objective/
# seed).
CPU_SWEEP = ROOT / "tests" / "data" / "cpu_sweep_single_seed_2026-11-27.jsonl"
DITS = [("Femto", 8), ("Pico", 8), ("Nano", 8), ("Femto", 4), ("Pico", 4), ("Nano", 4),
        ("Pico", 2), ("Nano", 2)]
# 5 of the 8 have final compute <= 1/4 of the largest's, so the prediction check can fit them
GFLOPS = np.geomspace(0.001, 0.06, 8)
BATCH, STEPS = 32, (400, 1000)


def _row(model, family, size, patch, gflops, seed, step, fid, **kw):
  return dict(dict(
      run=f"{model}-s{seed}", model=model, family=family, size=size, patch=patch, seed=seed,
      objective="ddpm", budget_gflops=None, step=step, num_train_steps=STEPS[-1],
      batch_size=BATCH, params=1e6, gflops=gflops, train_compute_gflops=3 * gflops * BATCH * step,
      final=step == STEPS[-1], status="ok", fid=fid, fid_metric="fid_digits_cnn",
      fid_num_samples=512), **kw)


def law_rows(seed=0, sigma=0.03, held_factor=1.0):
  """8 DiTs x 3 seeds x 2 steps with fid = 50·C^-0.2 and val_loss = 0.5·C^-0.05 (lognormal
  noise), a U-Net off the law, one failed run; held_factor scales DiT-Nano/2's FIDs."""
  rng = np.random.default_rng(seed)
  rows = []
  for (size, patch), g in zip(DITS, GFLOPS):
    model = f"DiT-{size}/{patch}"
    for s in range(3):
      for step in STEPS:
        c = 3 * g * BATCH * step
        fid = 50 * c ** -0.2 * math.exp(sigma * rng.standard_normal())
        fid *= held_factor if model == "DiT-Nano/2" else 1.0
        vl = 0.5 * c ** -0.05 * math.exp(sigma * rng.standard_normal())
        rows.append(_row(model, "DiT", size, patch, g, s, step, fid, val_loss=vl))
  for s in range(3):
    for step in STEPS:
      rows.append(_row("UNet-Pico", "UNet", "Pico", 1, 0.018, s, step, 5.0 + s, val_loss=0.1))
  rows.append(dict(run="DiT-Nano/2-s3", model="DiT-Nano/2", seed=3, status="failed",
                   error="RuntimeError: out of memory"))
  return rows


@pytest.fixture(scope="module")
def law_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("law")
  return out, report.write(law_rows(), out, n_boot=300)


def test_law_report_figures_table_and_failed_run(law_report):
  out, summary = law_report
  names = [f"{m}_{kind}" for m in ("fid", "val_loss")
           for kind in ("vs_gflops", "vs_steps", "vs_compute", "prediction")]
  assert summary["figures"] == names
  for name in names:
    assert (out / f"{name}.png").stat().st_size > 10_000
    assert (out / f"{name}.svg").stat().st_size > 10_000
  md = (out / "results.md").read_text()
  assert "- failed: DiT-Nano/2-s3: RuntimeError: out of memory" in md
  assert summary["failed"] == ["failed: DiT-Nano/2-s3: RuntimeError: out of memory"]
  (g,) = summary["groups"]
  assert (g["fid_metric"], g["fid_num_samples"], g["objective"]) == ("fid_digits_cnn", 512, "ddpm")
  assert len(g["members"]) == 9 and g["failed"] == summary["failed"]
  # the table's Nano/2 cell: seed mean ± sd of the rows' final FIDs
  finals = [r["fid"] for r in law_rows() if r.get("final") and r["model"] == "DiT-Nano/2"]
  assert f"{np.mean(finals):.4g} ± {np.std(finals, ddof=1):.2g} (n=3)" in md
  json.dumps(summary, allow_nan=False)  # NaN became null


def test_law_report_recovers_exponent_rho_and_predicts(law_report):
  out, summary = law_report
  fid = summary["groups"][0]["metrics"]["fid"]
  law = fid["law"]
  assert abs(law["b"] - 0.2) < 0.02 and law["b_ci"][0] < 0.2 < law["b_ci"][1]
  assert law["b_ci"][1] - law["b_ci"][0] < 0.08
  assert fid["rho"] == -1.0 and fid["rho_ci"][0] <= -0.8 and fid["rho_ci"][1] == -1.0
  vl = summary["groups"][0]["metrics"]["val_loss"]
  assert vl["law"]["b_ci"][0] < 0.05 < vl["law"]["b_ci"][1]
  p = fid["prediction"]
  assert p["model"] == "DiT-Nano/2" and p["n_seeds"] == 3 and p["inside"]
  assert p["lo"] < p["measured"] < p["hi"] and p["lo"] < p["predicted"] < p["hi"]
  truth = 50 * p["compute"] ** -0.2
  assert abs(math.log(p["predicted"] / truth)) < 0.05
  md = (out / "results.md").read_text()
  assert f"b = {law['b']:.3f} [90 % CI {law['b_ci'][0]:.3f}, {law['b_ci'][1]:.3f}]" in md
  assert "FID = " in md and "**inside**" in md
  lo, hi = fid["rho_ci"]
  assert f"−1.000; 90 % CI over seeds [{lo:.3f}".replace("-", "−") in md


def test_prediction_extrapolates_from_a_quarter_of_the_compute(law_report):
  """Only DiTs of final compute <= 1/4 of the held-out's are fitted; error % and half-width %."""
  _, summary = law_report
  p = summary["groups"][0]["metrics"]["fid"]["prediction"]
  held = 3 * GFLOPS[-1] * BATCH * STEPS[-1]
  want = [f"DiT-{sz}/{pt}" for (sz, pt), g in zip(DITS, GFLOPS) if 3 * g * BATCH * STEPS[-1]
          <= held / 4]
  assert p["fitted_members"] == want and len(want) == 5
  assert p["extrapolation"] >= 4
  assert p["error_pct"] == pytest.approx(100 * (p["predicted"] - p["measured"]) / p["measured"])
  assert p["half_width_pct"] == pytest.approx(50 * (p["hi"] - p["lo"]) / p["predicted"])
  # the default rule keeps final points only: every fitted point is at the last step
  assert all(u.endswith(f"@ {STEPS[-1]}") for u in p["law"]["points"]["used"])
  assert p["law"]["points"]["removed"] == len(want)  # one early point per fitted member


def test_fit_rules_remove_the_transient_and_refuse_an_all_transient_fit(tmp_path):
  rows = law_rows()
  s = report.write(rows, tmp_path / "curves", n_boot=50, plots=False,
                   rules=laws.Rules(min_fraction=0.0))
  law = s["groups"][0]["metrics"]["fid"]["law"]
  assert law["points"]["removed"] == 0 and law["points"]["frontier"]
  md = (tmp_path / "curves" / "results.md").read_text()
  assert "step ≥ 0 × the run's final step" in md and "fitted to the frontier" in md
  s = report.write(rows, tmp_path / "late", n_boot=50, plots=False,
                   rules=laws.Rules(min_fraction=0.0, min_step=2000))
  fid = s["groups"][0]["metrics"]["fid"]
  assert fid["law"] is None and "every point is inside the excluded transient" in fid["law_note"]
  assert "16 point(s) removed by the rule (step ≥ 0 × the run's final step and ≥ 2000)" in \
      fid["law_note"]
  with pytest.raises(ValueError, match="compute_ratio >= 1"):
    laws.Rules(compute_ratio=0.5)


def test_non_positive_kid_values_are_dropped_with_a_count(tmp_path):
  rows = [dict(r, kid=-0.001 if r["model"] == "DiT-Femto/8" else 0.01 * r["fid"] / 50)
          if "fid" in r else r for r in law_rows()]
  s = report.write(rows, tmp_path, n_boot=50, plots=False)
  kid = s["groups"][0]["metrics"]["kid"]
  assert kid["law"]["points"]["nonpositive"] == 1 and "DiT-Femto/8 @ 1000" not in \
      kid["law"]["points"]["used"]
  assert "kid_digits_cnn" in (tmp_path / "results.md").read_text()


def test_off_law_holdout_is_outside_and_holdout_choices(tmp_path):
  rows = law_rows(held_factor=2.0)
  s = report.write(rows, tmp_path / "off", n_boot=200, plots=False)
  assert s["figures"] == [] and not list((tmp_path / "off").glob("*.png"))
  p = s["groups"][0]["metrics"]["fid"]["prediction"]
  assert p["model"] == "DiT-Nano/2" and not p["inside"] and p["measured"] > p["hi"]
  assert "**outside**" in (tmp_path / "off" / "results.md").read_text()
  s = report.write(rows, tmp_path / "pick", n_boot=50, holdout="DiT-Pico/2", plots=False)
  assert s["groups"][0]["metrics"]["fid"]["prediction"]["model"] == "DiT-Pico/2"
  s = report.write(rows, tmp_path / "none", n_boot=50, holdout=False, plots=False)
  assert s["groups"][0]["metrics"]["fid"]["prediction"] is None
  assert "no prediction check (none asked for)" in (tmp_path / "none" / "results.md").read_text()
  with pytest.raises(ValueError, match="'UNet-Pico' is not a DiT grid model"):
    report.write(rows, tmp_path / "bad", n_boot=50, holdout="UNet-Pico")


def test_mixed_metrics_and_sample_counts_are_split(tmp_path):
  rows = law_rows()
  ok = [{k: v for k, v in r.items() if k != "val_loss"} for r in rows if r.get("status") == "ok"]
  other = [dict(r, run=r["run"] + "-inc", fid_metric="fid_inception", fid=r["fid"] * 3) for r in ok]
  fewer = [dict(r, run=r["run"] + "-256", fid_num_samples=256) for r in ok
           if r["model"].startswith("DiT")]
  s = report.write(rows + other + fewer, tmp_path, n_boot=50)
  keys = [(g["fid_metric"], g["fid_num_samples"]) for g in s["groups"]]
  assert keys == [("fid_digits_cnn", 256), ("fid_digits_cnn", 512), ("fid_inception", 512)]
  assert [len(g["members"]) for g in s["groups"]] == [8, 9, 9]
  for g in s["groups"]:  # each section's law is its own: the x3 metric moves a, not b
    assert abs(g["metrics"]["fid"]["law"]["b"] - 0.2) < 0.03
  assert "fid_vs_gflops_fid-inception_512" in s["figures"]
  assert (tmp_path / "fid_vs_gflops_fid-inception_512.png").stat().st_size > 10_000
  md = (tmp_path / "results.md").read_text()
  assert "## fid_inception, 512 samples · objective ddpm" in md
  assert "## fid_digits_cnn, 256 samples · objective ddpm" in md


def test_mixed_training_setups_are_refused(tmp_path):
  rows = law_rows()
  bigger = [dict(r, batch_size=64) if r.get("model") == "DiT-Pico/8" else r for r in rows]
  msg = r"runs differ in batch_size: 32 \(DiT-Femto/8-s0\), 64 \(DiT-Pico/8-s0\)"
  with pytest.raises(ValueError, match=msg):
    report.write(bigger, tmp_path, n_boot=10)
  longer = [dict(r, run=r["run"] + "-long", step=2 * r["step"], num_train_steps=2000)
            for r in rows if r.get("model") == "DiT-Pico/8"]
  with pytest.raises(ValueError, match="differ in step"):
    report.write(rows + longer, tmp_path, n_boot=10)
  twice = rows + [dict(rows[0], fid=1.0)]
  with pytest.raises(ValueError, match="two different rows for step 400"):
    report.write(twice, tmp_path, n_boot=10)


def test_missing_final_row_is_listed_and_objectives_are_groups(tmp_path):
  rows = law_rows()
  cut = [r for r in rows if not (r.get("run") == "DiT-Pico/4-s2" and r.get("final"))]
  flow = [dict(r, run=r["run"] + "-flow", objective="flow") for r in rows
          if r.get("status") == "ok"]
  s = report.write(cut + flow, tmp_path, n_boot=50, plots=False)
  assert "missing: DiT-Pico/4-s2: no final row (last evaluation at step 400 of 1000)" in s["failed"]
  assert [g["objective"] for g in s["groups"]] == ["ddpm", "flow"]
  assert "DiT-Pico/4" in s["groups"][0]["members"]  # its other two seeds are still reported
  md = (tmp_path / "results.md").read_text()
  assert "objective flow" in md and "- missing: DiT-Pico/4-s2" in md


def test_read_merges_files_and_refuses_conflicting_runs(tmp_path):
  rows = law_rows()
  a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
  a.write_text("".join(json.dumps(r) + "\n" for r in rows[:18]))
  b.write_text("".join(json.dumps(r) + "\n" for r in rows[12:]))  # DiT-Nano/8's runs in both
  assert report.read([a, b]) == rows
  c.write_text("".join(json.dumps(dict(r, fid=1.0)) + "\n" for r in rows[12:14]))
  with pytest.raises(ValueError, match="'DiT-Nano/8-s0' is in .*a.jsonl and .*c.jsonl"):
    report.read([a, c])
  with pytest.raises(ValueError, match="no such file"):
    report.read([tmp_path / "nope.jsonl"])


def test_cli_on_the_committed_cpu_sweep(tmp_path):
  """Old rows (no family/size/objective/seed, one seed): rho -0.943 as committed, no fake CI."""
  out = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_scaling.py"), str(CPU_SWEEP),
                        "--out", str(tmp_path), "--n-boot", "200"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  s = json.loads(out.stdout)
  fid = s["groups"][0]["metrics"]["fid"]
  assert round(fid["rho"], 3) == -0.943 and fid["rho_n"] == 6 and fid["rho_ci"] == [None, None]
  assert fid["prediction"]["model"] == "DiT-Nano/2" and s["failed"] == []
  md = (tmp_path / "results.md").read_text()
  assert "−0.943; no CI: one seed per model" in md and "UNet-Pico" in md
  assert (tmp_path / "fid_vs_compute.svg").stat().st_size > 10_000
  bad = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_scaling.py"),
                        str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines() == [
      f"plot_scaling: {tmp_path / 'nope.jsonl'}: no such file"]


def isoflop_rows(seed=2, sigma=0.003):
  """3 budgets x 4 models x 2 seeds of L = 1 + N^-0.35 + 134·D^-0.25 (D images, C = 3·N·D).

  Over noise seeds 0-19 the 90 % CI of a (n_boot 40) covered the truth 18 times (misses: seeds 0
  and 1), the mean a was 0.4165 (truth 0.4167), sd 0.006; seed 2 is one that covers.
  """
  rng = np.random.default_rng(seed)
  rows = []
  for budget in (1e3, 4e3, 1.6e4):
    for (size, patch), g in zip(DITS[1:5], (0.002, 0.006, 0.02, 0.06)):
      model = f"DiT-{size}/{patch}"
      step = round(budget / (3 * g * BATCH))
      L = 1 + g ** -0.35 + 134 * (step * BATCH) ** -0.25
      for s in range(2):
        rows.append(_row(model, "DiT", size, patch, g, s, step, L * math.exp(
            sigma * rng.standard_normal()), run=f"{model}-b{budget:g}-s{s}", budget_gflops=budget,
            num_train_steps=step, final=True))
  return rows


def test_isoflop_exponent_covers_the_truth(tmp_path):
  s = report.write(isoflop_rows(), tmp_path, n_boot=40)
  assert s["figures"] == ["fid_isoflop"]
  for ext in ("png", "svg"):
    assert (tmp_path / f"fid_isoflop.{ext}").stat().st_size > 10_000
  iso = s["groups"][0]["metrics"]["fid"]["isoflop"]
  truth = 0.25 / (0.35 + 0.25)
  assert iso["a_ci"][0] < truth < iso["a_ci"][1] and abs(iso["a"] - truth) < 0.02
  assert [p["budget"] for p in iso["per_budget"]] == [1e3, 4e3, 1.6e4]
  for p in iso["per_budget"]:  # argmin_N of the true L at C: (alpha/(beta·B·3^beta))^(1/0.6)·C^a
    n_true = (0.35 / (0.25 * 134 * 3 ** 0.25)) ** (1 / 0.6) * p["budget"] ** truth
    assert abs(math.log(p["n_opt"] / n_true)) < 0.05 and p["n_opt_ci"][0] < p["n_opt"]
  assert len(s["groups"][0]["members"]) == 12
  md = (tmp_path / "results.md").read_text()
  assert "parametric L(N, D) (Chinchilla Approach 3): a = " in md
  assert "parabolas in log N per budget (Approach 2): a = " in md
  assert iso["parabola_per_budget"][0]["budget"] == 1e3 and len(iso["budgets"]) == 3


def test_rows_against_another_reference_are_a_section_of_their_own(tmp_path):
  rows = [dict(r, fid_reference_fingerprint="aaaa") for r in law_rows()]
  other = [dict(r, run=r["run"] + "-other", fid_reference_fingerprint="bbbb") for r in rows
           if r.get("status") == "ok"]
  s = report.write(rows + other, tmp_path, n_boot=50, plots=False)
  assert [g["fid_reference_fingerprint"] for g in s["groups"]] == ["aaaa", "bbbb"]
  assert [len(g["members"]) for g in s["groups"]] == [9, 9]
