"""How a run ends when it does not finish: exit codes, one-line user errors, and disk space.

Exit codes of `python -m dit_jax.main` (and of the tools):

  0   finished (every member of a sweep trained, evaluated and reported);
  1   a sweep member failed (its row in results.jsonl says why), or a bug (with its traceback);
  2   a user error: a bad flag, config field, data path or cache, or no space left. One line names
      the field or file and what to do; `--verbose` adds the traceback. Nothing was trained;
  75  preempted (SIGTERM): every running member saved a checkpoint; re-running the same command
      resumes. EX_TEMPFAIL of sysexits.h, the code a scheduler's requeue logic checks
      (tools/slurm_sweep.sbatch requeues on it).

A user error is any exception of `USER_ERRORS`: the config checks raise ValueError naming the field,
files raise OSError naming the path. A disk that fills up is reported before a checkpoint is
written (`check_free_space`), or, caught anywhere else, as one line naming the path and the space
left on it.
"""
from __future__ import annotations

import errno
import os
import pathlib
import shutil
import sys

EXIT_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               IsADirectoryError, TimeoutError)


class Preempted(Exception):
  """SIGTERM stopped the run after its members saved their checkpoints."""


class DiskFull(OSError):
  """Not enough space for what is about to be written; nothing was written."""

  def __init__(self, path, need_bytes: float, free_bytes: float):
    super().__init__(errno.ENOSPC, f"no space left for {mib(need_bytes)} at {path} "
                     f"({mib(free_bytes)} free); free some space and re-run (the run resumes "
                     "from its last checkpoint)")
    self.path = path


def mib(n: float) -> str:
  return f"{n / 2**20:.1f} MiB"


def free_bytes(path) -> int:
  """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
  p = pathlib.Path(path).absolute()
  while not p.exists() and p != p.parent:
    p = p.parent
  return shutil.disk_usage(p).free


def check_free_space(path, need_bytes: float) -> None:
  """Raises DiskFull unless the filesystem of `path` has `need_bytes` free."""
  free = free_bytes(path)
  if free < need_bytes:
    raise DiskFull(path, need_bytes, free)


def is_user_error(e: BaseException) -> bool:
  return isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno == errno.ENOSPC)


def one_line(e: BaseException) -> str:
  """The message of a user error on one line: the disk's free space for ENOSPC."""
  if isinstance(e, OSError) and e.errno == errno.ENOSPC and not isinstance(e, DiskFull):
    where = e.filename or os.getcwd()
    return f"no space left on device writing {where} ({mib(free_bytes(where))} free); free " \
           "some space and re-run (the run resumes from its last checkpoint)"
  text = str(e) if not isinstance(e, OSError) or not e.filename else \
      f"{e.strerror or e}: {e.filename}"
  text = " ".join(text.split())
  return text if isinstance(e, (ValueError, DiskFull)) else f"{type(e).__name__}: {text}"


def exit_user_error(prog: str, e: BaseException, hint: str = ""):
  """Prints `prog: error: <one line>` to stderr and exits with EXIT_USER_ERROR: how the entry
  point and the tools end on a user error."""
  print(f"{prog}: error: {one_line(e)}{hint}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def root_cause(e: BaseException) -> BaseException:
  """The ENOSPC under a chain of wrappers (orbax and asyncio re-raise it as other errors), or e."""
  seen = set()
  c = e
  while c is not None and id(c) not in seen:
    seen.add(id(c))
    if isinstance(c, OSError) and c.errno == errno.ENOSPC:
      return c
    c = c.__cause__ or c.__context__
  return e
