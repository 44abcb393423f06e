"""XLA's persistent compilation cache, so identical programs compile once across processes.

The seeds of one model in a sweep, a resumed run, and a re-run are the same programs (the seed,
parameters and data are arguments, not constants). With the cache on, every process after the
first loads the compiled train step, sampler and validation loss from disk instead of compiling
them again (on 2 CPU cores: ~11 s per DiT-Pico/4 train step). A loaded executable is the one the
compiler produced, so results are unchanged.

Where: $DIT_JAX_COMPILE_CACHE, else `<cache>/xla` under the cache of inception.default_cache_dir()
($DIT_JAX_CACHE or ~/.cache/dit_jax); DIT_JAX_COMPILE_CACHE=off turns it off.
"""
from __future__ import annotations

import os
import pathlib

import jax

from dit_jax.evaluation import inception

ENV = "DIT_JAX_COMPILE_CACHE"
MIN_COMPILE_S = 0.5  # programs that compile faster than this are not worth a file


def directory() -> pathlib.Path | None:
  """The cache directory in use by default, or None when it is off."""
  value = os.environ.get(ENV, "")
  if value.lower() in ("off", "0", "none"):
    return None
  if value:
    return pathlib.Path(value)
  return inception.default_cache_dir() / "xla"


def enable() -> pathlib.Path | None:
  """Turns the cache on (before the first compilation); returns its directory, None when off."""
  path = directory()
  if path is None:
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
  return path
