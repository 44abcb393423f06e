"""What a new user hits from the command line, each reproduced there: bad input is one line (exit 2)
naming the field or file; a killed sweep takes its workers with it; a torn metrics line, a
truncated cache file or a full disk costs nothing already written; a run can be extended."""
import concurrent.futures
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dit_jax import config_check
from dit_jax import errors
from dit_jax import files
from dit_jax.evaluation import fid
from dit_jax.training import fingerprint
from tests.helpers import REPO, main_cmd, pids_with, subprocess_env, tiny_config

SWEEP = ["-m", "dit_jax.main", "--config=configs/dit_sweep.py", "--config.data.image_size=8",
         "--config.data.max_examples=64"]
SINGLE = ["-m", "dit_jax.main", "--config=configs/default.py:cpu"]
FLOW = ["--config.diffusion.objective=flow", "--config.learn_sigma=False"]

# (command after `python`, what the last stderr line must say). Every one exits 2 before anything
# is built, with no traceback and no workdir. The count can only grow.
CLI_BAD = [
    (SINGLE + FLOW + ["--config.flow.guidance_interval=(0,1,2)"],
     "flow.guidance_interval=(0, 1, 2): need two numbers"),
    (SINGLE + FLOW + ["--config.flow.path=vp"], "flow.path='vp': unknown path"),
    (SINGLE + FLOW + ["--config.flow.logit_std=0.0", "--config.flow.time_sampling=logit_normal"],
     "flow.logit_std=0.0: must be a finite number"),
    (SINGLE + ["--config.eval.grid.respacing=ddim0"], "'ddimN' needs a step count N >= 1"),
    (SINGLE + ["--config.batch_size=0"], "batch_size must be positive"),
    (SINGLE + ["--config.eval.fid.cache_dir=/dev/null/cache"], "eval.fid.cache_dir: cannot write"),
    (SWEEP + ["--config.sweep.budgets=('abc',)"], "sweep.budgets=('abc',): 'abc' is not a number"),
    (SWEEP + ["--config.sweep.patches=abc"], "sweep.patches=('abc',): 'abc' is not an integer"),
    (SWEEP + ["--config.sweep.objectives=('score',)"], "sweep.objectives='score'"),
    (SWEEP + ["--config.sweep.budgets=(1e-6,)"], "1e-06 Gflops buys no model a single training"),
    (SWEEP + ["--config.sweep.budgets=(1e12,)"], "more than sweep.max_steps=2,000,000"),
    # The last of two tuple overrides wins: patches (2,) gives 4 models x 3 seeds, not 30 members.
    (SWEEP + ["--config.sweep.patches=(8,4)", "--config.sweep.patches=(2,)",
              "--config.sweep.member=99"], "sweep.member=99, but the sweep has 12 members"),
    (SINGLE + ["--config.optim.lrr=1"], "no field 'optim.lrr'; did you mean optim.lr"),
    (["tools/sample_prompt.py", "--config=configs/default.py:cpu_text", "--config.text.widht=8",
      "--workdir=W", "--prompt=a handwritten digit one"], "no field 'text.widht'"),
    (["tools/sample.py", "--workdir=W"], "config.json"),
]


def _cli(args, workdir, env=None, timeout=600):
  args = [a.replace("--workdir=W", f"--workdir={workdir}") for a in args]
  if args[0] == "-m":
    args += [f"--workdir={workdir}"]
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        env=env or subprocess_env(1), timeout=timeout)


def test_the_table_only_grows():
  assert len(CLI_BAD) >= 15


def test_every_listed_bad_input_is_one_line_naming_the_field(tmp_path):
  def probe(i):
    return _cli(CLI_BAD[i][0], tmp_path / f"w{i}")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    outs = list(pool.map(probe, range(len(CLI_BAD))))
  for i, ((args, message), out) in enumerate(zip(CLI_BAD, outs)):
    last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
    assert out.returncode == errors.EXIT_USER_ERROR, (args, out.stderr[-3000:])
    assert message in last, (args, last)
    assert "Traceback" not in out.stderr, (args, out.stderr[-3000:])
    assert not (tmp_path / f"w{i}").exists(), args


def test_last_override_wins_in_check_argv():
  argv = ["--config=configs/dit_sweep.py", "--config.sweep.seeds=(0,)", "--config.seed=3",
          "--config.sweep.seeds", "(0,1,2)", "--config.seed=4"]
  assert config_check.check_argv(argv) == ["--config=configs/dit_sweep.py", "--config.sweep.seeds",
                                           "(0,1,2)", "--config.seed=4"]


TINY_SWEEP = SWEEP + [
    "--config.sweep.sizes=('Pico',)", "--config.sweep.patches=(8,)", "--config.sweep.extra_models=()",
    "--config.sweep.seeds=(0,1)", "--config.sweep.workers=2", "--config.data.max_examples=256",
    "--config.data.val_size=64", "--config.batch_size=16", "--config.num_train_steps=40",
    "--config.log_every_steps=2", "--config.checkpoint_every_steps=10",
    "--config.eval.grid.every_steps=0", "--config.eval.fid.every_steps=0",
    "--config.eval.val.every_steps=40", "--config.eval.val.num_examples=32",
    "--config.eval.val.num_timesteps=2", "--config.eval.val.batch_size=64"]


@pytest.mark.slow
def test_kill_9_of_the_sweep_parent_kills_its_workers_and_a_rerun_finishes(tmp_path):
  work = tmp_path / "w"
  parent = subprocess.Popen([sys.executable, *TINY_SWEEP, f"--workdir={work}"], cwd=REPO,
                            env=subprocess_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  mine = str(parent.pid).encode()  # a worker's last argument is its parent's pid
  t0 = time.time()
  while not any((work / f"DiT-Pico_8-s{s}" / "metrics.jsonl").exists() for s in (0, 1)):
    assert parent.poll() is None and time.time() - t0 < 300, "the sweep never started training"
    time.sleep(0.1)
  workers = pids_with(mine)
  assert workers, "no worker process found"
  parent.kill()
  parent.wait()
  t0 = time.time()
  while pids_with(mine) and time.time() - t0 < 10:
    time.sleep(0.1)
  assert not pids_with(mine), "workers outlived their sweep parent"
  out = _cli(TINY_SWEEP, work)  # at once: no member is "in use by pid N"
  assert out.returncode == 0, out.stderr[-3000:]
  rows = files.read_jsonl(work / "results.jsonl")
  assert sorted(r["run"] for r in rows if r.get("final")) == ["DiT-Pico/8-s0", "DiT-Pico/8-s1"]
  assert all(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_a_torn_metrics_line_is_cut_and_a_finished_run_can_be_extended(tmp_path):
  work = tmp_path / "w"
  flags = ("--config.checkpoint_every_steps=2",)
  first = subprocess.run(main_cmd(work, "--config.num_train_steps=4", *flags), cwd=REPO,
                         env=subprocess_env(1), capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-3000:]
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 30, "loss": 0.12')  # what SIGTERM mid-append leaves
  shorter = subprocess.run(main_cmd(work, "--config.num_train_steps=2", *flags), cwd=REPO,
                           env=subprocess_env(1), capture_output=True, text=True)
  assert shorter.returncode == 2 and "can be extended, not shortened" in shorter.stderr
  longer = subprocess.run(main_cmd(work, "--config.num_train_steps=6", *flags), cwd=REPO,
                          env=subprocess_env(1), capture_output=True, text=True)
  assert longer.returncode == 0, longer.stderr[-3000:]
  text = (work / "metrics.jsonl").read_text()
  assert '"step": 30' not in text and text.endswith("\n")
  steps = [r["step"] for r in files.read_jsonl(work / "metrics.jsonl") if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 4, not restarted
  assert '"num_train_steps": 6' in (work / "config.json").read_text()


def test_lowering_or_changing_more_than_the_steps_is_refused(tmp_path):
  path = tmp_path / "config.json"
  fingerprint.check_same_config(path, tiny_config(num_train_steps=6))
  fingerprint.check_same_config(path, tiny_config(num_train_steps=10))  # extended
  with pytest.raises(ValueError, match="configured for 10 steps; a run can be extended"):
    fingerprint.check_same_config(path, tiny_config(num_train_steps=8))
  with pytest.raises(ValueError, match="2 field.s. differ: num_train_steps, optim.lr"):
    fingerprint.check_same_config(path, tiny_config(num_train_steps=12, **{"optim.lr": 1.0}))


DISK_FULL_AFTER_FIRST_CHECKPOINT = """
import os, shutil, collections
_real = shutil.disk_usage
def disk_usage(path):
  u = _real(path)
  if os.path.isdir(os.path.join(os.environ["FAKE_FULL_WORKDIR"], "checkpoints", "2")):
    return collections.namedtuple("usage", "total used free")(u.total, u.total - 4096, 4096)
  return u
shutil.disk_usage = disk_usage
"""


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(tmp_path):
  work, site = tmp_path / "w", tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(DISK_FULL_AFTER_FIRST_CHECKPOINT)
  env = dict(subprocess_env(1), FAKE_FULL_WORKDIR=str(work),
             PYTHONPATH=f"{site}{os.pathsep}{REPO}")
  flags = ("--config.num_train_steps=6", "--config.checkpoint_every_steps=2",
           "--config.async_checkpoints=False")
  full = subprocess.run(main_cmd(work, *flags), cwd=REPO, env=env, capture_output=True, text=True)
  assert full.returncode == errors.EXIT_USER_ERROR, full.stderr[-3000:]
  assert "Traceback" not in full.stderr
  last = full.stderr.strip().splitlines()[-1]
  assert "no space left for" in last and f"{work / 'checkpoints'}" in last and "0.0 MiB free" in last
  again = subprocess.run(main_cmd(work, *flags), cwd=REPO, env=subprocess_env(1),
                         capture_output=True, text=True)
  assert again.returncode == 0, again.stderr[-3000:]
  steps = [r["step"] for r in files.read_jsonl(work / "metrics.jsonl") if "loss" in r]
  assert steps[-4:] == [3, 4, 5, 6] and steps.count(3) == 2  # resumed from step 2's checkpoint


def test_an_enospc_anywhere_is_one_line_naming_the_path_and_free_space(tmp_path):
  err = OSError(28, "No space left on device", str(tmp_path / "x.npz"))
  wrapped = RuntimeError("Event loop is closed")
  wrapped.__context__ = err
  cause = errors.root_cause(wrapped)
  assert cause is err and errors.is_user_error(cause)
  line = errors.one_line(cause)
  assert line.startswith(f"no space left on device writing {tmp_path / 'x.npz'} (") and "MiB free" in line


def test_a_truncated_cached_reference_is_recomputed_with_its_path_logged(tmp_path, caplog):
  images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
  feature_fn = lambda x: {"pool": x.reshape(x.shape[0], -1).astype(np.float32)[:, :16],
                          "logits": x.reshape(x.shape[0], -1).astype(np.float32)[:, :4]}
  feature_fn.weights_key = "identity16"
  args = (tmp_path, "digits", "train", 8, "toy", feature_fn, images)
  ref = fid.cached_reference(*args, batch_size=8)
  path, = tmp_path.glob("ref_*.npz")
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])  # a copy or a write cut off
  with caplog.at_level("WARNING"):
    again = fid.cached_reference(*args, batch_size=8)
  assert f"{path}: cached file does not read back" in caplog.text
  np.testing.assert_array_equal(again.mu, ref.mu)
  assert path.read_bytes() == data  # replaced by a whole file
  with pytest.raises(ValueError, match=f"{path}: not a readable .npz"):
    path.write_bytes(data[:100])
    fid.load_reference(path, "toy")
