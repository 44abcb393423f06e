r"""Do prompts steer samples? Train a small text-conditioned model on captioned MNIST with the main
trainer, sample every class prompt (as tools/sample_prompt.py does), and let a CNN classifier
trained on real MNIST (dit_jax.evaluation.feature_net) judge them.

  python experiments/text_conditioning/text_conditioning_experiment.py \
      --data-dir ../shared/data/mnist --out /tmp/txt_exp

The run is `configs/default.py:cpu_text` moved to the 10,000 MNIST test digits at 28 px, in
--out/run (an ordinary workdir: re-running resumes or reuses it). Reports the 10-way accuracy (the
classifier's label equals the prompt's class), the two-prompt accuracy for every pair of classes
(which of the two prompts made this sample?), and writes a grid (one row per prompt) plus
results.json under --out. Results: README.md next to this file.
"""
import importlib.util
import itertools
import json
import pathlib
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import models
from dit_jax import objectives
from dit_jax.data import captions
from dit_jax.data import datasets
from dit_jax.data import images
from dit_jax.evaluation import feature_net
from dit_jax.models import text
from dit_jax.training import train

REPO = pathlib.Path(__file__).resolve().parents[2]

# The two CPU-sized backbones of the experiment (width 64 caption encoder, 2 layers, 4 heads).
ARCHS = {"dit": dict(model="DiT-Pico/4", hidden_size=64, num_heads=4, conditioning="cross_attn"),
         "unet": dict(model="UNet-Nano", conditioning="adaln_zero")}


_DATA_DIR = flags.DEFINE_string("data-dir", "../shared/data/mnist", "MNIST idx.gz directory.")
_OUT = flags.DEFINE_string("out", "/tmp/text_conditioning", "Output directory (the run: out/run).")
_ARCH = flags.DEFINE_enum("arch", "dit", sorted(ARCHS), "Backbone.")
_TRAIN_STEPS = flags.DEFINE_integer("train-steps", 2000, "Training steps.")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 64, "Training batch size.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate.")
# The trainer's EMA has no warm-up: 0.999 would keep 13.5 % of the initialisation after 2000 steps.
_EMA_DECAY = flags.DEFINE_float("ema-decay", 0.995, "EMA decay.")
_PER_CLASS = flags.DEFINE_integer("per-class", 50, "Samples per prompt.")
_CFG_SCALE = flags.DEFINE_float("cfg-scale", 3.0, "Classifier-free guidance scale.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample-steps", 50, "DDIM steps.")
_CLASSIFIER_STEPS = flags.DEFINE_integer("classifier-steps", 300, "Judge CNN's training steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Training, sampling and judge seed.")


def default_config(preset: str):
  """configs/default.py's preset, loaded by path (this script runs from any directory)."""
  spec = importlib.util.spec_from_file_location("configs.default", REPO / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def experiment_config(arch, data_dir, batch_size, train_steps, lr, ema_decay, seed):
  """cpu_text on MNIST test digits at 28 px with the chosen backbone; FID off (the CNN judges)."""
  config = default_config("cpu_text")
  config.update_from_flattened_dict({
      **ARCHS[arch], "data.name": "mnist", "data.path": data_dir, "data.split": "test",
      "data.image_size": 28, "text.width": 64, "text.depth": 2, "text.num_heads": 4,
      "batch_size": batch_size, "num_train_steps": train_steps, "optim.lr": lr,
      "optim.warmup_steps": min(200, train_steps // 10 + 1), "ema_decay": ema_decay,
      "seed": seed, "log_every_steps": max(1, train_steps // 10),
      "checkpoint_every_steps": train_steps, "eval.grid.every_steps": train_steps,
      "eval.fid.every_steps": 0})
  return config


def sample_prompts(run, workdir, prompts, *, num: int, steps: int, cfg_scale: float, seed: int):
  """uint8 DDIM samples (P * num, H, W, C) of a trained text run, prompt by prompt, with
  classifier-free guidance against the empty caption (what tools/sample_prompt.py draws)."""
  ids = np.repeat(captions.load_tokenizer(workdir, run.config.text).encode(list(prompts)), num,
                  axis=0)
  sample = objectives.from_config(run.config).sample_fn(run.model, steps=str(steps),
                                                        cfg_scale=cfg_scale, sampler="ddim")
  shape = (len(ids),) + tuple(run.data_state["image_shape"])
  x = sample(run.params, jnp.asarray(ids), jax.random.PRNGKey(seed), shape)
  return np.asarray(images.quantize(x))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  num, seed = _PER_CLASS.value, _SEED.value

  config = experiment_config(_ARCH.value, _DATA_DIR.value, _BATCH_SIZE.value, _TRAIN_STEPS.value,
                             _LR.value, _EMA_DECAY.value, seed)
  t0 = time.time()
  train.train_and_evaluate(config, out / "run")
  train_s = time.time() - t0

  prompts = text.class_captions(text.MNIST_CLASS_NAMES, text.TEMPLATES["mnist"])
  want = np.repeat(np.arange(len(prompts)), num)
  t0 = time.time()
  run = train.load_trained(out / "run")
  samples = sample_prompts(run, out / "run", prompts, num=num, steps=_SAMPLE_STEPS.value,
                           cfg_scale=_CFG_SCALE.value, seed=seed)
  sample_s = time.time() - t0
  first10 = samples.reshape(len(prompts), num, *samples.shape[1:])[:, :10]
  images.save_grid(first10.reshape(-1, *samples.shape[1:]), out / "grid.png", ncol=10)

  real, labels = datasets.read_mnist(_DATA_DIR.value)
  variables, meta = feature_net.train(real, labels, steps=_CLASSIFIER_STEPS.value, seed=seed)
  net = feature_net.FeatureNet(meta["num_classes"], tuple(meta["widths"]))
  logits = np.asarray(jax.jit(lambda v, x: net.apply(v, x)["logits"])(variables, samples))
  acc10 = float((logits.argmax(-1) == want).mean())
  per_class = [float((logits[want == c].argmax(-1) == c).mean()) for c in range(len(prompts))]
  pairs = {}
  for a, b in itertools.combinations(range(len(prompts)), 2):
    sel = (want == a) | (want == b)
    pick = np.where(logits[sel][:, a] > logits[sel][:, b], a, b)
    pairs[f"{a}-{b}"] = float((pick == want[sel]).mean())
  res = {"arch": _ARCH.value, "model": config.model, "train_steps": _TRAIN_STEPS.value,
         "batch_size": _BATCH_SIZE.value, "ema_decay": _EMA_DECAY.value,
         "cfg_scale": _CFG_SCALE.value, "sample_steps": _SAMPLE_STEPS.value, "per_class": num,
         "params": int(sum(x.size for x in jax.tree.leaves(run.params))),
         "gflops": models.gflops(run.model), "accuracy_10way": acc10,
         "per_class_accuracy": per_class, "pairwise_min": min(pairs.values()),
         "pairwise_mean": float(np.mean(list(pairs.values()))), "pair_accuracy": pairs,
         "classifier_test_accuracy": meta["test_accuracy"], "train_seconds": round(train_s),
         "sample_seconds": round(sample_s), "device": str(jax.devices()[0])}
  (out / "results.json").write_text(json.dumps(res, indent=1))
  print(json.dumps({k: v for k, v in res.items() if k != "pair_accuracy"}, indent=1))


if __name__ == "__main__":
  app.run(main)
