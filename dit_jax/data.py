"""Input pipeline: data sources (pixels or VAE latents) and a deterministic, sharded batch reader.

`create_source(cfg)` builds a `Source` from a data config (`default_data_config()`);
`Pipeline(source, global_batch_size, seed, sharding).batch(step)` returns the global batch of `step`
as jax.Arrays sharded along the batch. The batch is a pure function of (seed, step): example order
is a permutation drawn from (seed, epoch), flips from (seed, step), latent posterior noise from
(seed, step); so the pipeline's whole state is the step, and a resumed run sees the same batches.
Each process reads only the rows its devices hold.

Pixel sources are resized the way ADM / DiT do (`center_crop_arr`) and scaled to [-1, 1]. The
"latents" source reads the posterior parameters written by tools/extract_latents.py and samples
z = mean + std * eps per step, scaled by the VAE's scaling factor (0.18215), as DiT's train.py does.
"""
import concurrent.futures
import dataclasses
import functools
import json
import os
import pathlib
import socket
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from dit_jax import datasets

SOURCE_NAMES = ("digits", "mnist", "cifar10", "tfds", "folder", "npz", "latents")
LATENTS_FORMAT = "dit_jax.latents.v1"
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
  cfg.max_in_memory_gb = 8.0  # Decode a folder/TFDS split into RAM once if it fits in this; else read lazily.
  cfg.tfds_probe_timeout_s = 3.0  # Connectivity probe before a TFDS download; offline fails in this time.
  cfg.num_workers = 8  # Threads decoding images for lazily-read sources.
  return cfg


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """ADM's centre crop: BOX-halve while the short side >= 2*size, BICUBIC short side to size, crop."""
  while min(pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
  scale = image_size / min(pil_image.size)
  pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.asarray(pil_image)
  top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def _to_pil(image_HxWxC: np.ndarray, channels: int) -> Image.Image:
  im = Image.fromarray(image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1 else image_HxWxC)
  if channels:
    im = im.convert({1: "L", 3: "RGB"}[channels])
  return im


def prepare_image(image_HxWxC: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """One uint8 image -> (image_size, image_size, C) uint8 via ADM's crop, channels converted."""
  h, w, c = image_HxWxC.shape
  if (h, w) == (image_size, image_size) and channels in (0, c):
    return image_HxWxC
  arr = center_crop_arr(_to_pil(image_HxWxC, channels), image_size)
  return arr[..., None] if arr.ndim == 2 else arr


@dataclasses.dataclass
class Source:
  """Random-access examples: `read(indices, flips)` -> (x [n,...], labels int32 [n])."""
  name: str
  image_shape: tuple  # (H, W, C) of one example as the model sees it (latents: (h, w, c)).
  num_classes: int
  class_names: tuple
  num_examples: int
  flip: bool
  kind: str = "pixels"  # "pixels": read() gives uint8 images; "latents": float mean||logvar.
  scaling_factor: float = 1.0  # latents only: z * scaling_factor is what DiT sees.

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
    x = prepare_image(self.load_fn(int(i)), self.image_shape[0], self.channels)
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

  def read(self, indices, flips):
    shard = np.searchsorted(self.offsets, indices, side="right") - 1
    variant = flips.astype(np.int64) if self.flip else np.zeros(len(indices), np.int64)
    out = np.empty((len(indices),) + self.moments[0].shape[2:], np.float32)
    for s in np.unique(shard):
      rows = np.nonzero(shard == s)[0]
      local = indices[rows] - self.offsets[s]
      order = np.argsort(local)  # sorted reads are kinder to the page cache
      out[rows[order]] = self.moments[s][local[order], variant[rows[order]]]
    return out, self.labels[indices]


def _check_image_size(cfg):
  if not isinstance(cfg.image_size, int) or isinstance(cfg.image_size, bool) or cfg.image_size <= 0:
    raise ValueError(f"data.image_size must be a positive int, got {cfg.image_size!r}")
  if cfg.channels not in (0, 1, 3):
    raise ValueError(f"data.channels must be 0 (native), 1 or 3, got {cfg.channels!r}")


def _require_path(cfg, what):
  if not cfg.path:
    raise ValueError(f"data.name={cfg.name!r} needs data.path: {what}")
  path = pathlib.Path(cfg.path).expanduser()
  if not path.exists():
    raise ValueError(f"data.path={cfg.path!r} does not exist ({what})")
  return path


def _limit(cfg, n):
  return n if cfg.max_examples <= 0 else min(n, cfg.max_examples)


def _array_source(cfg, images, labels, class_names, name):
  n = _limit(cfg, len(images))
  images = np.stack([prepare_image(im, cfg.image_size, cfg.channels) for im in images[:n]])
  num_classes = len(class_names) if class_names else int(labels.max()) + 1
  if not class_names:
    class_names = tuple(str(i) for i in range(num_classes))
  return ArraySource(name=name, image_shape=images.shape[1:], num_classes=num_classes,
                     class_names=tuple(class_names), num_examples=n, flip=cfg.flip,
                     images=images, labels=labels[:n].astype(np.int32))


def _folder_source(cfg, directory, name):
  directory = pathlib.Path(directory)
  if cfg.split and (directory / cfg.split).is_dir():
    directory = directory / cfg.split
  paths, labels, classes = datasets.list_image_folder(directory)
  n = _limit(cfg, len(paths))
  paths, labels = paths[:n], labels[:n]
  with Image.open(paths[0]) as im:
    native_c = len(im.getbands())
  c = cfg.channels or (1 if native_c == 1 else 3)
  mode = {1: "L", 3: "RGB"}[c]

  def load(i):
    with Image.open(paths[i]) as im:
      arr = np.asarray(im.convert(mode))
    return arr[..., None] if arr.ndim == 2 else arr

  lazy = LazyImageSource(name=name, image_shape=(cfg.image_size, cfg.image_size, c),
                         num_classes=len(classes), class_names=classes, num_examples=n,
                         flip=cfg.flip, load_fn=load, labels=labels, channels=c,
                         num_workers=cfg.num_workers)
  if n * cfg.image_size ** 2 * c > cfg.max_in_memory_gb * 2 ** 30:
    return lazy
  return _materialize(lazy)


def _materialize(lazy: "LazyImageSource") -> ArraySource:
  """Decodes every example of a lazy source once and keeps them in RAM."""
  n = lazy.num_examples
  images, labels = lazy.read(np.arange(n), np.zeros(n, bool))
  return ArraySource(name=lazy.name, image_shape=lazy.image_shape, num_classes=lazy.num_classes,
                     class_names=lazy.class_names, num_examples=n, flip=lazy.flip, images=images,
                     labels=labels)


def tfds_reachable(timeout_s: float, host=TFDS_PROBE_HOST) -> bool:
  """True if a TCP connection to TFDS's download host opens within timeout_s."""
  try:
    with socket.create_connection(host, timeout=timeout_s):
      return True
  except OSError:
    return False


def _tfds_builder(cfg, name):
  """A prepared TFDS builder, or DataUnavailableError within seconds when it can't be had."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=cfg.tfds_data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown TFDS dataset {name!r} (data.tfds_name)") from e
  if builder.is_prepared():
    return builder
  where = builder.data_dir
  if not tfds_reachable(cfg.tfds_probe_timeout_s):
    raise DataUnavailableError(
        f"TFDS dataset {name!r} is not prepared in {where} and the download host "
        f"{TFDS_PROBE_HOST[0]} is unreachable (offline?). Prepare it on a machine with network "
        f"(`tfds build {name}`) and copy the folder to {builder.data_dir_root}/ (or set "
        f"data.tfds_data_dir), or use a local source: data.name='folder'/'npz' or 'digits' (offline).")
  builder.download_and_prepare()  # imagenet2012 raises here if the manual archives are missing
  return builder


def _tfds_source(cfg, name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(cfg, name)
  if cfg.split not in builder.info.splits:
    raise ValueError(f"TFDS {name!r} has splits {list(builder.info.splits)}, not {cfg.split!r}")
  image_key, label_key = builder.info.supervised_keys or ("image", None)
  features = builder.info.features
  if image_key not in features:
    raise ValueError(f"TFDS {name!r} has no image feature {image_key!r}: {list(features)}")
  class_names = ()
  if label_key is not None and hasattr(features[label_key], "names"):
    class_names = tuple(features[label_key].names)
  n = _limit(cfg, builder.info.splits[cfg.split].num_examples)
  native_c = features[image_key].shape[-1] or 3
  c = cfg.channels or native_c
  fits = n * cfg.image_size ** 2 * c <= cfg.max_in_memory_gb * 2 ** 30
  file_format = str(getattr(builder.info, "file_format", "")).lower()
  if "array_record" in file_format:  # random access: decode on demand, or once if it fits in RAM
    records = builder.as_data_source(cfg.split)
    labels = np.zeros(n, np.int32)
    if label_key:  # one pass over the records without decoding images
      label_records = builder.as_data_source(
          cfg.split, decoders={image_key: tfds.decode.SkipDecoding()})
      for start in range(0, n, 4096):
        batch = label_records.__getitems__(list(range(start, min(n, start + 4096))))
        labels[start:start + len(batch)] = [ex[label_key] for ex in batch]
    num_classes = max(len(class_names), int(labels.max()) + 1)
    lazy = LazyImageSource(
        name=name, image_shape=(cfg.image_size, cfg.image_size, c), num_classes=num_classes,
        class_names=class_names or tuple(str(i) for i in range(num_classes)), num_examples=n,
        flip=cfg.flip, load_fn=lambda i: np.asarray(records[i][image_key]), labels=labels,
        channels=cfg.channels, num_workers=cfg.num_workers)
    return _materialize(lazy) if fits else lazy
  if not fits:
    raise ValueError(
        f"TFDS {name!r} {cfg.split} at {cfg.image_size}px needs "
        f"{n * cfg.image_size ** 2 * c / 2 ** 30:.1f} GiB (> data.max_in_memory_gb) and is stored as "
        f"{file_format or 'tfrecord'}, which has no random access. Re-prepare it with "
        f"`tfds build {name} --file_format=array_record`, use data.name='folder', or extract "
        "latents (tools/extract_latents.py) and train on data.name='latents'.")
  ds = builder.as_dataset(split=f"{cfg.split}[:{n}]", shuffle_files=False)
  images, labels = [], []
  for ex in tfds.as_numpy(ds):
    images.append(prepare_image(ex[image_key], cfg.image_size, cfg.channels))
    labels.append(ex[label_key] if label_key else 0)
  labels = np.asarray(labels, np.int32)
  num_classes = max(len(class_names), int(labels.max()) + 1)
  return ArraySource(name=name, image_shape=images[0].shape, num_classes=num_classes,
                     class_names=class_names or tuple(str(i) for i in range(num_classes)),
                     num_examples=n, flip=cfg.flip, images=np.stack(images), labels=labels)


def latents_meta(directory) -> dict:
  """meta.json of a latents directory written by tools/extract_latents.py."""
  path = pathlib.Path(directory) / "meta.json"
  if not path.is_file():
    raise ValueError(f"{directory}: no meta.json; create the latents with tools/extract_latents.py")
  meta = json.loads(path.read_text())
  if meta.get("format") != LATENTS_FORMAT:
    raise ValueError(f"{path}: format {meta.get('format')!r}, expected {LATENTS_FORMAT!r}")
  return meta


def shard_names(index: int, num_shards: int) -> tuple:
  """File names (moments, labels) of one latents shard."""
  tag = f"{index:05d}-of-{num_shards:05d}"
  return f"moments-{tag}.npy", f"labels-{tag}.npy"


def _latent_source(cfg):
  directory = _require_path(cfg, "the directory written by tools/extract_latents.py")
  meta = latents_meta(directory)
  if cfg.image_size not in (0, meta["image_size"]):
    raise ValueError(f"data.image_size={cfg.image_size} but the latents in {directory} were "
                     f"extracted at {meta['image_size']}px; set data.image_size to "
                     f"{meta['image_size']} or 0")
  if cfg.flip and meta["flips"] < 2:
    raise ValueError(f"data.flip=True but {directory} holds no flipped encodings; set "
                     "data.flip=False or re-extract with flips")
  moments, labels, offsets, missing = [], [], [0], []
  for s in range(meta["num_shards"]):
    m_name, l_name = shard_names(s, meta["num_shards"])
    if not (directory / m_name).is_file() or not (directory / l_name).is_file():
      missing.append(m_name)
      continue
    moments.append(np.load(directory / m_name, mmap_mode="r"))
    labels.append(np.load(directory / l_name))
    offsets.append(offsets[-1] + len(labels[-1]))
  if missing:
    raise ValueError(f"{directory}: {len(missing)} of {meta['num_shards']} shards missing "
                     f"(e.g. {missing[0]}); finish tools/extract_latents.py (it resumes)")
  labels = np.concatenate(labels).astype(np.int32)
  n = _limit(cfg, len(labels))
  h, w, c2 = moments[0].shape[2:]
  return LatentSource(
      name="latents", image_shape=(h, w, c2 // 2), num_classes=meta["num_classes"],
      class_names=tuple(meta["class_names"]), num_examples=n, flip=cfg.flip, kind="latents",
      scaling_factor=meta["scaling_factor"], moments=moments, labels=labels[:n],
      offsets=np.asarray(offsets[:-1]))


def create_source(cfg: ml_collections.ConfigDict) -> Source:
  """Builds the data source a config names; raises ValueError on bad settings before any compile."""
  if cfg.name not in SOURCE_NAMES:
    raise ValueError(f"unknown data.name {cfg.name!r}; choose one of {SOURCE_NAMES}")
  if cfg.name == "latents":
    if not isinstance(cfg.image_size, int) or cfg.image_size < 0:
      raise ValueError(f"data.image_size must be 0 or the extracted size, got {cfg.image_size!r}")
    return _latent_source(cfg)
  _check_image_size(cfg)
  if cfg.name == "digits":
    images, labels = datasets.read_digits()
    return _array_source(cfg, images, labels, tuple(str(i) for i in range(10)), "digits")
  if cfg.name == "mnist" and cfg.path:
    directory = _require_path(cfg, "the directory with MNIST's *-idx?-ubyte.gz files")
    prefix = {"test": "t10k", "t10k": "t10k", "train": "train"}.get(cfg.split)
    if prefix is None:
      raise ValueError(f"MNIST splits are 'train' and 'test', got data.split={cfg.split!r}")
    if not (directory / f"{prefix}-images-idx3-ubyte.gz").is_file():
      raise ValueError(f"{directory} has no {prefix}-images-idx3-ubyte.gz (split {cfg.split!r})")
    images, labels = datasets.read_mnist(directory, prefix)
    return _array_source(cfg, images, labels, tuple(str(i) for i in range(10)), "mnist")
  if cfg.name == "cifar10" and cfg.path:
    return _folder_source(cfg, _require_path(cfg, "a folder with one sub-folder per class"),
                          "cifar10")
  if cfg.name in ("mnist", "cifar10"):
    return _tfds_source(cfg, cfg.name)
  if cfg.name == "tfds":
    if not cfg.tfds_name:
      raise ValueError("data.name='tfds' needs data.tfds_name, e.g. 'imagenet2012' or 'celeb_a'")
    return _tfds_source(cfg, cfg.tfds_name)
  if cfg.name == "folder":
    return _folder_source(cfg, _require_path(cfg, "a folder with one sub-folder per class"),
                          "folder")
  path = _require_path(cfg, "an .npz file with 'images' (N,H,W[,C] uint8) and 'labels'")
  images, labels = datasets.read_npz(path)
  return _array_source(cfg, images, labels, (), "npz")


def _batch_sharding_for_labels(sharding):
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = sharding.spec[0] if len(sharding.spec) else None
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(spec))
  return sharding


class Pipeline:
  """Global batches of a Source; `batch(step)` is a pure function of (seed, step)."""

  def __init__(self, source: Source, global_batch_size: int, seed: int,
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
    try:
      sharding.shard_shape(self._host_shape)
    except ValueError as e:
      raise ValueError(f"global_batch_size={global_batch_size} does not split evenly over the "
                       f"batch sharding {sharding}: {e}") from e
    self.sharding, self.label_sharding = sharding, _batch_sharding_for_labels(sharding)
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
      self._to_device = jax.jit(
          # clip: XLA may multiply by 1/127.5, which overshoots 1.0 by an ulp
          lambda x, step: jnp.clip(x.astype(jnp.float32) / 127.5 - 1.0, -1.0, 1.0),
          out_shardings=sharding)

  @property
  def steps_per_epoch(self) -> float:
    return self.source.num_examples / self.global_batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      rng = np.random.default_rng([self.seed, 0, epoch])
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
    flips = np.random.default_rng([self.seed, 1, step]).random(self.global_batch_size) < 0.5
    flips = flips[self.local_start:self.local_stop] & self.source.flip
    return idx, flips

  def host_batch(self, step: int):
    """This process's part of `step`'s batch as numpy (uint8 pixels or float32 moments, labels)."""
    return self.source.read(*self.indices(step))

  def to_device(self, step: int, x_local, labels_local) -> dict:
    """Assembles the process-local parts into global sharded arrays and normalises/samples."""
    x = jax.make_array_from_process_local_data(self.sharding, x_local, self._host_shape)
    labels = jax.make_array_from_process_local_data(
        self.label_sharding, labels_local.astype(np.int32), (self.global_batch_size,))
    return {"image": self._to_device(x, jnp.int32(step)), "label": labels}

  def batch(self, step: int) -> dict:
    """{'image': float32 [B,H,W,C] in [-1,1] (latents: z*scale), 'label': int32 [B]} of `step`."""
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


def describe(source: Source) -> str:
  """One line about a source for logs."""
  return (f"{source.name}: {source.num_examples} examples of {source.image_shape} "
          f"({source.kind}), {source.num_classes} classes, flip={source.flip}")


def write_latents(source: Source, encode_fn, directory, *, shard_size: int, batch_size: int,
                  dtype=np.float32, meta_extra: Optional[dict] = None, flips: bool = True,
                  process_index: int = 0, process_count: int = 1, progress: bool = True) -> dict:
  """Encodes every example (and its mirror image) once into the "latents" source's shard files.

  encode_fn: float32 images [b,H,W,C] in [-1,1] -> (mean, logvar) numpy [b,h,w,c]; it is always
  called with b = batch_size (the tail is padded) so a jitted encoder compiles once. Shards go
  round-robin to processes (one writer each); a shard whose files exist is skipped, and files
  appear atomically (tmp + rename), so an interrupted run resumes where it stopped.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if source.kind != "pixels":
    raise ValueError(f"write_latents needs a pixel source, got {source.kind!r}")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  n = source.num_examples
  num_shards = -(-n // shard_size)
  meta = dict(format=LATENTS_FORMAT, num_examples=n, shard_size=shard_size, num_shards=num_shards,
              image_size=int(source.image_shape[0]), flips=2 if flips else 1,
              num_classes=source.num_classes, class_names=list(source.class_names),
              dtype=np.dtype(dtype).name, source=source.name, **(meta_extra or {}))
  meta_path = directory / "meta.json"
  if meta_path.is_file():
    old = json.loads(meta_path.read_text())
    if old != meta:
      diff = {k: (old.get(k), meta.get(k)) for k in set(old) | set(meta) if old.get(k) != meta.get(k)}
      raise ValueError(f"{directory} holds latents of another extraction (old, new): {diff}; "
                       "use a new --out directory")
  elif process_index == 0:
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
  mine = [s for s in range(num_shards) if s % process_count == process_index]
  todo = [s for s in mine if not all((directory / f).is_file() for f in shard_names(s, num_shards))]
  total = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in todo)
  bar = tqdm(total=total, unit="img", desc=f"latents p{process_index}", disable=not progress,
             position=process_index)
  for s in todo:
    lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
    out, labels = None, np.empty(hi - lo, np.int32)
    for start in range(lo, hi, batch_size):
      idx = np.arange(start, min(hi, start + batch_size))
      x, labels[start - lo:start - lo + len(idx)] = source.read(idx, np.zeros(len(idx), bool))
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(idx), axis=0)])
      variants = []
      for flip in (False, True)[:meta["flips"]]:
        xf = (x[:, :, ::-1] if flip else x).astype(np.float32) / 127.5 - 1.0
        mean, logvar = encode_fn(xf)
        variants.append(np.concatenate([np.asarray(mean), np.asarray(logvar)], -1)[:len(idx)])
      block = np.stack(variants, axis=1).astype(dtype)
      if out is None:
        out = np.empty((hi - lo,) + block.shape[1:], dtype)
      out[start - lo:start - lo + len(idx)] = block
      bar.update(len(idx))
    for name, arr in zip(shard_names(s, num_shards), (out, labels)):
      tmp = directory / (name + ".tmp.npy")
      np.save(tmp, arr)
      os.replace(tmp, directory / name)
  bar.close()
  return meta
