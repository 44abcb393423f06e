r"""Trains the dataset's own FID feature network (dit_jax.feature_net) and caches it.

  python tools/train_feature_net.py --dataset mnist --path /work/shared/data/mnist --split test \
      --image_size 28
  python tools/train_feature_net.py --dataset digits --image_size 16

The net is cached as <cache_dir>/feature_net_<dataset>_<image_size>.npz (cache_dir defaults to
$DIT_JAX_CACHE or ~/.cache/dit_jax); metrics computed with it are named e.g. fid_mnist_cnn.
"""
import argparse
import pathlib
import sys

from dit_jax import feature_net
from dit_jax import inception


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
  p.add_argument("--steps", type=int, default=300, help="Adam steps")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-retrain", dest="retrain", action="store_false",
                 help="load the cached net if there is one instead of training a new one")
  args = p.parse_args(argv)
  cache_dir = pathlib.Path(args.cache_dir or inception.default_cache_dir())
  path = feature_net.cache_path(cache_dir, args.dataset, args.image_size, args.channels)
  if args.retrain and path.exists():
    path.unlink()

  def labelled_images():
    images, labels, split = feature_net.read_labelled(args.dataset, args.path or None,
                                                      args.image_size, args.channels, args.split)
    print(f"{args.dataset} ({split}): {images.shape[0]} images {images.shape[1:]}, "
          f"{labels.max() + 1} classes")
    return images, labels

  _, meta = feature_net.load_or_train(args.dataset, cache_dir, args.image_size, labelled_images,
                                      channels=args.channels, steps=args.steps,
                                      batch_size=args.batch_size, seed=args.seed)
  print(f"{feature_net.network_name(args.dataset)}: test accuracy {meta['test_accuracy']:.4f} "
        f"({meta['num_test']} held-out images), cached at {path}")
  return meta


if __name__ == "__main__":
  main(sys.argv[1:])
