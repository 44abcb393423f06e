"""The deterministic, sharded batch pipeline over a `sources.Source`.

`Pipeline(source, global_batch_size, seed, sharding).batch(step)` returns the global batch of `step`
as jax.Arrays sharded along the batch. The batch is a pure function of (seed, step): example order
is a permutation drawn from (seed, epoch), flips from (seed, step), latent posterior noise from
(seed, step); so the pipeline's whole state is the step, and a resumed run sees the same batches.
Each process reads only the rows its devices hold.

Pixels are scaled to [-1, 1]. Latent sources give the posterior parameters, and the pipeline samples
z = mean + std * eps per step, scaled by the VAE's scaling factor (0.18215), as DiT's train.py does.
"""
import concurrent.futures
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import rng as rng_lib
from dit_jax import sharding as sharding_lib
from dit_jax.data import images as images_lib
from dit_jax.data import sources


class Pipeline:
  """Global batches of a Source; `batch(step)` is a pure function of (seed, step)."""

  def __init__(self, source: sources.Source, global_batch_size: int, seed: int,
               sharding: Optional[jax.sharding.Sharding] = None):
    if global_batch_size <= 0:
      raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    if sharding is None:
      if jax.process_count() > 1:
        raise ValueError("multi-process runs must pass the batch sharding to Pipeline")
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    self.source, self.global_batch_size, self.seed = source, global_batch_size, seed
    channels = source.image_shape[-1] * (2 if source.kind == "latents" else 1)
    self._host_shape = (global_batch_size,) + tuple(source.image_shape[:-1]) + (channels,)
    self.image_shape = (global_batch_size,) + tuple(source.image_shape)
    self.label_shape = (global_batch_size,) + tuple(source.label_shape)  # (B,) or (B, L)
    try:
      sharding.shard_shape(self._host_shape)
    except ValueError as e:
      raise ValueError(f"global_batch_size={global_batch_size} does not split evenly over the "
                       f"batch sharding {sharding}: {e}") from e
    self.sharding, self.label_sharding = sharding, sharding_lib.leading_axis(sharding)
    # This process's rows: the bounding range of its devices' batch slices.
    slices = [idx[0] for idx in sharding.addressable_devices_indices_map(self._host_shape).values()]
    self.local_start = min(s.start or 0 for s in slices)
    self.local_stop = max(global_batch_size if s.stop is None else s.stop for s in slices)
    self._perms = {}
    if source.kind == "latents":
      scale = source.scaling_factor
      self._to_device = jax.jit(
          lambda m, step: _sample_latents(m, step, seed, scale), out_shardings=sharding)
    else:
      self._to_device = jax.jit(lambda x, step: images_lib.to_unit_range(x), out_shardings=sharding)

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      rng = rng_lib.numpy_rng(self.seed, rng_lib.EPOCH_ORDER, epoch)
      self._perms[epoch] = rng.permutation(self.source.num_examples)
    return self._perms[epoch]

  def indices(self, step: int):
    """Global (example indices, flip bits) of `step`'s batch, this process's rows only."""
    pos = step * self.global_batch_size + np.arange(self.local_start, self.local_stop)
    n = self.source.num_examples
    epochs = pos // n
    idx = np.empty(len(pos), np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      idx[sel] = self._permutation(int(e))[pos[sel] % n]
    flips = rng_lib.numpy_rng(self.seed, rng_lib.FLIPS, step).random(self.global_batch_size) < 0.5
    flips = flips[self.local_start:self.local_stop] & self.source.flip
    return idx, flips

  def host_batch(self, step: int):
    """This process's part of `step`'s batch as numpy (uint8 pixels or float32 moments, labels)."""
    return self.source.read(*self.indices(step))

  def to_device(self, step: int, x_local, labels_local) -> dict:
    """Assembles the process-local parts into global sharded arrays and normalises/samples."""
    x = jax.make_array_from_process_local_data(self.sharding, x_local, self._host_shape)
    labels = jax.make_array_from_process_local_data(
        self.label_sharding, labels_local.astype(np.int32), self.label_shape)
    return {"image": self._to_device(x, jnp.int32(step)), "label": labels}

  def batch(self, step: int) -> dict:
    """{'image': float32 [B,H,W,C] in [-1,1] (latents: z*scale), 'label': int32 [B] (a caption
    source's: [B, L] token ids)} of `step`."""
    return self.to_device(step, *self.host_batch(step))

  def iterate(self, start_step: int = 0) -> Iterator[dict]:
    """batch(start_step), batch(start_step+1), ... with the next host batch read in the background."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      future = pool.submit(self.host_batch, start_step)
      step = start_step
      while True:
        host = future.result()
        future = pool.submit(self.host_batch, step + 1)
        yield self.to_device(step, *host)
        step += 1


def _sample_latents(moments, step, seed, scale):
  """DiT's training input: (mean + exp(logvar/2) * eps) * scale, eps from (seed, step)."""
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  key = jax.random.fold_in(jax.random.key(seed), step)
  eps = jax.random.normal(key, mean.shape, jnp.float32)
  return (mean + jnp.exp(0.5 * logvar) * eps) * scale
