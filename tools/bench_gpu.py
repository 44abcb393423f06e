"""GPU train-step benchmark: DiT-XL/2 and DiT-B/2, bf16, MFU, xla vs cudnn attention.

  python tools/bench_gpu.py                 # on one H100/H200: about 5-7 minutes
  python tools/bench_gpu.py --tiny          # CPU dry run of the same code path (seconds)

Sized for one H100 within 8 minutes: per (model, attention) one compile and 3 + 15 timed steps.
Imports only jax, flax, optax, numpy, absl (optax's dependency) and dit_jax's pure modules (no
ml_collections, clu, tensorflow: the device machine does not have them; importing any of them here
fails on purpose). MFU = 2 FLOPs per MAC x the paper's training compute (flops.training_gflops:
3 x forward Gflops (MACs/image) x images/s) / peak; the peak is the card's dense bf16 number from
dit_jax.training.hardware (H100/H200 SXM: 989 TFLOP/s). A measured large bf16 matmul rate is
printed alongside.
Results: a table on stdout and JSON in $OUT/bench_gpu.json (or --json).
"""
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

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dit_jax import benchmarking  # noqa: E402
from dit_jax import models  # noqa: E402
from dit_jax import sharding as sharding_lib  # noqa: E402
from dit_jax.training import hardware  # noqa: E402
from dit_jax.training import train_step  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("runs", "DiT-XL/2:64,DiT-B/2:256",
                    "model:batch pairs (global batch on the one device).")
flags.DEFINE_string("attention", "xla,cudnn", "Attention implementations to time.")
flags.DEFINE_integer("input_size", 32, "Latent side.")
flags.DEFINE_bool("remat", False, "Recompute block activations in the backward pass.")
flags.DEFINE_integer("steps", 15, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
flags.DEFINE_bool("tiny", False, "CPU dry run: 2-block width-64 models, 8x8, batch 4, 1 + 2 steps.")
flags.DEFINE_string("json", "", "Where to write results (default $OUT/bench_gpu.json).")


def peak_tflops() -> float:
  return hardware.peak_tflops(jax.devices()[0].device_kind)


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


def run_one(name, batch, attention, input_size, steps, warmup, tiny_shape) -> dict:
  """Compile and time the trainer's train_step for one (model, batch, attention)."""
  model = models.build(name, input_size=input_size, in_channels=4, num_classes=1000,
                       scan_layers=True, remat=FLAGS.remat, attention_impl=attention,
                       dtype=jnp.bfloat16, param_dtype=jnp.float32)
  if tiny_shape:  # --tiny: shrink the named model
    model = dataclasses.replace(model, **tiny_shape)
  mesh = sharding_lib.create_mesh((-1, 1, 1))
  sharding_lib.check_batch(batch, mesh)
  tx, step = benchmarking.trainer_step(model, mesh)
  state, _ = train_step.create_train_state(model, tx, mesh, seed=0)
  data = jax.device_put(benchmarking.random_batch(batch, model.input_size, 4),
                        train_step.batch_shardings(mesh))
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  state, metrics, times = benchmarking.time_steps(lambda s: compiled(s, data), state, steps=steps,
                                                  warmup=warmup)
  step_s = statistics.median(times)
  gflops = models.gflops(model)
  out = dict(model=name, batch=batch, attention=attention, compile_s=round(compile_s, 1),
             step_ms=round(1e3 * step_s, 2), images_s=round(batch / step_s, 1),
             tflop_s=round(benchmarking.train_step_flops(gflops, batch) / step_s / 1e12, 1),
             loss=float(metrics["loss"]), gflops=round(gflops, 3))
  peak = peak_tflops()
  if peak:
    out["mfu"] = round(out["tflop_s"] / peak, 4)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runs, input_size, steps, warmup, tiny_shape = (FLAGS.runs, FLAGS.input_size, FLAGS.steps,
                                                 FLAGS.warmup, {})
  if FLAGS.tiny:
    input_size, steps, warmup = 8, 2, 1
    tiny_shape = dict(depth=2, hidden_size=64, num_heads=2)
    runs = ",".join(f"{r.split(':')[0]}:4" for r in runs.split(","))

  dev = jax.devices()[0]
  print(f"jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} ({dev.platform}), "
        f"peak bf16 {peak_tflops()} TFLOP/s", flush=True)
  results = dict(device=dev.device_kind, jax=jax.__version__, runs=[])
  if dev.platform == "gpu":
    results["matmul_bf16_tflops_8192"] = round(matmul_tflops(8192), 1)
    print(f"bf16 matmul 8192^3: {results['matmul_bf16_tflops_8192']} TFLOP/s", flush=True)
  t_start = time.perf_counter()
  for run in runs.split(","):
    name, batch = run.split(":")
    for attention in FLAGS.attention.split(","):
      try:
        r = run_one(name, int(batch), attention, input_size, steps, warmup, tiny_shape)
      except Exception as e:  # pylint: disable=broad-except
        # e.g. cudnn attention on a CPU dry run, or out of memory: record and go on
        r = dict(model=name, batch=int(batch), attention=attention,
                 error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
      results["runs"].append(r)
      print(json.dumps(r), flush=True)
  results["total_s"] = round(time.perf_counter() - t_start, 1)
  cols = ["model", "batch", "attention", "compile_s", "step_ms", "images_s", "tflop_s", "mfu",
          "peak_gib", "error"]
  print("\n" + benchmarking.markdown_table(results["runs"], cols,
                                            fmt=lambda v: "-" if v is None else str(v)))
  out = FLAGS.json or (os.path.join(os.environ["OUT"], "bench_gpu.json") if os.environ.get("OUT")
                       else "")
  if out:
    pathlib.Path(out).write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
