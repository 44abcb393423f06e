"""The on-disk latent format: meta.json plus numbered shards of VAE posterior parameters.

Written once by `write_latents` (tools/extract_latents.py), read back by the "latents" data source
(`sources.create_source`) through `read_shards`. Each shard is a pair of .npy files: moments
[n, F, h, w, 2c] (mean || logvar of the image, with F=2 also of its mirror image), labels int32 [n].
"""
import json
import pathlib
from typing import Optional

import numpy as np
from tqdm import tqdm

from dit_jax import files
from dit_jax.data import images as images_lib

LATENTS_FORMAT = "dit_jax.latents.v1"


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


def read_shards(directory, meta: dict):
  """(moments memory-mapped per shard, labels per shard, offsets) of every shard `meta` names.

  offsets[s] is the first global index of shard s, and offsets[-1] the number of examples.
  """
  directory = pathlib.Path(directory)
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
  return moments, labels, offsets


def write_latents(source, encode_fn, directory, *, shard_size: int, batch_size: int,
                  dtype=np.float32, meta_extra: Optional[dict] = None, flips: bool = True,
                  process_index: int = 0, process_count: int = 1, progress: bool = True) -> dict:
  """Encodes every example (and its mirror image) once into the "latents" source's shard files.

  source: a pixel `sources.Source`. encode_fn: float32 images [b,H,W,C] in [-1,1] -> (mean,
  logvar) numpy [b,h,w,c]; it is always called with b = batch_size (the tail is padded) so a jitted
  encoder compiles once. Shards go round-robin to processes (one writer each); a shard whose files
  exist is skipped, and files appear atomically (tmp + rename), so an interrupted run resumes where
  it stopped.
  """
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
    files.atomic_write_text(meta_path, json.dumps(meta, indent=1))
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
        xf = images_lib.to_unit_range(x[:, :, ::-1] if flip else x)
        mean, logvar = encode_fn(xf)
        variants.append(np.concatenate([np.asarray(mean), np.asarray(logvar)], -1)[:len(idx)])
      block = np.stack(variants, axis=1).astype(dtype)
      if out is None:
        out = np.empty((hi - lo,) + block.shape[1:], dtype)
      out[start - lo:start - lo + len(idx)] = block
      bar.update(len(idx))
    for name, arr in zip(shard_names(s, num_shards), (out, labels)):
      files.atomic_save_npy(directory / name, arr)
  bar.close()
  return meta
