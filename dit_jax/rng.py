"""Named random streams: every key or numpy generator the framework derives from a seed, in one
place.

A stream's number is part of every result made with it (changing one changes FIDs, splits and
validation losses), so each is a named constant here, never a literal at its use.

Training draws from `config.seed` (parameters, per-step noise and times, the data order: see
train_step and data.pipeline, which fold the step into the seed's key). Evaluation draws from
`eval.seed`, common to every member and training seed of a sweep, so they are compared on the same
noise and labels. The held-out split and the class-stratified samples draw from `data.val_seed` /
`eval.seed` with their own stream numbers, so no two uses of one seed see the same numbers.
"""
import jax
import numpy as np

# jax keys from eval.seed: PRNGKey(eval.seed + offset), then folded as each evaluator says.
FID_SAMPLES = 1  # + eval.seed; folded with the step: FID's labels and sampling noise
VALIDATION = 2  # + eval.seed: the validation loss's fixed noise
VALIDATION_POSTERIOR = 1  # folded into VALIDATION's key: one fixed latent posterior draw
GRID = 1_000_003  # folded into PRNGKey(eval.seed): the sample grid's noise

# numpy generators: default_rng([seed, stream, *more]).
EPOCH_ORDER = 0  # config.seed, epoch: the data pipeline's shuffle of each epoch
FLIPS = 1  # config.seed, step: the data pipeline's random flips of each step
SPLIT = 7  # data.val_seed: the held-out validation split's permutation
STRATIFIED = 11  # a seeded class-stratified sample (data.max_examples, eval.fid.reference_size)
KID_SUBSETS = 13  # eval.seed: KID's random subsets (evaluation/unbiased.py)
FID_INF_SUBSETS = 17  # eval.seed: FID∞'s random subset at each sample count (evaluation/unbiased.py)
# The dataset CNN (evaluation/feature_net.py) under its own seed: default_rng(seed) holds out its
# test images, jax.random.key(seed) initialises it, default_rng(seed + FEATURE_NET_BATCHES) orders
# its minibatches.
FEATURE_NET_BATCHES = 1


def grid_key(eval_seed: int) -> jax.Array:
  """The sample grid's key (the same at every step: the grid shows one noise over training)."""
  return jax.random.fold_in(jax.random.PRNGKey(eval_seed), GRID)


def fid_key(eval_seed: int, step: int) -> jax.Array:
  """The key of FID's labels and samples at `step`."""
  return jax.random.fold_in(jax.random.PRNGKey(eval_seed + FID_SAMPLES), step)


def validation_keys(eval_seed: int) -> tuple:
  """(the validation loss's noise key, its latent posterior key)."""
  key = jax.random.PRNGKey(eval_seed + VALIDATION)
  return key, jax.random.fold_in(key, VALIDATION_POSTERIOR)


def numpy_rng(seed: int, stream: int, *more: int) -> np.random.Generator:
  """numpy's generator of `stream` (EPOCH_ORDER, FLIPS, SPLIT, STRATIFIED) under `seed`."""
  return np.random.default_rng([seed, stream, *more])
