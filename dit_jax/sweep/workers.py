"""Sweep members in concurrent worker processes, each pinned to its own CPU core.

On a small CPU most members do not speed up on a second core (XLA:CPU keeps a small model's step
on about one core), but two processes, one per core, do run twice the work. `sweep.workers = N`
starts N workers, worker k pinned to core k mod N, each

  python -m dit_jax.sweep.workers CORE PARENT_PID

and feeds them members one at a time: a JSON line {"key", "config", "run_dir"} on the worker's
stdin; the worker trains it with `train.train_and_evaluate` (its own workdir lock, checkpoints,
resume), its logs going to RUN_DIR/train.log, and answers {"key", "code"} on its stdout. A worker
lives for the whole sweep, so Python, jax and TensorFlow are imported once per core, not once per
member, and the compilation cache (compile_cache.py) serves the programs of a model's later seeds.
A worker that dies takes only its member with it (recorded as failed); a fresh one takes its
place. A worker dies with the parent (`die_with_parent`): killing the sweep kills its workers. Only the parent writes results rows, so nothing interleaves. Runs are identical whatever N
is and whatever ran before in the worker: every worker sees one core, so XLA's thread pool has one
thread, and every run draws from its own seeds.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import ml_collections

from dit_jax import errors

PREEMPTED = errors.EXIT_PREEMPTED  # a member that saved its checkpoint on SIGTERM and stopped
DIED = -1000  # `code` of a member whose worker process died under it (the signal is in its log)


def _cores() -> list[int]:
  return sorted(os.sched_getaffinity(0))


class _Worker:
  """A worker process on one core, and the member it is training."""

  def __init__(self, core: int, env: dict | None = None):
    self.core, self.job, self.t0, self.termed = core, None, 0.0, False
    self.env = env  # devices.worker_envs: the devices this worker sees (None: the parent's)
    self.proc = subprocess.Popen([sys.executable, "-m", "dit_jax.sweep.workers", str(core),
                                  str(os.getpid())],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                 env=env)

  def start(self, job) -> None:
    key, cfg, run_dir = job
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "member_config.json"), "w") as f:
      json.dump(cfg, f, indent=1)
    self.job, self.t0 = job, time.perf_counter()
    self.proc.stdin.write(json.dumps(dict(key=key, config=cfg, run_dir=run_dir)) + "\n")
    self.proc.stdin.flush()

  def stop(self) -> None:
    try:
      self.proc.stdin.close()
    except OSError:
      pass
    self.proc.wait()


def run_pool(jobs: list, num_workers: int, on_done: Callable, poll_s: float = 0.2,
             envs: list | None = None, on_tick: Callable | None = None) -> bool:
  """Runs `jobs` [(key, member config dict, run_dir)] in that order on at most `num_workers`
  workers; `on_done(key, code, seconds)` after each (code 0: finished, PREEMPTED, or an error).
  `envs[k]`: worker k's environment (devices.worker_envs; None: the parent's); `on_tick(keys)`,
  the running members' keys, every poll (progress.Live.poll). Returns False if
  SIGTERM stopped the pool (running members save their checkpoints)."""
  cores, queue, stop = _cores(), list(jobs), {"term": False}
  pool = [_Worker(cores[k % len(cores)], envs[k] if envs else None)
          for k in range(min(num_workers, len(jobs)))]
  old = signal.signal(signal.SIGTERM, lambda *a: stop.update(term=True))
  try:
    while True:
      if stop["term"]:
        queue.clear()
        for w in pool:
          if w.job is not None and w.proc.poll() is None and not w.termed:
            w.proc.send_signal(signal.SIGTERM)  # its member saves a checkpoint and returns
            w.termed = True  # once: a second SIGTERM after the member returned would kill it
      for k, w in enumerate(pool):
        if w.job is None and queue:
          if w.proc.poll() is not None:
            w = pool[k] = _Worker(w.core, w.env)
          w.start(queue.pop(0))
      busy = [w for w in pool if w.job is not None]
      if not busy:
        break
      if on_tick is not None:
        on_tick([w.job[0] for w in busy])
      ready, _, _ = select.select([w.proc.stdout for w in busy], [], [], poll_s)
      for w in busy:
        if w.proc.stdout not in ready:
          continue
        line = w.proc.stdout.readline()
        key, seconds = w.job[0], time.perf_counter() - w.t0
        if line:
          code = json.loads(line)["code"]
        else:  # EOF: the process died under its member
          code = DIED
        if code not in (0, PREEMPTED):
          w.proc.wait()  # a worker exits after a failed member; the next one gets a fresh process
        w.job = None
        on_done(key, code, seconds)
    for w in pool:
      w.stop()
  finally:
    signal.signal(signal.SIGTERM, old)
  return not stop["term"]


def last_error(run_dir, code: int = 1) -> str:
  """The last error line a worker logged (for the failed row)."""
  try:
    with open(os.path.join(run_dir, "train.log")) as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return "worker log missing"
  errors = [l for l in lines if "Error" in l or "error" in l]
  if code == DIED:
    return "the worker process died (killed, or out of memory); its log: " + (lines or ["empty"])[-1][:400]
  return (errors or lines or ["worker exited without output"])[-1][:500]


def _train_one(config_dict: dict, run_dir: str) -> int:
  from dit_jax.training import train  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(config_dict)
  try:
    state = train.train_and_evaluate(config, run_dir)
  except Exception:  # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    return 1
  return 0 if int(state.step) >= config.num_train_steps else PREEMPTED


def die_with_parent(parent: int) -> None:
  """SIGKILL this worker when the sweep's parent process `parent` dies, however it dies (kill -9
  included): an orphan would keep training untracked and hold its member's lock. Linux's
  PR_SET_PDEATHSIG does it at once; a thread that watches for re-parenting does it elsewhere."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=import-outside-toplevel
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
  threading.Thread(target=watch, daemon=True, name="die_with_parent").start()


def main(argv) -> int:
  """A worker on core argv[1] for the parent process argv[2]: trains the members it reads from
  stdin until stdin closes, or until one fails (a fresh process takes the next)."""
  core = int(argv[1])
  die_with_parent(int(argv[2]))  # the parent may already be gone: then the watcher kills us
  # Before the first computation creates XLA's CPU client, whose thread pool is sized by the cores
  # this process may use.
  from dit_jax.sweep import devices  # pylint: disable=import-outside-toplevel
  if devices.pins_core():  # CPU workers; accelerator workers (devices_per_member) share the cores
    os.sched_setaffinity(0, {core})
  answer = os.fdopen(os.dup(1), "w", buffering=1)  # the pipe to the parent, and only answers
  os.dup2(2, 1)  # anything printed between members goes to stderr, not into the answers
  from dit_jax.training import compile_cache  # pylint: disable=import-outside-toplevel
  compile_cache.enable()
  out, err = os.dup(1), os.dup(2)
  for line in sys.stdin:
    job = json.loads(line)
    with open(os.path.join(job["run_dir"], "train.log"), "a") as log:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(log.fileno(), 1)
      os.dup2(log.fileno(), 2)
      try:
        code = _train_one(job["config"], job["run_dir"])
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out, 1)
        os.dup2(err, 2)
    answer.write(json.dumps(dict(key=job["key"], code=code)) + "\n")
    if code not in (0, PREEMPTED):
      return 1  # whatever the failure left behind (a lock, a half-built state) goes with us
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
