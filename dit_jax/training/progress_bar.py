"""A single training run's progress bar on a terminal: steps, loss and steps/s, updated at each
log window (`log_every_steps`) from the scalars the trainer writes. A clu MetricWriter, so the
trainer's loop is unchanged: metric_log.create_writer adds it on a TTY (process 0 only); on a
non-TTY (a sweep worker's train.log, CI) there is no bar.
"""
from __future__ import annotations

import shutil
import sys

from tqdm.auto import tqdm

from dit_jax.training import metric_log


class ProgressWriter(metric_log.ScalarWriter):
  """tqdm bar over `total` steps, from `start` (a resumed run), on `stream` (default stderr)."""

  def __init__(self, total: int, start: int = 0, stream=None):
    self.bar = tqdm(total=total, initial=start, unit="step", file=stream or sys.stderr,
                    **terminal_size(), desc="train")

  def write_scalars(self, step, scalars):
    if "loss" not in scalars:  # evaluation rows (fid, val_*) do not move the bar
      return
    self.bar.update(max(0, int(step) - self.bar.n))
    postfix = {"loss": f"{float(scalars['loss']):.4g}"}
    if "steps_per_sec" in scalars:
      postfix["steps/s"] = f"{float(scalars['steps_per_sec']):.3g}"
    self.bar.set_postfix(postfix)

  def write_texts(self, step, texts):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self.bar.refresh()

  def close(self):
    self.bar.close()


def wanted(stream=None) -> bool:
  """A bar only on a terminal."""
  stream = stream or sys.stderr
  return bool(getattr(stream, "isatty", lambda: False)())


def terminal_size() -> dict:
  """The terminal's size for tqdm, with a fallback where it reports 0 x 0 (a bare pty), which
  tqdm would take as no room and hide the bar."""
  cols, rows = shutil.get_terminal_size((100, 24))
  return dict(ncols=cols, nrows=rows)
