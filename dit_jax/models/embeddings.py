"""Conditioning embeddings of DiT: 2-D sin-cos positions, timesteps, class labels."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models import dense_dot


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[sin, cos] of pos * 10000^(-2i/dim), shape (len(pos), dim)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Frozen 2-D position table (grid_h*grid_w, dim); the first dim/2 channels encode the column."""
  if dim % 4:
    raise ValueError(f"hidden size {dim} must be a multiple of 4 for the 2-D sin-cos embedding")
  w, h = np.meshgrid(np.arange(grid_w, dtype=np.float64), np.arange(grid_h, dtype=np.float64))
  return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1).astype(np.float32)


def timestep_embedding(t_B: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """GLIDE/DiT frequency embedding: [cos, sin] of t * exp(-ln(max_period) * i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t_B.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """Timesteps -> 256-d frequency embedding -> MLP(256 -> D -> D) with SiLU."""
  hidden_size: int
  frequency_size: int = 256
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B):
    x = timestep_embedding(t_B, self.frequency_size).astype(self.dtype)
    dense = lambda name, names: dense_dot.Dense(
        self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)))
    x = dense("mlp_0", (None, "embed"))(x)
    return dense("mlp_2", ("mlp", "embed"))(nn.silu(x))


class LabelEmbedder(nn.Module):
  """Class labels -> D, with label dropout to the null class (index num_classes) for CFG."""
  num_classes: int
  hidden_size: int
  dropout_prob: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y_B, train: bool, force_drop_ids=None):
    table = nn.Embed(
        self.num_classes + int(self.dropout_prob > 0), self.hidden_size, dtype=self.dtype,
        param_dtype=self.param_dtype, name="embedding_table",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    if force_drop_ids is not None:
      y_B = jnp.where(force_drop_ids == 1, self.num_classes, y_B)
    elif train and self.dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("label_dropout"), y_B.shape) < self.dropout_prob
      y_B = jnp.where(drop, self.num_classes, y_B)
    return table(y_B)

