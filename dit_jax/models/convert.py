"""Official facebookresearch/DiT state dicts (`DiT-XL-2-256x256.pt` key names) -> dit_jax params.

Any size converts: `infer_model` reads depth, width, patch, input size, channels, classes, MLP
ratio and learn_sigma from the tensors. The head count is not in any tensor (qkv is (3D, D) for
every split), so it is an argument; the default is the size table's for that width, else D / 64.
"""
import json
import math
import pathlib

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from dit_jax import models
from dit_jax.models import dit as dit_lib
from dit_jax.models import embeddings


def _linear(sd, key):
  """torch Linear (out, in) -> flax Dense kernel (in, out) and bias."""
  return {"kernel": sd[key + ".weight"].T, "bias": sd[key + ".bias"]}


def _block(sd, i: int, d: int, h: int) -> dict:
  pre = f"blocks.{i}."
  hd = d // h
  qkv_w = sd[pre + "attn.qkv.weight"].T.reshape(d, 3, h, hd)  # timm splits (3, heads, head_dim)
  qkv_b = sd[pre + "attn.qkv.bias"].reshape(3, h, hd)
  proj = _linear(sd, pre + "attn.proj")
  return {
      "attn": {"qkv": {"kernel": qkv_w, "bias": qkv_b},
               "proj": {"kernel": proj["kernel"].reshape(h, hd, d), "bias": proj["bias"]}},
      "mlp": {"fc1": _linear(sd, pre + "mlp.fc1"), "fc2": _linear(sd, pre + "mlp.fc2")},
      "adaLN_modulation": _linear(sd, pre + "adaLN_modulation.1"),
  }


def _unwrap(state_dict: dict) -> dict:
  if "ema" in state_dict:  # a train.py checkpoint rather than a released model
    state_dict = state_dict["ema"]
  return state_dict


def default_num_heads(hidden_size: int) -> int:
  """Heads for a width: the size table's (each width there has one head count, e.g. XL's 1152 ->
  16), else DiT's head width 64; raises when neither applies."""
  for s in dit_lib.SIZES.values():
    if s.hidden_size == hidden_size:
      return s.num_heads
  if hidden_size % 64 == 0:
    return hidden_size // 64
  raise ValueError(f"hidden size {hidden_size} is in no size-table row and not a multiple of 64: "
                   "the head count cannot be guessed (no tensor holds it); pass num_heads")


def _shape(sd: dict, key: str, ndim: int) -> tuple:
  if key not in sd:
    raise ValueError(f"not an official DiT state dict: no {key!r} (keys start "
                     f"{sorted(sd)[:4]})")
  shape = tuple(np.shape(sd[key]))
  if len(shape) != ndim:
    raise ValueError(f"{key} has shape {shape}; an official DiT has {ndim} dims there")
  return shape


def infer_model(state_dict: dict, *, num_heads: int | None = None, **model_kwargs) -> dit_lib.DiT:
  """The adaLN-Zero DiT an official state dict describes, every field but the heads from tensors.

  num_heads: None = `default_num_heads(hidden)`; a wrong count still converts but computes a
  different attention, so pass it for a width outside the size table. model_kwargs (scan_layers,
  dtype, class_dropout_prob, ...) go to DiT; raises ValueError on an inconsistent dict.
  """
  sd = _unwrap(state_dict)
  d, c_in, p, p2 = _shape(sd, "x_embedder.proj.weight", 4)
  if p != p2:
    raise ValueError(f"x_embedder.proj.weight {(d, c_in, p, p2)}: patches are not square")
  _, tokens, d_pos = _shape(sd, "pos_embed", 3)
  grid = math.isqrt(tokens)
  if grid * grid != tokens or d_pos != d:
    raise ValueError(f"pos_embed {tuple(np.shape(sd['pos_embed']))} is not a square grid of "
                     f"{d}-wide tokens")
  # The model recomputes the frozen table; a checkpoint whose table differs would not match.
  if not np.allclose(np.asarray(sd["pos_embed"], np.float32)[0],
                     embeddings.sincos_2d(d, grid, grid), atol=1e-5):
    raise ValueError(f"pos_embed is not DiT's fixed 2-D sin-cos table for a {grid}x{grid} grid")
  blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
  if not blocks or blocks != list(range(len(blocks))):
    raise ValueError(f"blocks are not numbered 0..depth-1: found {blocks[:8]}"
                     f"{'...' if len(blocks) > 8 else ''}")
  mlp_hidden, _ = _shape(sd, "blocks.0.mlp.fc1.weight", 2)
  rows, _ = _shape(sd, "final_layer.linear.weight", 2)
  c_out, rem = divmod(rows, p * p)
  if rem or c_out not in (c_in, 2 * c_in):
    raise ValueError(f"final_layer.linear has {rows} outputs: expected patch^2 x {c_in} or "
                     f"x {2 * c_in} (learned sigma) for {c_in} input channels, patch {p}")
  mlp_ratio = mlp_hidden / d
  if int(d * mlp_ratio) != mlp_hidden:  # DiT sizes its MLP as int(D * ratio): undo float rounding
    mlp_ratio = (mlp_hidden + 0.5) / d
  class_dropout = model_kwargs.pop("class_dropout_prob", 0.1)
  num_classes = 0
  if "y_embedder.embedding_table.weight" in sd:
    # With label dropout (DiT: 0.1) the table has one extra row, the null class used by CFG.
    n_rows, _ = _shape(sd, "y_embedder.embedding_table.weight", 2)
    num_classes = n_rows - int(class_dropout > 0)
  model = dit_lib.DiT(
      input_size=grid * p, in_channels=c_in, patch_size=p, hidden_size=d, depth=len(blocks),
      num_heads=default_num_heads(d) if num_heads is None else num_heads,
      mlp_ratio=mlp_ratio, num_classes=num_classes, class_dropout_prob=class_dropout,
      learn_sigma=c_out == 2 * c_in, conditioning="adaln_zero", **model_kwargs)
  model.validate()
  return model


def convert(state_dict: dict, *, num_heads: int | None = None, **model_kwargs):
  """(model, params) of any official state dict: `infer_model` then `from_official`."""
  model = infer_model(state_dict, num_heads=num_heads, **model_kwargs)
  return model, from_official(state_dict, model)


def from_official(state_dict: dict, model: dit_lib.DiT) -> dict:
  """Maps an official DiT state dict (arrays or tensors) onto `model`'s params, checking every shape."""
  if model.conditioning != "adaln_zero":
    raise ValueError("official checkpoints are adaLN-Zero models; got conditioning="
                     f"{model.conditioning!r}")
  sd = {k: np.asarray(v, np.float32) for k, v in _unwrap(state_dict).items()}
  try:
    params = _map(sd, model)
  except KeyError as e:
    raise ValueError(f"checkpoint lacks {e}, which {model_name(model)} needs") from None
  except ValueError as e:  # a reshape of a tensor of another width
    raise ValueError(f"checkpoint does not fit {model_name(model)}: {e}") from None

  used = {"pos_embed"} | {k for k in sd if k.startswith(("x_embedder", "t_embedder", "final_layer",
                                                         "y_embedder"))}
  used |= {k for k in sd if k.startswith("blocks.") and int(k.split(".")[1]) < model.depth}
  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(f"checkpoint has keys the model does not use (wrong model?): {unused[:5]}")
  _check_shapes(params, model)
  return params


def _map(sd: dict, model: dit_lib.DiT) -> dict:
  d, h = model.hidden_size, model.num_heads
  w = sd["x_embedder.proj.weight"]  # (D, C, p, p) -> tokens are flattened as (p, q, c)
  params = {
      "x_embedder": {"kernel": w.transpose(2, 3, 1, 0).reshape(-1, d),
                     "bias": sd["x_embedder.proj.bias"]},
      "t_embedder": {"mlp_0": _linear(sd, "t_embedder.mlp.0"),
                     "mlp_2": _linear(sd, "t_embedder.mlp.2")},
      "final_layer": {"linear": _linear(sd, "final_layer.linear"),
                      "adaLN_modulation": _linear(sd, "final_layer.adaLN_modulation.1")},
  }
  if model.num_classes:
    params["y_embedder"] = {"embedding_table": {
        "embedding": sd["y_embedder.embedding_table.weight"]}}
  blocks = [_block(sd, i, d, h) for i in range(model.depth)]
  if model.scan_layers:
    params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  else:
    params.update({f"blocks_{i}": b for i, b in enumerate(blocks)})
  return params


def _check_shapes(params, model):
  want = jax.eval_shape(lambda: nn.unbox(dit_lib.init_params(model, jax.random.key(0))))
  got = jax.tree.map(lambda a: a.shape, params)
  want = jax.tree.map(lambda a: a.shape, want)
  if got != want:
    bad = [(jax.tree_util.keystr(k), g, w) for (k, g), (_, w) in zip(
        jax.tree_util.tree_leaves_with_path(got, is_leaf=lambda x: isinstance(x, tuple)),
        jax.tree_util.tree_leaves_with_path(want, is_leaf=lambda x: isinstance(x, tuple))) if g != w]
    raise ValueError(f"checkpoint does not fit {model_name(model)}: first mismatches {bad[:3]}")


def model_name(model: dit_lib.DiT) -> str:
  return models.name_of(model)


MODEL_FIELDS = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                "mlp_ratio", "num_classes", "class_dropout_prob", "learn_sigma", "conditioning")


def save(directory, params, model: dit_lib.DiT) -> None:
  """Writes params (orbax) and the model's fields (model.json) to `directory`."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "model.json").write_text(json.dumps({f: getattr(model, f) for f in MODEL_FIELDS}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params, force=True)


def load(directory, **model_overrides):
  """Reads what `save` wrote: returns (model, params)."""
  directory = pathlib.Path(directory).absolute()
  fields = json.loads((directory / "model.json").read_text())
  model = dit_lib.DiT(**{**fields, **model_overrides})
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory / "params")
  return model, params
