"""What the benchmarks (tools/bench_*.py) and the performance experiments (experiments/) share.

Shape flags, seeded random inputs, the trainer's step as they jit it, timing, the numpy matmul
rate they compare against, the training-FLOP count and a markdown table. jax and numpy only: no
torch, clu, ml_collections or tensorflow (tools/bench_gpu.py runs where those are missing).
"""
import statistics
import time
from typing import Callable

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dit_jax.models import flops as flops_lib
from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.training import train_step


def define_shape_flags(model: str | None = "DiT-S/2") -> None:
  """Defines the shared absl flags: --model (unless `model` is None), --batch, --input_size and
  --in_channels. Call at a script's top level; read them as flags.FLAGS.batch etc."""
  if model:
    flags.DEFINE_string("model", model, "Model name, e.g. DiT-S/2.")
  flags.DEFINE_integer("batch", 8, "Global batch size.")
  flags.DEFINE_integer("input_size", 32, "Latent side (256 px images: 32).")
  flags.DEFINE_integer("in_channels", 4, "Latent channels.")


def image_shape(batch: int, input_size: int, in_channels: int) -> tuple:
  return (batch, input_size, input_size, in_channels)


def random_batch(batch: int, input_size: int, in_channels: int, num_classes: int = 1000) -> dict:
  """A seeded numpy train batch {image (B, H, W, C) float32, label (B,) int32}: the same in
  every benchmark."""
  rng = np.random.default_rng(0)
  return dict(
      image=rng.standard_normal(image_shape(batch, input_size, in_channels)).astype(np.float32),
      label=rng.integers(0, num_classes, batch).astype(np.int32))


def random_inputs(batch: int, input_size: int, in_channels: int, num_classes: int = 1000):
  """Seeded (x, noise, y, t) for a model's forward/backward outside the trainer's step."""
  shape = image_shape(batch, input_size, in_channels)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  noise = jnp.asarray(rng.standard_normal(shape, np.float32))
  y = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
  t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  return x, noise, y, t


def trainer_step(model, mesh):
  """(tx, step): DiT's AdamW (lr 1e-4, no weight decay) and the trainer's jitted
  `train_step.train_step` for `model` on `mesh` (the diffusion objective, EMA decay 0.9999)."""
  tx = optax.adamw(1e-4, weight_decay=0.0)
  shardings = train_step.state_shardings(model, tx, mesh)[1]
  step = train_step.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings,
                                   ema_decay=0.9999)
  return tx, step


def time_steps(step: Callable, carry=None, *, steps: int, warmup: int = 0):
  """Calls `carry, out = step(carry)` warmup + steps times, each until `out` is ready.

  Returns (the last carry, the last out, the wall seconds of the `steps` timed calls). A train step
  threads its state through `carry` (it may donate it); a stateless call ignores it.
  """
  times, out = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    carry, out = step(carry)
    jax.block_until_ready(out)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return carry, out, times


def median_seconds(fn: Callable, *, steps: int, warmup: int = 1) -> float:
  """Median wall seconds of `steps` calls of fn() (blocked on its result) after `warmup`."""
  return statistics.median(time_steps(lambda c: (c, fn()), steps=steps, warmup=warmup)[2])


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
  """This machine's fp32 numpy matmul rate (GFLOP/s, best of `repeats`) on n x n matrices."""
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
  a @ b
  best = min(time_steps(lambda c: (c, a @ b), steps=repeats)[2])
  return 2 * n ** 3 / best / 1e9


def train_step_flops(gflops_per_image: float, batch: int) -> float:
  """Hardware FLOPs of one train step: the paper's training compute (3 x forward MACs per image,
  flops.training_gflops) at 2 FLOPs per MAC, i.e. 6 x Gflops x batch x 1e9."""
  return flops_lib.training_gflops(gflops_per_image, batch) * flops_lib.FLOPS_PER_MAC * 1e9


def format_value(v) -> str:
  """A table cell: '-' for missing, 3 significant digits below 100, whole numbers above."""
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
  return str(v)


def markdown_table(rows: list, cols: list, fmt: Callable = format_value) -> str:
  """A markdown table of dict rows, a column per key in `cols` (fmt(None) where a row lacks it)."""
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(k)) for k in cols) + " |" for r in rows]
  return "\n".join(lines)
