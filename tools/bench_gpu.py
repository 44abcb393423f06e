"""GPU train-step benchmark: DiT-XL/2 and DiT-B/2, bf16, MFU, xla vs cudnn attention.

  python tools/bench_gpu.py                 # on one H100/H200: about 5-7 minutes
  python tools/bench_gpu.py --tiny          # CPU dry run of the same code path (seconds)

Sized for one H100 within 8 minutes: per (model, attention) one compile and 3 + 15 timed steps.
Imports only jax, flax, optax, numpy and dit_jax's pure modules (no ml_collections, clu, tensorflow:
the device machine does not have them; importing any of them here fails on purpose).
MFU = 6 x paper Gflops (MACs/image) x images/s / peak; the peak is the card's dense bf16 number
(H100/H200 SXM: 989 TFLOP/s). A measured large bf16 matmul rate is printed alongside.
Results: a table on stdout and JSON in $OUT/bench_gpu.json (or --json).
"""
import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time



class _Block:
  """Import hook: the device machine lacks these, so importing one fails here too."""
  NAMES = ("ml_collections", "clu", "tensorflow")

  def find_spec(self, name, path=None, target=None):
    del path, target
    if name.split(".")[0] in self.NAMES:
      raise ImportError(f"{name} is not available on the device machine (bench_gpu.py blocks it)")
    return None


sys.meta_path.insert(0, _Block())

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dit_jax.objectives import diffusion as diffusion_lib  # noqa: E402
from dit_jax import sharding as sharding_lib  # noqa: E402
from dit_jax import models  # noqa: E402
from dit_jax.training import train_step  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops() -> float:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), 0.0)


def matmul_tflops(n: int, dtype=jnp.bfloat16, repeats: int = 10) -> float:
  """Measured rate of an n x n x n matmul (TFLOP/s)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def run_one(name, batch, attention, args) -> dict:
  """Compile and time the trainer's train_step for one (model, batch, attention)."""
  model = models.build(name, input_size=args.input_size, in_channels=4, num_classes=1000,
                         scan_layers=True, remat=args.remat, attention_impl=attention,
                         dtype=jnp.bfloat16, param_dtype=jnp.float32)
  if args.tiny_shape:  # --tiny: shrink the named model
    model = dataclasses.replace(model, **args.tiny_shape)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  mesh = sharding_lib.create_mesh((-1, 1, 1))
  sharding_lib.check_batch(batch, mesh)
  state, shardings = train_step.create_train_state(model, tx, mesh, seed=0)
  step = train_step.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings, ema_decay=0.9999)
  bs = train_step.batch_shardings(mesh)
  rng = np.random.default_rng(0)
  data = jax.device_put(dict(
      image=rng.standard_normal((batch, model.input_size, model.input_size, 4)).astype(np.float32),
      label=rng.integers(0, 1000, batch).astype(np.int32)), bs)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  gflops = models.gflops(model)
  out = dict(model=name, batch=batch, attention=attention, compile_s=round(compile_s, 1),
             step_ms=round(1e3 * step_s, 2), images_s=round(batch / step_s, 1),
             tflop_s=round(6 * gflops * batch / step_s / 1e3, 1),
             loss=float(metrics["loss"]), gflops=round(gflops, 3))
  peak = peak_tflops()
  if peak:
    out["mfu"] = round(out["tflop_s"] / peak, 4)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
  del state, compiled
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--runs", default="DiT-XL/2:64,DiT-B/2:256",
                 help="model:batch pairs (global batch on the one device)")
  p.add_argument("--attention", default="xla,cudnn")
  p.add_argument("--input_size", type=int, default=32)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--steps", type=int, default=15)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--tiny", action="store_true", help="CPU dry run: 2-block width-64 models, 8x8")
  p.add_argument("--json", default="", help="where to write results (default $OUT/bench_gpu.json)")
  args = p.parse_args()
  args.tiny_shape = {}
  if args.tiny:
    args.input_size, args.steps, args.warmup = 8, 2, 1
    args.tiny_shape = dict(depth=2, hidden_size=64, num_heads=2)
    args.runs = ",".join(f"{r.split(':')[0]}:4" for r in args.runs.split(","))

  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} ({dev.platform}), "
        f"peak bf16 {peak_tflops()} TFLOP/s", flush=True)
  results = dict(device=dev.device_kind, jax=jax.__version__, runs=[])
  if dev.platform == "gpu":
    results["matmul_bf16_tflops_8192"] = round(matmul_tflops(8192), 1)
    print(f"bf16 matmul 8192^3: {results['matmul_bf16_tflops_8192']} TFLOP/s", flush=True)
  t_start = time.perf_counter()
  for run in args.runs.split(","):
    name, batch = run.split(":")
    for attention in args.attention.split(","):
      try:
        r = run_one(name, int(batch), attention, args)
      except Exception as e:  # pylint: disable=broad-except
        # e.g. cudnn attention on a CPU dry run, or out of memory: record and go on
        r = dict(model=name, batch=int(batch), attention=attention,
                 error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
      results["runs"].append(r)
      print(json.dumps(r), flush=True)
  results["total_s"] = round(time.perf_counter() - t_start, 1)
  cols = ["model", "batch", "attention", "compile_s", "step_ms", "images_s", "tflop_s", "mfu",
          "peak_gib", "error"]
  print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
  for r in results["runs"]:
    print("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
  out = args.json or (os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT")
                      else "")
  if out:
    pathlib.Path(out).write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
