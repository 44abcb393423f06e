"""The sweep's worker pool: long-lived processes that train members one after another, where a
member that fails, or whose process is killed, costs only that member."""
import os
import pathlib
import signal
import threading
import time

import pytest

from dit_jax import files
from dit_jax.sweep import workers
from tests.helpers import pids_with, tiny_config


def _worker_pids():
  # this test process's workers only (their last argument is their parent's pid), never those
  # of a sweep running beside the tests
  return pids_with(b"dit_jax.sweep.workers", str(os.getpid()).encode())


def _kill_when_training(run_dir: pathlib.Path, timeout_s=300):
  metrics = run_dir / "metrics.jsonl"
  t0 = time.time()
  while time.time() - t0 < timeout_s:
    if metrics.exists() and any("loss" in r for r in files.read_jsonl(metrics)):
      for pid in _worker_pids():
        os.kill(pid, signal.SIGKILL)
      return
    time.sleep(0.05)


@pytest.mark.slow
def test_a_failed_or_killed_member_costs_only_itself(tmp_path):
  good = tiny_config(num_train_steps=2, checkpoint_every_steps=2).to_dict()
  bad = dict(good, model="DiT-Q/2")
  endless = tiny_config(num_train_steps=1_000_000, checkpoint_every_steps=1_000_000).to_dict()
  jobs = [("bad", bad, str(tmp_path / "bad")), ("killed", endless, str(tmp_path / "killed")),
          ("good", good, str(tmp_path / "good")), ("good2", good, str(tmp_path / "good2"))]
  killer = threading.Thread(target=_kill_when_training, args=(tmp_path / "killed",))
  killer.start()
  done = []
  assert workers.run_pool(jobs, 1, lambda key, code, s: done.append((key, code)))
  killer.join()
  assert done == [("bad", 1), ("killed", workers.DIED), ("good", 0), ("good2", 0)]
  assert "DiT-Q/2" in workers.last_error(tmp_path / "bad")
  assert "died" in workers.last_error(tmp_path / "killed", workers.DIED)
  # good and good2 ran in one process (after the kill, a fresh one): both finished, each logged.
  for run in ("good", "good2"):
    assert [r["step"] for r in files.read_jsonl(tmp_path / run / "metrics.jsonl") if "loss" in r]
  assert not _worker_pids()  # the pool leaves no process behind


@pytest.mark.slow
def test_sigterm_stops_the_pool_with_the_running_member_checkpointed(tmp_path):
  endless = tiny_config(num_train_steps=1_000_000, checkpoint_every_steps=1_000_000).to_dict()
  good = tiny_config(num_train_steps=2).to_dict()
  jobs = [("endless", endless, str(tmp_path / "endless")), ("next", good, str(tmp_path / "next"))]

  def term_when_training():
    metrics = tmp_path / "endless" / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < 300:
      if metrics.exists() and any("loss" in r for r in files.read_jsonl(metrics)):
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends the sweep's parent
        return
      time.sleep(0.05)

  threading.Thread(target=term_when_training).start()
  done = []
  assert not workers.run_pool(jobs, 1, lambda key, code, s: done.append((key, code)))
  assert done == [("endless", workers.PREEMPTED)]  # saved and stopped; "next" never started
  assert [p.name for p in (tmp_path / "endless" / "checkpoints").iterdir() if p.name.isdigit()]
  assert not (tmp_path / "next").exists() and not _worker_pids()
