"""Text prompts -> a PNG grid, from a text-conditioned run of the main trainer (text.enabled).

With --config it trains first, through `train.train_and_evaluate` into --workdir (resuming what is
there); without, --workdir must hold a trained text run. Prompts are encoded with the run's
tokenizer (workdir/tokenizer.json): a word the captions never had is an error, not an <unk>.

  python tools/sample_prompt.py --config=configs/default.py:cpu_text --workdir=/tmp/txt \
      --prompt="a handwritten digit seven" --out=seven.png
  python tools/sample_prompt.py --workdir=/tmp/txt --prompt="a handwritten digit three" \
      --prompt="a handwritten digit eight" --num=8 --out=three_eight.png

One grid row per prompt, --num samples each; DDIM (--sampler, --steps) with classifier-free guidance
(--cfg_scale) against the empty caption.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dit_jax import config_check
from dit_jax import errors
from dit_jax import objectives
from dit_jax.data import captions
from dit_jax.data import images
from dit_jax.data import sources
from dit_jax.evaluation import evaluators
from dit_jax.models import text
from dit_jax.training import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config (with text.enabled), e.g. "
                                "configs/default.py:cpu_text; omit to sample a trained --workdir.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizer.json, checkpoints/).")
flags.DEFINE_multi_string("prompt", None, "Caption to sample; repeat for more grid rows.")
flags.DEFINE_string("out", "prompt.png", "PNG grid to write.")
flags.DEFINE_integer("num", 8, "Samples per prompt (one grid row each).")
flags.DEFINE_enum("sampler", "ddim", ["ddpm", "ddim"], "Sampler.")
flags.DEFINE_string("steps", "50", "Respaced sampling steps.")
flags.DEFINE_float("cfg_scale", 3.0, "Classifier-free guidance against the empty caption (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("vae_path", "", "SD-VAE folder that decodes a latent model's samples.")
flags.mark_flags_as_required(["workdir", "prompt"])


def encode_prompts(workdir, prompts) -> np.ndarray:
  """Token ids (P, L) of the prompts under the run's tokenizer; unknown words raise ValueError."""
  tokenizer = captions.load_tokenizer(workdir, train.load_config(workdir).get("text"))
  if tokenizer is None:
    raise ValueError(f"{workdir} is not a text-conditioned run (text.enabled=False); sample it "
                     f"with tools/sample.py")
  return tokenizer.encode(list(prompts))


def check_prompts(config, prompts) -> None:
  """Before training: the config's checks, then the prompts against the tokenizer the run will
  have (it reads the data once more, which costs less than a training run lost to a typo)."""
  config_check.check(config)
  if not text.enabled(config.text):
    raise ValueError("the config is not text-conditioned: set text.enabled (e.g. "
                     "configs/default.py:cpu_text)")
  source = captions.training_source(config.text, sources.create_source(config.data))
  source.tokenizer.encode(prompts)


def sample_prompts(workdir, prompts, *, num: int = 8, sampler: str = "ddim", steps: str = "50",
                   cfg_scale: float = 3.0, seed: int = 0, step=None, vae_path: str = ""):
  """uint8 samples (P * num, H, W, C) of a trained text run, prompt by prompt (images.quantize)."""
  ids = np.repeat(encode_prompts(workdir, prompts), num, axis=0)  # before the checkpoint is read
  run = train.load_trained(workdir, step)
  # Text conditioning is DDPM-only (objectives.from_config refuses flow with text.enabled).
  sample = objectives.from_config(run.config).sample_fn(
      run.model, steps=steps, cfg_scale=cfg_scale, data_kind=run.data_state["kind"],
      sampler=sampler)
  shape = (len(ids),) + tuple(run.data_state["image_shape"])
  x = np.asarray(sample(run.params, jnp.asarray(ids), jax.random.PRNGKey(seed), shape))
  if run.data_state["kind"] == "latents":
    vae_path = vae_path or run.config.eval.vae_path
    if not vae_path:
      raise ValueError("this model was trained on latents: pass --vae_path to decode them")
    x = evaluators.decode_latents(vae_path, x, run.data_state["scaling_factor"])
  logging.info("sampled %d prompt(s) x %d at step %d", len(prompts), num, run.step)
  return np.asarray(images.quantize(x))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    if FLAGS.config is not None:
      check_prompts(FLAGS.config, FLAGS.prompt)
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    x = sample_prompts(FLAGS.workdir, FLAGS.prompt, num=FLAGS.num, sampler=FLAGS.sampler,
                       steps=FLAGS.steps, cfg_scale=FLAGS.cfg_scale, seed=FLAGS.seed,
                       step=FLAGS.step, vae_path=FLAGS.vae_path)
  except errors.USER_ERRORS as e:  # one line, as dit_jax.main's (errors.py); exit code 2
    errors.exit_user_error("sample_prompt", e)
  images.save_grid(x, FLAGS.out, ncol=FLAGS.num)
  print(f"wrote {FLAGS.out}: {len(FLAGS.prompt)} prompt(s) x {FLAGS.num} samples")


if __name__ == "__main__":
  config_check.checked_argv("sample_prompt")  # the --config.FIELD overrides, as dit_jax.main's
  app.run(main)
