"""Do prompts steer samples? Train a small text-conditioned model on captioned MNIST, sample every
class prompt, and let a CNN classifier trained on real MNIST (dit_jax.feature_net) judge them.

  python tools/text_conditioning_experiment.py --data-dir ../shared/data/mnist --out /tmp/txt_exp

Reports the 10-way accuracy (the classifier's label equals the prompt's class), the two-prompt
accuracy for every pair of classes (which of the two prompts made this sample?), and writes a grid
(one row per prompt) plus results.json under --out.
"""
import argparse
import itertools
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import sample_prompt  # noqa: E402

from dit_jax import feature_net, text  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--data-dir", default="../shared/data/mnist")
  ap.add_argument("--out", default="/tmp/text_conditioning")
  ap.add_argument("--arch", default="dit", choices=sample_prompt.ARCHS)
  ap.add_argument("--train-steps", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--per-class", type=int, default=50, help="samples per prompt")
  ap.add_argument("--cfg-scale", type=float, default=3.0)
  ap.add_argument("--sample-steps", type=int, default=50)
  ap.add_argument("--classifier-steps", type=int, default=300)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  images, labels, captions = sample_prompt.mnist_captioned(args.data_dir)
  tok = text.Tokenizer.build(captions)
  model = sample_prompt.build_model(args.arch, tok, images.shape[1], images.shape[-1])
  t0 = time.time()
  params = sample_prompt.train(model, images, tok.encode(captions), steps=args.train_steps,
                               batch_size=args.batch_size, seed=args.seed)
  train_s = time.time() - t0
  sample_prompt.save(out / "model", model, params, tok, args.arch)

  prompts = text.class_captions(text.MNIST_CLASS_NAMES, text.TEMPLATES["mnist"])
  ids = np.repeat(tok.encode(prompts), args.per_class, axis=0)
  want = np.repeat(np.arange(len(prompts)), args.per_class)
  t0 = time.time()
  samples = sample_prompt.sample(model, params, ids, tok.null_tokens(), cfg_scale=args.cfg_scale,
                                 steps=args.sample_steps, seed=args.seed)
  sample_s = time.time() - t0
  sample_prompt.save_grid(samples.reshape(len(prompts), args.per_class, *samples.shape[1:])
                          [:, :10].reshape(-1, *samples.shape[1:]), out / "grid.png", ncols=10)

  variables, meta = feature_net.train(images, labels, steps=args.classifier_steps, seed=args.seed)
  net = feature_net.FeatureNet(meta["num_classes"], tuple(meta["widths"]))
  logits = np.asarray(jax.jit(lambda v, x: net.apply(v, x)["logits"])(variables, samples))
  acc10 = float((logits.argmax(-1) == want).mean())
  per_class = [float((logits[want == c].argmax(-1) == c).mean()) for c in range(len(prompts))]
  pairs = {}
  for a, b in itertools.combinations(range(len(prompts)), 2):
    sel = (want == a) | (want == b)
    pick = np.where(logits[sel][:, a] > logits[sel][:, b], a, b)
    pairs[f"{a}-{b}"] = float((pick == want[sel]).mean())
  res = {"arch": args.arch, "train_steps": args.train_steps, "batch_size": args.batch_size,
         "cfg_scale": args.cfg_scale, "sample_steps": args.sample_steps,
         "per_class": args.per_class, "accuracy_10way": acc10, "per_class_accuracy": per_class,
         "pairwise_min": min(pairs.values()), "pairwise_mean": float(np.mean(list(pairs.values()))),
         "pair_accuracy": pairs, "classifier_test_accuracy": meta["test_accuracy"],
         "train_seconds": round(train_s), "sample_seconds": round(sample_s),
         "device": str(jax.devices()[0])}
  (out / "results.json").write_text(json.dumps(res, indent=1))
  print(json.dumps({k: v for k, v in res.items() if k != "pair_accuracy"}, indent=1))


if __name__ == "__main__":
  main()
