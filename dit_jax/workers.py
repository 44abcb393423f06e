"""Sweep members as concurrent worker processes, each pinned to its own CPU core.

On a small CPU most members do not speed up on a second core (XLA:CPU keeps a small model's step
on about one core), but two processes, one per core, do run twice the work. `sweep.workers = N`
runs N members at once, member k of the queue on core k mod N. Each worker is

  python -m dit_jax.workers MEMBER_CONFIG.json RUN_DIR CORE

training one member with `train.train_and_evaluate` (its own workdir lock, checkpoints, resume)
and logging to RUN_DIR/train.log. Only the parent writes results rows, so nothing interleaves.
Runs are identical whatever N is: every worker sees one core, so XLA's thread pool has one thread.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import ml_collections

from dit_jax import train

PREEMPTED = 75  # exit code of a worker that saved its checkpoint on SIGTERM and stopped early


def _cores() -> list[int]:
  return sorted(os.sched_getaffinity(0))


def run_pool(jobs: list, num_workers: int, on_done: Callable, poll_s: float = 0.2) -> bool:
  """Runs `jobs` [(key, member config dict, run_dir)] with at most `num_workers` at once;
  `on_done(key, returncode, seconds)` after each. Returns False if SIGTERM stopped the pool."""
  cores, queue, running, stop = _cores(), list(jobs), {}, {"term": False}
  old = signal.signal(signal.SIGTERM, lambda *a: stop.update(term=True))
  try:
    while queue or running:
      while queue and len(running) < num_workers and not stop["term"]:
        key, cfg, run_dir = queue.pop(0)
        free = [c for c in cores if c not in {r[2] for r in running.values()}] or cores
        core = free[0]
        os.makedirs(run_dir, exist_ok=True)
        cfg_path = os.path.join(run_dir, "member_config.json")
        with open(cfg_path, "w") as f:
          json.dump(cfg, f, indent=1)
        log = open(os.path.join(run_dir, "train.log"), "a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dit_jax.workers", cfg_path, run_dir, str(core)], stdout=log,
            stderr=subprocess.STDOUT)
        running[key] = (proc, time.perf_counter(), core, log)
      if stop["term"]:
        for proc, *_ in running.values():
          proc.send_signal(signal.SIGTERM)  # each saves its checkpoint and exits
        queue.clear()
      for key in [k for k, (p, *_) in running.items() if p.poll() is not None]:
        proc, t0, _, log = running.pop(key)
        log.close()
        on_done(key, proc.returncode, time.perf_counter() - t0)
      time.sleep(poll_s)
  finally:
    signal.signal(signal.SIGTERM, old)
  return not stop["term"]


def last_error(run_dir) -> str:
  """The last error line a worker logged (for the failed row)."""
  try:
    with open(os.path.join(run_dir, "train.log")) as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return "worker log missing"
  errors = [l for l in lines if "Error" in l or "error" in l]
  return (errors or lines or ["worker exited without output"])[-1][:500]


def main(argv) -> int:
  """A worker: train the member whose config is argv[1] in workdir argv[2] on core argv[3]."""
  config_path, run_dir, core = argv[1], argv[2], int(argv[3])
  # Before the first computation creates XLA's CPU client, whose thread pool is sized by the cores
  # this process may use.
  os.sched_setaffinity(0, {core})
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  state = train.train_and_evaluate(config, run_dir)
  return 0 if int(state.step) >= config.num_train_steps else PREEMPTED


if __name__ == "__main__":
  sys.exit(main(sys.argv))
