"""Text prompt -> PNG grid, with a small text-conditioned DiT or U-Net trained on captioned class data.

Captions come from class names ("a handwritten digit seven"), so this runs offline end to end.
Train (and save) a model, then sample any prompt made of the caption vocabulary:

  python tools/sample_prompt.py --data-dir ../shared/data/mnist --train-steps 2000 \
      --save /tmp/txt_dit --prompt "a handwritten digit seven" --out seven.png
  python tools/sample_prompt.py --load /tmp/txt_dit --prompt "a handwritten digit three" --out three.png

Sampling is DDIM (respaced steps, eta 0) with classifier-free guidance against the empty caption.
"""
import argparse
import json
import pathlib
import sys
import time

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from dit_jax import datasets, diffusion, dit, sampling, text, unet

ARCHS = ("dit", "unet")


def build_model(arch: str, tok: text.Tokenizer, image_size: int, channels: int,
                width: int = 64) -> text.TextConditioned:
  """A CPU-sized text-conditioned model: DiT (cross_attn, patch 4) or U-Net (two levels)."""
  enc = text.TextEncoder(tok.vocab_size, tok.max_length, width=width, depth=2, num_heads=4)
  if arch == "dit":
    m = dit.DiT(input_size=image_size, in_channels=channels, patch_size=4, hidden_size=64,
                depth=4, num_heads=4, num_classes=0, conditioning="cross_attn", context_dim=width)
  elif arch == "unet":
    m = unet.UNet(input_size=image_size, in_channels=channels, model_channels=32,
                  channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                  num_head_channels=32, num_classes=0, context_dim=width)
  else:
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
  return text.TextConditioned(enc, m, caption_dropout_prob=0.1)


def train(model: text.TextConditioned, images_NxHxWxC: np.ndarray, ids_NxL: np.ndarray, *,
          steps: int, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.999,
          seed: int = 0, log=print):
  """AdamW on DiT's loss (eps MSE + VLB, learned Sigma); returns the EMA params (with warm-up)."""
  diff = diffusion.create()
  x_all = jnp.asarray(images_NxHxWxC.astype(np.float32) / 127.5 - 1.0)
  ids_all = jnp.asarray(ids_NxL)
  params = nn.unbox(jax.jit(lambda k: text.init_text_params(model, k))(jax.random.key(seed)))
  tx = optax.adamw(optax.warmup_constant_schedule(0.0, lr, min(200, steps // 10 + 1)),
                   weight_decay=0.0)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, ema, opt_state, i, rng):
    r_idx, r_t, r_noise, r_drop = jax.random.split(rng, 4)
    idx = jax.random.randint(r_idx, (batch_size,), 0, x_all.shape[0])
    x0, ids = x_all[idx], ids_all[idx]

    def loss_fn(p):
      fn = lambda x, t: model.apply({"params": p}, x, t, ids, train=True,
                                    rngs={"label_dropout": r_drop})
      losses = diff.training_losses(fn, x0, diff.sample_t(r_t, batch_size),
                                    jax.random.normal(r_noise, x0.shape))
      return losses["loss"].mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # Warm-up (1 + i) / (10 + i): a short run's EMA must not keep a share of the (zero-output) init.
    decay = jnp.minimum(ema_decay, (1.0 + i) / (10.0 + i))
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    return params, ema, opt_state, loss

  ema, rng, t0 = params, jax.random.key(seed + 1), time.time()
  for i in range(steps):
    params, ema, opt_state, loss = step(params, ema, opt_state, i, jax.random.fold_in(rng, i))
    if log and ((i + 1) % max(1, steps // 10) == 0 or i == 0):
      log(f"step {i + 1}/{steps}: loss {float(loss):.4f} ({time.time() - t0:.0f}s)")
  return ema


def sample(model: text.TextConditioned, params, ids_BxL: np.ndarray, null_L: np.ndarray, *,
           cfg_scale: float = 3.0, steps: int = 50, seed: int = 0) -> np.ndarray:
  """DDIM samples for each row of token ids, guided against the empty caption; uint8 NHWC."""
  diff = diffusion.create(respacing=f"ddim{steps}")
  b = ids_BxL.shape[0]
  shape = (b, model.input_size, model.input_size, model.in_channels)

  @jax.jit
  def run(params, ids, rng):
    fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
    model_fn = (sampling.cfg_model_fn(fn, ids, jnp.asarray(null_L), cfg_scale) if cfg_scale != 1
                else (lambda x, t: fn(x, t, ids)))
    return sampling.ddim_sample(model_fn, diff, shape, rng)

  x = np.asarray(run(params, jnp.asarray(ids_BxL), jax.random.key(seed)))
  return np.clip(np.round(127.5 * x + 128), 0, 255).astype(np.uint8)  # ADM's quantisation


def save_grid(images_NxHxWxC: np.ndarray, path, ncols: int = 8) -> None:
  """Images tiled row-major into one PNG with a 2-pixel border."""
  n, h, w, c = images_NxHxWxC.shape
  rows = -(-n // ncols)
  grid = np.zeros((rows * (h + 2) + 2, ncols * (w + 2) + 2, c), np.uint8)
  for i, im in enumerate(images_NxHxWxC):
    r, q = divmod(i, ncols)
    grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
  Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def save(path, model: text.TextConditioned, params, tok: text.Tokenizer, arch: str) -> None:
  """Params (msgpack), tokenizer and model settings in one folder."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "params.msgpack").write_bytes(flax.serialization.to_bytes(params))
  tok.save(path / "tokenizer.json")
  (path / "model.json").write_text(json.dumps(
      {"arch": arch, "image_size": model.input_size, "channels": model.in_channels,
       "width": model.encoder.width}))


def load(path):
  """(model, params, tokenizer) written by `save`."""
  path = pathlib.Path(path)
  if not (path / "params.msgpack").exists():
    raise ValueError(f"{path}: no params.msgpack; train and --save a model first")
  cfg = json.loads((path / "model.json").read_text())
  tok = text.Tokenizer.load(path / "tokenizer.json")
  model = build_model(cfg["arch"], tok, cfg["image_size"], cfg["channels"], cfg["width"])
  target = jax.eval_shape(lambda: nn.unbox(text.init_text_params(model, jax.random.key(0))))
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
  params = flax.serialization.from_bytes(target, (path / "params.msgpack").read_bytes())
  return model, params, tok


def mnist_captioned(data_dir):
  """MNIST test images (N, 28, 28, 1) uint8, their labels and class-name captions."""
  images, labels = datasets.read_mnist(data_dir)
  captions = text.captions_for_labels(labels, text.MNIST_CLASS_NAMES, text.TEMPLATES["mnist"])
  return images, labels, captions


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--prompt", action="append", required=True,
                  help="caption to sample (repeat for several rows)")
  ap.add_argument("--out", default="prompt.png", help="PNG grid path")
  ap.add_argument("--num", type=int, default=8, help="samples per prompt (one grid row each)")
  ap.add_argument("--load", help="folder written by --save (skips training)")
  ap.add_argument("--save", help="folder to write the trained model to")
  ap.add_argument("--data-dir", default="../shared/data/mnist", help="MNIST idx.gz folder")
  ap.add_argument("--arch", default="dit", choices=ARCHS)
  ap.add_argument("--train-steps", type=int, default=2000)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--cfg-scale", type=float, default=3.0, help="1 = no guidance")
  ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  try:
    if args.load:
      model, params, tok = load(args.load)
    else:
      images, _, captions = mnist_captioned(args.data_dir)
      tok = text.Tokenizer.build(captions)
      model = build_model(args.arch, tok, images.shape[1], images.shape[-1])
      params = train(model, images, tok.encode(captions), steps=args.train_steps,
                     batch_size=args.batch_size, lr=args.lr, seed=args.seed)
      if args.save:
        save(args.save, model, params, tok, args.arch)
    ids = np.repeat(tok.encode(args.prompt), args.num, axis=0)  # unknown words raise here
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"sample_prompt: {e}")
  images = sample(model, params, ids, tok.null_tokens(), cfg_scale=args.cfg_scale,
                  steps=args.sample_steps, seed=args.seed)
  save_grid(images, args.out, ncols=args.num)
  print(f"wrote {args.out}: {len(args.prompt)} prompt(s) x {args.num} samples")


if __name__ == "__main__":
  main()
