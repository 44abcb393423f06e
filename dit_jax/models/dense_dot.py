"""The dense layers' product, with a backward pass that computes the kernel's gradient in place.

For `y = dot_general(x, w)` that contracts trailing axes of the input x with the leading axes of a
kernel w, JAX's transpose rule forms the kernel's gradient as `dot_general(dy, x)` (the kernel's
free axes first) and then transposes it into the kernel's layout. XLA:CPU (jax 0.10) does not fold
that transpose: it copies dy (the larger operand: tokens x 3D for qkv, tokens x 4D for fc1) into
transposed order and runs the product as a plain dot outside the YNNPACK fusions the other products
use. On DiT-S/2's fc1 shape (2048 tokens, 384 -> 1536) the layer's backward takes 36 ms instead of
26 on the 2-core CPU (experiments/xla_cpu_grads/repro_xla_cpu_grads.py;
experiments/xla_cpu_grads/README.md, issue 16).

`dot_general` here has the same forward and computes the same two gradients, written as the
products a hand-written backward uses: dx = dy . w^T over the kernel's free axes and
dw = x^T . dy over the input's free axes, which lands in the kernel's own layout with no transpose
(XLA then copies x, the smaller operand, for the product). When x is the larger operand (fc2:
tokens x 4D in, D out) JAX's own form is kept, so the copy is again of the smaller one. Only the
summation order of dw can differ (float32 rounding, tests/test_fast_grads.py). Pass it to flax's Dense/DenseGeneral
as `dot_general=`; products with batch dimensions fall back to `lax.dot_general`.

The custom backward is a workaround for XLA:CPU, measured only there: on other backends (GPU, TPU)
`custom_backward_on` turns it off and the product is `lax.dot_general` with JAX's own transpose
rule, which XLA:GPU/TPU fuse. The decision reads the default backend at trace time.
"""
import functools

import flax.linen as nn
import jax
from jax import lax


def custom_backward_on(platform: str) -> bool:
  """Whether the kernel-layout backward is used on `platform` (jax's 'cpu' / 'gpu' / 'tpu')."""
  return platform == "cpu"


def dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` with the kernel-layout backward above (same signature) on the CPU."""
  (x_contract, w_contract), (x_batch, w_batch) = dimension_numbers
  n = len(w_contract)
  if (not custom_backward_on(jax.default_backend()) or x_batch or w_batch
      or tuple(w_contract) != tuple(range(n)) or preferred_element_type):
    return lax.dot_general(x, w, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  x_contract = tuple(a % x.ndim for a in x_contract)
  return _dot(x_contract, _hashable(precision), x, w)


def _hashable(precision):
  return tuple(precision) if isinstance(precision, list) else precision


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dot(x_contract, precision, x, w):
  return lax.dot_general(x, w, ((x_contract, tuple(range(len(x_contract)))), ((), ())),
                         precision=precision)


def _fwd(x_contract, precision, x, w):
  return _dot(x_contract, precision, x, w), (x, w)


def _bwd(x_contract, precision, residuals, dy):
  x, w = residuals
  n_contract = len(x_contract)
  x_free = tuple(a for a in range(x.ndim) if a not in x_contract)
  n_free = len(x_free)
  w_free = tuple(range(n_contract, w.ndim))
  # dx: dy's kernel-free axes (its last ones) against w's free axes -> x_free + x_contract order.
  dx = lax.dot_general(dy, w, ((tuple(range(n_free, dy.ndim)), w_free), ((), ())),
                       precision=precision)
  order = x_free + x_contract
  if order != tuple(range(x.ndim)):
    dx = lax.transpose(dx, tuple(order.index(a) for a in range(x.ndim)))
  # dw: x's free axes against dy's leading axes -> x_contract (ascending) + w_free, the kernel's
  # layout when the contracted input axes are listed in ascending order (flax's trailing axes).
  if x.size <= dy.size:
    dw = lax.dot_general(x, dy, ((x_free, tuple(range(n_free))), ((), ())), precision=precision)
  else:  # JAX's own form: XLA transposes dy, here the smaller operand
    dw = lax.dot_general(dy, x, ((tuple(range(n_free)), x_free), ((), ())), precision=precision)
    dw = lax.transpose(dw, tuple(range(dy.ndim - n_free, dw.ndim)) + tuple(range(dy.ndim - n_free)))
  ascending = tuple(sorted(x_contract))
  if ascending != x_contract:
    perm = tuple(ascending.index(a) for a in x_contract) + w_free
    dw = lax.transpose(dw, perm)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dot.defvjp(_fwd, _bwd)


# The models' dense layers: flax's, with this product.
Dense = functools.partial(nn.Dense, dot_general=dot_general)
DenseGeneral = functools.partial(nn.DenseGeneral, dot_general=dot_general)
