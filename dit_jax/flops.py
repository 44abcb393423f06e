"""Forward-pass Gflops in the DiT paper's convention, analytic and from XLA's cost analysis.

The paper counts multiply-accumulates (one per multiply-add), one image, VAE excluded: patch embed,
qkv/proj/MLP, QK^T and AV, adaLN modulation, the t-embedding MLP, the final linear. Softmax, norms
and elementwise work are not counted. XLA counts 2 FLOPs per MAC and does count elementwise work.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax import dit as dit_lib


def dit_macs(m: dit_lib.DiT, context_length: int = 0) -> int:
  """Multiply-accumulates of one forward pass of DiT `m` on one image (with a context sequence of
  `context_length` tokens when the model reads one)."""
  m.validate()
  d, p, c = m.hidden_size, m.patch_size, m.in_channels
  n = (m.input_size // p) ** 2
  s = 2 if m.num_classes else 1  # conditioning tokens (t, y)
  context = context_length if m.context_dim else 0
  s += context
  t = n + s if m.conditioning == "in_context" else n
  mlp = int(d * m.mlp_ratio)
  macs = n * c * p * p * d                 # patch embedding
  macs += context * m.context_dim * d      # context projection
  macs += 256 * d + d * d                  # timestep MLP
  block = t * d * 3 * d + t * d * d        # fused qkv, output projection
  block += 2 * t * t * d                   # QK^T and AV
  block += 2 * t * d * mlp                 # MLP
  if m.conditioning == "adaln_zero":
    block += d * 6 * d
  elif m.conditioning == "adaln":
    block += d * 4 * d
  elif m.conditioning == "cross_attn":
    block += 2 * n * d * d + 2 * s * d * d + 2 * n * s * d  # q, o; k, v; QK^T, AV over s tokens
  macs += m.depth * block
  if m.conditioning in ("adaln_zero", "adaln"):
    macs += d * 2 * d                      # final adaLN
  macs += n * d * p * p * m.out_channels   # final linear
  return macs


def gflops(m: dit_lib.DiT, context_length: int = 0) -> float:
  """Analytic forward Gflops (paper convention: 1e9 MACs)."""
  return dit_macs(m, context_length) / 1e9


def cost_flops(compiled) -> float:
  """FLOPs from a compiled executable's cost analysis (a dict, or a list of one in older jax)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def xla_gflops(model: nn.Module, example_inputs: tuple) -> float:
  """Forward Gflops of `model` on a batch of one, counted by XLA (FLOPs / 2), params abstract."""
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype),
                     example_inputs)
  params = jax.eval_shape(lambda *a: model.init({"params": jax.random.key(0)}, *a)["params"], *one)
  fwd = jax.jit(lambda p, *args: model.apply({"params": p}, *args))
  return cost_flops(fwd.lower(nn.unbox(params), *one).compile()) / 2 / 1e9


def dit_inputs(m: dit_lib.DiT) -> tuple:
  """Abstract (x, t, y) for a batch of one."""
  x = jax.ShapeDtypeStruct((1, m.input_size, m.input_size, m.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return (x, t, t) if m.num_classes else (x, t)


def count_params(params) -> int:
  """Number of scalars in a (possibly boxed or abstract) params pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))


def _is_unet(model) -> bool:
  from dit_jax import unet  # pylint: disable=g-import-not-at-top  (unet imports this module)
  return isinstance(model, unet.UNet)


def model_gflops(model) -> float:
  """Analytic forward Gflops of a DiT or a U-Net, one convention for both."""
  if _is_unet(model):
    from dit_jax import unet  # pylint: disable=g-import-not-at-top
    return unet.gflops(model)
  return gflops(model)


def model_xla_gflops(model) -> float:
  """XLA's forward Gflops of a DiT or a U-Net on one image."""
  if _is_unet(model):
    from dit_jax import unet  # pylint: disable=g-import-not-at-top
    return unet.xla_gflops(model)
  return xla_gflops(model, dit_inputs(model))


def abstract_params(model):
  """Shapes of a DiT's or U-Net's params, without allocating them."""
  if _is_unet(model):
    from dit_jax import unet  # pylint: disable=g-import-not-at-top
    return jax.eval_shape(lambda: unet.init_params(model, jax.random.key(0)))
  return jax.eval_shape(lambda: dit_lib.init_params(model, jax.random.key(0)))
