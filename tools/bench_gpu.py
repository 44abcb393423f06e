"""The prepared device check: DiT training steps on one GPU, bf16, per implementation choice.

  python tools/bench_gpu.py                 # one H100/H200: about 6-9 minutes (--budget_s=540)
  python tools/bench_gpu.py --smoke         # CPU dry run of the same code path (tiny shapes, CI)

Measures, per row: compile time, median step time (3 warm-up + 15 timed steps), images/s, TFLOP/s
and MFU, XLA's compiled memory (arguments + temporaries) and the process's peak device memory.
Rows: DiT-S/2, B/2 (batch 256), L/2 and XL/2 (batch 64, which fits an 80 GB H100 without remat)
with the defaults a GPU gets (attention 'auto' -> cuDNN, dense_dot's custom backward off, no remat);
then XL/2 with XLA's and dit_jax's own attention, with dense_dot's backward on, and with remat.
Once --budget_s has passed, the remaining rows are recorded as skipped, so the table is written
within the device window.

Imports only jax, flax, optax, numpy, absl (optax's dependency) and dit_jax's pure modules (no
ml_collections, clu, tensorflow: the device machine does not have them; importing any of them here
fails on purpose). MFU = 2 FLOPs per MAC x the paper's training compute (flops.training_gflops:
3 x forward Gflops (MACs/image) x images/s) / peak; the peak is the card's dense bf16 number from
dit_jax.training.hardware (H100/H200 SXM: 989 TFLOP/s). A measured large bf16 matmul rate is
printed alongside. Results: a markdown table on stdout and in $OUT/bench_gpu.md (or --out), and
JSON beside it.
"""
import contextlib
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
from dit_jax.models import dense_dot  # noqa: E402
from dit_jax.training import hardware  # noqa: E402
from dit_jax.training import train_step  # noqa: E402

FLAGS = flags.FLAGS
# model:batch[:attention[:dense_dot[:remat]]]; attention auto | cudnn | xla | own; dense_dot on | off
# (off: JAX's transpose rule, what a GPU gets); remat on | off.
DEFAULT_RUNS = ("DiT-S/2:256,DiT-B/2:256,DiT-L/2:64,DiT-XL/2:64,DiT-XL/2:64:xla,DiT-XL/2:64:own,"
                "DiT-XL/2:64:auto:on,DiT-XL/2:64:auto:off:on")
flags.DEFINE_string("runs", DEFAULT_RUNS, "Rows: model:batch[:attention[:dense_dot[:remat]]].")
flags.DEFINE_integer("input_size", 32, "Latent side.")
flags.DEFINE_integer("steps", 15, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
flags.DEFINE_float("budget_s", 540, "Skip the remaining rows once this many seconds have passed.")
flags.DEFINE_bool("smoke", False, "CPU dry run: 2-block width-64 models, 8x8 latents, batch 4, "
                  "1 + 2 steps, one row per implementation choice.")
flags.DEFINE_string("out", "", "Markdown table path (default $OUT/bench_gpu.md); JSON beside it.")

COLUMNS = ["model", "batch", "attention", "dense_dot", "remat", "compile_s", "step_ms", "images_s",
           "tflop_s", "mfu", "xla_mem_gib", "peak_gib", "error"]
SMOKE_SHAPE = dict(depth=2, hidden_size=64, num_heads=2)


@dataclasses.dataclass(frozen=True)
class Row:
  model: str
  batch: int
  attention: str = "auto"
  dense_dot: str = "off"
  remat: str = "off"


def parse_runs(spec: str) -> list:
  rows = []
  for item in spec.split(","):
    parts = item.split(":")
    row = Row(parts[0], int(parts[1]), *parts[2:])
    if row.attention not in ("auto", "cudnn", "xla", "own") or row.dense_dot not in ("on", "off") \
        or row.remat not in ("on", "off"):
      raise ValueError(f"--runs {item!r}: model:batch[:auto|cudnn|xla|own[:on|off[:on|off]]]")
    rows.append(row)
  return rows


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


@contextlib.contextmanager
def dense_backward(on: bool):
  """dense_dot's custom backward forced on or off (its own rule: on the CPU only)."""
  saved = dense_dot.custom_backward_on
  dense_dot.custom_backward_on = lambda platform: on
  try:
    yield
  finally:
    dense_dot.custom_backward_on = saved


def build(row: Row, input_size: int, smoke: bool):
  attention = "" if row.attention == "own" else row.attention
  model = models.build(row.model, input_size=input_size, in_channels=4, num_classes=1000,
                       scan_layers=True, remat=row.remat == "on", attention_impl=attention,
                       dtype=jnp.bfloat16, param_dtype=jnp.float32,
                       **(SMOKE_SHAPE if smoke else {}))
  return model


def run_one(row: Row, input_size: int, steps: int, warmup: int, smoke: bool) -> dict:
  """Compile and time the trainer's train_step for one row."""
  model = build(row, input_size, smoke)
  mesh = sharding_lib.create_mesh((-1, 1, 1), devices=jax.devices()[:1])  # one device
  with dense_backward(row.dense_dot == "on"):
    tx, step = benchmarking.trainer_step(model, mesh)
    state, _ = train_step.create_train_state(model, tx, mesh, seed=0)
    data = jax.device_put(benchmarking.random_batch(row.batch, model.input_size, 4),
                          train_step.batch_shardings(mesh))
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
  _, metrics, times = benchmarking.time_steps(lambda s: compiled(s, data), state, steps=steps,
                                              warmup=warmup)
  step_s = statistics.median(times)
  gflops = models.gflops(model)
  mem = compiled.memory_analysis()
  out = dict(dataclasses.asdict(row), attention=models.implementations(model)["attention_impl"],
             compile_s=round(compile_s, 1), step_ms=round(1e3 * step_s, 2),
             images_s=round(row.batch / step_s, 1),
             tflop_s=round(benchmarking.train_step_flops(gflops, row.batch) / step_s / 1e12, 3),
             loss=float(metrics["loss"]), gflops=round(gflops, 3),
             xla_mem_gib=round((mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2 ** 30, 2))
  if peak_tflops():
    out["mfu"] = round(out["tflop_s"] / peak_tflops(), 4)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:  # the process's peak so far (it never goes down)
    out["peak_gib"] = round(stats["peak_bytes_in_use"] / 2 ** 30, 2)
  return out


def measure(rows: list, input_size: int, steps: int, warmup: int, smoke: bool,
            budget_s: float) -> list:
  results, t_start = [], time.perf_counter()
  for row in rows:
    if time.perf_counter() - t_start > budget_s:
      r = dict(dataclasses.asdict(row), error=f"skipped: --budget_s={budget_s:g} passed")
    else:
      try:
        r = run_one(row, input_size, steps, warmup, smoke)
      except Exception as e:  # pylint: disable=broad-except
        # e.g. cuDNN attention on the CPU, or out of memory: record and go on
        r = dict(dataclasses.asdict(row),
                 error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}".replace("|", "/"))
    results.append(r)
    print(json.dumps(r), flush=True)
  return results


def output_path() -> str:
  if FLAGS.out:
    return FLAGS.out
  return os.path.join(os.environ["OUT"], "bench_gpu.md") if os.environ.get("OUT") else ""


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows, input_size, steps, warmup = parse_runs(FLAGS.runs), FLAGS.input_size, FLAGS.steps, \
      FLAGS.warmup
  if FLAGS.smoke:
    input_size, steps, warmup = 8, 2, 1
    # one row per implementation choice as resolved here ('auto' is 'own' on the CPU): the tiny
    # shapes make the model names alike
    key = lambda r: (models.implementations(build(r, 8, True))["attention_impl"], r.dense_dot,
                     r.remat)
    rows = list({key(r): dataclasses.replace(r, batch=4) for r in rows}.values())
  dev = jax.devices()[0]
  header = (f"jax {jax.__version__}, 1 of {jax.device_count()} x {dev.device_kind} "
            f"({dev.platform}), peak bf16 {peak_tflops()} TFLOP/s"
            + (", --smoke (tiny shapes)" if FLAGS.smoke else ""))
  print(header, flush=True)
  info = dict(device=dev.device_kind, jax=jax.__version__, smoke=FLAGS.smoke)
  if dev.platform == "gpu":
    info["matmul_bf16_tflops_8192"] = round(matmul_tflops(8192), 1)
    header += f"; bf16 matmul 8192^3: {info['matmul_bf16_tflops_8192']} TFLOP/s"
  t0 = time.perf_counter()
  results = measure(rows, input_size, steps, warmup, FLAGS.smoke, FLAGS.budget_s)
  info["total_s"] = round(time.perf_counter() - t0, 1)
  table = benchmarking.markdown_table(results, COLUMNS,
                                      fmt=lambda v: "-" if v is None else str(v))
  text = f"{header}; {info['total_s']} s in all\n\n{table}\n"
  print("\n" + text)
  out = output_path()
  if out:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(dict(info, runs=results), indent=1))
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
  app.run(main)
