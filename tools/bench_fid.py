"""Feature-extraction throughput: dit_jax's Flax FID Inception vs pytorch-fid's InceptionV3 on one
CPU.

  python tools/bench_fid.py --batch_size 16 --iters 5 --image_size 32 --torch_threads 2

Both networks get random weights of the same architecture (speed does not depend on the values),
the same uint8 batch, and resize it to 299x299 themselves. Flax: jit, float32, on the default JAX
backend (CPU here). Torch: eval mode, no_grad, float32, torch.set_num_threads(--torch_threads).
"""
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np
import torch
import torchvision
from pytorch_fid import inception as pfi

from dit_jax import benchmarking
from dit_jax.evaluation import inception

_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per batch.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed batches (after one warm-up).")
_SIZE = flags.DEFINE_integer("image_size", 32, "Input side, resized to 299 inside.")
_THREADS = flags.DEFINE_integer("torch_threads", 2, "PyTorch intra-op threads.")


def _torch_model():
  """pytorch-fid's InceptionV3 built by its own code, the weight download replaced by random."""
  def random_state_dict(url, **kwargs):
    del url, kwargs
    torch.manual_seed(0)
    return torchvision.models.inception_v3(num_classes=inception.NUM_LOGITS, aux_logits=False,
                                           weights=None, init_weights=False).state_dict()
  original = pfi.load_state_dict_from_url
  pfi.load_state_dict_from_url = random_state_dict
  try:
    net = pfi.fid_inception_v3()
  finally:
    pfi.load_state_dict_from_url = original
  original_builder = pfi.fid_inception_v3
  pfi.fid_inception_v3 = lambda: net
  try:
    wrapper = pfi.InceptionV3([3], resize_input=True, normalize_input=True)
  finally:
    pfi.fid_inception_v3 = original_builder
  return net, wrapper.eval()


def _time(fn, iters):
  """Mean seconds of `iters` calls after one warm-up call (which compiles)."""
  return statistics.mean(benchmarking.time_steps(lambda c: (c, fn()), steps=iters, warmup=1)[2])


def main(argv):
  """Prints one table row per implementation."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  batch_size, iters, image_size, threads = _BATCH.value, _ITERS.value, _SIZE.value, _THREADS.value

  images = np.random.default_rng(0).integers(
      0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8)
  net, wrapper = _torch_model()
  params = inception.params_from_torch_state_dict(net.state_dict())
  feature_fn = inception.make_feature_fn(params)
  flax_run = lambda: jax.block_until_ready(feature_fn(images)["pool"])
  t0 = time.perf_counter()
  flax_run()
  compile_s = time.perf_counter() - t0
  flax_s = _time(flax_run, iters)

  torch.set_num_threads(threads)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0

  def torch_run():
    with torch.no_grad():
      return wrapper(x)[0]
  torch_s = _time(torch_run, iters)

  print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}; "
        f"batch {batch_size} of {image_size}x{image_size}x3 uint8 -> 299x299, "
        f"{iters} timed iterations after one warm-up")
  print("| implementation | images/s | ms/batch | first call (compile) s |")
  print("|---|---|---|---|")
  print(f"| dit_jax Flax InceptionV3 (jit, fp32, {jax.default_backend()}) | "
        f"{batch_size / flax_s:.2f} | {1000 * flax_s:.0f} | {compile_s:.1f} |")
  print(f"| pytorch-fid InceptionV3 (torch CPU, {threads} threads) | "
        f"{batch_size / torch_s:.2f} | {1000 * torch_s:.0f} | - |")


if __name__ == "__main__":
  app.run(main)
