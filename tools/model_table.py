"""Params and forward Gflops (paper convention and XLA's count) for DiT and U-Net variants.

  python tools/model_table.py --json                 # the 12 models of the paper's Table 4
  python tools/model_table.py --markdown --models DiT-Mi/2,DiT-Nano/4 --input-size 16 --channels 1
  python tools/model_table.py --markdown --models UNet-S,UNet-B,UNet-L,UNet-XL
"""
import argparse
import json
import sys

from dit_jax.models import dit
from dit_jax import models


def row(name: str, input_size: int, channels: int, num_classes: int, conditioning: str) -> dict:
  """One table row; params counted from the params pytree."""
  fields = dict(conditioning=conditioning) if models.family_name(name) == "DiT" else {}
  model = models.build(name, input_size=input_size, in_channels=channels, num_classes=num_classes,
                       **fields)
  return {"model": name, **models.describe(model, name)}


def markdown(rows) -> str:
  lines = ["| model | params (M) | Gflops | XLA Gflops |", "|---|---:|---:|---:|"]
  lines += [f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops']:.3f} | {r['xla_gflops']:.3f} |"
            for r in rows]
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--models", default=",".join(models.paper_models()),
                  help="comma-separated names; " + "; ".join(
                      f"{f.example} (sizes: {', '.join(f.sizes)})" for f in models.FAMILIES.values()))
  ap.add_argument("--input-size", type=int, default=32, help="latent/image side (32 = 256px latents)")
  ap.add_argument("--channels", type=int, default=4)
  ap.add_argument("--num-classes", type=int, default=1000)
  ap.add_argument("--conditioning", default="adaln_zero", choices=dit.CONDITIONINGS)
  fmt = ap.add_mutually_exclusive_group()
  fmt.add_argument("--json", action="store_true", help="a JSON list, one object per model")
  fmt.add_argument("--markdown", action="store_true", help="a markdown table (the default)")
  args = ap.parse_args(argv)
  try:
    rows = [row(n, args.input_size, args.channels, args.num_classes, args.conditioning)
            for n in args.models.split(",")]
  except ValueError as e:
    sys.exit(f"model_table: {e}")
  print(json.dumps(rows, indent=1) if args.json else markdown(rows))


if __name__ == "__main__":
  main()
