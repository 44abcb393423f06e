"""Readers for datasets stored as plain files: MNIST idx.gz, class-folder images, .npz arrays,
and scikit-learn's bundled 8x8 digits.

Each reader returns (images_NxHxWxC uint8, labels_N int32). The sources in `sources.py` build on them.
"""
import gzip
import pathlib
import zipfile

import numpy as np
from sklearn.datasets import load_digits
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_idx(path) -> np.ndarray:
  """Reads one idx(.gz) file (the MNIST format) into a numpy array."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte idx file (header {data[:4].hex()})")
  ndim = data[3]
  dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
  payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if payload.size != int(np.prod(dims)):
    raise ValueError(f"{path}: payload has {payload.size} bytes, header says {tuple(dims)}")
  return payload.reshape(dims)


def read_mnist(directory, split: str = "t10k"):
  """MNIST from its idx.gz files: images (N, 28, 28, 1) uint8, labels (N,) int32."""
  directory = pathlib.Path(directory)
  images = read_idx(directory / f"{split}-images-idx3-ubyte.gz")
  labels = read_idx(directory / f"{split}-labels-idx1-ubyte.gz").astype(np.int32)
  return images[..., None], labels


def read_image_folder(directory, channels: int = 3):
  """Images in `directory/<class>/*`, classes in sorted order; all images must share one size."""
  directory = pathlib.Path(directory)
  classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
  if not classes:
    raise ValueError(f"{directory}: expected one sub-folder per class, found none")
  mode = {1: "L", 3: "RGB"}[channels]
  images, labels = [], []
  for label, name in enumerate(classes):
    for f in sorted((directory / name).iterdir()):
      if f.suffix.lower() in IMAGE_SUFFIXES:
        with Image.open(f) as im:
          images.append(np.asarray(im.convert(mode)))
        labels.append(label)
  images = np.stack(images)
  if images.ndim == 3:
    images = images[..., None]
  return images, np.asarray(labels, np.int32)


def list_image_folder(directory):
  """Files of `directory/<class>/*` in read_image_folder's order: (paths, labels int32, class names)."""
  directory = pathlib.Path(directory)
  classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
  if not classes:
    raise ValueError(f"{directory}: expected one sub-folder per class, found none")
  paths, labels = [], []
  for label, name in enumerate(classes):
    for f in sorted((directory / name).iterdir()):
      if f.suffix.lower() in IMAGE_SUFFIXES:
        paths.append(f)
        labels.append(label)
  if not paths:
    raise ValueError(f"{directory}: no images with suffix in {IMAGE_SUFFIXES} under its class folders")
  return paths, np.asarray(labels, np.int32), tuple(classes)


def read_npz(path):
  """An .npz with `images` (N,H,W[,C]) uint8 and optional `labels` (N,) ints >= 0 (default all 0).
  A file that is not a readable .npz of that layout is a ValueError naming it and what is wrong."""
  try:
    with np.load(path, allow_pickle=False) as f:
      if "images" not in f:
        raise ValueError(f"{path}: expected an array named 'images' (N,H,W[,C] uint8), found "
                         f"{list(f) or 'no arrays'}")
      images = f["images"]
      labels = f["labels"] if "labels" in f else np.zeros(len(images), np.int32)
  except ValueError as e:
    if str(path) in str(e):
      raise
    raise ValueError(f"{path}: not a readable .npz of arrays ({e.__class__.__name__}: "
                     f"{str(e).splitlines()[0][:120]}); write it with numpy.savez") from None
  except (OSError, EOFError, zipfile.BadZipFile) as e:  # truncated, not a zip, unreadable
    raise ValueError(f"{path}: not a readable .npz ({e.__class__.__name__}: {e}); the file is "
                     "truncated or not written by numpy.savez") from None
  if images.dtype != np.uint8:
    raise ValueError(f"{path}: 'images' must be uint8 in 0..255, got {images.dtype}")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or labels.shape != (len(images),):
    raise ValueError(f"{path}: images {images.shape} / labels {labels.shape} are not (N,H,W[,C]) / (N,)")
  if len(images) == 0:
    raise ValueError(f"{path}: 'images' holds no examples")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path}: 'labels' must be integers (class indices), got {labels.dtype}")
  if labels.min() < 0:
    raise ValueError(f"{path}: 'labels' must be class indices >= 0, got a minimum of "
                     f"{int(labels.min())}")
  return images, labels.astype(np.int32)


def write_npz(path, images, labels) -> None:
  """Writes the format `read_npz` reads."""
  np.savez(path, images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int32))


def read_digits():
  """scikit-learn's bundled 8x8 handwritten digits (1797 images, 0..16 ink) as (N, 8, 8, 1) uint8."""
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int32)
