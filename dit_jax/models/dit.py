"""DiT: the diffusion transformer of Peebles & Xie, with the four conditioning modes of Fig. 5.

Layout and initialisation follow facebookresearch/DiT `models.py`; tensors are NHWC. Parameters carry
logical axis names ("embed", "mlp", "heads", "kv", "patch", "vocab", "layers") for sharding rules.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.models import attention, dense_dot, embeddings, patchify as patchify_lib
from dit_jax.models.text import check_context

CONDITIONINGS = ("adaln_zero", "adaln", "cross_attn", "in_context")


@dataclasses.dataclass(frozen=True)
class Size:
  """One row of the size table: depth, hidden width, attention heads."""
  depth: int
  hidden_size: int
  num_heads: int


# The paper's Table 4 (S, B, L, XL) and smaller rows for CPU sweeps. Ti is DeiT-Ti's width;
# Mi and Nano keep DiT's head width (64) and shrink depth and width; Pico has 0.56x Nano's Gflops,
# so a Pico/Nano x patch grid interleaves in Gflops (each step about 2x) as the CPU sweep wants.
SIZES = {
    # A width ladder at Pico's depth and head count (SI prefixes in width order), for iso-FLOP
    # sweeps along one axis (configs/dit_sweep.py:isoflop) and more widths per patch in the default.
    "Yocto": Size(4, 24, 2),
    "Zepto": Size(4, 32, 2),
    "Atto": Size(4, 48, 2),
    "Femto": Size(4, 64, 2),
    "Pico": Size(4, 96, 2),
    "Nano": Size(4, 128, 2),
    "Mi": Size(6, 192, 3),
    "Ti": Size(12, 192, 3),
    "S": Size(12, 384, 6),
    "B": Size(12, 768, 12),
    "L": Size(24, 1024, 16),
    "XL": Size(28, 1152, 16),
    # The μP width ladder (configs/dit_sweep.py:mup_transfer): depth 2, head width 64, width grown
    # through the heads (1-4), as μP's fixed-head-size rule wants (models/mup.py).
    "Mu1": Size(2, 64, 1),
    "Mu2": Size(2, 128, 2),
    "Mu3": Size(2, 192, 3),
    "Mu4": Size(2, 256, 4),
}
def xavier(names, zero: bool = False, **axes):
  """Xavier-uniform (or zeros) with logical axis names; fans as torch's flattened Linear weight."""
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform(**axes)
  return nn.with_logical_partitioning(init, names)


def bias(names):
  """Zero-initialised bias with logical axis names (every bias in DiT starts at zero)."""
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def modulate(x_BxTxD, shift_BxD, scale_BxD):
  return x_BxTxD * (1 + scale_BxD[:, None]) + shift_BxD[:, None]


def layer_norm(dtype):
  """LayerNorm without affine parameters, eps 1e-6, statistics in float32."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


class Attention(nn.Module):
  """Multi-head attention; self-attention uses ONE fused qkv projection with bias, as timm."""
  num_heads: int
  attention_impl: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, context_BxSxD=None, mask_BxS=None):
    d = x_BxTxD.shape[-1]
    h, hd = self.num_heads, d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if context_BxSxD is None:
      qkv = dense_dot.DenseGeneral((3, h, hd), name="qkv", **kw,
                                   kernel_init=xavier(("embed", None, "heads", "kv")),
                                   bias_init=bias((None, "heads", "kv")))(x_BxTxD)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:  # cross-attention: separate q/k/v, each D x D
      proj = lambda name, y: dense_dot.DenseGeneral((h, hd), name=name, **kw,
                                                    kernel_init=xavier(("embed", "heads", "kv")),
                                                    bias_init=bias(("heads", "kv")))(y)
      q, k, v = proj("q", x_BxTxD), proj("k", context_BxSxD), proj("v", context_BxSxD)
    mask = None if mask_BxS is None else mask_BxS[:, None, None, :]
    o = attention.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    return dense_dot.DenseGeneral(d, axis=(-2, -1), name="proj", **kw,
                                  kernel_init=xavier(("heads", "kv", "embed")),
                                  bias_init=bias(("embed",)))(o)


class Mlp(nn.Module):
  """fc1 -> tanh-GELU -> fc2."""
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense_dot.Dense(self.hidden, name="fc1", kernel_init=xavier(("embed", "mlp")),
                        bias_init=bias(("mlp",)), **kw)(x)
    x = nn.gelu(x, approximate=True)
    return dense_dot.Dense(d, name="fc2", kernel_init=xavier(("mlp", "embed")),
                           bias_init=bias(("embed",)), **kw)(x)


class DiTBlock(nn.Module):
  """One transformer block, conditioned by adaLN(-Zero), cross-attention or nothing (in-context)."""
  num_heads: int
  mlp_ratio: float = 4.0
  conditioning: str = "adaln_zero"
  attention_impl: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, cond):
    c_BxD, cond_BxSxD, mask_BxS = cond
    d = x_BxTxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = Attention(self.num_heads, self.attention_impl, name="attn", **kw)
    mlp = Mlp(int(d * self.mlp_ratio), name="mlp", **kw)
    norm = layer_norm(self.dtype)
    if self.conditioning in ("adaln_zero", "adaln"):
      zero = self.conditioning == "adaln_zero"
      n = 6 if zero else 4
      mod = dense_dot.Dense(n * d, name="adaLN_modulation",
                            kernel_init=xavier(("embed", "mlp"), zero),
                            bias_init=bias(("mlp",)), **kw)(nn.silu(c_BxD))
      mod = jnp.split(mod, n, axis=-1)
      if zero:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
      else:
        shift_msa, scale_msa, shift_mlp, scale_mlp = mod
        gate_msa = gate_mlp = jnp.ones_like(shift_msa)
      x_BxTxD = x_BxTxD + gate_msa[:, None] * attn(modulate(norm(x_BxTxD), shift_msa, scale_msa))
      x_BxTxD = x_BxTxD + gate_mlp[:, None] * mlp(modulate(norm(x_BxTxD), shift_mlp, scale_mlp))
    else:
      x_BxTxD = x_BxTxD + attn(norm(x_BxTxD))
      if self.conditioning == "cross_attn":
        cross = Attention(self.num_heads, self.attention_impl, name="cross_attn", **kw)
        x_BxTxD = x_BxTxD + cross(norm(x_BxTxD), cond_BxSxD, mask_BxS)
      x_BxTxD = x_BxTxD + mlp(norm(x_BxTxD))
    return x_BxTxD, None


class FinalLayer(nn.Module):
  """Norm (adaptive in the adaLN modes) and a zero-initialised linear to p*p*C_out."""
  patch_size: int
  out_channels: int
  conditioning: str = "adaln_zero"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, c_BxD):
    d = x_BxTxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x_BxTxD = layer_norm(self.dtype)(x_BxTxD)
    if self.conditioning in ("adaln_zero", "adaln"):
      zero = self.conditioning == "adaln_zero"
      mod = dense_dot.Dense(2 * d, name="adaLN_modulation",
                            kernel_init=xavier(("embed", "mlp"), zero),
                            bias_init=bias(("mlp",)), **kw)(nn.silu(c_BxD))
      shift, scale = jnp.split(mod, 2, axis=-1)
      x_BxTxD = modulate(x_BxTxD, shift, scale)
    return dense_dot.Dense(self.patch_size ** 2 * self.out_channels, name="linear", **kw,
                           kernel_init=xavier(("embed", None), zero=True),
                           bias_init=bias((None,)))(x_BxTxD)


class DiT(nn.Module):
  """Diffusion transformer: (x_BxHxWxC, t_B, y_B) -> eps (and Sigma) of shape (B, H, W, C_out)."""
  input_size: int = 32
  in_channels: int = 4
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000  # 0 = unconditional
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  conditioning: str = "adaln_zero"
  # cross_attn only: > 0 appends a context sequence (B, L, context_dim), e.g. a caption encoding,
  # projected to hidden_size, to the (t, y) tokens the blocks cross-attend to.
  context_dim: int = 0
  attention_impl: Optional[str] = None  # None: dit_jax.models.attention; "xla"/"cudnn": jax.nn's
  scan_layers: bool = False
  remat: bool = False
  # > 0: μP with this base width (models/mup.py: the init and Adam lr of each parameter; the
  # forward pass is the same). 0: the standard parameterisation.
  mup_base_width: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def validate(self) -> None:
    """Config errors, raised before anything is traced or compiled."""
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"unknown conditioning {self.conditioning!r}; choose from {CONDITIONINGS}")
    patchify_lib.check_patch(self.input_size, self.patch_size)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden size {self.hidden_size} not divisible by {self.num_heads} heads")
    if self.context_dim and self.conditioning != "cross_attn":
      raise ValueError(f"context_dim={self.context_dim} needs conditioning='cross_attn' (got "
                       f"{self.conditioning!r}): only cross-attention reads a context sequence")

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, y_B=None, *, train: bool = False, force_drop_ids=None,
               context=None, context_mask=None):
    """context (B, L, context_dim) and context_mask (B, L) bool (True = a real token) are used by
    cross_attn models built with context_dim > 0; the mask defaults to all True."""
    self.validate()
    want = (self.input_size, self.input_size, self.in_channels)
    if tuple(x_BxHxWxC.shape[1:]) != want:
      raise ValueError(f"DiT expects inputs (B, {want[0]}, {want[1]}, {want[2]}), "
                       f"got {tuple(x_BxHxWxC.shape)}")
    p, d = self.patch_size, self.hidden_size
    g = self.input_size // p
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    tokens = patchify_lib.patchify(x_BxHxWxC.astype(self.dtype), p)
    x_BxTxD = dense_dot.Dense(d, name="x_embedder", kernel_init=xavier(("patch", "embed")),
                              bias_init=bias(("embed",)), **kw)(tokens)
    x_BxTxD = x_BxTxD + embeddings.sincos_2d(d, g, g).astype(self.dtype)[None]  # frozen

    t_BxD = embeddings.TimestepEmbedder(d, name="t_embedder", **kw)(t_B)
    cond_tokens = [t_BxD]
    if self.num_classes > 0:
      if y_B is None:
        raise ValueError("a class-conditional DiT needs labels y (num_classes > 0)")
      y_BxD = embeddings.LabelEmbedder(self.num_classes, d, self.class_dropout_prob,
                                       name="y_embedder", **kw)(y_B, train, force_drop_ids)
      cond_tokens.append(y_BxD)
    c_BxD = sum(cond_tokens)
    cond_BxSxD = jnp.stack(cond_tokens, axis=1)
    mask_BxS = None
    if self.context_dim:
      context, context_mask = check_context(self.context_dim, context, context_mask,
                                            x_BxHxWxC.shape[0])
      ctx_BxLxD = dense_dot.Dense(d, name="context_proj", kernel_init=xavier((None, "embed")),
                                  bias_init=bias(("embed",)), **kw)(context.astype(self.dtype))
      mask_BxS = jnp.concatenate([jnp.ones(cond_BxSxD.shape[:2], bool), context_mask], axis=1)
      cond_BxSxD = jnp.concatenate([cond_BxSxD, ctx_BxLxD], axis=1)
    elif context is not None:
      raise ValueError("this DiT has context_dim=0; build it with conditioning='cross_attn' and "
                       "context_dim=<encoder width> to condition on a context sequence")

    n_extra = 0
    if self.conditioning == "in_context":  # (t, c) as extra tokens, dropped before the final layer
      n_extra = cond_BxSxD.shape[1]
      x_BxTxD = jnp.concatenate([cond_BxSxD, x_BxTxD], axis=1)

    block_kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    conditioning=self.conditioning, attention_impl=self.attention_impl, **kw)
    block_cls = DiTBlock
    if self.remat:
      block_cls = nn.remat(block_cls, prevent_cse=not self.scan_layers,
                           policy=jax.checkpoint_policies.nothing_saveable)
    if self.scan_layers:
      blocks = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=nn.broadcast, length=self.depth,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxD, _ = blocks(name="blocks", **block_kw)(x_BxTxD, (c_BxD, cond_BxSxD, mask_BxS))
    else:
      for i in range(self.depth):
        x_BxTxD, _ = block_cls(name=f"blocks_{i}", **block_kw)(x_BxTxD,
                                                               (c_BxD, cond_BxSxD, mask_BxS))

    x_BxTxD = x_BxTxD[:, n_extra:]
    out = FinalLayer(p, self.out_channels, self.conditioning, name="final_layer", **kw)(
        x_BxTxD, c_BxD)
    return patchify_lib.unpatchify(out, p, g, g).astype(jnp.float32)


def init_params(model: DiT, rng, batch: int = 1):
  """Initialised (boxed, logically partitioned) params for `model`."""
  args, kwargs = example_inputs(model, batch)
  return model.init({"params": rng}, *args, **kwargs)["params"]


def example_inputs(m: DiT, batch: int = 1, context_length: int = 1):
  """Zero (x, t, y) and keyword inputs (context) for init or tracing."""
  x = jnp.zeros((batch, m.input_size, m.input_size, m.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  y = jnp.zeros((batch,), jnp.int32) if m.num_classes else None
  kwargs = {}
  if m.context_dim:  # the params do not depend on the context length
    kwargs = dict(context=jnp.zeros((batch, max(context_length, 1), m.context_dim), jnp.float32))
  return (x, t, y), kwargs


# --- forward Gflops in the paper's convention (flops.py) ---------------------------------------

def macs(m: DiT, context_length: int = 0) -> int:
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
