"""Files the framework writes: JSON-lines logs and atomic (write-then-rename) saves.

A reader of a JSON-lines file that a crash interrupted mid-append sees a torn last line; it is
dropped with a warning, never parsed into a wrong row. A torn line anywhere else is corruption and
raises with the file and line named. Saves go to a temporary file in the same directory and are
renamed into place, so a reader never sees half a file.
"""
import json
import os
import pathlib
import warnings

import numpy as np


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


def append_jsonl(path, rows) -> None:
  """Appends rows, one JSON object per line; a torn last line left by a crash is finished first."""
  path = pathlib.Path(path)
  if not rows:
    return
  with open(path, "a+b") as f:
    if f.tell() > 0:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")
    f.write("".join(json.dumps(r) + "\n" for r in rows).encode())


def _replace(tmp: pathlib.Path, path: pathlib.Path) -> None:
  os.replace(tmp, path)


def atomic_write_text(path, text: str) -> None:
  """Writes `text` to `path` all at once (temporary file + rename)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  _replace(tmp, path)


def atomic_write_bytes(path, data: bytes) -> None:
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_bytes(data)
  _replace(tmp, path)


def atomic_save_npz(path, **arrays) -> None:
  """np.savez to `path` all at once."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.stem + ".tmp.npz")
  np.savez(tmp, **arrays)
  _replace(tmp, path)


def atomic_save_npy(path, array) -> None:
  path = pathlib.Path(path)
  tmp = path.with_name(path.stem + ".tmp.npy")
  np.save(tmp, array)
  _replace(tmp, path)
