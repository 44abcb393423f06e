"""Data sources: what examples there are and how one is read, from a data config.

`create_source(config.data)` is the one place a dataset name (`data.name`) is turned
into a `Source`, random-access examples `read(indices, flips)` -> (x, labels): pixels held in memory
(`ArraySource`), decoded per read (`LazyImageSource`), or VAE posterior parameters in the on-disk
latent format (`LatentSource`, see latent_format.py). The batch order lives in pipeline.py.

Pixel sources are resized the way ADM / DiT do (`center_crop_arr`) and kept as uint8; a TFDS
dataset that is not prepared here fails fast (`DataUnavailableError`) when the network is down.
"""
import concurrent.futures
import dataclasses
import functools
import pathlib
import re
import socket
from typing import Sequence

import ml_collections
import numpy as np
from PIL import Image

from dit_jax import rng as rng_lib
from dit_jax.data import datasets
from dit_jax.data import images as images_lib
from dit_jax.data import latent_format

SOURCE_NAMES = ("digits", "mnist", "cifar10", "tfds", "folder", "npz", "latents")
# Host tfds downloads from first (its GCS mirror); the probe only checks it answers quickly.
TFDS_PROBE_HOST = ("storage.googleapis.com", 443)


class DataUnavailableError(RuntimeError):
  """The data cannot be obtained here (e.g. TFDS data not prepared and no network)."""


def default_data_config() -> ml_collections.ConfigDict:
  """The data config; every field the sources read, with its default."""
  cfg = ml_collections.ConfigDict()
  # One of SOURCE_NAMES. "digits": scikit-learn's 8x8 digits (offline, ships with a dependency);
  # "mnist"/"cifar10": local files when `path` is set, else TFDS by that name; "tfds": any TFDS
  # dataset (`tfds_name`); "folder": `path`/<class>/*.jpg; "npz": `path` to an .npz with
  # images/labels; "latents": a directory written by tools/extract_latents.py.
  cfg.name = "digits"
  cfg.tfds_name = ""  # TFDS dataset name for name="tfds", e.g. "imagenet2012", "celeb_a".
  cfg.tfds_data_dir = ""  # TFDS data_dir ("" = TFDS default, ~/tensorflow_datasets).
  cfg.path = ""  # File or directory for mnist (idx.gz dir), cifar10/folder, npz, latents.
  cfg.image_size = 16  # Side of the square images after ADM centre-crop/resize (latents: 0 or the extracted size).
  cfg.channels = 0  # 0 = the dataset's own; 1 or 3 converts (grey <-> RGB).
  cfg.split = "train"  # Split name ("train"/"test"); a folder path/<split> is used when it exists.
  cfg.flip = True  # Random horizontal flips (latents: picks the stored flipped encoding).
  cfg.max_examples = 0  # Use only the first N examples (0 = all), for quick runs and benchmarks.
  cfg.val_size = 0  # Hold out this many examples for the validation loss (splits.py; 0 = none).
  cfg.val_seed = 0  # Seed of the held-out split (not the training seed: every run holds out the same).
  cfg.max_in_memory_gb = 8.0  # Decode a folder/TFDS split into RAM once if it fits in this; else read lazily.
  cfg.tfds_probe_timeout_s = 3.0  # Connectivity probe before a TFDS download; offline fails in this time.
  cfg.num_workers = 8  # Threads decoding images for lazily-read sources.
  return cfg


@dataclasses.dataclass
class Source:
  """Random-access examples: `read(indices, flips)` -> (x [n,...], labels int32 [n, *label_shape])."""
  name: str
  image_shape: tuple  # (H, W, C) of one example as the model sees it (latents: (h, w, c)).
  num_classes: int
  class_names: tuple
  num_examples: int
  flip: bool
  kind: str = "pixels"  # "pixels": read() gives uint8 images; "latents": float mean||logvar.
  scaling_factor: float = 1.0  # latents only: z * scaling_factor is what DiT sees.
  split: str = "all"  # The split the examples are from; "all": the whole dataset or directory.
  label_shape: tuple = ()  # One example's label: () a class; (L,) caption token ids (captions.py).

  def read(self, indices: np.ndarray, flips: np.ndarray):
    raise NotImplementedError


@dataclasses.dataclass
class ArraySource(Source):
  """Images held in memory (uint8 NHWC, already at image_size)."""
  images: np.ndarray = None
  labels: np.ndarray = None

  def read(self, indices, flips):
    x = self.images[indices]  # fancy indexing copies, so flipping in place is safe
    x[flips] = x[flips, :, ::-1]
    return x, self.labels[indices]


@dataclasses.dataclass
class LazyImageSource(Source):
  """Images decoded and ADM-cropped on each read (datasets too large to hold in memory)."""
  load_fn: object = None  # index -> uint8 HxWxC image at native size
  labels: np.ndarray = None
  channels: int = 0
  num_workers: int = 8

  def _one(self, i, flip):
    x = images_lib.prepare_image(self.load_fn(int(i)), self.image_shape[0], self.channels)
    return x[:, ::-1] if flip else x

  @functools.cached_property
  def _pool(self):
    return concurrent.futures.ThreadPoolExecutor(self.num_workers)

  def read(self, indices, flips):
    xs = list(self._pool.map(self._one, indices, flips))
    return np.stack(xs), self.labels[indices]


@dataclasses.dataclass
class LatentSource(Source):
  """Posterior parameters from tools/extract_latents.py, memory-mapped per shard."""
  moments: Sequence[np.ndarray] = ()  # per shard [n, F, h, w, 2c], F=2 (plain, flipped) or 1
  labels: np.ndarray = None
  offsets: np.ndarray = None  # first global index of each shard
  keep: np.ndarray | None = None  # the kept examples' global indices (data.max_examples)

  def read(self, indices, flips):
    indices = np.asarray(indices) if self.keep is None else self.keep[np.asarray(indices)]
    shard = np.searchsorted(self.offsets, indices, side="right") - 1
    variant = flips.astype(np.int64) if self.flip else np.zeros(len(indices), np.int64)
    out = np.empty((len(indices),) + self.moments[0].shape[2:], np.float32)
    for s in np.unique(shard):
      rows = np.nonzero(shard == s)[0]
      local = indices[rows] - self.offsets[s]
      order = np.argsort(local)  # sorted reads are kinder to the page cache
      out[rows[order]] = self.moments[s][local[order], variant[rows[order]]]
    return out, self.labels[indices]


def stratified_sample(labels, n: int, seed: int) -> np.ndarray:
  """Sorted indices of a seeded class-stratified sample of `n` of the examples with these labels:
  each class gets its share of n (largest remainders break ties), drawn at random within it. With
  n >= len(labels), every index in order. Datasets listed class by class (folders) keep all their
  classes in a sample of any size, which the first n examples would not."""
  labels = np.asarray(labels)
  total = len(labels)
  if n >= total:
    return np.arange(total)
  rng = rng_lib.numpy_rng(seed, rng_lib.STRATIFIED)
  flat = labels.reshape(total, -1)[:, 0] if labels.ndim > 1 else labels
  classes, counts = np.unique(flat, return_counts=True)
  share = counts * n / total
  take = np.floor(share).astype(int)
  extra = np.argsort(-(share - take), kind="stable")[:n - take.sum()]
  take[extra] += 1
  chosen = [rng.choice(np.nonzero(flat == c)[0], k, replace=False) for c, k in zip(classes, take)]
  return np.sort(np.concatenate(chosen))


def identity(kind: str, path) -> str:
  """The name of a generic source (npz, folder) with its file's or directory's name, e.g.
  'npz_mnist_test': what its metrics (fid_npz_mnist_test_cnn) and cache files are called."""
  stem = re.sub(r"[^a-z0-9]+", "_", pathlib.Path(path).expanduser().resolve().stem.lower()).strip("_")
  return f"{kind}_{stem}" if stem else kind


def labels_of(source: Source) -> np.ndarray:
  """Every example's label, without reading the images where the source holds them."""
  if getattr(source, "labels", None) is not None:
    return np.asarray(source.labels)[:source.num_examples]
  n = source.num_examples
  return source.read(np.arange(n), np.zeros(n, bool))[1]


def _check_image_size(data):
  size = data.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
    raise ValueError(f"data.image_size must be a positive int, got {data.image_size!r}")
  if data.channels not in (0, 1, 3):
    raise ValueError(f"data.channels must be 0 (native), 1 or 3, got {data.channels!r}")


def _require_path(data, what):
  if not data.path:
    raise ValueError(f"data.name={data.name!r} needs data.path: {what}")
  path = pathlib.Path(data.path).expanduser()
  if not path.exists():
    raise ValueError(f"data.path={data.path!r} does not exist ({what})")
  return path


def _keep(data, labels) -> np.ndarray:
  """The examples a source keeps: all, or with data.max_examples a class-stratified sample of
  that many drawn with data.val_seed (never the first N: folders list class by class)."""
  if data.max_examples <= 0:
    return np.arange(len(labels))
  return stratified_sample(labels, data.max_examples, data.val_seed)


def _array_source(data, images, labels, class_names, name, split="all"):
  keep = _keep(data, labels)
  n = len(keep)
  images = np.stack([images_lib.prepare_image(images[i], data.image_size, data.channels)
                     for i in keep])
  labels = np.asarray(labels)[keep]
  num_classes = len(class_names) if class_names else int(labels.max()) + 1
  if not class_names:
    class_names = tuple(str(i) for i in range(num_classes))
  return ArraySource(name=name, image_shape=images.shape[1:], num_classes=num_classes,
                     class_names=tuple(class_names), num_examples=n, flip=data.flip, split=split,
                     images=images, labels=labels.astype(np.int32))


def _folder_source(data, directory, name):
  directory, split = pathlib.Path(directory), "all"
  if data.split and (directory / data.split).is_dir():
    directory, split = directory / data.split, data.split
  paths, labels, classes = datasets.list_image_folder(directory)
  keep = _keep(data, labels)
  paths, labels, n = [paths[i] for i in keep], np.asarray(labels)[keep], len(keep)
  with Image.open(paths[0]) as im:
    native_c = len(im.getbands())
  c = data.channels or (1 if native_c == 1 else 3)
  mode = {1: "L", 3: "RGB"}[c]

  def load(i):
    with Image.open(paths[i]) as im:
      arr = np.asarray(im.convert(mode))
    return arr[..., None] if arr.ndim == 2 else arr

  lazy = LazyImageSource(name=name, image_shape=(data.image_size, data.image_size, c),
                         num_classes=len(classes), class_names=classes, num_examples=n,
                         flip=data.flip, split=split, load_fn=load, labels=labels, channels=c,
                         num_workers=data.num_workers)
  if n * data.image_size ** 2 * c > data.max_in_memory_gb * 2 ** 30:
    return lazy
  return _materialize(lazy)


def _materialize(lazy: "LazyImageSource") -> ArraySource:
  """Decodes every example of a lazy source once and keeps them in RAM."""
  n = lazy.num_examples
  images, labels = lazy.read(np.arange(n), np.zeros(n, bool))
  return ArraySource(name=lazy.name, image_shape=lazy.image_shape, num_classes=lazy.num_classes,
                     class_names=lazy.class_names, num_examples=n, flip=lazy.flip,
                     split=lazy.split, images=images, labels=labels)


def tfds_reachable(timeout_s: float, host=TFDS_PROBE_HOST) -> bool:
  """True if a TCP connection to TFDS's download host opens within timeout_s."""
  try:
    with socket.create_connection(host, timeout=timeout_s):
      return True
  except OSError:
    return False


def _tfds_builder(data, name):
  """A prepared TFDS builder, or DataUnavailableError within seconds when it can't be had."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data.tfds_data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown TFDS dataset {name!r} (data.tfds_name)") from e
  if builder.is_prepared():
    return builder
  where = builder.data_dir
  if not tfds_reachable(data.tfds_probe_timeout_s):
    raise DataUnavailableError(
        f"TFDS dataset {name!r} is not prepared in {where} and the download host "
        f"{TFDS_PROBE_HOST[0]} is unreachable (offline?). Prepare it on a machine with network "
        f"(`tfds build {name}`) and copy the folder to {builder.data_dir_root}/ (or set "
        f"data.tfds_data_dir), or use a local source: data.name='folder'/'npz' or 'digits' (offline).")
  builder.download_and_prepare()  # imagenet2012 raises here if the manual archives are missing
  return builder


def _tfds_source(data, name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(data, name)
  if data.split not in builder.info.splits:
    raise ValueError(f"TFDS {name!r} has splits {list(builder.info.splits)}, not {data.split!r}")
  image_key, label_key = builder.info.supervised_keys or ("image", None)
  features = builder.info.features
  if image_key not in features:
    raise ValueError(f"TFDS {name!r} has no image feature {image_key!r}: {list(features)}")
  class_names = ()
  if label_key is not None and hasattr(features[label_key], "names"):
    class_names = tuple(features[label_key].names)
  total = builder.info.splits[data.split].num_examples
  n = total if data.max_examples <= 0 else min(total, data.max_examples)
  native_c = features[image_key].shape[-1] or 3
  c = data.channels or native_c
  fits = n * data.image_size ** 2 * c <= data.max_in_memory_gb * 2 ** 30
  file_format = str(getattr(builder.info, "file_format", "")).lower()
  if "array_record" in file_format:  # random access: decode on demand, or once if it fits in RAM
    records = builder.as_data_source(data.split)
    labels = np.zeros(total, np.int32)
    if label_key:  # one pass over the records without decoding images
      label_records = builder.as_data_source(
          data.split, decoders={image_key: tfds.decode.SkipDecoding()})
      for start in range(0, total, 4096):
        batch = label_records.__getitems__(list(range(start, min(total, start + 4096))))
        labels[start:start + len(batch)] = [ex[label_key] for ex in batch]
    keep = _keep(data, labels)
    labels = labels[keep]
    num_classes = max(len(class_names), int(labels.max()) + 1)
    lazy = LazyImageSource(
        name=name, image_shape=(data.image_size, data.image_size, c), num_classes=num_classes,
        class_names=class_names or tuple(str(i) for i in range(num_classes)), num_examples=n,
        flip=data.flip, split=data.split,
        load_fn=lambda i: np.asarray(records[int(keep[i])][image_key]),
        labels=labels, channels=data.channels, num_workers=data.num_workers)
    return _materialize(lazy) if fits else lazy
  if not fits:
    raise ValueError(
        f"TFDS {name!r} {data.split} at {data.image_size}px needs "
        f"{n * data.image_size ** 2 * c / 2 ** 30:.1f} GiB (> data.max_in_memory_gb) and is stored as "
        f"{file_format or 'tfrecord'}, which has no random access. Re-prepare it with "
        f"`tfds build {name} --file_format=array_record`, use data.name='folder', or extract "
        "latents (tools/extract_latents.py) and train on data.name='latents'.")
  # No random access: the whole split is read in order, then the stratified sample kept.
  ds = builder.as_dataset(split=data.split, shuffle_files=False)
  images, labels = [], []
  for ex in tfds.as_numpy(ds):
    images.append(images_lib.prepare_image(ex[image_key], data.image_size, data.channels))
    labels.append(ex[label_key] if label_key else 0)
  keep = _keep(data, np.asarray(labels, np.int32))
  images, labels = [images[i] for i in keep], np.asarray(labels, np.int32)[keep]
  num_classes = max(len(class_names), int(labels.max()) + 1)
  return ArraySource(name=name, image_shape=images[0].shape, num_classes=num_classes,
                     class_names=class_names or tuple(str(i) for i in range(num_classes)),
                     num_examples=n, flip=data.flip, split=data.split, images=np.stack(images),
                     labels=labels)


def _latent_source(data):
  directory = _require_path(data, "the directory written by tools/extract_latents.py")
  meta = latent_format.latents_meta(directory)
  if data.image_size not in (0, meta["image_size"]):
    raise ValueError(f"data.image_size={data.image_size} but the latents in {directory} were "
                     f"extracted at {meta['image_size']}px; set data.image_size to "
                     f"{meta['image_size']} or 0")
  if data.flip and meta["flips"] < 2:
    raise ValueError(f"data.flip=True but {directory} holds no flipped encodings; set "
                     "data.flip=False or re-extract with flips")
  moments, labels, offsets = latent_format.read_shards(directory, meta)
  labels = np.concatenate(labels).astype(np.int32)
  keep = _keep(data, labels)
  n = len(keep)
  h, w, c2 = moments[0].shape[2:]
  return LatentSource(
      name="latents", image_shape=(h, w, c2 // 2), num_classes=meta["num_classes"],
      class_names=tuple(meta["class_names"]), num_examples=n, flip=data.flip, kind="latents",
      scaling_factor=meta["scaling_factor"], moments=moments, labels=labels[keep],
      offsets=np.asarray(offsets[:-1]), keep=None if n == len(labels) else keep)


def create_source(data: ml_collections.ConfigDict) -> Source:
  """Builds the data source a config names; raises ValueError on bad settings before any compile."""
  if data.name not in SOURCE_NAMES:
    raise ValueError(f"unknown data.name {data.name!r}; choose one of {SOURCE_NAMES}")
  if data.name == "latents":
    if not isinstance(data.image_size, int) or data.image_size < 0:
      raise ValueError(f"data.image_size must be 0 or the extracted size, got {data.image_size!r}")
    return _latent_source(data)
  _check_image_size(data)
  if data.name == "digits":
    images, labels = datasets.read_digits()
    return _array_source(data, images, labels, tuple(str(i) for i in range(10)), "digits")
  if data.name == "mnist" and data.path:
    directory = _require_path(data, "the directory with MNIST's *-idx?-ubyte.gz files")
    prefix = {"test": "t10k", "t10k": "t10k", "train": "train"}.get(data.split)
    if prefix is None:
      raise ValueError(f"MNIST splits are 'train' and 'test', got data.split={data.split!r}")
    if not (directory / f"{prefix}-images-idx3-ubyte.gz").is_file():
      raise ValueError(f"{directory} has no {prefix}-images-idx3-ubyte.gz (split {data.split!r})")
    images, labels = datasets.read_mnist(directory, prefix)
    return _array_source(data, images, labels, tuple(str(i) for i in range(10)), "mnist", prefix)
  if data.name == "cifar10" and data.path:
    return _folder_source(data, _require_path(data, "a folder with one sub-folder per class"),
                          "cifar10")
  if data.name in ("mnist", "cifar10"):
    return _tfds_source(data, data.name)
  if data.name == "tfds":
    if not data.tfds_name:
      raise ValueError("data.name='tfds' needs data.tfds_name, e.g. 'imagenet2012' or 'celeb_a'")
    return _tfds_source(data, data.tfds_name)
  if data.name == "folder":
    path = _require_path(data, "a folder with one sub-folder per class")
    return _folder_source(data, path, identity("folder", path))
  path = _require_path(data, "an .npz file with 'images' (N,H,W[,C] uint8) and 'labels'")
  images, labels = datasets.read_npz(path)
  return _array_source(data, images, labels, (), identity("npz", path))


def describe(source: Source) -> str:
  """One line about a source for logs."""
  return (f"{source.name}: {source.num_examples} examples of {source.image_shape} "
          f"({source.kind}), {source.num_classes} classes, flip={source.flip}")

