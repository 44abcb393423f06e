r"""Input-pipeline throughput: images/s of Pipeline.batch per source, and VAE latent extraction.

  python tools/bench_data.py --shared_data=/work/shared/data [--batch_size=256 --steps=20]

Pipeline rows time `batch(step)` end to end (host gather + flip, transfer, normalise or posterior
sampling on the device, block_until_ready) after one warm-up step. Extraction rows time the SD VAE
encoder (real SD config, random weights: throughput does not depend on the values) on both flips.
"""
import pathlib
import platform
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.data import datasets
from dit_jax.data import latent_format
from dit_jax.data import pipeline
from dit_jax.data import sources
from dit_jax.models import vae as vae_lib

_SHARED = flags.DEFINE_string("shared_data", "/work/shared/data", "MNIST / CIFAR-10 test data.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size of the pipeline rows.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per source (after one warm-up step).")
_VAE_BATCH = flags.DEFINE_integer("vae_batch", 8, "Images per encoder call for extraction rows.")
_VAE_SIZES = flags.DEFINE_list("vae_sizes", ["32", "256"], "Image sizes for extraction rows.")
_VAE_IMAGES = flags.DEFINE_integer("vae_images", 8, "Images encoded per extraction row.")


def _cfg(**kw):
  cfg = sources.default_data_config()
  cfg.update(kw)
  return cfg


def bench_pipeline(source, batch_size, steps):
  """Steady-state images/s of Pipeline.batch on the default device."""
  pipe = pipeline.Pipeline(source, batch_size, seed=0)
  jax.block_until_ready(pipe.batch(0))
  t0 = time.perf_counter()
  for step in range(1, steps + 1):
    jax.block_until_ready(pipe.batch(step))
  return steps * batch_size / (time.perf_counter() - t0)


def bench_extraction(source, size, batch, num_images, tmp):
  """images/s of write_latents with the SD-config VAE (each image encoded plain and mirrored)."""
  cfg = vae_lib.VAEConfig()
  model = vae_lib.AutoencoderKL(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.02,
                        flax_unbox(shapes)["params"])
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
  encode_fn = lambda x: encode(params, x)
  jax.block_until_ready(encode_fn(np.zeros((batch, size, size, 3), np.float32)))  # compile
  t0 = time.perf_counter()
  latent_format.write_latents(source, encode_fn, tmp, shard_size=num_images, batch_size=batch,
                              progress=False, meta_extra={"scaling_factor": cfg.scaling_factor})
  return num_images / (time.perf_counter() - t0)


def flax_unbox(tree):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return nn.unbox(tree)


def main(argv):
  del argv
  shared, bs, steps = pathlib.Path(_SHARED.value), _BATCH.value, _STEPS.value
  rows = []
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_data_"))

  def add(name, make):
    t0 = time.perf_counter()
    src = make()
    load_s = time.perf_counter() - t0
    rows.append((name, src.num_examples, "x".join(map(str, src.image_shape)), f"{load_s:.2f}",
                 f"{bench_pipeline(src, bs, steps):,.0f}"))
    print(rows[-1], flush=True)
    return src

  add("digits (sklearn 8x8 -> 32)", lambda: sources.create_source(_cfg(image_size=32)))
  mnist = add("mnist idx.gz (test, 28)", lambda: sources.create_source(
      _cfg(name="mnist", path=str(shared / "mnist"), split="test", image_size=28)))
  cifar_cfg = _cfg(name="cifar10", path=str(shared / "cifar10_test_jpg"), split="test",
                   image_size=32)
  add("cifar10 JPEG folder, decoded once (32)", lambda: sources.create_source(cifar_cfg))
  add("cifar10 JPEG folder, lazy decode (32)", lambda: sources.create_source(
      _cfg(**{**cifar_cfg.to_dict(), "max_in_memory_gb": 0.0})))
  add("cifar10 JPEG folder, lazy decode + ADM resize (256)", lambda: sources.create_source(
      _cfg(**{**cifar_cfg.to_dict(), "max_in_memory_gb": 0.0, "image_size": 256})))
  datasets.write_npz(tmp / "mnist.npz", mnist.images, mnist.labels)
  add("npz (mnist test, 28)", lambda: sources.create_source(
      _cfg(name="npz", path=str(tmp / "mnist.npz"), image_size=28)))
  # Latents at DiT's ImageNet-256 shape (32x32x4, mean+logvar, 2 flips), 4096 examples. The
  # shard contents come from a cheap stand-in encoder (8x8 average pool): reading and posterior
  # sampling cost does not depend on the values.
  big = sources.create_source(_cfg(**{**cifar_cfg.to_dict(), "image_size": 256,
                                      "max_in_memory_gb": 0.0, "max_examples": 4096}))
  pool = lambda x: (x.reshape(x.shape[0], 32, 8, 32, 8, 3).mean((2, 4)) @ np.ones((3, 4)) / 3,
                    np.full(x.shape[:1] + (32, 32, 4), -10.0, np.float32))
  latent_format.write_latents(big, pool, tmp / "latents", shard_size=1024, batch_size=256,
                              progress=False, meta_extra={"scaling_factor": 0.18215})
  add("latents 32x32x4 (mmap .npy, posterior sample)", lambda: sources.create_source(
      _cfg(name="latents", path=str(tmp / "latents"), image_size=256)))

  ext = []
  for size in map(int, _VAE_SIZES.value):
    src = sources.create_source(_cfg(**{**cifar_cfg.to_dict(), "image_size": size,
                                        "max_examples": _VAE_IMAGES.value}))
    ips = bench_extraction(src, size, _VAE_BATCH.value, _VAE_IMAGES.value, tmp / f"ext{size}")
    ext.append((f"SD VAE encode, {size}px, both flips, batch {_VAE_BATCH.value}",
                _VAE_IMAGES.value, f"{size // 8}x{size // 8}x4", f"{ips:.2f}"))
    print(ext[-1], flush=True)

  dev = jax.devices()[0]
  print(f"\nmachine: {platform.processor() or platform.machine()}, {jax.device_count()} x "
        f"{dev.platform} device ({dev.device_kind}), jax {jax.__version__}")
  print(f"\n| source | examples | example shape | load s | images/s (batch {bs}) |")
  print("|---|---:|---|---:|---:|")
  for r in rows:
    print("| " + " | ".join(map(str, r)) + " |")
  print("\n| latent extraction | images | latent shape | images/s |")
  print("|---|---:|---|---:|")
  for r in ext:
    print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
  app.run(main)
