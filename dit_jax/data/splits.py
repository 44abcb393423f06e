"""The held-out validation split: a seeded subset of the dataset that training never sees.

`data.val_size` examples are drawn with `data.val_seed` (not the training seed), so every member
and every training seed of a sweep holds out the same examples and is scored on the same ones.
"""
import numpy as np

from dit_jax import rng as rng_lib
from dit_jax.data import sources


class Subset(sources.Source):
  """The examples `indices` of `base`, renumbered 0..len-1."""

  def __init__(self, base: sources.Source, indices):
    super().__init__(name=base.name, image_shape=base.image_shape, num_classes=base.num_classes,
                     class_names=base.class_names, num_examples=len(indices), flip=base.flip,
                     kind=base.kind, scaling_factor=base.scaling_factor, split=base.split,
                     label_shape=base.label_shape)
    self.base, self.indices = base, np.asarray(indices, np.int64)

  def read(self, indices, flips):
    return self.base.read(self.indices[np.asarray(indices)], flips)

  @property
  def labels(self) -> np.ndarray:
    return sources.labels_of(self.base)[self.indices]


def check_config(data) -> None:
  if data.val_size < 0:
    raise ValueError(f"data.val_size must be >= 0 (0 = no held-out split), got {data.val_size}")


def split(source: sources.Source, val_size: int, seed: int):
  """(training source, held-out source): a seeded permutation's first `val_size` examples are
  held out; with val_size 0 the training source is `source` itself."""
  if val_size <= 0:
    return source, None
  if val_size >= source.num_examples:
    raise ValueError(f"data.val_size={val_size} leaves no training examples of the "
                     f"{source.num_examples} in {source.name}")
  perm = rng_lib.numpy_rng(seed, rng_lib.SPLIT).permutation(source.num_examples)
  return Subset(source, np.sort(perm[val_size:])), Subset(source, np.sort(perm[:val_size]))
