"""A small CNN classifier trained on the dataset itself, whose pooled features stand in for Inception.

Offline, or on small data (digits, MNIST), the standard FID Inception weights are not available or not
meaningful. This net is trained on the real images of the dataset; its globally pooled last-stage
features (the layer before the classifier, like Inception's pool_3) are the embedding for FID and
precision/recall, and its logits give an Inception-Score-like number. Metrics computed with it carry
its name (e.g. `fid_mnist_cnn`), so they are never confused with Inception FID.
"""
import json
import pathlib
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from dit_jax import files
from dit_jax import rng as rng_lib
from dit_jax import sharding as sharding_lib
from dit_jax.data import images as images_lib
from dit_jax.data import sources

Dtype = Any


class FeatureNet(nn.Module):
  """uint8 NHWC images (any size, any channels) -> dict(pool=(N, widths[-1]), logits=(N, classes))."""
  num_classes: int
  widths: Sequence[int] = (32, 64, 128)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_NxHxWxC, train: bool = False):
    x = images_lib.to_unit_range(images_NxHxWxC, self.dtype, clip=False)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i, width in enumerate(self.widths):
      # Every stage, the first included, halves the resolution: 3x cheaper to train on CPU than a
      # full-resolution first stage, and no less accurate on 28x28 digits.
      x = nn.Conv(width, (3, 3), strides=(2, 2), padding="SAME", name=f"down{i}", **kw)(x)
      x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False, name=f"conv{i}", **kw)(x)
      # BatchNorm, a fixed affine map at evaluation like Inception's: with GroupNorm (per-image
      # statistics) the features were nearly blind to added noise (FID +0.01 at sigma 0.2 vs +16).
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"norm{i}", **kw)(x)
      x = nn.swish(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, name="classifier", **kw)(pool)
    return {"pool": pool, "logits": logits.astype(jnp.float32)}


def resize_images(images_NxHxWxC: np.ndarray, size: int) -> np.ndarray:
  """ADM's centre crop of uint8 images to size x size, the training pipeline's own resize."""
  if images_NxHxWxC.shape[1:3] == (size, size):
    return images_NxHxWxC
  return np.stack([images_lib.prepare_image(im, size, 0) for im in images_NxHxWxC])


def read_labelled(name: str, path, image_size: int, channels: int = 0, split: str = "train"):
  """(images uint8 NHWC, labels, split read) of a dataset named as in the data config.

  The images come from `sources.create_source`, so the dataset names, split rules, channel
  conversion and ADM resize are the training pipeline's own; split read is "all" where the dataset
  has no splits (digits, npz, a folder without a `split` sub-folder).
  """
  if name == "latents":  # the net sees pixels; latents would need decoding first
    raise ValueError("dataset 'latents' holds VAE latents, not images: pass labelled images to "
                     "train the feature net on")
  cfg = sources.default_data_config()
  cfg.update(dict(name=name, path=str(path or ""), image_size=image_size, channels=channels,
                  split=split, flip=False))
  source = sources.create_source(cfg)
  n = source.num_examples
  images, labels = source.read(np.arange(n), np.zeros(n, bool))
  return images, labels, source.split


def train(images: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None,
          widths: Sequence[int] = (32, 64, 128), steps: int = 300, batch_size: int = 64,
          learning_rate: float = 3e-3, test_fraction: float = 0.1, seed: int = 0,
          log: Callable[[str], None] | None = print):
  """Trains a FeatureNet on uint8 images: (variables, meta) with meta['test_accuracy']."""
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"train expects uint8 NHWC images, got {images.dtype} {images.shape}")
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels")
  num_classes = int(num_classes or labels.max() + 1)
  perm = np.random.default_rng(seed).permutation(len(images))
  n_test = max(1, int(round(test_fraction * len(images))))
  test_idx, train_idx = perm[:n_test], perm[n_test:]
  model = FeatureNet(num_classes, tuple(widths))
  variables = model.init(jax.random.key(seed), images[:1])
  params, batch_stats = variables["params"], variables["batch_stats"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps // 10), steps)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      out, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                 mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean()
      return loss, updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  rng = np.random.default_rng(seed + rng_lib.FEATURE_NET_BATCHES)
  t0 = time.time()
  order = np.array([], np.int64)
  for i in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(train_idx)])
    idx, order = order[:batch_size], order[batch_size:]
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, images[idx],
                                                labels[idx])
    if log and (i + 1) % max(1, steps // 5) == 0:
      log(f"feature net step {i + 1}/{steps}: loss {float(loss):.4f} ({time.time() - t0:.1f}s)")
  variables = {"params": params, "batch_stats": batch_stats}
  apply = jax.jit(lambda v, x: model.apply(v, x)["logits"])
  correct = 0
  for i in range(0, n_test, 512):
    batch = test_idx[i:i + 512]
    correct += int((np.asarray(apply(variables, images[batch])).argmax(-1) == labels[batch]).sum())
  meta = {"num_classes": num_classes, "widths": list(widths), "image_shape": list(images.shape[1:]),
          "test_accuracy": correct / n_test, "num_test": int(n_test), "num_train": int(len(train_idx)),
          "steps": steps, "seed": seed, "train_seconds": round(time.time() - t0, 1)}
  if log:
    log(f"feature net test accuracy {meta['test_accuracy']:.4f} on {n_test} held-out images")
  return jax.device_get(variables), meta


def save(path, variables, meta) -> None:
  """Writes variables (params and batch_stats, flattened) and meta to one .npz."""
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_save_npz(path, __meta__=np.array(json.dumps(meta)), **flat)


def load(path):
  """Reads what `save` wrote: (variables, meta)."""
  with np.load(path) as f:
    meta = json.loads(str(f["__meta__"]))
    variables = traverse_util.unflatten_dict({k: f[k] for k in f.files if k != "__meta__"},
                                             sep="/")
  return variables, meta


def cache_path(cache_dir, dataset: str, image_size: int, channels: int = 0,
               data_key: str = "") -> pathlib.Path:
  """Where the net of (dataset, resolution[, channels]) trained on the images of `data_key` is
  cached: one file per training set, so another dataset of the same name never reuses it."""
  suffix = (f"_c{channels}" if channels else "") + (f"_{data_key}" if data_key else "")
  return pathlib.Path(cache_dir) / f"feature_net_{dataset}_{image_size}{suffix}.npz"


def data_key(images: np.ndarray, labels: np.ndarray) -> str:
  """The content key of a training set: its images and labels, bytes and shapes."""
  return files.content_hash(images, np.asarray(labels, np.int64))


def load_or_train(dataset: str, cache_dir, image_size: int, labelled_images,
                  log: Callable[[str], None] | None = print, channels: int = 0,
                  retrain: bool = False, **train_kwargs):
  """The net trained on `labelled_images()` (uint8 images at image_size, labels): loaded from the
  cache when one was trained on exactly those images, trained and cached otherwise (or when
  `retrain`). Returns (variables, meta); meta records the training set's key and size."""
  if not image_size:
    raise ValueError("load_or_train needs image_size (the resolution the net sees)")
  images, labels = labelled_images()
  if images.shape[1:3] != (image_size, image_size):
    raise ValueError(f"labelled images are {images.shape[1:3]}, the net is for {image_size}px")
  key = data_key(images, labels)
  path = cache_path(cache_dir, dataset, image_size, channels, key)
  cached = None if retrain else files.read_cache(path, load)
  if cached is not None:
    variables, meta = cached
    if meta.get("data_key") == key:
      return variables, meta
    if log:
      log(f"{path} was trained on other images (key {meta.get('data_key')}, now {key}); retraining")
  variables, meta = train(images, labels, log=log, **train_kwargs)
  meta.update(dataset=dataset, image_size=image_size, data_key=key, num_examples=len(images))
  save(path, variables, meta)
  if log:
    log(f"feature net cached at {path}")
  return variables, meta


def network_name(dataset: str) -> str:
  """The name metrics computed with this net carry, e.g. 'mnist_cnn'."""
  return f"{dataset}_cnn"


def make_feature_fn(variables, meta, dtype: Dtype = jnp.float32) -> Callable[[jax.Array], dict]:
  """Jitted uint8 NHWC -> dict(pool, logits); variables replicated on every device."""
  model = FeatureNet(meta["num_classes"], tuple(meta["widths"]), dtype=dtype)
  expected = tuple(meta["image_shape"])
  apply = jax.jit(lambda v, x: model.apply(v, x))
  weights_key = files.content_hash(jax.device_get(variables))
  variables = jax.device_put(variables, sharding_lib.replicated())

  def feature_fn(images):
    if tuple(images.shape[1:]) != expected:
      raise ValueError(f"this feature net was trained on images of shape {expected}, got "
                       f"{tuple(images.shape[1:])}; train one for this resolution")
    return apply(variables, images)
  feature_fn.weights_key = weights_key  # keys the reference statistics made with these weights
  return feature_fn
