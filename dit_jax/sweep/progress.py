"""The sweep's live line: training steps done over all members, members done, and an ETA from the
throughput measured so far; updated while members train.

The workers report their progress through the metrics.jsonl each member's training already writes
every `log_every_steps` (its last logged step); the parent reads the running members' files at most
every `every_s` seconds while it waits for them (workers.run_pool's `on_tick`). The ETA weighs each
step by its member's cost (steps x Gflops, the runner's proxy), so big members trained first do not
make it pessimistic. On a terminal this is one tqdm line on stderr; on a non-TTY it is off, and the
runner's one line per finished member is all that is printed (as before).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Callable

from tqdm.auto import tqdm

from dit_jax.training import progress_bar


def last_step(metrics_path, tail_bytes: int = 8192) -> int:
  """The last training step logged in a metrics.jsonl (0 if none yet): its last lines only."""
  try:
    with open(metrics_path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - tail_bytes))
      lines = f.read().decode(errors="ignore").splitlines()
  except OSError:
    return 0
  for line in reversed(lines):
    try:
      row = json.loads(line)
    except ValueError:  # a partial first line of the tail, or a line being written
      continue
    if "loss" in row and "step" in row:
      return int(row["step"])
  return 0


class Live:
  """The live line of a sweep over `members` (runner's Member), whose run directories are
  `run_dir(run)`, with `cost[run]` the runner's cost proxy of each member."""

  def __init__(self, members, run_dir: Callable, cost: dict, stream=None, every_s: float = 2.0,
               enabled: bool = True):
    self.steps = {m.run: max(int(m.steps), 1) for m in members}
    self.cost, self.run_dir, self.every_s = cost, run_dir, every_s
    self.partial, self.finished_runs, self.t0, self.last_poll = {}, set(), time.time(), 0.0
    self.stream = stream or sys.stderr
    self.enabled = enabled and progress_bar.wanted(self.stream)
    self.bar = tqdm(total=sum(self.steps.values()), unit="step", file=self.stream,
                    disable=not self.enabled, **progress_bar.terminal_size(), desc="sweep",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} steps "
                               "[{elapsed}{postfix}]")
    self._refresh()

  def done_fraction(self) -> float:
    """Cost-weighted fraction of the sweep's training done (finished + partial members)."""
    total = sum(self.cost[r] for r in self.steps)
    done = sum(self.cost[r] for r in self.finished_runs)
    done += sum(self.cost[r] * s / self.steps[r] for r, s in self.partial.items())
    return done / total if total else 1.0

  def eta_s(self) -> float | None:
    frac = self.done_fraction()
    return None if frac <= 0 else max(0.0, (time.time() - self.t0) * (1 - frac) / frac)

  def poll(self, running: list, force: bool = False) -> None:
    """Reads the running members' last logged steps (at most every `every_s` seconds)."""
    if not self.enabled or (not force and time.time() - self.last_poll < self.every_s):
      return
    self.last_poll = time.time()
    for run in running:
      if run not in self.finished_runs:
        step = last_step(pathlib.Path(self.run_dir(run)) / "metrics.jsonl")
        self.partial[run] = min(step, self.steps[run])
    self._refresh()

  def finished(self, run: str) -> None:
    """A member is done (or failed): its steps count in full. The bar's line is cleared, so the
    runner's line for the member (printed next) starts on a clean line; the next poll redraws it."""
    self.finished_runs.add(run)
    self.partial.pop(run, None)
    self.last_poll = 0.0
    if self.enabled:
      self.bar.clear()

  def _refresh(self) -> None:
    if not self.enabled:
      return
    self.bar.n = sum(self.steps[r] for r in self.finished_runs) + sum(self.partial.values())
    eta = self.eta_s()
    left = "?" if eta is None else f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.0f} min"
    self.bar.set_postfix_str(f"members {len(self.finished_runs)}/{len(self.steps)}, ETA {left}",
                             refresh=False)
    self.bar.refresh()

  def close(self) -> None:
    self._refresh()  # the final count (the last member's line cleared the bar)
    self.bar.close()

