"""Counting: parameters and XLA's forward FLOPs of any flax module (the model registry uses these).

The paper's own convention (multiply-accumulates of one image's forward pass, VAE excluded) is
analytic and family-specific: `dit.macs` and `unet.macs`. XLA counts 2 FLOPs per MAC and also counts
elementwise work; `xla_gflops` divides by 2 so the two are comparable.
"""
from typing import Callable

import flax.linen as nn
import jax


def cost_flops(compiled) -> float:
  """FLOPs from a compiled executable's cost analysis (a dict, or a list of one in older jax)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def count_params(params) -> int:
  """Number of scalars in a (possibly boxed or abstract) params pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))


def xla_gflops(model: nn.Module, init_fn: Callable, args: tuple, kwargs: dict) -> float:
  """Forward Gflops (FLOPs / 2) XLA counts for `model.apply(params, *args, **kwargs)`.

  `init_fn()` returns the (boxed) params; it is only traced, so nothing is allocated. `args` and
  `kwargs` are arrays or ShapeDtypeStructs for a batch of one.
  """
  spec = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
  args, kwargs = jax.tree.map(spec, args), jax.tree.map(spec, kwargs)
  params = jax.eval_shape(init_fn)
  fwd = jax.jit(lambda p, a, k: model.apply({"params": p}, *a, **k))
  return cost_flops(fwd.lower(nn.unbox(params), args, kwargs).compile()) / 2 / 1e9


# Training compute in the paper's measure: a training step costs about three forward passes (the
# backward pass is about two), counted in forward Gflops (multiply-accumulates) per image.
TRAIN_FORWARD_PASSES = 3
FLOPS_PER_MAC = 2  # hardware FLOPs (XLA's count, TFLOP/s ratings) per multiply-accumulate


def training_gflops(gflops_per_image: float, batch_size: int, steps: int = 1) -> float:
  """Training compute of `steps` steps at `batch_size`, in the paper's forward Gflops (MACs):
  3 x forward Gflops x images. Hardware FLOPs are FLOPS_PER_MAC times this."""
  return gflops_per_image * batch_size * steps * TRAIN_FORWARD_PASSES
