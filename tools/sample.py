"""Samples a trained model from its workdir's checkpoint (EMA params) and writes a PNG grid, with
the sampler of the objective the run was trained with (objectives.from_config of its config.json).

  python tools/sample.py --workdir=/tmp/dit_cpu --out=/tmp/grid.png --steps=250 --cfg_scale=4
  python tools/sample.py --workdir=DIR --sampler=ddim --steps=ddim50 --labels=207,360,387,974
  python tools/sample.py --workdir=FLOW_RUN --sampler=euler --steps=50   # a flow-trained run

DDPM with 250 respaced steps and guidance 1.5 is the paper's FID setting; 4.0 gives its figures.
A DDPM run takes --sampler ddpm (default) or ddim and --steps as a respacing ('250', 'ddim50'); a
flow run takes euler, heun or euler_maruyama (default: the run's flow.sampler) and --steps as a
number of integration steps. Latent models need --vae_path (a diffusers SD-VAE folder) to decode.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dit_jax import errors
from dit_jax import objectives
from dit_jax.data import images
from dit_jax.evaluation import evaluators
from dit_jax.models import text
from dit_jax.training import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("out", "samples.png", "PNG grid to write.")
flags.DEFINE_string("sampler", "", "ddpm | ddim (DDPM runs), euler | heun | euler_maruyama (flow "
                    "runs); '' = the objective's own (ddpm; the run's flow.sampler).")
flags.DEFINE_string("steps", "250", "Sampling steps: a respacing ('250', 'ddim50') for DDPM, a "
                    "number of integration steps for flow.")
flags.DEFINE_float("eta", 0.0, "DDIM stochasticity.")
flags.DEFINE_float("cfg_scale", 4.0, "Classifier-free guidance (1 = off).")
flags.DEFINE_integer("guide_channels", 0, "DDPM: guide only the first N eps channels (0 = all; 3 "
                     "= the official DiT sampler's quirk).")
flags.DEFINE_integer("num", 16, "Images (labels cycle 0..classes-1).")
flags.DEFINE_string("labels", "", "Comma-separated class labels (overrides --num).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("vae_path", "", "SD-VAE folder that decodes a latent model's samples.")
flags.mark_flags_as_required(["workdir"])


def chosen_sampler(config) -> tuple:
  """(the run's objective, the sampler the flags choose), checked against each other before any
  checkpoint is read; ValueError names the flag at fault."""
  objective = objectives.from_config(config)
  sampler = FLAGS.sampler or ("ddpm" if objective.name == "ddpm" else config.flow.sampler)
  if sampler not in objective.samplers:
    raise ValueError(f"--sampler={sampler}: a {objective.name}-trained run samples with one of "
                     f"{objective.samplers}")
  objective.check_sampling(FLAGS.steps, FLAGS.guide_channels, "--", "steps")
  return objective, sampler


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sample()
  except errors.USER_ERRORS as e:  # one line, as dit_jax.main's (errors.py); exit code 2
    errors.exit_user_error("sample.py", e)


def _labels(num_classes: int) -> np.ndarray:
  if FLAGS.labels:
    try:
      labels = np.array([int(v) for v in FLAGS.labels.split(",")], np.int32)
    except ValueError:
      raise ValueError(f"--labels={FLAGS.labels!r}: comma-separated class numbers") from None
  else:
    labels = np.arange(FLAGS.num, dtype=np.int32) % max(num_classes, 1)
  if num_classes and (labels.max() >= num_classes or labels.min() < 0):
    raise ValueError(f"--labels={FLAGS.labels}: the model has classes 0..{num_classes - 1}")
  return labels


def sample() -> None:
  """Checks the flags against the run, then samples and writes the grid."""
  config = train.load_config(FLAGS.workdir)
  if text.enabled(config.get("text")):
    raise ValueError(f"{FLAGS.workdir} is a text-conditioned run; sample it with "
                     f"tools/sample_prompt.py --workdir={FLAGS.workdir} --prompt=...")
  objective, sampler = chosen_sampler(config)
  run = train.load_trained(FLAGS.workdir, FLAGS.step)
  labels = _labels(run.model.num_classes)
  sample = objective.sample_fn(run.model, steps=FLAGS.steps, cfg_scale=FLAGS.cfg_scale,
                               guide_channels=FLAGS.guide_channels,
                               data_kind=run.data_state["kind"], sampler=sampler, eta=FLAGS.eta)
  shape = (len(labels),) + tuple(run.data_state["image_shape"])
  x = np.asarray(sample(run.params, jnp.asarray(labels), jax.random.PRNGKey(FLAGS.seed), shape))
  if run.data_state["kind"] == "latents":
    vae_path = FLAGS.vae_path or run.config.eval.vae_path
    if not vae_path:
      raise ValueError("this model was trained on latents: pass --vae_path to decode them")
    x = evaluators.decode_latents(vae_path, x, run.data_state["scaling_factor"])
  images.save_grid(np.asarray(images.quantize(x)), FLAGS.out)
  name = sampler if sampler == objective.name else f"{objective.name} {sampler}"
  print(f"step {run.step}: {len(labels)} samples ({name}, {FLAGS.steps} steps, "
        f"cfg {FLAGS.cfg_scale}) -> {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
