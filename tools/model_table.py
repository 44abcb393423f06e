"""Params and forward Gflops (paper convention and XLA's count) for DiT and U-Net variants.

  python tools/model_table.py --json                 # the 12 models of the paper's Table 4
  python tools/model_table.py --markdown --models DiT-Mi/2,DiT-Nano/4 --input-size 16 --channels 1
  python tools/model_table.py --markdown --models UNet-S,UNet-B,UNet-L,UNet-XL
"""
import json
import sys

from absl import app
from absl import flags

from dit_jax import models
from dit_jax.models import dit

_MODELS = flags.DEFINE_string(
    "models", ",".join(models.paper_models()),
    "Comma-separated names; " + "; ".join(f"{f.example} (sizes: {', '.join(f.sizes)})"
                                          for f in models.FAMILIES.values()))
_INPUT_SIZE = flags.DEFINE_integer("input-size", 32, "Latent/image side (32 = 256px latents).")
_CHANNELS = flags.DEFINE_integer("channels", 4, "Input channels.")
_NUM_CLASSES = flags.DEFINE_integer("num-classes", 1000, "Classes.")
_CONDITIONING = flags.DEFINE_enum("conditioning", "adaln_zero", dit.CONDITIONINGS,
                                  "DiT conditioning.")
_JSON = flags.DEFINE_bool("json", False, "A JSON list, one object per model.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "A markdown table (the default).")
flags.mark_bool_flags_as_mutual_exclusive(["json", "markdown"])


def row(name: str, input_size: int, channels: int, num_classes: int, conditioning: str) -> dict:
  """One table row; params counted from the params pytree."""
  fields = dict(conditioning=conditioning) if models.family_name(name) == "DiT" else {}
  model = models.build(name, input_size=input_size, in_channels=channels, num_classes=num_classes,
                       **fields)
  return {"model": name, **models.describe(model, name)}


def markdown(rows) -> str:
  lines = ["| model | params (M) | Gflops | XLA Gflops |", "|---|---:|---:|---:|"]
  lines += [f"| {r['model']} | {r['params'] / 1e6:.2f} | {r['gflops']:.3f} | "
            f"{r['xla_gflops']:.3f} |" for r in rows]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    rows = [row(n, _INPUT_SIZE.value, _CHANNELS.value, _NUM_CLASSES.value, _CONDITIONING.value)
            for n in _MODELS.value.split(",")]
  except ValueError as e:
    sys.exit(f"model_table: {e}")
  print(json.dumps(rows, indent=1) if _JSON.value else markdown(rows))


if __name__ == "__main__":
  app.run(main)
