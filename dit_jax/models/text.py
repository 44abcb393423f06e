"""Text conditioning: captions, a word-level tokenizer, a small trainable caption encoder, the wrapper
that makes (encoder + DiT or U-Net) one model taking token ids as its labels, and pre-computed context
embeddings from an external frozen encoder stored beside the data.

Class-labelled data gets captions from its class names ("a handwritten digit seven"), so prompts work
end to end offline. Token id 0 is padding (masked out), id 1 starts every caption: the empty caption
[1, 0, 0, ...] is the null condition that caption dropout trains and classifier-free guidance uses.
"""
import dataclasses
import json
import pathlib
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models import dense_dot

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
PAD_ID, BOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = (PAD, BOS, UNK)

MNIST_CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck")
TEMPLATES = {"mnist": "a handwritten digit {}", "digits": "a handwritten digit {}",
             "cifar10": "a photo of a {}"}
# Words for datasets whose sources name their classes only by index ('0', '1', ...).
CLASS_NAMES = {"mnist": MNIST_CLASS_NAMES, "digits": MNIST_CLASS_NAMES,
               "cifar10": CIFAR10_CLASS_NAMES}


def enabled(text_cfg) -> bool:
  """Whether a run is text-conditioned, from its `text` block (None for configs older than it)."""
  return text_cfg is not None and bool(text_cfg.get("enabled", False))


def class_captions(class_names: Sequence[str], template: str) -> list[str]:
  """One caption per class, e.g. template 'a handwritten digit {}' -> 'a handwritten digit seven'."""
  if "{}" not in template:
    raise ValueError(f"caption template {template!r} needs a '{{}}' where the class name goes")
  return [template.format(name) for name in class_names]


def captions_for_labels(labels_N, class_names: Sequence[str], template: str) -> list[str]:
  """The caption of each example's class."""
  per_class = class_captions(class_names, template)
  labels_N = np.asarray(labels_N)
  if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= len(per_class)):
    raise ValueError(f"labels span [{labels_N.min()}, {labels_N.max()}] but there are "
                     f"{len(per_class)} class names")
  return [per_class[i] for i in labels_N]


def split_words(text: str) -> list[str]:
  """Lower-cased words (letters, digits, apostrophes); punctuation is dropped."""
  return re.findall(r"[a-z0-9']+", text.lower())


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Word-level tokenizer with a fixed vocabulary: the special tokens, then the sorted caption words."""
  vocab: tuple
  max_length: int  # tokens per caption, including the leading <bos>

  @classmethod
  def build(cls, captions: Sequence[str], max_length: Optional[int] = None) -> "Tokenizer":
    """Vocabulary of every word in `captions`; max_length defaults to the longest caption + 1."""
    words = sorted({w for c in captions for w in split_words(c)})
    longest = 1 + max((len(split_words(c)) for c in captions), default=0)
    if max_length is not None and max_length < longest:
      raise ValueError(f"max_length={max_length} is shorter than the longest caption ({longest} "
                       f"tokens with <bos>)")
    return cls(SPECIAL_TOKENS + tuple(words), max_length or longest)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, captions: Sequence[str], strict: bool = True) -> np.ndarray:
    """Token ids (N, max_length) int32: <bos>, the words, then padding. strict: unknown words raise
    (a prompt the model never saw a word of would silently become <unk>); else they map to <unk>."""
    index = {w: i for i, w in enumerate(self.vocab)}
    out = np.full((len(captions), self.max_length), PAD_ID, np.int32)
    for n, caption in enumerate(captions):
      words = split_words(caption)
      unknown = [w for w in words if w not in index]
      if unknown and strict:
        raise ValueError(f"caption {caption!r} has words outside the vocabulary: {unknown}; "
                         f"known words: {' '.join(self.vocab[len(SPECIAL_TOKENS):])}")
      if 1 + len(words) > self.max_length:
        raise ValueError(f"caption {caption!r} has {len(words)} words; at most "
                         f"{self.max_length - 1} fit (max_length {self.max_length} with <bos>)")
      out[n, 0] = BOS_ID
      out[n, 1:1 + len(words)] = [index.get(w, UNK_ID) for w in words]
    return out

  def decode(self, ids_L) -> str:
    """Words of one encoded caption (special tokens dropped)."""
    return " ".join(self.vocab[i] for i in np.asarray(ids_L) if i >= len(SPECIAL_TOKENS))

  def null_tokens(self) -> np.ndarray:
    """The empty caption (max_length,): the unconditional input for caption dropout and CFG."""
    return null_ids(self.max_length)

  def save(self, path) -> None:
    pathlib.Path(path).write_text(json.dumps({"vocab": list(self.vocab),
                                              "max_length": self.max_length}))

  @classmethod
  def load(cls, path) -> "Tokenizer":
    d = json.loads(pathlib.Path(path).read_text())
    if tuple(d["vocab"][:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise ValueError(f"{path}: vocabulary must start with {SPECIAL_TOKENS}")
    return cls(tuple(d["vocab"]), int(d["max_length"]))


def null_ids(length: int) -> np.ndarray:
  """The empty caption's token ids (length,) int32: <bos>, then padding."""
  ids = np.full((length,), PAD_ID, np.int32)
  ids[0] = BOS_ID
  return ids


def check_context(context_dim: int, context, context_mask, batch: int):
  """Validates a model's (context, mask) inputs; returns them with the mask defaulted to all True."""
  if context_dim <= 0:
    if context is not None:
      raise ValueError("this model has context_dim=0; build it with context_dim=<encoder width> "
                       "to condition on a context sequence")
    return None, None
  if context is None:
    raise ValueError(f"this model cross-attends to a context (context_dim={context_dim}); pass "
                     f"context=(B, L, {context_dim}), e.g. from text.TextEncoder")
  if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != context_dim:
    raise ValueError(f"context must be (B={batch}, L, {context_dim}), got {tuple(context.shape)}")
  if context_mask is None:
    context_mask = jnp.ones(context.shape[:2], bool)
  if tuple(context_mask.shape) != tuple(context.shape[:2]):
    raise ValueError(f"context_mask must be (B, L) = {tuple(context.shape[:2])}, "
                     f"got {tuple(context_mask.shape)}")
  return context, context_mask.astype(bool)


def normal(names, std=0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def xavier(names):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)


def zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class EncoderLayer(nn.Module):
  """Pre-LN transformer layer: masked self-attention and a GELU MLP, each residual."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD, mask_BxL):
    d = x_BxLxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.LayerNorm(name="norm1", **kw)(x_BxLxD)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, name="attn", kernel_init=xavier(("embed", "heads", "kv")),
        out_kernel_init=xavier(("heads", "kv", "embed")), bias_init=zeros((None,)), **kw)(
            h, mask=nn.make_attention_mask(mask_BxL, mask_BxL))
    x_BxLxD = x_BxLxD + h
    h = nn.LayerNorm(name="norm2", **kw)(x_BxLxD)
    h = dense_dot.Dense(int(d * self.mlp_ratio), name="fc1", kernel_init=xavier(("embed", "mlp")),
                        bias_init=zeros(("mlp",)), **kw)(h)
    h = dense_dot.Dense(d, name="fc2", kernel_init=xavier(("mlp", "embed")),
                        bias_init=zeros(("embed",)), **kw)(nn.gelu(h, approximate=True))
    return x_BxLxD + h


class TextEncoder(nn.Module):
  """Token ids (B, L) -> (context (B, L, width), mask (B, L)): embeddings, learned positions, a few
  transformer layers attending only to real tokens, and a final LayerNorm."""
  vocab_size: int
  max_length: int
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids_BxL):
    if ids_BxL.ndim != 2 or ids_BxL.shape[1] != self.max_length:
      raise ValueError(f"TextEncoder expects token ids (B, {self.max_length}), got "
                       f"{tuple(ids_BxL.shape)}; encode captions with the same Tokenizer")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask_BxL = ids_BxL != PAD_ID
    x = nn.Embed(self.vocab_size, self.width, name="token_embed",
                 embedding_init=normal(("vocab", "embed")), **kw)(ids_BxL)
    pos = self.param("pos_embed", normal((None, "embed")), (self.max_length, self.width),
                     self.param_dtype)
    x = x + jnp.asarray(pos, self.dtype)[None]
    for i in range(self.depth):
      x = EncoderLayer(self.num_heads, name=f"layers_{i}", **kw)(x, mask_BxL)
    x = nn.LayerNorm(name="final_norm", **kw)(x)
    return x.astype(jnp.float32), mask_BxL


class TextConditioned(nn.Module):
  """A DiT or U-Net (num_classes=0, context_dim=encoder.width) whose labels are caption token ids.

  `apply({'params': p}, x, t, ids_BxL, train=, rngs={'label_dropout': k})` has the same interface as
  the class-conditional models, so trainers and samplers (and `sampling.cfg_model_fn` with
  null_label=tokenizer.null_tokens()) treat token ids like labels. In training, captions are
  replaced by the empty caption with probability caption_dropout_prob, as DiT's label dropout.
  """
  encoder: TextEncoder
  model: nn.Module
  caption_dropout_prob: float = 0.1

  @property
  def input_size(self) -> int:
    return self.model.input_size

  @property
  def in_channels(self) -> int:
    return self.model.in_channels

  @property
  def out_channels(self) -> int:
    return self.model.out_channels

  def validate(self) -> None:
    """Config errors, raised before anything is traced."""
    if getattr(self.model, "num_classes", 0):
      raise ValueError("the wrapped model must have num_classes=0: captions replace class labels")
    if getattr(self.model, "context_dim", 0) != self.encoder.width:
      raise ValueError(f"the wrapped model needs context_dim={self.encoder.width} (the encoder "
                       f"width), got {getattr(self.model, 'context_dim', None)}")
    self.model.validate()

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, ids_BxL, *, train: bool = False, force_drop_ids=None):
    self.validate()
    if ids_BxL is None:
      raise ValueError("a text-conditioned model reads caption token ids (B, L) as its labels; "
                       "samplers guide it against the empty caption (make_sample_fn(..., "
                       "null_label=tokenizer.null_tokens()))")
    null_L = jnp.asarray(null_ids(ids_BxL.shape[1]), ids_BxL.dtype)
    drop_B = None
    if force_drop_ids is not None:
      drop_B = force_drop_ids == 1
    elif train and self.caption_dropout_prob > 0:
      drop_B = jax.random.uniform(self.make_rng("label_dropout"), t_B.shape) < self.caption_dropout_prob
    if drop_B is not None:
      ids_BxL = jnp.where(drop_B[:, None], null_L[None], ids_BxL)
    context, mask = self.encoder(ids_BxL)
    return self.model(x_BxHxWxC, t_B, None, train=train, context=context, context_mask=mask)


def example_inputs(model: TextConditioned, batch: int = 1):
  """Zero images and timesteps and empty captions (x, t, ids), for init or tracing."""
  x = jnp.zeros((batch, model.input_size, model.input_size, model.in_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.int32)
  ids = jnp.broadcast_to(jnp.asarray(null_ids(model.encoder.max_length)),
                         (batch, model.encoder.max_length))
  return x, t, ids


def init_text_params(model: TextConditioned, rng, batch: int = 1):
  """Initialised (boxed) params {'encoder', 'model'} for a TextConditioned model."""
  return model.init({"params": rng}, *example_inputs(model, batch))["params"]


def encoder_macs(encoder: TextEncoder) -> int:
  """Multiply-accumulates of one caption's encoding, DiT's convention (dit.macs): every layer's
  qkv and output projections, QK^T and AV, and MLP over all max_length positions (padding too:
  the masked attention computes them); embedding lookups and norms are free."""
  n, d = encoder.max_length, encoder.width
  layer = n * d * 3 * d + n * d * d + 2 * n * n * d + 2 * n * d * int(d * EncoderLayer.mlp_ratio)
  return encoder.depth * layer


def context_path(data_path) -> pathlib.Path:
  """Where the pre-computed context of a data file or folder lives: `<name>.context.npz` beside it."""
  p = pathlib.Path(data_path)
  return p.parent / f"{p.name.split('.')[0]}.context.npz"


def save_context(path, context_NxLxD, mask_NxL, index_N=None, null_context_LxD=None,
                 null_mask_L=None) -> None:
  """Stores pre-computed embeddings of an external frozen encoder (e.g. CLIP/T5 token states).

  context (N, L, D) float, mask (N, L) bool (True = real token), index (N,) the example index of
  each row (default 0..N-1); optionally the encoding of the empty caption for CFG.
  """
  context_NxLxD, mask_NxL = np.asarray(context_NxLxD), np.asarray(mask_NxL, bool)
  n = context_NxLxD.shape[0]
  index_N = np.arange(n) if index_N is None else np.asarray(index_N, np.int64)
  if context_NxLxD.ndim != 3 or mask_NxL.shape != context_NxLxD.shape[:2] or index_N.shape != (n,):
    raise ValueError(f"need context (N, L, D), mask (N, L), index (N,); got "
                     f"{context_NxLxD.shape}, {mask_NxL.shape}, {index_N.shape}")
  if len(np.unique(index_N)) != n:
    raise ValueError("example indices must be unique")
  arrays = dict(context=context_NxLxD.astype(np.float32), mask=mask_NxL, index=index_N)
  if null_context_LxD is not None:
    arrays.update(null_context=np.asarray(null_context_LxD, np.float32),
                  null_mask=np.ones(context_NxLxD.shape[1], bool) if null_mask_L is None
                  else np.asarray(null_mask_L, bool))
  np.savez(path, **arrays)


@dataclasses.dataclass(frozen=True)
class ContextStore:
  """Pre-computed context embeddings keyed by example index (see `save_context`)."""
  context: np.ndarray  # (N, L, D) float32
  mask: np.ndarray     # (N, L) bool
  index: np.ndarray    # (N,) int64 example indices
  null_context: np.ndarray  # (L, D): the empty caption's encoding, zeros if none was stored
  null_mask: np.ndarray     # (L,)

  @classmethod
  def load(cls, path) -> "ContextStore":
    with np.load(path, allow_pickle=False) as f:
      missing = {"context", "mask"} - set(f.files)
      if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}; write it with "
                         f"text.save_context(path, context_NxLxD, mask_NxL)")
      context, mask = f["context"].astype(np.float32), f["mask"].astype(bool)
      index = f["index"] if "index" in f.files else np.arange(len(context))
      if "null_context" in f.files:
        null_context, null_mask = f["null_context"], f["null_mask"].astype(bool)
      else:  # no stored null: an all-zero context with its first token visible
        null_context = np.zeros(context.shape[1:], np.float32)
        null_mask = np.zeros(context.shape[1], bool)
        null_mask[0] = True
    if mask.shape != context.shape[:2]:
      raise ValueError(f"{path}: mask {mask.shape} does not match context {context.shape}")
    return cls(context, mask, index.astype(np.int64), null_context, null_mask)

  @property
  def dim(self) -> int:
    return self.context.shape[-1]

  def lookup(self, example_ids_B):
    """(context (B, L, D), mask (B, L)) of the given example indices."""
    order = np.argsort(self.index)
    ids = np.asarray(example_ids_B)
    pos = np.searchsorted(self.index[order], ids)
    pos = np.minimum(pos, len(order) - 1)
    found = self.index[order][pos] == ids
    if not np.all(found):
      raise ValueError(f"no stored context for example indices {ids[~found][:10].tolist()}")
    rows = order[pos]
    return self.context[rows], self.mask[rows]

  def null(self, batch: int):
    """The unconditional context repeated `batch` times, for CFG with pre-computed embeddings."""
    return (np.broadcast_to(self.null_context, (batch,) + self.null_context.shape),
            np.broadcast_to(self.null_mask, (batch,) + self.null_mask.shape))
