r"""Trains the dataset's own FID feature network (dit_jax.evaluation.feature_net) and caches it.

  python tools/train_feature_net.py --dataset mnist --path /work/shared/data/mnist --split test \
      --image_size 28
  python tools/train_feature_net.py --dataset digits --image_size 16

It trains on the images a run's FID evaluator uses for this data: a class-stratified sample of
--reference_size examples drawn with --sample_seed (eval.fid.reference_size and eval.seed), so
the run then loads this net. The net is cached as
<cache_dir>/feature_net_<dataset>_<image_size>_<key>.npz, keyed by the images it learned from
(cache_dir defaults to $DIT_JAX_CACHE or ~/.cache/dit_jax); metrics computed with it are named e.g.
fid_mnist_cnn. Retraining gives new weights, and reference statistics keyed by the old weights are
never reused with them.
"""
import pathlib

from absl import app
from absl import flags
import numpy as np

from dit_jax.data import sources
from dit_jax.evaluation import feature_net
from dit_jax.evaluation import inception

_DATASET = flags.DEFINE_string(
    "dataset", None, "A data.name: digits | mnist | cifar10 | folder | npz (mnist/cifar10 without "
    "--path: TFDS).", required=True)
_PATH = flags.DEFINE_string("path", "", "Data files (mnist idx.gz dir, class folders, .npz).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Resolution the net sees (px).",
                                   required=True)
_CHANNELS = flags.DEFINE_integer("channels", 0, "0 = the dataset's own; 1 or 3 converts.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to train on, as data.split reads it.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Default: $DIT_JAX_CACHE or ~/.cache/dit_jax.")
_REFERENCE_SIZE = flags.DEFINE_integer(
    "reference_size", 10000, "Examples to train on (eval.fid.reference_size; <= 0: all).")
_SAMPLE_SEED = flags.DEFINE_integer("sample_seed", 0, "Seed of that sample (eval.seed).")
_STEPS = flags.DEFINE_integer("steps", 300, "Adam steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Training batch size.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and batch-order seed.")
_NO_RETRAIN = flags.DEFINE_bool(
    "no-retrain", False, "Load the cached net if there is one instead of training a new one.")


def run(dataset: str, image_size: int, *, path: str = "", channels: int = 0, split: str = "train",
        cache_dir: str = "", reference_size: int = 10000, sample_seed: int = 0, steps: int = 300,
        batch_size: int = 64, seed: int = 0, retrain: bool = True) -> dict:
  """Trains the net (without `retrain`: loads the cached one), prints its test accuracy; returns
  meta."""
  cache_dir = pathlib.Path(cache_dir or inception.default_cache_dir())

  def labelled_images():
    images, labels, got_split = feature_net.read_labelled(dataset, path or None, image_size,
                                                          channels, split)
    n = len(images) if reference_size <= 0 else min(reference_size, len(images))
    idx = sources.stratified_sample(labels, n, sample_seed)
    images, labels = images[idx], labels[idx]
    print(f"{dataset} ({got_split}): {images.shape[0]} images {images.shape[1:]}, "
          f"{np.unique(labels).size} classes")
    return images, labels

  name = sources.identity(dataset, path) if dataset in ("npz", "folder") else dataset
  _, meta = feature_net.load_or_train(name, cache_dir, image_size, labelled_images,
                                      channels=channels, retrain=retrain, steps=steps,
                                      batch_size=batch_size, seed=seed)
  cached = feature_net.cache_path(cache_dir, name, image_size, channels, meta["data_key"])
  print(f"{feature_net.network_name(name)}: test accuracy {meta['test_accuracy']:.4f} "
        f"({meta['num_test']} held-out images), cached at {cached}")
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_DATASET.value, _IMAGE_SIZE.value, path=_PATH.value, channels=_CHANNELS.value,
      split=_SPLIT.value, cache_dir=_CACHE_DIR.value, reference_size=_REFERENCE_SIZE.value,
      sample_seed=_SAMPLE_SEED.value, steps=_STEPS.value, batch_size=_BATCH_SIZE.value,
      seed=_SEED.value, retrain=not _NO_RETRAIN.value)


if __name__ == "__main__":
  app.run(main)
