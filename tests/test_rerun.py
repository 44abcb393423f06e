"""Re-runs never lose or mix anything: SIGKILL during an evaluation, changed configs, a second
process on the workdir, torn lines, and concurrent sweep workers giving the rows of a serial run."""
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest

from configs import dit_sweep
from dit_jax import files
from dit_jax.sweep import runner as sweep
from dit_jax.training import fingerprint
from dit_jax.training import train
from tests.helpers import main_cmd, subprocess_env, tiny_config

TIMING = ("wall_s", "images_per_s", "eval_time_s", "sample_time_s")
# FID of 192 samples with 100 sampling steps at steps 2 and 4: each evaluation lasts a second or
# more (1.9 s at step 4 with a 176 GFLOP/s matmul), long enough to kill the process inside it.
EVAL_FLAGS = ["--config.num_train_steps=4", "--config.checkpoint_every_steps=2",
              "--config.eval.fid.every_steps=2", "--config.eval.fid.num_samples=192",
              "--config.eval.fid.batch_size=64", "--config.eval.fid.respacing=100",
              "--config.eval.fid.reference_size=256", "--config.record_batch_hashes=False"]


def _metric_rows(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING}
          for r in files.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
          if any(k.startswith("fid_") for k in r)]


def _eval_times(workdir):
  return [r["eval_time_s"] for r in files.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
          if "eval_time_s" in r]


def _run(workdir, cache, extra=(), kill_in_eval_at=None, eval_s=None):
  cmd = main_cmd(workdir, *EVAL_FLAGS, f"--config.eval.fid.cache_dir={cache}", *extra)
  proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  if kill_in_eval_at is None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return
  ckpt = pathlib.Path(workdir) / "checkpoints" / str(kill_in_eval_at)
  metrics = pathlib.Path(workdir) / "metrics.jsonl"
  t0 = time.time()
  while time.time() - t0 < 600:  # the step's checkpoint is written, its FID row not yet
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    rows = files.read_jsonl(metrics) if metrics.exists() else []
    logged = any(r.get("step") == kill_in_eval_at and "loss" in r for r in rows)
    if ckpt.is_dir() and logged:
      break
    time.sleep(0.02)
  # A third of the way into the evaluation, however fast the machine is today: a fixed wait
  # outlasted the whole evaluation once it ran in under the wait.
  time.sleep(eval_s / 3)
  assert not [r for r in _metric_rows(workdir) if r["step"] == kill_in_eval_at], \
      "the evaluation finished before the kill; make it longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [2, 4])  # a middle and the final evaluation
def test_sigkill_during_an_evaluation_then_rerun_gives_the_uninterrupted_rows(kill_at, tmp_path):
  cache = tmp_path / "cache"
  _run(tmp_path / "ref", cache)
  _run(tmp_path / "killed", cache, kill_in_eval_at=kill_at,
       eval_s=min(_eval_times(tmp_path / "ref")))
  _run(tmp_path / "killed", cache)  # the re-run redoes the lost evaluation
  want = _metric_rows(tmp_path / "ref")
  assert [r["step"] for r in want] == [2, 4]
  assert _metric_rows(tmp_path / "killed") == want


def test_a_changed_config_never_resumes(tmp_path):
  config = tiny_config(num_train_steps=0)
  fingerprint.check_same_config(tmp_path / "config.json", config)  # first run writes it
  fingerprint.check_same_config(tmp_path / "config.json", config)  # identical: fine
  changed = tiny_config(num_train_steps=0, ema_decay=0.5, **{"optim.lr": 3e-4})
  with pytest.raises(ValueError, match=r"2 field\(s\) differ: ema_decay, optim.lr"):
    fingerprint.check_same_config(tmp_path / "config.json", changed)
  # Logging and checkpoint cadence change no number: they resume.
  fingerprint.check_same_config(tmp_path / "config.json", tiny_config(num_train_steps=0,
                                                                   log_every_steps=7))
  assert fingerprint.fingerprint(config) != fingerprint.fingerprint(changed)


def test_a_second_process_on_a_workdir_is_refused(tmp_path):
  with files.WorkdirLock(tmp_path):
    code = ("import sys; from dit_jax import files\n"
            f"with files.WorkdirLock({str(tmp_path)!r}): pass")
    out = subprocess.run([subprocess.sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env())
    assert out.returncode != 0 and "is in use by pid" in out.stderr
  with files.WorkdirLock(tmp_path):  # released with its holder
    pass


def test_torn_lines(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')  # a crash during an append
  with pytest.warns(UserWarning, match="torn last line"):
    assert files.read_jsonl(path) == [{"a": 1}, {"a": 2}]
  with pytest.warns(UserWarning, match="dropping a torn last line"):
    files.append_jsonl(path, [{"a": 3}])
  assert files.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
  path.write_text('{"a": 1}\n{"a": \n{"a": 2}\n')
  with pytest.raises(ValueError, match=r"r.jsonl:2: not a JSON row"):
    files.read_jsonl(path)


def _tiny_seeds(tmp_path, workers):
  config = dit_sweep.get_config("")
  config.update_from_flattened_dict({
      "sweep.sizes": ("Pico",), "sweep.patches": (8,), "sweep.extra_models": (),
      "sweep.seeds": (0, 1), "sweep.workers": workers, "data.image_size": 8,
      "data.max_examples": 256, "data.val_size": 64, "batch_size": 16, "num_train_steps": 4,
      "log_every_steps": 2, "checkpoint_every_steps": 2, "eval.grid.every_steps": 0,
      "eval.fid.every_steps": 4, "eval.fid.respacing": "4", "eval.fid.num_samples": 32,
      "eval.fid.batch_size": 16, "eval.fid.reference_size": 192, "eval.val.every_steps": 2,
      "eval.val.num_examples": 32, "eval.val.num_timesteps": 4, "eval.val.batch_size": 64,
      "eval.fid.cache_dir": str(tmp_path / "cache")})
  return config


@pytest.mark.slow
def test_concurrent_workers_give_the_rows_of_one_worker(tmp_path):
  rows = {}
  for n in (1, 2):
    assert sweep.run(_tiny_seeds(tmp_path, n), tmp_path / f"w{n}") == []
    rows[n] = sorted(({k: v for k, v in r.items() if k not in TIMING}
                      for r in files.read_jsonl(tmp_path / f"w{n}" / "results.jsonl")),
                     key=lambda r: (r["run"], r["step"]))
  assert [(r["run"], r["step"]) for r in rows[1]] == [
      ("DiT-Pico/8-s0", 2), ("DiT-Pico/8-s0", 4), ("DiT-Pico/8-s1", 2), ("DiT-Pico/8-s1", 4)]
  assert rows[1] == rows[2]
  final = [r for r in rows[1] if r.get("final")]
  assert all("fid" in r and r["val_loss"] > 0 and r["seed"] == s for r, s in zip(final, (0, 1)))
  assert final[0]["val_loss"] != final[1]["val_loss"]  # seeds train differently...
  assert final[0]["fid_reference_fingerprint"] == final[1]["fid_reference_fingerprint"]
  assert final[0]["config_fingerprint"] != final[1]["config_fingerprint"]
  # ...and the same member re-run in the same workdir is skipped, a changed one refused.
  assert sweep.run(_tiny_seeds(tmp_path, 2), tmp_path / "w2") == []
  changed = _tiny_seeds(tmp_path, 2)
  changed.ema_decay = 0.5
  with pytest.raises(ValueError, match="another config"):
    sweep.run(changed, tmp_path / "w2")


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
  config = tiny_config(num_train_steps=6, checkpoint_every_steps=2, keep_checkpoints=3)
  final = train.train_and_evaluate(config, tmp_path)
  ckpts = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]
  for f in (ckpts / "6" / "state").rglob("*"):  # every array file of step 6 overwritten
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\0garbage" * 8)
  run = train.setup(config, tmp_path)
  try:
    state = train.restore_or_init(run)
  finally:
    run.lock.__exit__()
  assert int(state.step) == 4  # the newest checkpoint that reads back
  assert (tmp_path / "checkpoints.corrupt" / "6").is_dir()  # kept, not deleted
  assert not (ckpts / "6").exists()
  # Resuming from there trains steps 5 and 6 again: the same final state as the first run.
  again = train.train_and_evaluate(config, tmp_path)
  assert int(again.step) == 6
  np.testing.assert_array_equal(np.asarray(again.params["x_embedder"]["kernel"]),
                                np.asarray(final.params["x_embedder"]["kernel"]))
