"""Samples a trained DiT from its workdir's checkpoint (EMA params) and writes a PNG grid.

  python tools/sample.py --workdir=/tmp/dit_cpu --out=/tmp/grid.png --steps=250 --cfg_scale=4
  python tools/sample.py --workdir=DIR --sampler=ddim --steps=50 --labels=207,360,387,974

DDPM with 250 respaced steps and guidance 1.5 is the paper's FID setting; 4.0 gives its figures.
Latent models need --vae_path (a diffusers SD-VAE folder) to decode to pixels.
"""
import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from dit_jax.objectives import diffusion as diffusion_lib  # noqa: E402
from dit_jax.evaluation import evaluators  # noqa: E402
from dit_jax.evaluation import images  # noqa: E402
from dit_jax.objectives import sampling  # noqa: E402
from dit_jax.models import text  # noqa: E402
from dit_jax.training import train  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="training workdir (config.json, checkpoints/)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", default="samples.png", help="PNG grid to write")
  p.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
  p.add_argument("--steps", default="250", help="respaced sampling steps, e.g. 250 or ddim50")
  p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
  p.add_argument("--cfg_scale", type=float, default=4.0, help="classifier-free guidance (1 = off)")
  p.add_argument("--guide_channels", type=int, default=None,
                 help="guide only the first N channels (3 = the official DiT sampler's quirk)")
  p.add_argument("--num", type=int, default=16, help="images (labels cycle 0..classes-1)")
  p.add_argument("--labels", default="", help="comma-separated class labels (overrides --num)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--vae_path", default="", help="SD-VAE folder to decode latents")
  args = p.parse_args()

  if text.enabled(train.load_config(args.workdir)):
    sys.exit(f"sample.py: {args.workdir} is a text-conditioned run; sample it with "
             f"tools/sample_prompt.py --workdir={args.workdir} --prompt=...")
  run = train.load_trained(args.workdir, args.step)
  config, model, params, data_state, step = (run.config, run.model, run.params, run.data_state,
                                             run.step)
  if args.labels:
    labels = np.array([int(v) for v in args.labels.split(",")], np.int32)
  else:
    labels = np.arange(args.num, dtype=np.int32) % max(data_state["num_classes"], 1)
  if model.num_classes and labels.max() >= model.num_classes:
    raise ValueError(f"labels must be < {model.num_classes}")
  diffusion = diffusion_lib.from_config(config, args.steps)
  sample = sampling.make_sample_fn(model, diffusion, sampler=args.sampler, cfg_scale=args.cfg_scale,
                                guide_channels=args.guide_channels, eta=args.eta)
  shape = (len(labels),) + tuple(data_state["image_shape"])
  x = np.asarray(sample(params, jnp.asarray(labels), jax.random.PRNGKey(args.seed), shape))
  if data_state["kind"] == "latents":
    vae_path = args.vae_path or config.eval.vae_path
    if not vae_path:
      raise ValueError("this model was trained on latents: pass --vae_path to decode them")
    x = evaluators.decode_latents(vae_path, x, data_state["scaling_factor"])
  images.save_grid(np.asarray(images.quantize(x)), args.out)
  print(f"step {step}: {len(labels)} samples ({args.sampler}, {diffusion.num_timesteps} steps, "
        f"cfg {args.cfg_scale}) -> {args.out}")


if __name__ == "__main__":
  main()
