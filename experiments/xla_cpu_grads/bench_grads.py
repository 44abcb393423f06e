"""What the two hand-written backward passes buy: a DiT's gradient program with and without them.

  python experiments/xla_cpu_grads/bench_grads.py --model=DiT-S/2 --batch=8 --rounds=5  # 32x32x4

Four programs of the same model, each jax.grad of an eps-MSE loss, jitted on one device:
  jax     flax's Dense/DenseGeneral and jax.nn.dot_product_attention(implementation="xla")
  dense   + dit_jax.models.dense_dot (the kernel gradient in the kernel's layout)
  attn    + dit_jax.models.attention's backward instead of autodiff of jax's attention
  both    what the models use
The calls are interleaved round by round (this VM drifts by tens of percent within minutes), and
each row gives the minimum and median over the rounds and its ratio to `jax` by minimum. The
parameters are perturbed off adaLN-Zero's zeros so that every weight has a gradient, and the
largest gradient difference to `jax` is printed (float32 rounding, not a different answer).
"""
import statistics

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax import benchmarking
from dit_jax import models
from dit_jax.models import dense_dot

FLAGS = flags.FLAGS
benchmarking.define_shape_flags()
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")

VARIANTS = {"jax": (False, "xla"), "dense": (True, "xla"), "attn": (False, None),
            "both": (True, None)}


def compile_variant(name, args, x, t, y, noise):
  """(compiled grad program, params) with the variant's dense layers and attention."""
  use_dense_dot, attention_impl = VARIANTS[name]
  kept = dense_dot.Dense, dense_dot.DenseGeneral
  if not use_dense_dot:  # the models look these up when they are traced
    dense_dot.Dense, dense_dot.DenseGeneral = nn.Dense, nn.DenseGeneral
  try:
    model = models.build(args.model, input_size=args.input_size, in_channels=args.in_channels,
                         num_classes=1000, attention_impl=attention_impl)
    params = model.init(jax.random.key(0), x, t, y)["params"]
    leaves, tree = jax.tree.flatten(params)
    params = tree.unflatten([a + 0.02 * jax.random.normal(jax.random.key(i), a.shape)
                             for i, a in enumerate(leaves)])
    c = x.shape[-1]
    loss = lambda p: jnp.mean((model.apply({"params": p}, x, t, y)[..., :c] - noise) ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile(), params
  finally:
    dense_dot.Dense, dense_dot.DenseGeneral = kept


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  x, noise, y, t = benchmarking.random_inputs(args.batch, args.input_size, args.in_channels)
  rate = benchmarking.matmul_gflops()
  programs = {name: compile_variant(name, args, x, t, y, noise) for name in VARIANTS}
  grads = {name: jax.block_until_ready(c(params)) for name, (c, params) in programs.items()}
  times = {name: [] for name in programs}
  for _ in range(args.rounds):
    for name, (c, params) in programs.items():
      times[name] += benchmarking.time_steps(lambda _, c=c, p=params: (None, c(p)), steps=1)[2]
  print(f"\n{args.model}, batch {args.batch}, {args.input_size}x{args.input_size}x"
        f"{args.in_channels}, fp32, 1 device, {args.rounds} interleaved rounds; numpy fp32 4096^2 "
        f"matmul {rate:.0f} GFLOP/s in this run\n")
  print("| program | min ms | median ms | jax/this (min) | max abs grad diff vs jax |")
  print("|---|---:|---:|---:|---:|")
  base = min(times["jax"])
  for name, ts in times.items():
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(grads["jax"])))
    print(f"| {name} | {1e3 * min(ts):.0f} | {1e3 * statistics.median(ts):.0f} | "
          f"{base / min(ts):.2f} | {diff:.1e} |")


if __name__ == "__main__":
  app.run(main)
