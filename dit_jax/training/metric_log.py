"""The training loop's metrics: writers (TensorBoard, logging, metrics.jsonl) and the log window.

The step's metrics stay on the device until a log step; then the window's steps are fetched at
once, averaged over the finite values (a skipped step is counted, not averaged), and written with
the window's throughput and MFU.
"""
import pathlib
import time

import jax
import numpy as np
import optax
from clu import metric_writers

from dit_jax import files
from dit_jax import sharding as sharding_lib


class ScalarWriter(metric_writers.MetricWriter):
  """A clu MetricWriter of scalars (and texts, hparams) only: summaries, images, videos, audio,
  histograms and point clouds are ignored (TensorBoard, the default writer, has them)."""

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_pointcloud(self, step, point_clouds, *, point_colors=None, configs=None):
    pass


class JsonlWriter(ScalarWriter):
  """A clu MetricWriter that appends one JSON object per scalar write to a file (through
  files.JsonlAppender: a torn last line left by a kill is cut before the first append)."""

  def __init__(self, path):
    self._out = files.JsonlAppender(path)

  def write_scalars(self, step, scalars):
    self._out.write({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

  def write_texts(self, step, texts):
    self._out.write({"step": int(step), **texts})

  def write_hparams(self, hparams):
    self._out.write({"hparams": {k: str(v) for k, v in hparams.items()}})

  def flush(self):
    pass  # every write is flushed

  def close(self):
    self._out.close()


def create_writer(workdir, total_steps: int = 0, start: int = 0) -> metric_writers.MetricWriter:
  """TensorBoard + logging (process 0 only) and metrics.jsonl in the workdir; on a terminal, a
  progress bar over `total_steps` (progress_bar.py)."""
  default = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() > 0:
    return default
  writers = [default, JsonlWriter(pathlib.Path(workdir) / "metrics.jsonl")]
  from dit_jax.training import progress_bar  # pylint: disable=import-outside-toplevel (a cycle)
  if total_steps and progress_bar.wanted():
    writers.append(progress_bar.ProgressWriter(total_steps, start))
  return metric_writers.MultiWriter(writers)


def finite_mean(values) -> float:
  """Mean over the finite values (skipped steps excluded); NaN if there are none."""
  values = np.asarray(values, np.float64)
  ok = np.isfinite(values)
  return float(values[ok].mean()) if ok.any() else float("nan")


class MetricLog:
  """Collects each step's device metrics and writes one averaged row per log window."""

  def __init__(self, writer, *, start: int, batch_size: int, gflops: float, peak_flops: float,
               mesh):
    self.writer = writer
    self._batch_size, self._gflops, self._peak = batch_size, gflops, peak_flops
    # The params' norm at log steps only: a pass over every parameter is a noticeable share of a
    # small model's step on CPU.
    self._param_norm = jax.jit(optax.tree.norm, out_shardings=sharding_lib.replicated(mesh))
    self._pending, self._t0, self._start = [], time.perf_counter(), start

  def add(self, metrics) -> None:
    self._pending.append(metrics)

  def write(self, step: int, params) -> None:
    """Writes the window that ends at `step` and starts a new one."""
    host = jax.device_get(self._pending)
    dt = time.perf_counter() - self._t0
    summary = {k: finite_mean([m[k] for m in host]) for k in host[-1]
               if k not in ("nonfinite_streak", "nonfinite_total", "skipped")}
    summary["skipped"] = float(sum(m["skipped"] for m in host))
    summary["nonfinite_total"] = float(host[-1]["nonfinite_total"])
    summary["param_norm"] = float(self._param_norm(params))
    steps_per_s = (step - self._start) / dt
    summary.update(steps_per_sec=steps_per_s, images_per_sec=steps_per_s * self._batch_size)
    if self._peak > 0:
      summary["mfu"] = 6.0 * self._gflops * 1e9 * self._batch_size * steps_per_s / self._peak
    self.writer.write_scalars(step, summary)
    self._pending, self._t0, self._start = [], time.perf_counter(), step
