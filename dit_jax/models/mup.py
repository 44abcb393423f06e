"""μP (Tensor Programs V, Yang et al. 2022) for the DiT: the learning rate found at one width
transfers to the others (Zheng et al. 2025, "Scaling Diffusion Transformers Efficiently via μP").

Width grows through the number of heads at a fixed head size (the reference's rule: head size 72,
base width 288 = 4 heads), so attention keeps its 1/sqrt(d_head) (d_head is constant) and "kv" is a
finite axis. A model of width d with base width d0 has width multiplier m = d / d0; at m = 1 μP is
the standard parameterisation (SP) exactly.

Each parameter's role comes from the logical axis names the model declares (the same names the
sharding rules read), never from a table of parameter paths: the axes in `INFINITE` grow with width,
the others ("patch", "vocab", "kv", "layers", None) do not.

  role    which parameters                      init std (x the SP std at the base width)  Adam lr
  input   kernels with one infinite axis, an    1                                          1
          output axis (patch/label/timestep
          embeddings: fan_in finite)
  hidden  kernels with two infinite axes (qkv,  1/sqrt(m)                                  1/m
          proj, MLP, adaLN, timestep MLP 2nd)
  output  kernels whose infinite axis is the    1/m (the final linear starts at zero)      1/m
          leading (input) axis (final linear)
  vector  biases and norm scales                1 (zero)                                   1
  fixed   no infinite axis                      1                                          1

The output row is microsoft/mup's `MuReadout` (forward x / m, Adam lr 1) in the equivalent form
without a forward multiplier (Tensor Programs V, Table 3: output weights init var 1/fan_in^2, Adam
lr 1/fan_in): for W' = W / m, x W / m = x W', and Adam's normalised step on W' is the step on W
divided by m (exactly, up to Adam's eps, which the multiplier form sees as eps * m). So the model
needs no μP code of its own. Hidden weights follow `MuAdamW`: lr / m, and decoupled weight decay
whose product with the lr is unchanged (`MuAdamW` multiplies weight_decay by m; here the per-
parameter factor scales only Adam's direction, before `add_decayed_weights`).

Init: μP std at width d = (SP std of the same parameter at the base width) x the role's factor. The
SP std at the base width is measured on the base-width model's own draw (same key), so the rule is
right whatever initialiser (xavier, normal(0.02)) the SP model uses; zero-initialised parameters
(biases, adaLN-Zero, the final linear) stay zero. adaLN-Zero is kept: a zero hidden weight is a
valid μP init (its first Adam step at lr/m moves each modulation coordinate by Theta(1) whatever
the width), and it keeps DiT's identity-block start (tools/coord_check.py shows both).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PARAMETERIZATIONS = ("sp", "mup")
INFINITE = ("embed", "mlp", "heads")  # logical axes that grow with width (heads: fixed head size)
VECTOR_LEAVES = ("bias", "scale")  # flax's names of biases and norm scales
ROLES = ("input", "hidden", "output", "vector", "fixed")
# role -> (init std factor, Adam lr factor) as powers of m.
RULES = {"input": (0.0, 0.0), "hidden": (-0.5, -1.0), "output": (-1.0, -1.0),
         "vector": (0.0, 0.0), "fixed": (0.0, 0.0)}


def role(path: tuple, names: tuple) -> str:
  """The μP role of the parameter at `path` (its leaf name last) with logical axis `names`."""
  names = tuple(n for n in names if n != "layers")  # nn.scan's stacked-layer axis
  inf = [i for i, n in enumerate(names) if n in INFINITE]
  if not inf:
    return "fixed"
  if path[-1] in VECTOR_LEAVES:
    return "vector"
  if len(inf) == 2:
    return "hidden"
  if len(inf) > 2:
    raise ValueError(f"μP: parameter {'/'.join(path)} has axes {names}, more than two of which "
                     f"({INFINITE}) grow with width")
  return "output" if inf[0] == 0 else "input"


def _path(keypath) -> tuple:
  return tuple(str(getattr(k, "key", k)) for k in keypath)


def roles(boxed_params) -> dict:
  """{path: role} of every parameter of a boxed (logically partitioned) params tree."""
  out = {}
  def visit(keypath, leaf):
    if not isinstance(leaf, nn.Partitioned):
      raise ValueError(f"μP: parameter {'/'.join(_path(keypath))} declares no logical axis names; "
                       f"declare them (nn.with_logical_partitioning) so its role is known")
    out[_path(keypath)] = role(_path(keypath), tuple(leaf.names))
  jax.tree_util.tree_map_with_path(visit, boxed_params,
                                   is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return out


def lr_scales(boxed_params, width_mult: float) -> dict:
  """{path: the factor on Adam's direction} (1/m for hidden and output weights, else 1)."""
  return {p: width_mult ** RULES[r][1] for p, r in roles(boxed_params).items()}


def init_scales(boxed_params, width_mult: float) -> dict:
  """{path: μP init std / SP std at the base width}."""
  return {p: width_mult ** RULES[r][0] for p, r in roles(boxed_params).items()}


def reinit(params, base_params, width_mult: float):
  """μP params at width m from the SP draw `params` (boxed) and the base-width model's SP draw
  `base_params` (same key): each nonzero parameter rescaled to base std x the role's factor."""
  if width_mult == 1.0:
    return params  # μP at the base width is SP, bit for bit
  factors = init_scales(params, width_mult)
  base = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(nn.unbox(base_params))[0]}

  def rescale(keypath, leaf):
    path = _path(keypath)
    value = leaf.unbox()
    std, target = jnp.std(value), jnp.std(base[path]) * factors[path]
    value = jnp.where(std > 0, value * (target / jnp.where(std > 0, std, 1.0)), value)
    return leaf.replace_boxed(value.astype(leaf.unbox().dtype))
  return jax.tree_util.tree_map_with_path(rescale, params,
                                          is_leaf=lambda x: isinstance(x, nn.Partitioned))


def scale_updates(scales: dict) -> optax.GradientTransformation:
  """Multiplies each parameter's update by scales[path] (a factor of 1 leaves it untouched)."""
  def update(updates, state, params=None):
    del params
    def one(keypath, u):
      s = scales[_path(keypath)]
      return u if s == 1.0 else u * jnp.asarray(s, u.dtype)
    return jax.tree_util.tree_map_with_path(one, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def head_size(hidden_size: int, num_heads: int) -> int:
  return hidden_size // num_heads


def check(parameterization: str, base_width: int, hidden_size: int, num_heads: int) -> None:
  """The μP fields against a DiT of `hidden_size` and `num_heads` (one line, naming the field)."""
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"unknown parameterization {parameterization!r}; choose from "
                     f"{PARAMETERIZATIONS}")
  if parameterization == "sp":
    return
  hd = head_size(hidden_size, num_heads)
  if base_width <= 0 or base_width % hd:
    raise ValueError(f"mup.base_width={base_width}: μP grows width through heads at a fixed head "
                     f"size, so the base width must be a positive multiple of the head size {hd} "
                     f"(hidden_size {hidden_size} / {num_heads} heads)")


def width_mult(hidden_size: int, base_width: int) -> float:
  return hidden_size / base_width


def describe(boxed_params, width_mult_: float) -> list[dict]:
  """One row per parameter: path, role, init std factor, Adam lr factor (for tables and tests)."""
  return [dict(path="/".join(p), role=r, init=width_mult_ ** RULES[r][0],
               lr=width_mult_ ** RULES[r][1]) for p, r in sorted(roles(boxed_params).items())]

