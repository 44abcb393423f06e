"""Sample-quality evaluator for the training loop: sample N images sharded, embed them, score them."""
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dit_jax import fid

SampleFn = Callable[[jax.Array, jax.Array | None], jax.Array]


class Evaluator:
  """`run(sample_fn, rng)` -> {fid_<net>, sfid_<net>, is_<net>, precision_<net>, recall_<net>}.

  sample_fn(rng, labels_B) returns images (B, H, W, C) in [-1, 1]; it should be jitted. Labels are
  drawn uniformly from num_classes (None: unconditional, sample_fn gets labels=None) and sharded
  over the mesh's data axis, so a sample_fn jitted without explicit shardings runs data-parallel.
  Images are quantised to uint8 (DiT's sample_ddp.py rule) before the feature network sees them.
  """

  def __init__(self, feature_name: str, feature_fn: fid.FeatureFn, reference: fid.Reference,
               num_samples: int, batch_size: int, num_classes: int | None = None, mesh=None,
               data_axis: Any = "data", precision_recall: bool = True, progress: bool = True):
    if reference.feature_net != feature_name:
      raise ValueError(f"reference statistics were made with {reference.feature_net!r}, not "
                       f"{feature_name!r}")
    if num_samples < 2:
      raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
    self.sharding, num_shards = fid.data_sharding(mesh, data_axis)
    if batch_size % num_shards:
      raise ValueError(f"batch_size {batch_size} must be a multiple of the {num_shards} devices on "
                       f"the data axis")
    self.feature_name = feature_name
    self.feature_fn = feature_fn
    self.reference = reference
    self.num_samples = num_samples
    self.batch_size = batch_size
    self.num_classes = num_classes
    self.precision_recall = precision_recall
    self.progress = progress
    self._labels = jax.jit(lambda r: jax.random.randint(r, (batch_size,), 0, num_classes or 1),
                           out_shardings=self.sharding)
    self._quantize = jax.jit(fid.quantize, out_shardings=self.sharding)

  def _batch(self, sample_fn, rng):
    label_rng, sample_rng = jax.random.split(rng)
    labels = self._labels(label_rng) if self.num_classes else None
    images = sample_fn(sample_rng, labels)
    if images.ndim != 4 or images.shape[0] != self.batch_size:
      raise ValueError(f"sample_fn must return ({self.batch_size}, H, W, C) images in [-1, 1], "
                       f"got shape {images.shape}")
    return self.feature_fn(self._quantize(jax.device_put(images, self.sharding)))

  def sample_features(self, sample_fn: SampleFn, rng: jax.Array) -> dict:
    """Features of num_samples images from sample_fn (batch i uses fold_in(rng, i))."""
    num_batches = math.ceil(self.num_samples / self.batch_size)
    collected = {}

    def fetch(feats):
      for key, value in jax.device_get(feats).items():
        collected.setdefault(key, []).append(np.asarray(value))

    pending = None
    for i in tqdm(range(num_batches), desc=f"eval {self.feature_name}", disable=not self.progress):
      feats = self._batch(sample_fn, jax.random.fold_in(rng, i))
      if pending is not None:  # fetch batch i-1 after dispatching batch i, so the device never idles
        fetch(pending)
      pending = feats
    fetch(pending)
    return {key: np.concatenate(value)[:self.num_samples] for key, value in collected.items()}

  def run(self, sample_fn: SampleFn, rng: jax.Array) -> dict[str, float]:
    """Samples, embeds and scores num_samples images; metric names carry the feature network."""
    feats = self.sample_features(sample_fn, rng)
    return fid.metrics(self.feature_name, feats, self.reference, pr=self.precision_recall)
