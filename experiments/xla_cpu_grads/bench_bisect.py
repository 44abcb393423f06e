"""Bisects the train step's whole-program slowdown on XLA:CPU: one DiT grown program by program.

  python experiments/xla_cpu_grads/bench_bisect.py --model=DiT-S/2 --batch=8 --steps=5  # 32x32x4

Each row is one jitted program on one device, timed as the median of --steps calls after a warm-up:
fwd+bwd of the DiT with 1, 2, 4 and all blocks (an eps-MSE loss), then at full depth + the hybrid
loss (eps-MSE + VLB with learned Sigma), + AdamW, + the EMA update, and the trainer's own step
(`train_step.train_step`: + label dropout, the non-finite guard and its metrics). Every program
once with the blocks unrolled and once under `nn.scan`. GFLOP/s is the model's training FLOPs,
2 x flops.training_gflops (3 x paper Gflops (MACs per image) x batch), over the time, the same
count for every program of one depth (XLA's cost analysis counts a scanned loop's body once);
numpy's fp32 matmul rate, measured in the same run, is the machine's reference. Prints a markdown
table.
"""
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from dit_jax import benchmarking
from dit_jax import models
from dit_jax import sharding as sharding_lib
from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.training import train_step

FLAGS = flags.FLAGS
benchmarking.define_shape_flags()
flags.DEFINE_integer("steps", 5, "Timed calls per program (median reported, after one warm-up).")


def _programs(model, depth_label, full: bool):
  """{name: (fn(params, opt_state, ema, x, y, noise, t) -> outputs)} for one model."""
  diffusion = diffusion_lib.create()
  tx = optax.adamw(1e-4, weight_decay=0.0)

  def mse_loss(params, x, y, noise, t):
    out = model.apply({"params": params}, x, t, y)
    return jnp.mean((out[..., :x.shape[-1]] - noise) ** 2)

  def hybrid_loss(params, x, y, noise, t):
    def model_fn(x_t, t_orig):
      return model.apply({"params": params}, x_t, t_orig, y)
    return jnp.mean(diffusion.training_losses(model_fn, x, t, noise)["loss"])

  def grads(loss):
    return lambda p, o, e, x, y, n, t: jax.grad(loss)(p, x, y, n, t)

  def adamw(p, o, e, x, y, n, t):
    g = jax.grad(hybrid_loss)(p, x, y, n, t)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o

  def adamw_ema(p, o, e, x, y, n, t):
    p, o = adamw(p, o, e, x, y, n, t)
    return p, o, jax.tree.map(lambda a, b: a * 0.9999 + (1 - 0.9999) * b, e, p)

  out = {f"fwd+bwd, {depth_label} (eps-MSE)": grads(mse_loss)}
  if full:
    out.update({"+ hybrid loss (MSE + VLB)": grads(hybrid_loss), "+ AdamW": adamw,
                "+ EMA": adamw_ema})
  return out, tx


def _train_flops(model, batch: int) -> float:
  return benchmarking.train_step_flops(models.gflops(model), batch)


def _row(name, layout, compiled, args, steps, flops):
  s = benchmarking.median_seconds(lambda: compiled(*args), steps=steps, warmup=1)
  return dict(program=name, layout=layout, ms=1e3 * s, gflops_s=flops / s / 1e9)


def run(args) -> list:
  """The table's rows for the shape flags in `args` (flags.FLAGS)."""
  x, noise, y, t = benchmarking.random_inputs(args.batch, args.input_size, args.in_channels)
  full_depth = models.build(args.model, input_size=args.input_size, in_channels=args.in_channels,
                            num_classes=1000).depth
  rows = []
  for scan in (False, True):
    layout = "scan" if scan else "unrolled"
    for depth in sorted({1, 2, 4, full_depth}):
      model = models.build(args.model, input_size=args.input_size, in_channels=args.in_channels,
                           num_classes=1000, depth=depth, scan_layers=scan)
      params = model.init(jax.random.key(0), x, t, y)["params"]
      label = f"{depth} block{'s' if depth > 1 else ''}"
      progs, tx = _programs(model, label, full=depth == full_depth)
      opt_state = tx.init(params)
      call = (params, opt_state, params, x, y, noise, t)
      for name, fn in progs.items():
        rows.append(_row(name, layout, jax.jit(fn).lower(*call).compile(), call, args.steps,
                         _train_flops(model, args.batch)))
        print(rows[-1], flush=True)
    # The trainer's step itself, on a one-device mesh.
    mesh = sharding_lib.create_mesh((1, 1, 1), jax.devices()[:1])
    tx, step = benchmarking.trainer_step(model, mesh)
    state = train_step.create_train_state(model, tx, mesh, 0)[0]
    batch = dict(image=x, label=y)
    compiled = step.lower(state, batch).compile()
    flops = _train_flops(model, args.batch)
    # The step donates its state: feed it its own output.
    _, _, ts = benchmarking.time_steps(lambda s: compiled(s, batch), state, steps=args.steps,
                                       warmup=2)
    s = statistics.median(ts)
    rows.append(dict(program="trainer's step (+ dropout, guard, metrics)", layout=layout,
                     ms=1e3 * s, gflops_s=flops / s / 1e9))
    print(rows[-1], flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  rate = benchmarking.matmul_gflops()
  rows = run(args)
  print(f"\n{args.model}, batch {args.batch}, "
        f"{args.input_size}x{args.input_size}x{args.in_channels}, fp32, 1 device; "
        f"numpy fp32 4096^2 matmul {rate:.0f} GFLOP/s in this run\n")
  print("| program | layout | ms/step | GFLOP/s | vs 1 block |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    base = next(b["gflops_s"] for b in rows if b["layout"] == r["layout"])
    print(f"| {r['program']} | {r['layout']} | {r['ms']:.0f} | {r['gflops_s']:.0f} | "
          f"{r['gflops_s'] / base:.2f} |")


if __name__ == "__main__":
  app.run(main)
