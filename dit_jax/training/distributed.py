"""Processes: joining a `jax.distributed` job, and preemption (SIGTERM) as one flag for all hosts."""
import os
import signal

import jax
from jax.experimental import multihost_utils


def check_config(dist) -> None:
  """`config.distributed`: an explicit coordinator needs a consistent process count and id."""
  if dist.coordinator_address:
    if dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes:
      raise ValueError(f"distributed.process_id={dist.process_id} must be in [0, num_processes="
                       f"{dist.num_processes})")
    if ":" not in dist.coordinator_address:
      raise ValueError(f"distributed.coordinator_address={dist.coordinator_address!r}: use "
                       f"'host:port'")


def maybe_initialize(dist) -> None:
  """jax.distributed: explicit coordinator from the config, or automatic on SLURM / TPU pods."""
  if jax.distributed.is_initialized():
    return
  if dist.coordinator_address:
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=dist.coordinator_address,
                               num_processes=dist.num_processes, process_id=dist.process_id)
  elif dist.auto and (int(os.environ.get("SLURM_NTASKS", "1")) > 1
                      or "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS"
                      in os.environ or os.environ.get("DIT_JAX_DISTRIBUTED") == "1"):
    # DIT_JAX_DISTRIBUTED=1 (tools/launch_tpu_pod.sh): a Cloud TPU VM pod, which JAX detects itself.
    jax.distributed.initialize()


class Preemption:
  """SIGTERM sets a flag (single process) or jax's preemption sync point (multi-host)."""

  def __init__(self):
    self.requested = False
    self._old = None
    if jax.process_count() == 1:
      try:
        self._old = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread
        self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is not running
        return False
    return self.requested

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
