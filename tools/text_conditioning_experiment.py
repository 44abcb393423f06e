"""Do prompts steer samples? Train a small text-conditioned model on captioned MNIST with the main
trainer, sample every class prompt (tools/sample_prompt.py), and let a CNN classifier trained on
real MNIST (dit_jax.evaluation.feature_net) judge them.

  python tools/text_conditioning_experiment.py --data-dir ../shared/data/mnist --out /tmp/txt_exp

The run is `configs/default.py:cpu_text` moved to the 10,000 MNIST test digits at 28 px, in
--out/run (an ordinary workdir: re-running resumes or reuses it). Reports the 10-way accuracy (the
classifier's label equals the prompt's class), the two-prompt accuracy for every pair of classes
(which of the two prompts made this sample?), and writes a grid (one row per prompt) plus
results.json under --out.
"""
import argparse
import itertools
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import sample_prompt  # noqa: E402

from configs import default  # noqa: E402
from dit_jax.data import datasets  # noqa: E402
from dit_jax.evaluation import feature_net, images  # noqa: E402
from dit_jax import models  # noqa: E402
from dit_jax.models import text  # noqa: E402
from dit_jax.training import train  # noqa: E402

# The two CPU-sized backbones of the experiment (width 64 caption encoder, 2 layers, 4 heads).
ARCHS = {"dit": dict(model="DiT-Pico/4", hidden_size=64, num_heads=4, conditioning="cross_attn"),
         "unet": dict(model="UNet-Nano", conditioning="adaln_zero")}


def experiment_config(args):
  """cpu_text on MNIST test digits at 28 px with the chosen backbone; FID off (the CNN judges)."""
  config = default.get_config("cpu_text")
  config.update_from_flattened_dict({
      **ARCHS[args.arch], "data.name": "mnist", "data.path": args.data_dir, "data.split": "test",
      "data.image_size": 28, "text.width": 64, "text.depth": 2, "text.num_heads": 4,
      "batch_size": args.batch_size, "num_train_steps": args.train_steps, "optim.lr": args.lr,
      "optim.warmup_steps": min(200, args.train_steps // 10 + 1), "ema_decay": args.ema_decay,
      "seed": args.seed, "log_every_steps": max(1, args.train_steps // 10),
      "checkpoint_every_steps": args.train_steps, "eval.grid.every_steps": args.train_steps,
      "eval.fid.every_steps": 0})
  return config


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--data-dir", default="../shared/data/mnist")
  ap.add_argument("--out", default="/tmp/text_conditioning")
  ap.add_argument("--arch", default="dit", choices=sorted(ARCHS))
  ap.add_argument("--train-steps", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--lr", type=float, default=1e-3)
  # The trainer's EMA has no warm-up: 0.999 would keep 13.5 % of the initialisation after 2000 steps.
  ap.add_argument("--ema-decay", type=float, default=0.995)
  ap.add_argument("--per-class", type=int, default=50, help="samples per prompt")
  ap.add_argument("--cfg-scale", type=float, default=3.0)
  ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
  ap.add_argument("--classifier-steps", type=int, default=300)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  config = experiment_config(args)
  t0 = time.time()
  train.train_and_evaluate(config, out / "run")
  train_s = time.time() - t0

  prompts = text.class_captions(text.MNIST_CLASS_NAMES, text.TEMPLATES["mnist"])
  want = np.repeat(np.arange(len(prompts)), args.per_class)
  t0 = time.time()
  samples = sample_prompt.sample_prompts(out / "run", prompts, num=args.per_class, sampler="ddim",
                                         steps=str(args.sample_steps), cfg_scale=args.cfg_scale,
                                         seed=args.seed)
  sample_s = time.time() - t0
  first10 = samples.reshape(len(prompts), args.per_class, *samples.shape[1:])[:, :10]
  images.save_grid(first10.reshape(-1, *samples.shape[1:]), out / "grid.png", ncol=10)

  real, labels = datasets.read_mnist(args.data_dir)
  variables, meta = feature_net.train(real, labels, steps=args.classifier_steps, seed=args.seed)
  net = feature_net.FeatureNet(meta["num_classes"], tuple(meta["widths"]))
  logits = np.asarray(jax.jit(lambda v, x: net.apply(v, x)["logits"])(variables, samples))
  acc10 = float((logits.argmax(-1) == want).mean())
  per_class = [float((logits[want == c].argmax(-1) == c).mean()) for c in range(len(prompts))]
  pairs = {}
  for a, b in itertools.combinations(range(len(prompts)), 2):
    sel = (want == a) | (want == b)
    pick = np.where(logits[sel][:, a] > logits[sel][:, b], a, b)
    pairs[f"{a}-{b}"] = float((pick == want[sel]).mean())
  run = train.load_trained(out / "run")
  res = {"arch": args.arch, "model": config.model, "train_steps": args.train_steps,
         "batch_size": args.batch_size, "ema_decay": args.ema_decay, "cfg_scale": args.cfg_scale,
         "sample_steps": args.sample_steps, "per_class": args.per_class,
         "params": int(sum(x.size for x in jax.tree.leaves(run.params))),
         "gflops": models.gflops(run.model), "accuracy_10way": acc10,
         "per_class_accuracy": per_class, "pairwise_min": min(pairs.values()),
         "pairwise_mean": float(np.mean(list(pairs.values()))), "pair_accuracy": pairs,
         "classifier_test_accuracy": meta["test_accuracy"], "train_seconds": round(train_s),
         "sample_seconds": round(sample_s), "device": str(jax.devices()[0])}
  (out / "results.json").write_text(json.dumps(res, indent=1))
  print(json.dumps({k: v for k, v in res.items() if k != "pair_accuracy"}, indent=1))


if __name__ == "__main__":
  main()
