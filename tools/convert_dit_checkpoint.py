"""Converts an official facebookresearch/DiT checkpoint (.pt state dict) into dit_jax params.

  python tools/convert_dit_checkpoint.py DiT-XL-2-256x256.pt --out checkpoints/DiT-XL-2-256

Any size converts: depth, width, patch, input size, channels, classes and learn_sigma come from
the tensors. The head count is in no tensor: --num-heads, else --model's, else the size table's
for that width (e.g. 16 for XL's 1152), else width / 64. --model and --image-size, when given, are
checked against the tensors. Reading the .pt needs PyTorch (pip install torch); the result is an
orbax checkpoint plus model.json that `dit_jax.models.convert.load(out)` reads back without it.
Nothing is written unless the whole state dict converts.
"""
import sys

from absl import app
from absl import flags

from dit_jax import models
from dit_jax.models import convert

_MODEL = flags.DEFINE_string("model", None,
                             "Optional check, e.g. DiT-XL/2 (also gives the head count).")
_NUM_HEADS = flags.DEFINE_integer("num-heads", None, "Attention heads (see above).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image-size", None, "Optional check: pixel resolution of a latent (/8) model, e.g. 256.")
_NUM_CLASSES = flags.DEFINE_integer("num-classes", None, "Optional check.")
_SCAN_LAYERS = flags.DEFINE_bool("scan-layers", False, "Store blocks stacked for nn.scan.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)


def _check_named(model, name):
  """The tensors' model against a name like DiT-XL/2; returns the name's head count."""
  family, size, patch = models.parse(name)
  if family.module is not type(model):
    raise ValueError(f"{name} is a {family.name}, the checkpoint is an official DiT")
  s = family.sizes[size]
  got = (model.depth, model.hidden_size, model.patch_size)
  if got != (s.depth, s.hidden_size, patch):
    raise ValueError(f"the checkpoint has depth {got[0]}, hidden size {got[1]}, patch {got[2]}; "
                     f"{name} has {s.depth}, {s.hidden_size}, {patch}")
  return s.num_heads


def main(argv):
  """argv[1]: the official .pt (released EMA weights or a train.py checkpoint)."""
  if len(argv) != 2:
    raise app.UsageError("usage: convert_dit_checkpoint.py CHECKPOINT.pt --out DIR [flags]")
  checkpoint, name, num_heads = argv[1], _MODEL.value, _NUM_HEADS.value
  try:
    import torch
  except ImportError:
    sys.exit("reading an official .pt checkpoint needs PyTorch: pip install torch")
  state = torch.load(checkpoint, map_location="cpu", weights_only=True)
  state = {k: v.numpy() for k, v in state.get("ema", state).items()}
  what = name or checkpoint
  try:
    model = convert.infer_model(state, num_heads=num_heads, scan_layers=_SCAN_LAYERS.value)
    if name:
      heads = _check_named(model, name)
      if num_heads is None:
        model = model.clone(num_heads=heads)
    if _IMAGE_SIZE.value is not None and _IMAGE_SIZE.value != 8 * model.input_size:
      raise ValueError(f"the checkpoint's input is {model.input_size}x{model.input_size}: "
                       f"{8 * model.input_size}px through the /8 VAE, not {_IMAGE_SIZE.value}px")
    if _NUM_CLASSES.value is not None and _NUM_CLASSES.value != model.num_classes:
      raise ValueError(f"the checkpoint has {model.num_classes} classes, not {_NUM_CLASSES.value}")
    params = convert.from_official(state, model)
  except (KeyError, ValueError) as e:
    sys.exit(f"convert: {checkpoint} does not fit {what}: {e}")
  convert.save(_OUT.value, params, model)
  print(f"wrote {_OUT.value} ({convert.model_name(model)}, input {model.input_size}x"
        f"{model.input_size}x{model.in_channels}, {model.num_classes} classes, "
        f"learn_sigma={model.learn_sigma}, {model.num_heads} heads)")


if __name__ == "__main__":
  app.run(main)
