"""ADM U-Net (Dhariwal & Nichol): the convolutional baseline DiT replaced, with optional cross-attention.

Layout follows openai/guided-diffusion `unet.py` with `use_scale_shift_norm=True` and learned Sigma:
conv_in, then per level `num_res_blocks` residual blocks (plus self-attention at the downsample rates
in `attention_resolutions`) and a down-sampling block; a middle ResBlock-Attention-ResBlock; a decoder
that concatenates the encoder's features (last in, first out) before each of its `num_res_blocks + 1`
blocks per level; GroupNorm-SiLU-zero-initialised conv out to 2C channels. Tensors are NHWC.

Same interface as `dit.DiT`: `apply({'params': p}, x_BxHxWxC, t_B, y_B, train=, context=,
context_mask=, rngs={'label_dropout': k})` -> float32 (B, H, W, 2C). With `context_dim > 0` every
attention block also cross-attends to a context sequence (B, L, context_dim), e.g. a caption encoding.
"""
import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dit_jax.models import attention, dense_dot, embeddings
from dit_jax.models.text import check_context


@dataclasses.dataclass(frozen=True)
class Size:
  """One named U-Net: base width, per-level multipliers, blocks per level, attention rates."""
  model_channels: int
  channel_mult: tuple
  num_res_blocks: int
  attention_resolutions: tuple  # downsample rates (1 = full resolution) with self-attention
  num_head_channels: int = 64
  num_groups: int = 32  # GroupNorm groups (GroupNorm32); must divide every level's width


# Sizes for 32x32x4 latents whose forward Gflops (MACs, one image) span DiT-S/2 (6.06) .. DiT-XL/2
# (118.6): one family, levels 32-16-8-4 with self-attention at 16, 8 and 4 (ADM-style), only the width
# changes. S 4.79, B 25.6, L 74.8, XL 116.7 Gflops (see experiments/text_conditioning/README.md). Head
# width 32 (as LDM) because the widths are multiples of 32, not 64. Nano and Pico are CPU-sized rows;
# Pico (width 16, GroupNorm8) is the U-Net of the default CPU sweep (configs/dit_sweep.py).
SIZES = {
    "Pico": Size(16, (1, 2), 1, (2,), 16, num_groups=8),
    "Nano": Size(32, (1, 2), 1, (2,), 32),
    "S": Size(96, (1, 2, 3, 4), 2, (2, 4, 8), 32),
    "B": Size(224, (1, 2, 3, 4), 2, (2, 4, 8), 32),
    "L": Size(384, (1, 2, 3, 4), 2, (2, 4, 8), 32),
    "XL": Size(480, (1, 2, 3, 4), 2, (2, 4, 8), 32),
}


def torch_default(names):
  """PyTorch's default Conv/Linear weight init, uniform(+-1/sqrt(fan_in)), with logical axes."""
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), names)


def zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def conv(features, kernel, name, kw, stride=1, zero=False):
  """Conv with torch's padding (kernel // 2 each side) and conv_in/conv_out logical axes."""
  names = (None, None, "conv_in", "conv_out")
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), name=name,
                 kernel_init=zeros(names) if zero else torch_default(names),
                 bias_init=zeros(("conv_out",)), **kw)


def group_norm(num_groups, name, dtype):
  """GroupNorm32: statistics in float32 (guided-diffusion's GroupNorm32), eps 1e-5 as torch."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=1e-5, dtype=jnp.float32, name=name,
                      param_dtype=jnp.float32)


def downsample_pool(x_BxHxWxC):
  return nn.avg_pool(x_BxHxWxC, (2, 2), strides=(2, 2))


def upsample_nearest(x_BxHxWxC):
  return jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
  """GN-SiLU-conv, scale-shift norm from the embedding, SiLU-dropout-zero conv; optional up/down."""
  out_channels: int
  num_groups: int = 32
  dropout: float = 0.0
  updown: Optional[str] = None  # None, "down" or "up"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, emb_BxE, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c_in, c = x_BxHxWxC.shape[-1], self.out_channels
    h = nn.silu(group_norm(self.num_groups, "in_norm", self.dtype)(x_BxHxWxC)).astype(self.dtype)
    if self.updown is not None:  # resample h after the norm and x on the skip path (ADM order)
      resample = downsample_pool if self.updown == "down" else upsample_nearest
      h, x_BxHxWxC = resample(h), resample(x_BxHxWxC)
    h = conv(c, 3, "in_conv", kw)(h)
    emb = dense_dot.Dense(2 * c, name="emb_proj", kernel_init=torch_default(("embed", "mlp")),
                          bias_init=zeros(("mlp",)), **kw)(nn.silu(emb_BxE))
    scale, shift = jnp.split(emb[:, None, None, :], 2, axis=-1)  # ADM chunks scale first
    h = group_norm(self.num_groups, "out_norm", self.dtype)(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout)(nn.silu(h).astype(self.dtype), deterministic=not train)
    h = conv(c, 3, "out_conv", kw, zero=True)(h)
    skip = x_BxHxWxC if c_in == c else conv(c, 1, "skip", kw)(x_BxHxWxC)
    return skip + h


class AttentionBlock(nn.Module):
  """Self-attention over the H*W positions (fused qkv, zero-init output), then optional
  cross-attention to a context sequence; each is residual after its own GroupNorm."""
  num_head_channels: int = 64
  num_groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, context_BxLxD=None, mask_BxL=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hh, ww, c = x_BxHxWxC.shape
    nh, hd = c // self.num_head_channels, self.num_head_channels
    x_BxTxC = x_BxHxWxC.reshape(b, hh * ww, c)
    out_proj = lambda name: dense_dot.DenseGeneral(c, axis=(-2, -1), name=name, **kw,
                                                   kernel_init=zeros(("heads", "kv", "embed")),
                                                   bias_init=zeros(("embed",)))
    h = group_norm(self.num_groups, "norm", self.dtype)(x_BxTxC).astype(self.dtype)
    qkv = dense_dot.DenseGeneral((3, nh, hd), name="qkv", kernel_init=torch_default(
        ("embed", None, "heads", "kv")), bias_init=zeros((None, "heads", "kv")), **kw)(h)
    o = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    x_BxTxC = x_BxTxC + out_proj("proj_out")(o)
    if context_BxLxD is not None:
      proj = lambda name, y: dense_dot.DenseGeneral((nh, hd), name=name, kernel_init=torch_default(
          ("embed", "heads", "kv")), bias_init=zeros(("heads", "kv")), **kw)(y)
      h = group_norm(self.num_groups, "cross_norm", self.dtype)(x_BxTxC).astype(self.dtype)
      ctx = context_BxLxD.astype(self.dtype)
      mask = mask_BxL[:, None, None, :]
      o = attention.dot_product_attention(proj("cross_q", h), proj("cross_k", ctx),
                                          proj("cross_v", ctx), mask=mask)
      # A fully padded context attends to nothing rather than averaging the padding.
      o = jnp.where(jnp.any(mask_BxL, axis=-1)[:, None, None, None], o, 0)
      x_BxTxC = x_BxTxC + out_proj("cross_out")(o)
    return x_BxTxC.reshape(b, hh, ww, c)


class Downsample(nn.Module):
  """Stride-2 3x3 conv (ADM's conv_resample down-sampling when resblock_updown is off)."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return conv(x_BxHxWxC.shape[-1], 3, "conv", kw, stride=2)(x_BxHxWxC)


class Upsample(nn.Module):
  """Nearest x2 then 3x3 conv (ADM's conv_resample up-sampling when resblock_updown is off)."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return conv(x_BxHxWxC.shape[-1], 3, "conv", kw)(upsample_nearest(x_BxHxWxC))


@dataclasses.dataclass(frozen=True)
class Stage:
  """One encoder/decoder block of the plan: its kind, width, resolution and attention."""
  kind: str        # "conv_in", "res", "down", "up_res" (decoder ResBlock), "middle"
  channels: int    # output channels
  rate: int        # downsample rate of the block's input (1 = full resolution)
  attention: bool = False
  in_channels: int = 0  # decoder blocks: channels after concatenating the skip
  upsample: bool = False  # decoder blocks: ends with an up-sampling


class UNet(nn.Module):
  """ADM U-Net: (x_BxHxWxC, t_B, y_B) -> eps and Sigma values of shape (B, H, W, C_out)."""
  input_size: int = 32
  in_channels: int = 4
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (2, 4, 8)
  num_head_channels: int = 64
  num_groups: int = 32
  dropout: float = 0.0
  resblock_updown: bool = True  # ADM's ImageNet models: ResBlocks do the up/down-sampling
  num_classes: int = 1000  # 0 = unconditional
  class_dropout_prob: float = 0.1
  learn_sigma: bool = True
  context_dim: int = 0  # > 0: cross-attention to a (B, L, context_dim) context in every attention
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.model_channels

  def plan(self) -> tuple[list, Stage, list]:
    """Encoder stages, middle stage and decoder stages, as ADM's constructor lays them out."""
    mc, levels = self.model_channels, len(self.channel_mult)
    ch = mc * self.channel_mult[0]
    enc, skips, rate = [Stage("conv_in", ch, 1)], [ch], 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = mc * mult
        enc.append(Stage("res", ch, rate, rate in self.attention_resolutions))
        skips.append(ch)
      if level != levels - 1:
        enc.append(Stage("down", ch, rate))
        skips.append(ch)
        rate *= 2
    middle = Stage("middle", ch, rate, True)
    dec = []
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        cin = ch + skips.pop()
        ch = mc * mult
        up = bool(level) and i == self.num_res_blocks
        dec.append(Stage("up_res", ch, rate, rate in self.attention_resolutions, cin, up))
        if up:
          rate //= 2
    return enc, middle, dec

  def validate(self) -> None:
    """Config errors, raised before anything is traced or compiled."""
    levels = len(self.channel_mult)
    if levels < 1 or self.num_res_blocks < 1 or self.model_channels < 1:
      raise ValueError("need at least one level, one ResBlock per level and model_channels >= 1")
    if self.input_size % 2 ** (levels - 1):
      raise ValueError(f"input size {self.input_size} must be divisible by 2^{levels - 1} for "
                       f"{levels} levels (skips are concatenated at every level); pad the images "
                       f"or use fewer channel_mult entries")
    rates = {2 ** i for i in range(levels)}
    if not set(self.attention_resolutions) <= rates:
      raise ValueError(f"attention_resolutions {tuple(self.attention_resolutions)} are downsample "
                       f"rates; this U-Net has rates {sorted(rates)}")
    for mult in self.channel_mult:
      ch = self.model_channels * mult
      if ch % self.num_groups or ch % self.num_head_channels:
        raise ValueError(f"width {ch} (model_channels {self.model_channels} x {mult}) must be a "
                         f"multiple of num_groups={self.num_groups} and num_head_channels="
                         f"{self.num_head_channels}")

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, y_B=None, *, train: bool = False, force_drop_ids=None,
               context=None, context_mask=None):
    self.validate()
    want = (self.input_size, self.input_size, self.in_channels)
    if tuple(x_BxHxWxC.shape[1:]) != want:
      raise ValueError(f"UNet expects inputs (B, {want[0]}, {want[1]}, {want[2]}), "
                       f"got {tuple(x_BxHxWxC.shape)}")
    context, context_mask = check_context(self.context_dim, context, context_mask,
                                          x_BxHxWxC.shape[0])
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    e = self.time_embed_dim

    dense = lambda name, names: dense_dot.Dense(e, name=name, kernel_init=torch_default(names),
                                                bias_init=zeros((names[1],)), **kw)
    temb = embeddings.timestep_embedding(t_B, self.model_channels).astype(self.dtype)
    emb_BxE = dense("time_embed_1", ("mlp", "embed"))(
        nn.silu(dense("time_embed_0", (None, "embed"))(temb)))
    if self.num_classes > 0:
      if y_B is None:
        raise ValueError("a class-conditional UNet needs labels y (num_classes > 0)")
      emb_BxE = emb_BxE + embeddings.LabelEmbedder(
          self.num_classes, e, self.class_dropout_prob, name="label_emb", **kw)(
              y_B, train, force_drop_ids)

    res = lambda ch, name, updown=None: ResBlock(ch, self.num_groups, self.dropout, updown,
                                                 name=name, **kw)
    attn = lambda name: AttentionBlock(self.num_head_channels, self.num_groups, name=name, **kw)
    enc, middle, dec = self.plan()

    h = x_BxHxWxC.astype(self.dtype)
    hs = []
    for i, s in enumerate(enc):
      name = f"input_blocks_{i}"
      if s.kind == "conv_in":
        h = conv(s.channels, 3, name, kw)(h)
      elif s.kind == "res":
        h = res(s.channels, f"{name}_res")(h, emb_BxE, train)
        if s.attention:
          h = attn(f"{name}_attn")(h, context, context_mask)
      elif self.resblock_updown:
        h = res(s.channels, f"{name}_down", "down")(h, emb_BxE, train)
      else:
        h = Downsample(name=f"{name}_down", **kw)(h)
      self.sow("intermediates", "skips", h)
      hs.append(h)

    h = res(middle.channels, "middle_res_0")(h, emb_BxE, train)
    h = attn("middle_attn")(h, context, context_mask)
    h = res(middle.channels, "middle_res_1")(h, emb_BxE, train)

    for i, s in enumerate(dec):
      name = f"output_blocks_{i}"
      h = jnp.concatenate([h, hs.pop()], axis=-1)
      self.sow("intermediates", "decoder_inputs", h)
      h = res(s.channels, f"{name}_res")(h, emb_BxE, train)
      if s.attention:
        h = attn(f"{name}_attn")(h, context, context_mask)
      if s.upsample:
        if self.resblock_updown:
          h = res(s.channels, f"{name}_up", "up")(h, emb_BxE, train)
        else:
          h = Upsample(name=f"{name}_up", **kw)(h)

    h = nn.silu(group_norm(self.num_groups, "out_norm", self.dtype)(h)).astype(self.dtype)
    out = conv(self.out_channels, 3, "out_conv", kw, zero=True)(h)
    return out.astype(jnp.float32)


def example_inputs(m: UNet, batch: int = 1, context_length: int = 0):
  """Zero (x, t, y) and keyword inputs (context, context_mask) for init or tracing."""
  x = jnp.zeros((batch, m.input_size, m.input_size, m.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  y = jnp.zeros((batch,), jnp.int32) if m.num_classes else None
  kwargs = {}
  if m.context_dim:
    kwargs = dict(context=jnp.zeros((batch, max(context_length, 1), m.context_dim), jnp.float32),
                  context_mask=jnp.ones((batch, max(context_length, 1)), bool))
  return (x, t, y), kwargs


def init_params(model: UNet, rng, batch: int = 1, context_length: int = 1):
  """Initialised (boxed, logically partitioned) params for `model`."""
  args, kwargs = example_inputs(model, batch, context_length)
  return model.init({"params": rng}, *args, **kwargs)["params"]


def _conv_macs(size_in: int, c_in: int, c_out: int, kernel: int, stride: int = 1) -> int:
  """MACs of a padded square conv counting only taps that land inside the input (as XLA does)."""
  pad, size_out = kernel // 2, size_in // stride
  taps = sum(sum(1 for o in range(size_out) if 0 <= o * stride - pad + k < size_in)
             for k in range(kernel))  # per spatial axis
  return taps * taps * c_in * c_out


def macs(m: UNet, context_length: int = 0) -> int:
  """Multiply-accumulates of one forward pass on one image, DiT's convention (dit.macs):
  convolutions, linears, QK^T and AV, the embedding MLPs; not norms, softmax or elementwise work.
  Padded conv taps (multiplications by zero) are not counted, as XLA's cost analysis does not."""
  m.validate()
  e, mc = m.time_embed_dim, m.model_channels
  lc = context_length if m.context_dim else 0

  def res(size, cin, c, updown=None):
    size_h = size // 2 if updown == "down" else size * 2 if updown == "up" else size
    n = _conv_macs(size_h, cin, c, 3) + e * 2 * c + _conv_macs(size_h, c, c, 3)
    return n + (_conv_macs(size_h, cin, c, 1) if cin != c else 0)

  def attn(size, c):
    t = size * size
    n = t * c * 3 * c + 2 * t * t * c + t * c * c
    if lc:
      n += t * c * c + 2 * lc * m.context_dim * c + 2 * t * lc * c + t * c * c
    return n

  total = mc * e + e * e  # time-embedding MLP (the label embedding is a lookup)
  enc, middle, dec = m.plan()
  size, ch = m.input_size, m.in_channels
  for s in enc:
    size = m.input_size // s.rate
    if s.kind == "conv_in":
      total += _conv_macs(size, m.in_channels, s.channels, 3)
    elif s.kind == "res":
      total += res(size, ch, s.channels) + (attn(size, s.channels) if s.attention else 0)
    elif m.resblock_updown:
      total += res(size, ch, s.channels, "down")
    else:
      total += _conv_macs(size, ch, s.channels, 3, stride=2)
    ch = s.channels
  size = m.input_size // middle.rate
  total += 2 * res(size, ch, ch) + attn(size, ch)
  for s in dec:
    size = m.input_size // s.rate
    total += res(size, s.in_channels, s.channels)
    total += attn(size, s.channels) if s.attention else 0
    if s.upsample:
      total += (res(size, s.channels, s.channels, "up") if m.resblock_updown
                else _conv_macs(2 * size, s.channels, s.channels, 3))
    ch = s.channels
  return total + _conv_macs(m.input_size, ch, m.out_channels, 3)
