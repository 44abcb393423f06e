"""The scaling sweep end to end: train, evaluate, results rows, plots; re-runs skip finished members."""
import json
import pathlib
import sys

import pytest

from dit_jax import errors
from dit_jax import files
from dit_jax.sweep import members as members_lib
from dit_jax.sweep import runner as sweep
from dit_jax.training import train

from configs import dit_sweep
from tests.helpers import load_tool

ROOT = pathlib.Path(__file__).resolve().parents[1]
plot_scaling = load_tool("plot_scaling")


# Two DiT-Pico members (patch 8 and 4) on 8x8 digits, 4 steps, FID-32 at steps 2 and 4.
TINY = {"sweep.sizes": ("Pico",), "sweep.patches": (8, 4), "sweep.extra_models": (),
        "data.image_size": 8, "data.max_examples": 256, "batch_size": 16, "num_train_steps": 4,
        "log_every_steps": 2, "checkpoint_every_steps": 2, "eval.grid.every_steps": 2,
        "eval.grid.num_samples": 4, "eval.grid.respacing": "4", "eval.fid.every_steps": 2,
        "eval.fid.respacing": "4", "eval.fid.num_samples": 32, "eval.fid.batch_size": 16,
        "eval.fid.reference_size": 256, "sweep.seeds": (0,), "sweep.workers": 0,
        "data.val_size": 64, "eval.val.num_examples": 32, "eval.val.batch_size": 64}


def tiny_sweep(tmp_path):
  """The default sweep config with TINY's fields and a per-test FID cache."""
  config = dit_sweep.get_config("")
  config.update_from_flattened_dict(dict(TINY, **{"eval.fid.cache_dir": str(tmp_path / "cache")}))
  return config


def rows(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_two_member_sweep_end_to_end_and_rerun(tmp_path, monkeypatch):
  config = tiny_sweep(tmp_path)
  work = tmp_path / "sweep"
  assert sweep.run(config, work) == []
  got = rows(work / "results.jsonl")
  assert [(r["run"], r["step"]) for r in got] == [("DiT-Pico/8-s0", 2), ("DiT-Pico/8-s0", 4),
                                                  ("DiT-Pico/4-s0", 2), ("DiT-Pico/4-s0", 4)]
  for r in got:
    assert r["status"] == "ok" and r["fid_metric"] == "fid_digits_cnn" and r["fid"] > 0
    assert r["train_compute_gflops"] == pytest.approx(r["gflops"] * 16 * r["step"] * 3)
    assert r["images_per_s"] > 0 and r["wall_s"] > 0 and r["xla_gflops"] > 0
  assert got[2]["gflops"] > got[0]["gflops"]  # patch 4 costs more than patch 8
  assert [r.get("final", False) for r in got] == [False, True, False, True]

  summary = plot_scaling.run([str(work / "results.jsonl")], str(tmp_path / "plots"), n_boot=100)
  for name in ("fid_vs_gflops", "fid_vs_steps", "fid_vs_compute"):
    for ext in ("png", "svg"):
      assert (tmp_path / "plots" / f"{name}.{ext}").stat().st_size > 1000
  assert "DiT-Pico/4" in (tmp_path / "plots" / "results.md").read_text()
  assert [len(g["members"]) for g in summary["groups"]] == [2]

  # A re-run trains nothing: both members are finished.
  def no_training(*args, **kwargs):
    raise AssertionError("a finished member was trained again")
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  assert sweep.run(config, work) == []
  assert len(rows(work / "results.jsonl")) == 4


def test_failed_member_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
  config = tiny_sweep(tmp_path)
  trained = []

  def fake_train(cfg, workdir):
    if cfg.model == "DiT-Pico/8":
      raise RuntimeError("out of memory")
    trained.append(cfg.model)
    pathlib.Path(workdir).mkdir(parents=True)
    (pathlib.Path(workdir) / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "images_per_sec": 10.0}) + "\n" +
        json.dumps({"step": 4, "fid_digits_cnn": 12.5, "wall_s": 3.0}) + "\n")
  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  assert sweep.run(config, tmp_path / "w") == ["DiT-Pico/8-s0"]
  got = rows(tmp_path / "w" / "results.jsonl")
  assert got[0]["status"] == "failed" and "out of memory" in got[0]["error"]
  assert got[1]["run"] == "DiT-Pico/4-s0" and got[1]["fid"] == 12.5 and got[1]["final"]
  assert trained == ["DiT-Pico/4"]


def test_member_selection_and_config_errors(tmp_path):
  config = dit_sweep.get_config("")
  names = members_lib.model_names(config.sweep)
  assert names[:3] == ["DiT-Femto/8", "DiT-Femto/4", "DiT-Femto/2"] and names[-1] == "UNet-Pico"
  config.sweep.seeds, config.sweep.objectives = (0, 1), ("ddpm", "flow")
  members = members_lib.plan(config.sweep, config.num_train_steps, config.batch_size,
                             {n: 1.0 for n in names})
  assert len(members) == len(names) * 4
  assert [m.run for m in members[:4]] == ["DiT-Femto/8-s0", "DiT-Femto/8-s1",
                                          "DiT-Femto/8-flow-s0", "DiT-Femto/8-flow-s1"]
  assert members_lib.select(members, "1")[0].run == "DiT-Femto/8-s1"
  assert [m.run for m in members_lib.select(members, "UNet-Pico")] == [
      "UNet-Pico-s0", "UNet-Pico-s1", "UNet-Pico-flow-s0", "UNet-Pico-flow-s1"]
  with pytest.raises(ValueError, match="not in the sweep"):
    members_lib.select(members, "DiT-XL/2")
  with pytest.raises(ValueError, match="has 40 members"):
    members_lib.select(members, "40")
  flow = members_lib.member_config(config, members[2])
  assert flow.diffusion.objective == "flow" and not flow.learn_sigma and flow.seed == 0
  config = tiny_sweep(tmp_path)
  config.sweep.patches = (3,)  # does not tile 8x8: an error before anything trains
  with pytest.raises(ValueError, match="does not divide"):
    sweep.run(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match="unknown sweep preset"):
    dit_sweep.get_config("imagenet")


def test_sigterm_stops_the_sweep_without_marking_the_member_finished(tmp_path, monkeypatch):
  """A member that returns before its last step (SIGTERM saved it) gets no rows; nothing else runs."""
  import types  # pylint: disable=g-import-not-at-top
  config = tiny_sweep(tmp_path)
  trained = []

  def preempted_train(cfg, workdir):
    trained.append(cfg.model)
    pathlib.Path(workdir).mkdir(parents=True)
    (pathlib.Path(workdir) / "metrics.jsonl").write_text(
        json.dumps({"step": 2, "fid_digits_cnn": 20.0, "wall_s": 1.0}) + "\n")
    return types.SimpleNamespace(step=2)  # of num_train_steps=4
  monkeypatch.setattr(train, "train_and_evaluate", preempted_train)
  with pytest.raises(errors.Preempted, match="SIGTERM"):  # main exits 75 on it
    sweep.run(config, tmp_path / "w")
  assert trained == ["DiT-Pico/8"]
  assert not [r for r in files.read_jsonl(tmp_path / "w" / "results.jsonl") if r.get("final")]


@pytest.mark.slow
def test_slurm_array_script_runs_its_member(tmp_path):
  """tools/slurm_sweep.sbatch end to end with a stand-in `srun`: array task 1 trains member 1."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  paper = dit_sweep.get_config("paper")
  n = len(members_lib.model_names(paper.sweep)) * len(paper.sweep.seeds) * len(paper.sweep.objectives)
  script = ROOT / "tools" / "slurm_sweep.sbatch"
  assert f"#SBATCH --array=0-{n - 1}\n" in script.read_text()  # one task per paper member
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # `python` must be this interpreter (a wrapper: a symlink would lose the virtualenv).
  for name, body in (("srun", 'exec "$@"'), ("python", f'exec "{sys.executable}" "$@"')):
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_ARRAY_TASK_ID="1",
             CONFIG="configs/dit_sweep.py", WORKDIR=str(tmp_path / "w"), LATENTS="unused-by-digits")
  # TINY as command-line overrides, trained for 2 steps only.
  fields = dict(TINY, num_train_steps=2, log_every_steps=1,
                **{"eval.fid.cache_dir": str(tmp_path / "cache")})
  args = [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in fields.items()]
  out = subprocess.run(["bash", str(script)] + args, cwd=ROOT, env=env, timeout=600,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  got = rows(tmp_path / "w" / "results.jsonl")
  assert [r["run"] for r in got] == ["DiT-Pico/4-s0"] and got[0]["step"] == 2 and got[0]["final"]


def test_tpu_pod_launcher_checks_its_arguments():
  import subprocess  # pylint: disable=g-import-not-at-top
  script = ROOT / "tools" / "launch_tpu_pod.sh"
  subprocess.run(["bash", "-n", str(script)], check=True)
  out = subprocess.run(["bash", str(script), "only-a-name"], capture_output=True, text=True)
  assert out.returncode == 2 and "TPU_NAME ZONE BUCKET" in out.stdout
