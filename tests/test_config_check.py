"""Every config check runs before anything is built: >= 20 bad configs, each with its message.

Each case goes through the real entry (`train.train_and_evaluate`, or `sweep.run`) with the step's
jit and the feature network replaced by tripwires: a check that fires after compiling, or after a
feature net was trained, fails the test.
"""
import subprocess
import sys

import pytest

from configs import dit_sweep
from dit_jax import config_check
from dit_jax.evaluation import fid
from dit_jax.sweep import runner as sweep
from dit_jax.training import train
from dit_jax.training import train_step
from tests.helpers import REPO, tiny_config

FID_ON = {"eval.fid.every_steps": 3, "eval.fid.num_samples": 32}

BAD = [
    (dict(mesh_shape=(3, 1, 1)), "device count"),
    (dict(mesh_shape=(8, 1)), "must have 3 entries"),
    (dict(batch_size=12, mesh_shape=(8, 1, 1)), "not divisible by the data-parallel size 8"),
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(num_train_steps=-1), "num_train_steps must be >= 0"),
    (dict(log_every_steps=0), "log_every_steps must be >= 1"),
    (dict(checkpoint_every_steps=-5), "checkpoint_every_steps and keep_checkpoints must be >= 0"),
    (dict(max_nonfinite_streak=0), "max_nonfinite_streak must be >= 1"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(ema_decay=1.0), "ema_decay must be in"),
    (dict(**{"optim.lr": -1e-3}), "optim.lr must be positive"),
    (dict(**{"optim.b2": 1.0}), "optim.b1/b2 must be in"),
    (dict(model="DiT-S/3"), "patch"),
    (dict(model="DiT-Q/2"), "unknown model"),
    (dict(model="UNet-Nano"), "does not use depth"),
    (dict(depth=-1), "depth=-1: must be >= 0"),
    (dict(conditioning="film"), "unknown conditioning"),
    (dict(attention_impl="flash"), "attention_impl 'flash'"),
    (dict(dtype="float64"), "unknown dtype"),
    (dict(**{"diffusion.prediction": "score"}), "prediction 'score' not supported"),
    (dict(**{"diffusion.schedule": "quadratic"}), "unknown noise schedule"),
    (dict(**{"eval.grid.respacing": "abc"}), "eval.grid.respacing='abc'"),
    (dict(**{"eval.fid.num_samples": 1, "eval.fid.every_steps": 3}), "at least|>= 2"),
    (dict(**FID_ON, **{"eval.fid.feature_network": "vgg"}), "eval.fid.feature_network='vgg'"),
    (dict(**FID_ON, **{"eval.fid.batch_size": 12}), "eval.fid.batch_size=12 is not divisible"),
    (dict(**{"eval.grid.guide_channels": 2}), "guide_channels=2, but the model predicts 1"),
    (dict(**{"distributed.coordinator_address": "localhost"}), "use 'host:port'"),
    (dict(**{"data.name": "folder", "data.path": "/nonexistent/images"}), "does not exist"),
    (dict(**{"data.name": "latents", "data.path": ""}), "needs data.path"),
    (dict(**{"data.name": "imagenet"}), "imagenet"),
    (dict(**{"diffusion.objective": "score"}), "diffusion.objective='score'"),
    (dict(**{"diffusion.objective": "flow"}), "learn_sigma=True applies to the DDPM objective"),
    (dict(learn_sigma=False, **{"diffusion.objective": "flow", "eval.fid.respacing": "ddim50"}),
     "number of integration steps"),
    (dict(learn_sigma=False, **{"diffusion.objective": "flow", "flow.sampler": "rk4"}),
     "flow.sampler='rk4'"),
    (dict(learn_sigma=False, **{"diffusion.objective": "flow", "eval.grid.guide_channels": 1}),
     "guides every channel"),
    (dict(learn_sigma=False, **{"diffusion.objective": "flow", "flow.path": "vp"}), "vp"),
    (dict(**{"eval.clip_denoised": "yes"}), "eval.clip_denoised='yes'"),
]


@pytest.fixture
def tripwires(monkeypatch):
  def compiled(*a, **k):
    raise AssertionError("the train step was built despite a bad config")

  def feature_net(*a, **k):
    raise AssertionError("a feature network was built despite a bad config")
  monkeypatch.setattr(train_step, "jit_train_step", compiled)
  monkeypatch.setattr(fid, "feature_network", feature_net)


def test_there_are_at_least_twenty_cases():
  assert len(BAD) >= 20


@pytest.mark.parametrize("overrides, match", BAD, ids=[m for _, m in BAD])
def test_bad_config_fails_before_anything_is_built(overrides, match, tmp_path, tripwires):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # nothing written either


def test_a_typo_or_a_missing_config_file_is_one_line_before_anything_runs(tmp_path):
  with pytest.raises(ValueError, match=r"no field 'optim.lrr'; did you mean optim.lr\b"):
    config_check.check_argv(["--config=configs/dit_sweep.py", "--config.optim.lrr=1e-3"])
  with pytest.raises(ValueError, match="no config file 'configs/nope.py'"):
    config_check.check_argv(["--config=configs/nope.py", "--config.seed=1"])
  config_check.check_argv(["--config", "configs/dit_sweep.py:isoflop", "--config.sweep.seeds=(0,1)",
                           "--config.eval.fid.num_samples=8"])  # real fields pass
  out = subprocess.run([sys.executable, "-m", "dit_jax.main", "--config=configs/dit_sweep.py",
                        "--config.sweep.sizez=(1,)", f"--workdir={tmp_path}/cli"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  assert "no field 'sweep.sizez'; did you mean sweep.sizes" in out.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "cli").exists()


def test_renamed_fields_are_rejected_with_the_new_name(tmp_path, tripwires):
  config = tiny_config()
  with config.unlocked():
    config.eval.cfg_scale = 2.0
  with pytest.raises(ValueError, match="eval.cfg_scale was renamed: use eval.grid.cfg_scale"):
    train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(ValueError, match="eval_every_steps was renamed"):
    config_check.check_argv(["--config=configs/default.py:cpu", "--config.eval_every_steps=5"])
  out = subprocess.run([sys.executable, "-m", "dit_jax.main", "--config=configs/default.py:cpu",
                        "--config.eval.fid_num_samples=8", f"--workdir={tmp_path}/cli"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "eval.fid_num_samples was renamed: use eval.fid.num_samples" in out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("overrides, match", [
    ({"sweep.patches": (3,)}, "does not divide"),
    ({"eval.fid.num_samples": 0, "eval.val.every_steps": 0}, "a sweep records one row per"),
    ({"sweep.sizes": ("Huge",)}, "unknown model"),
    ({"sweep.seeds": (1, 1)}, "distinct seeds"),
    ({"sweep.patches": ("abc",)}, "'abc' is not an integer"),
    ({"sweep.budgets": (1e-6,)}, "buys no model a single training step"),
    ({"sweep.budgets": (1e12,)}, "more than sweep.max_steps"),
    ({"sweep.member": "DiT-Q/8"}, "is not in the sweep"),
    ({"sweep.fit": {"min_fractoin": 0.5}}, "sweep.fit: unknown field 'min_fractoin'"),
    ({"sweep.fit": {"min_step": "100"}}, r"sweep.fit.min_step='100': a number"),
])
def test_sweep_checks_every_member_before_training(overrides, match, tmp_path, tripwires,
                                                   monkeypatch):
  def no_training(*a, **k):
    raise AssertionError("a member trained despite a bad config")
  monkeypatch.setattr(train, "train_and_evaluate", no_training)
  config = dit_sweep.get_config("")
  config.update_from_flattened_dict({"data.image_size": 8, "data.max_examples": 64, **overrides})
  with pytest.raises(ValueError, match=match):
    sweep.run(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()
