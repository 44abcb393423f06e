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
import argparse
import pathlib
import sys

import numpy as np

from dit_jax.evaluation import feature_net
from dit_jax.evaluation import inception
from dit_jax.data import sources


def main(argv=None) -> dict:
  """Parses flags, trains (or loads with --no-retrain), prints the test accuracy; returns meta."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", required=True,
                 help="a data.name: digits | mnist | cifar10 | folder | npz (mnist/cifar10 without "
                      "--path: TFDS)")
  p.add_argument("--path", default="", help="data files (mnist idx.gz dir, class folders, .npz)")
  p.add_argument("--image_size", type=int, required=True, help="resolution the net sees (px)")
  p.add_argument("--channels", type=int, default=0, help="0 = the dataset's own; 1 or 3 converts")
  p.add_argument("--split", default="train", help="split to train on, as data.split reads it")
  p.add_argument("--cache_dir", default="", help="default: $DIT_JAX_CACHE or ~/.cache/dit_jax")
  p.add_argument("--reference_size", type=int, default=10000,
                 help="examples to train on (eval.fid.reference_size; <= 0: all)")
  p.add_argument("--sample_seed", type=int, default=0, help="seed of that sample (eval.seed)")
  p.add_argument("--steps", type=int, default=300, help="Adam steps")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-retrain", dest="retrain", action="store_false",
                 help="load the cached net if there is one instead of training a new one")
  args = p.parse_args(argv)
  cache_dir = pathlib.Path(args.cache_dir or inception.default_cache_dir())

  def labelled_images():
    images, labels, split = feature_net.read_labelled(args.dataset, args.path or None,
                                                      args.image_size, args.channels, args.split)
    n = len(images) if args.reference_size <= 0 else min(args.reference_size, len(images))
    idx = sources.stratified_sample(labels, n, args.sample_seed)
    images, labels = images[idx], labels[idx]
    print(f"{args.dataset} ({split}): {images.shape[0]} images {images.shape[1:]}, "
          f"{np.unique(labels).size} classes")
    return images, labels

  name = sources.identity(args.dataset, args.path) if args.dataset in ("npz", "folder") \
      else args.dataset
  _, meta = feature_net.load_or_train(name, cache_dir, args.image_size, labelled_images,
                                      channels=args.channels, retrain=args.retrain,
                                      steps=args.steps, batch_size=args.batch_size, seed=args.seed)
  path = feature_net.cache_path(cache_dir, name, args.image_size, args.channels, meta["data_key"])
  print(f"{feature_net.network_name(name)}: test accuracy {meta['test_accuracy']:.4f} "
        f"({meta['num_test']} held-out images), cached at {path}")
  return meta


if __name__ == "__main__":
  main(sys.argv[1:])
