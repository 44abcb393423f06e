"""Bisects the train step's whole-program slowdown on XLA:CPU: the same DiT grown program by program.

  python tools/bench_bisect.py --model=DiT-S/2 --batch=8 --steps=5      # latent 32x32x4, as bench_train

Each row is one jitted program on one device, timed as the median of --steps calls after a warm-up:
fwd+bwd of the DiT with 1, 2, 4 and all blocks (an eps-MSE loss), then at full depth + the hybrid
loss (eps-MSE + VLB with learned Sigma), + AdamW, + the EMA update, and the trainer's own step
(`train_step.train_step`: + label dropout, the non-finite guard and its metrics). Every program
once with the blocks unrolled and once under `nn.scan`. GFLOP/s is the model's training FLOPs,
6 x paper Gflops (MACs per image) x batch, over the time, the same count for every program of one
depth (XLA's cost analysis counts a scanned loop's body once); numpy's fp32 matmul rate, measured
in the same run, is the machine's reference. Prints a markdown table.
"""
import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from dit_jax.objectives import diffusion as diffusion_lib  # noqa: E402
from dit_jax import models  # noqa: E402
from dit_jax import sharding as sharding_lib  # noqa: E402
from dit_jax.training import train_step  # noqa: E402
from tools import bench_train  # noqa: E402


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


def _time(compiled, args, steps):
  jax.block_until_ready(compiled(*args))
  ts = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _train_flops(model, batch: int) -> float:
  return 6 * models.gflops(model) * 1e9 * batch


def _row(name, layout, compiled, args, steps, flops):
  s = _time(compiled, args, steps)
  return dict(program=name, layout=layout, ms=1e3 * s, gflops_s=flops / s / 1e9)


def run(args) -> list:
  x, noise, y, t = bench_train.random_inputs(args)
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
    shardings = train_step.state_shardings(model, tx, mesh)[1]
    step = train_step.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings, 0.9999)
    state = train_step.create_train_state(model, tx, mesh, 0)[0]
    batch = dict(image=x, label=y)
    compiled = step.lower(state, batch).compile()
    flops = _train_flops(model, args.batch)
    jax.block_until_ready(compiled(state, batch))
    state = train_step.create_train_state(model, tx, mesh, 0)[0]
    ts = []
    for _ in range(args.steps + 1):  # the step donates its state: feed it its own output
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      ts.append(time.perf_counter() - t0)
    s = statistics.median(ts[1:])
    rows.append(dict(program="trainer's step (+ dropout, guard, metrics)", layout=layout,
                     ms=1e3 * s, gflops_s=flops / s / 1e9))
    print(rows[-1], flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_train.add_shape_args(p)
  p.add_argument("--steps", type=int, default=5)
  args = p.parse_args(argv)
  rate = bench_train.matmul_gflops()
  rows = run(args)
  print(f"\n{args.model}, batch {args.batch}, {args.input_size}x{args.input_size}x{args.in_channels}, "
        f"fp32, 1 device; numpy fp32 4096^2 matmul {rate:.0f} GFLOP/s in this run\n")
  print("| program | layout | ms/step | GFLOP/s | vs 1 block |")
  print("|---|---|---:|---:|---:|")
  for r in rows:
    base = next(b["gflops_s"] for b in rows if b["layout"] == r["layout"])
    print(f"| {r['program']} | {r['layout']} | {r['ms']:.0f} | {r['gflops_s']:.0f} | "
          f"{r['gflops_s'] / base:.2f} |")
  return rows


if __name__ == "__main__":
  main()
