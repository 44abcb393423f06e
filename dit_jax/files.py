"""Files the framework writes: JSON-lines logs, atomic (write-then-rename) saves, and the content
hash that keys every cache by what it was computed from.

A reader of a JSON-lines file that a crash interrupted mid-append sees a torn last line; it is
dropped with a warning, never parsed into a wrong row. A torn line anywhere else is corruption and
raises with the file and line named. Saves go to a temporary file in the same directory and are
renamed into place, so a reader never sees half a file.
"""
import fcntl
import hashlib
import json
import os
import pathlib
import warnings
import zipfile

import numpy as np
from absl import logging


def read_jsonl(path) -> list[dict]:
  """The rows of a JSON-lines file ([] if it does not exist)."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  lines = path.read_text().split("\n")
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # no newline after it: an append that was cut off
        warnings.warn(f"{path}: ignoring a torn last line ({line[:60]!r}...)")
        continue
      raise ValueError(f"{path}:{i + 1}: not a JSON row ({e.msg}); the file is corrupt") from e
  return rows


class JsonlAppender:
  """An open JSON-lines file for appending, one object per line, flushed after each. Opening it
  cuts off a torn last line a crash left (a partial object with no newline), with a warning, so
  what is appended never continues a broken line: the one place every JSON-lines log is written
  (results.jsonl, metrics.jsonl, batch_hashes.*.jsonl)."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self._f = open(self.path, "a+b")
    self._f.seek(0, os.SEEK_END)
    size = self._f.tell()
    if size:
      self._f.seek(max(0, size - 65536))
      tail = self._f.read()
      if not tail.endswith(b"\n"):
        keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        warnings.warn(f"{self.path}: dropping a torn last line before appending")
        self._f.truncate(keep)
        self._f.seek(keep)

  def write(self, *rows: dict) -> None:
    self._f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def append_jsonl(path, rows) -> None:
  """Appends rows to a JSON-lines file (JsonlAppender: a torn last line is cut off first)."""
  if not rows:
    return
  out = JsonlAppender(path)
  try:
    out.write(*rows)
  finally:
    out.close()


# What reading a truncated or corrupt .npz raises: zipfile's, numpy's and the OS's errors.
UNREADABLE = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError)


def read_cache(path, read):
  """`read(path)` of a cache file, or None on a miss: no file, or one that does not read back (a
  truncated or corrupt file is logged with its path, then recomputed and replaced by the caller)."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  try:
    return read(path)
  except UNREADABLE as e:
    logging.warning("%s: cached file does not read back (%s: %s); recomputing it", path,
                    type(e).__name__, e)
    return None


def read_npz(path, read):
  """`read(npz)` of a user's .npz file (np.load); one that does not read back is a ValueError
  naming it."""
  try:
    with np.load(path) as f:
      return read(f)
  except (zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e}); is it truncated?"
                     ) from None


def atomic_write_text(path, text: str) -> None:
  """Writes `text` to `path` all at once (temporary file + rename)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def atomic_save_npz(path, **arrays) -> None:
  """np.savez to `path` all at once."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.stem + ".tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def atomic_save_npy(path, array) -> None:
  path = pathlib.Path(path)
  tmp = path.with_name(path.stem + ".tmp.npy")
  np.save(tmp, array)
  os.replace(tmp, path)


def content_hash(*parts) -> str:
  """sha256 (16 hex digits) of arrays (dtype, shape and bytes), strings, numbers and nested
  dicts/lists/tuples of them (dicts in sorted key order): a cache key of what a result was made from."""
  h = hashlib.sha256()

  def feed(x):
    if isinstance(x, dict):
      h.update(b"{")
      for k in sorted(x):
        feed(str(k))
        feed(x[k])
      h.update(b"}")
    elif isinstance(x, (list, tuple)):
      h.update(b"[")
      for v in x:
        feed(v)
      h.update(b"]")
    elif isinstance(x, (str, bytes, int, float, bool)) or x is None:
      h.update(repr(x).encode())
    else:  # an array (numpy, or anything np.asarray takes: jax arrays)
      a = np.ascontiguousarray(np.asarray(x))
      h.update(f"{a.dtype.str}{a.shape}".encode())
      h.update(a.tobytes())
  for p in parts:
    feed(p)
  return h.hexdigest()[:16]


class WorkdirLock:
  """An exclusive lock on a workdir for as long as a run or sweep uses it.

  A second process on the same workdir fails at once with a message instead of colliding in its
  checkpoints and results; the lock goes with the process, so a killed run leaves none behind.
  (flock: local filesystems; network filesystems may not honour it.)
  """

  def __init__(self, workdir, name: str = ".lock"):
    self.path = pathlib.Path(workdir) / name  # one per process of a multi-host job
    self._f = None

  def __enter__(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._f = open(self.path, "a+")
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._f.seek(0)
      holder = self._f.read().strip() or "another process"
      self._f.close()
      raise RuntimeError(f"{self.path.parent} is in use by {holder}; wait for it to finish or "
                         f"use another workdir") from None
    self._f.seek(0)
    self._f.truncate()
    self._f.write(f"pid {os.getpid()}")
    self._f.flush()
    return self

  def __exit__(self, *exc):
    fcntl.flock(self._f, fcntl.LOCK_UN)
    self._f.close()
