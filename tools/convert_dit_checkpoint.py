"""Converts an official facebookresearch/DiT checkpoint (.pt state dict) into dit_jax params.

  python tools/convert_dit_checkpoint.py DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \
      --out checkpoints/DiT-XL-2-256

Reading the .pt needs PyTorch (pip install torch); the result is an orbax checkpoint plus
model.json that `dit_jax.convert.load(out)` reads back without it.
"""
import argparse
import sys

from dit_jax import convert, dit


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("checkpoint", help="official .pt (released EMA weights or a train.py checkpoint)")
  ap.add_argument("--model", default="DiT-XL/2")
  ap.add_argument("--image-size", type=int, default=256, choices=(256, 512),
                  help="pixel resolution; the model sees latents of size/8")
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--scan-layers", action="store_true", help="store blocks stacked for nn.scan")
  ap.add_argument("--out", required=True, help="output directory")
  args = ap.parse_args(argv)
  try:
    import torch
  except ImportError:
    sys.exit("reading an official .pt checkpoint needs PyTorch: pip install torch")
  model = dit.create(args.model, input_size=args.image_size // 8, in_channels=4,
                     num_classes=args.num_classes, scan_layers=args.scan_layers)
  state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
  state = {k: v.numpy() for k, v in state.get("ema", state).items()}
  try:
    params = convert.from_official(state, model)
  except (KeyError, ValueError) as e:
    sys.exit(f"convert: {args.checkpoint} does not fit {args.model}: {e}")
  convert.save(args.out, params, model)
  print(f"wrote {args.out} ({args.model}, {args.image_size}px)")


if __name__ == "__main__":
  main()
