"""Stable Diffusion's AutoencoderKL (the VAE DiT trains in) in Flax Linen, NHWC.

Architecture follows diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py, vae.py,
resnet.py, unet_2d_blocks.py, attention_processor.py) so that a diffusers-format checkpoint
(`stabilityai/sd-vae-ft-ema` or `-mse`: a folder with config.json and
diffusion_pytorch_model.safetensors or .bin) loads without conversion scripts. The module tree
mirrors diffusers' names with '.' between a list and its index replaced by '_' (e.g.
`encoder.down_blocks.0.resnets.1.conv1` -> params['encoder']['down_blocks_0']['resnets_1']['conv1']).

Latents: DiT trains on `posterior SAMPLE * scaling_factor` (0.18215 for SD) and decodes `z / 0.18215`.
"""
import dataclasses
import json
import pathlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

SD_SCALING_FACTOR = 0.18215
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Attention parameter names written by diffusers < 0.14 (and the SD VAE uploads of that era).
_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NORM_MODULES = ("norm1", "norm2", "group_norm", "conv_norm_out")


def missing_weights_message(path) -> str:
  """The error text shown when the VAE weights are not where the config says."""
  return (
      f"VAE weights not found at {str(path)!r}. Download a diffusers-format SD VAE (a folder with "
      f"config.json and diffusion_pytorch_model.safetensors), e.g. on a machine with network: "
      f"`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {path}` (or sd-vae-ft-mse), "
      f"copy the folder there, or point the vae path setting at the folder.")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a diffusers AutoencoderKL config.json that size the network."""
  in_channels: int = 3  # image channels in
  out_channels: int = 3  # image channels out
  latent_channels: int = 4  # z channels (the posterior has twice this: mean and logvar)
  block_out_channels: Sequence[int] = (128, 256, 512, 512)  # one entry per resolution level
  layers_per_block: int = 2  # resnets per encoder level (decoder levels get one more)
  norm_num_groups: int = 32  # GroupNorm groups everywhere
  scaling_factor: float = SD_SCALING_FACTOR  # latents fed to DiT are z * scaling_factor
  use_quant_conv: bool = True  # 1x1 conv on the posterior moments
  use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
  mid_block_add_attention: bool = True  # self-attention in both mid blocks
  sample_size: int = 256  # image size the VAE was trained at (informational)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: dict) -> "VAEConfig":
    """Validates a diffusers config dict and keeps the fields this implementation supports."""
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      raise ValueError(f"expected an AutoencoderKL config, got _class_name={d['_class_name']!r}")
    if d.get("act_fn", "silu") != "silu":
      raise ValueError(f"only act_fn='silu' is supported, got {d['act_fn']!r}")
    n = len(d.get("block_out_channels", cls.block_out_channels))
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      types = list(d.get(key, [want] * n))
      if types != [want] * n:
        raise ValueError(f"{key} must be {n} x {want!r}, got {types}")
    for key in ("shift_factor", "latents_mean", "latents_std"):
      if d.get(key) is not None:
        raise ValueError(f"{key}={d[key]!r} is not supported (SD VAEs have none; this is another VAE)")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in fields}
    if "block_out_channels" in kwargs:
      kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
    return cls(**kwargs)

  @classmethod
  def from_json(cls, path) -> "VAEConfig":
    """Reads config.json of a diffusers AutoencoderKL folder."""
    return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


def _conv(features, kernel, name, dtype, param_dtype, strides=1, padding=None):
  k = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides),
      padding=((k, k), (k, k)) if padding is None else padding,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
      dtype=dtype, param_dtype=param_dtype, name=name)


def _group_norm(groups, name, dtype, param_dtype):
  # Two-pass variance: E[x^2]-E[x]^2 cancels badly in float32 when |mean| >> std.
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                      dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: GN-SiLU-conv twice, 1x1 shortcut if needed."""
  out_channels: int
  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(_group_norm(self.groups, "norm1", **kw)(x_BxHxWxC))
    h = _conv(self.out_channels, 3, "conv1", **kw)(h)
    h = nn.silu(_group_norm(self.groups, "norm2", **kw)(h))
    h = _conv(self.out_channels, 3, "conv2", **kw)(h)
    if x_BxHxWxC.shape[-1] != self.out_channels:
      x_BxHxWxC = _conv(self.out_channels, 1, "conv_shortcut", **kw)(x_BxHxWxC)
    return x_BxHxWxC + h


class Attention(nn.Module):
  """Single-head spatial self-attention with GroupNorm and residual (the VAE mid-block attention)."""
  groups: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    b, h, w, c = x_BxHxWxC.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda name: nn.Dense(c, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("conv_in", "conv_out")), name=name, **kw)
    x_BxLxC = _group_norm(self.groups, "group_norm", **kw)(x_BxHxWxC).reshape(b, h * w, c)
    q, k, v = dense("to_q")(x_BxLxC), dense("to_k")(x_BxLxC), dense("to_v")(x_BxLxC)
    # diffusers upcasts the softmax; head_dim == channels (one head).
    logits_BxLxL = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(logits_BxLxL, axis=-1).astype(v.dtype)
    out_BxLxC = dense("to_out_0")(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x_BxHxWxC + out_BxLxC.reshape(b, h, w, c)


class Downsample(nn.Module):
  """Stride-2 3x3 conv after padding one pixel at the bottom/right only (diffusers padding=0)."""
  channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype, strides=2,
                 padding=((0, 1), (0, 1)))(x_BxHxWxC)


class Upsample(nn.Module):
  """Nearest-neighbour 2x then a 3x3 conv."""
  channels: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
    return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype)(x)


class MidBlock(nn.Module):
  """resnet -> attention -> resnet at the lowest resolution."""
  channels: int
  groups: int
  add_attention: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResnetBlock(self.channels, self.groups, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = Attention(self.groups, name="attentions_0", **kw)(x)
    return ResnetBlock(self.channels, self.groups, name="resnets_1", **kw)(x)


class ResnetStack(nn.Module):
  """diffusers DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional down/upsampler."""
  channels: int
  groups: int
  num_layers: int
  resample: Optional[str] = None  # None, "down" (downsamplers_0) or "up" (upsamplers_0)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock(self.channels, self.groups, name=f"resnets_{j}", **kw)(x)
    if self.resample == "down":
      x = Downsample(self.channels, name="downsamplers_0", **kw)(x)
    elif self.resample == "up":
      x = Upsample(self.channels, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """Image [B,H,W,in] -> posterior moments [B,H/f,W/f,2*latent] (before quant_conv)."""
  config: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans, g = cfg.block_out_channels, cfg.norm_num_groups
    h = _conv(chans[0], 3, "conv_in", **kw)(x_BxHxWxC)
    for i, ch in enumerate(chans):
      h = ResnetStack(ch, g, cfg.layers_per_block, "down" if i < len(chans) - 1 else None,
                      name=f"down_blocks_{i}", **kw)(h)
    h = MidBlock(chans[-1], g, cfg.mid_block_add_attention, name="mid_block", **kw)(h)
    h = nn.silu(_group_norm(g, "conv_norm_out", **kw)(h))
    return _conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(h)


class Decoder(nn.Module):
  """Latent z [B,h,w,latent] (after post_quant_conv) -> image [B,h*f,w*f,out]."""
  config: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_BxhxwxC):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    h = _conv(chans[0], 3, "conv_in", **kw)(z_BxhxwxC)
    h = MidBlock(chans[0], g, cfg.mid_block_add_attention, name="mid_block", **kw)(h)
    for i, ch in enumerate(chans):
      h = ResnetStack(ch, g, cfg.layers_per_block + 1, "up" if i < len(chans) - 1 else None,
                      name=f"up_blocks_{i}", **kw)(h)
    h = nn.silu(_group_norm(g, "conv_norm_out", **kw)(h))
    return _conv(cfg.out_channels, 3, "conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
  """The SD VAE. `encode` gives the diagonal-Gaussian posterior (mean, logvar); `decode` maps z back."""
  config: VAEConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, None, **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, None, **kw)

  def encode(self, x_BxHxWxC):
    """Images in [-1, 1] -> (mean, logvar), each [B, H/8, W/8, latent]; logvar clamped like diffusers."""
    moments = self.encoder(x_BxHxWxC)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z_BxhxwxC):
    """Unscaled latents z (i.e. DiT latents / scaling_factor) -> images (roughly [-1, 1])."""
    if self.config.use_post_quant_conv:
      z_BxhxwxC = self.post_quant_conv(z_BxhxwxC)
    return self.decoder(z_BxhxwxC)

  def __call__(self, x_BxHxWxC):
    """Reconstruction through the posterior mean (used by init to create every parameter)."""
    mean, _ = self.encode(x_BxHxWxC)
    return self.decode(mean)


def _read_state_dict(path: pathlib.Path) -> dict:
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(str(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{path} is a torch pickle; install torch to read it, or use the "
                      ".safetensors file of the same checkpoint") from e
  sd = torch.load(str(path), map_location="cpu", weights_only=True)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def _flax_path(torch_key: str) -> tuple:
  parts = torch_key.split(".")
  if len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION_NAMES:
    parts = parts[:-2] + _DEPRECATED_ATTENTION_NAMES[parts[-2]].split(".") + parts[-1:]
  out = []
  for p in parts[:-1]:
    if p.isdigit():
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  leaf = parts[-1]
  if leaf == "weight":
    leaf = "scale" if out[-1] in _NORM_MODULES else "kernel"
  return tuple(out) + (leaf,)


def convert_state_dict(state_dict: dict, vae_cfg: VAEConfig) -> dict:
  """diffusers AutoencoderKL state dict (name -> array) -> Flax params, checking every name/shape."""
  model = AutoencoderKL(vae_cfg)
  size = 8 * vae_cfg.downsample_factor
  shapes = nn.unbox(jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, size, size, vae_cfg.in_channels))))["params"]
  flat_shapes = {k: v.shape for k, v in traverse_util.flatten_dict(shapes).items()}
  flat_params, unused = {}, []
  for name, value in state_dict.items():
    if ".Conv2d_0." in name:  # diffusers aliases a down/upsampler conv under this second name
      continue
    path = _flax_path(name)
    if path not in flat_shapes:
      unused.append(name)
      continue
    value = np.asarray(value, np.float32)
    if value.ndim == 4:  # torch conv [O, I, kh, kw] -> flax [kh, kw, I, O]
      value = value.transpose(2, 3, 1, 0)
      if len(flat_shapes[path]) == 2:  # attention stored as 1x1 conv by some exports
        value = value[0, 0]
    elif value.ndim == 2:  # torch linear [O, I] -> flax [I, O]
      value = value.T
    if value.shape != flat_shapes[path]:
      raise ValueError(f"{name}: checkpoint shape {value.shape} != model shape {flat_shapes[path]} "
                       "(after layout conversion); is config.json the one for these weights?")
    flat_params[path] = value
  missing = sorted("/".join(p) for p in flat_shapes if p not in flat_params)
  if missing or unused:
    raise ValueError(f"checkpoint does not match the config: missing {missing[:8]} "
                     f"({len(missing)} in all), unexpected {unused[:8]} ({len(unused)} in all)")
  return traverse_util.unflatten_dict(flat_params)


def load_pretrained(path, dtype=jnp.float32):
  """Loads a diffusers-format VAE folder: returns (AutoencoderKL module, params)."""
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(missing_weights_message(path))
  weight_file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
  if weight_file is None:
    raise FileNotFoundError(missing_weights_message(path) +
                            f" (config.json is there but none of {WEIGHT_FILES})")
  config = VAEConfig.from_json(path / "config.json")
  params = convert_state_dict(_read_state_dict(weight_file), config)
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  return AutoencoderKL(config, dtype=dtype), params
