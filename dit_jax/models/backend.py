"""The accelerator a model runs on, as the facts the implementation choices read.

`attention.choose` (attention_impl='auto') and `dense_dot.custom_backward_on` decide from a
`Backend`, never from jax directly, so the decisions are pure functions of (backend, dtype, shapes)
that the tests exercise for a GPU or a TPU on a CPU-only machine by building the `Backend` by hand.
"""
from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Backend:
  """platform: 'cpu' | 'gpu' | 'tpu'; cuda: an NVIDIA GPU (jax's CUDA backend, not ROCm);
  compute_capability: e.g. '9.0' (H100/H200), '8.0' (A100), '' where not a CUDA GPU."""
  platform: str
  device_kind: str = ""
  cuda: bool = False
  compute_capability: str = ""

  @property
  def capability(self) -> tuple[int, ...]:
    return tuple(int(x) for x in self.compute_capability.split(".")) if self.compute_capability \
        else ()


def current() -> Backend:
  """The backend of jax's first device (the one the default mesh starts with)."""
  dev = jax.devices()[0]
  cuda = dev.platform == "gpu" and "cuda" in getattr(dev.client, "platform_version", "").lower()
  return Backend(dev.platform, dev.device_kind, cuda, str(getattr(dev, "compute_capability", "")
                                                          if cuda else ""))
