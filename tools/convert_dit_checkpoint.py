"""Converts an official facebookresearch/DiT checkpoint (.pt state dict) into dit_jax params.

  python tools/convert_dit_checkpoint.py DiT-XL-2-256x256.pt --out checkpoints/DiT-XL-2-256

Any size converts: depth, width, patch, input size, channels, classes and learn_sigma come from
the tensors. The head count is in no tensor: --num-heads, else --model's, else the size table's
for that width (e.g. 16 for XL's 1152), else width / 64. --model and --image-size, when given, are
checked against the tensors. Reading the .pt needs PyTorch (pip install torch); the result is an
orbax checkpoint plus model.json that `dit_jax.models.convert.load(out)` reads back without it. Nothing is
written unless the whole state dict converts.
"""
import argparse
import sys

from dit_jax.models import convert
from dit_jax import models


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


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("checkpoint", help="official .pt (released EMA weights or a train.py checkpoint)")
  ap.add_argument("--model", default=None,
                  help="optional check, e.g. DiT-XL/2 (also gives the head count)")
  ap.add_argument("--num-heads", type=int, default=None, help="attention heads (see above)")
  ap.add_argument("--image-size", type=int, default=None,
                  help="optional check: pixel resolution of a latent (/8) model, e.g. 256")
  ap.add_argument("--num-classes", type=int, default=None, help="optional check")
  ap.add_argument("--scan-layers", action="store_true", help="store blocks stacked for nn.scan")
  ap.add_argument("--out", required=True, help="output directory")
  args = ap.parse_args(argv)
  try:
    import torch
  except ImportError:
    sys.exit("reading an official .pt checkpoint needs PyTorch: pip install torch")
  state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
  state = {k: v.numpy() for k, v in state.get("ema", state).items()}
  what = args.model or args.checkpoint
  try:
    model = convert.infer_model(state, num_heads=args.num_heads, scan_layers=args.scan_layers)
    if args.model:
      heads = _check_named(model, args.model)
      if args.num_heads is None:
        model = model.clone(num_heads=heads)
    if args.image_size is not None and args.image_size != 8 * model.input_size:
      raise ValueError(f"the checkpoint's input is {model.input_size}x{model.input_size}: "
                       f"{8 * model.input_size}px through the /8 VAE, not {args.image_size}px")
    if args.num_classes is not None and args.num_classes != model.num_classes:
      raise ValueError(f"the checkpoint has {model.num_classes} classes, not {args.num_classes}")
    params = convert.from_official(state, model)
  except (KeyError, ValueError) as e:
    sys.exit(f"convert: {args.checkpoint} does not fit {what}: {e}")
  convert.save(args.out, params, model)
  print(f"wrote {args.out} ({convert.model_name(model)}, input {model.input_size}x"
        f"{model.input_size}x{model.in_channels}, {model.num_classes} classes, "
        f"learn_sigma={model.learn_sigma}, {model.num_heads} heads)")


if __name__ == "__main__":
  main()
