"""Official facebookresearch/DiT state dicts (`DiT-XL-2-256x256.pt` key names) -> dit_jax params."""
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np

from dit_jax import dit as dit_lib


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


def from_official(state_dict: dict, model: dit_lib.DiT) -> dict:
  """Maps an official DiT state dict (arrays or tensors) onto `model`'s params, checking every shape."""
  if model.conditioning != "adaln_zero":
    raise ValueError("official checkpoints are adaLN-Zero models; got conditioning="
                     f"{model.conditioning!r}")
  if "ema" in state_dict:  # a train.py checkpoint rather than a released model
    state_dict = state_dict["ema"]
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
  d, p, h = model.hidden_size, model.patch_size, model.num_heads
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

  used = {"pos_embed"} | {k for k in sd if k.startswith(("x_embedder", "t_embedder", "final_layer",
                                                         "y_embedder"))}
  used |= {k for k in sd if k.startswith("blocks.") and int(k.split(".")[1]) < model.depth}
  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(f"checkpoint has keys the model does not use (wrong model?): {unused[:5]}")
  _check_shapes(params, model)
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
  for size, s in dit_lib.SIZES.items():
    if (s.depth, s.hidden_size, s.num_heads) == (model.depth, model.hidden_size, model.num_heads):
      return f"DiT-{size}/{model.patch_size}"
  return f"DiT(depth={model.depth}, hidden={model.hidden_size})/{model.patch_size}"


MODEL_FIELDS = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                "num_classes", "learn_sigma", "conditioning")


def save(directory, params, model: dit_lib.DiT) -> None:
  """Writes params (orbax) and the model's fields (model.json) to `directory`."""
  import orbax.checkpoint as ocp
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "model.json").write_text(json.dumps({f: getattr(model, f) for f in MODEL_FIELDS}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", params, force=True)


def load(directory, **model_overrides):
  """Reads what `save` wrote: returns (model, params)."""
  import orbax.checkpoint as ocp
  directory = pathlib.Path(directory).absolute()
  fields = json.loads((directory / "model.json").read_text())
  model = dit_lib.DiT(**{**fields, **model_overrides})
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(directory / "params")
  return model, params
