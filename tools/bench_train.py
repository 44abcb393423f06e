"""Train-step benchmark: step time, images/s, achieved GFLOP/s and MFU, compile time, memory.

  python tools/bench_train.py --models=DiT-S/8,DiT-S/4,DiT-S/2 --batch=8 --torch --matmul
  python tools/bench_train.py --models=DiT-XL/2 --scan --compile_only     # compile time only

JAX: the real `train_step.train_step` (AdamW, EMA, the hybrid MSE+VLB loss, non-finite guard), jitted
with the trainer's shardings on a (data, fsdp, tensor) mesh. --torch: the same model in PyTorch
(diffusers' DiTTransformer2DModel, fp32, `torch.set_num_threads(--threads)`) with an equivalent
step (noise, q_sample, forward, MSE on eps + the variance channels' loss, backward, AdamW, EMA), and
the jax/torch speed ratio. --matmul: this machine's fp32 numpy matmul rate on 4096^2 matrices, the
yardstick for achieved GFLOP/s. FLOPs per step = 6 x paper Gflops (MACs) x batch.
"""
import argparse
import functools
import os
import resource
import statistics
import sys
import time

import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dit_jax import diffusion as diffusion_lib  # noqa: E402
from dit_jax import flops as flops_lib  # noqa: E402
from dit_jax import sharding as sharding_lib  # noqa: E402
from dit_jax import models  # noqa: E402
from dit_jax import train_step  # noqa: E402


def matmul_gflops(n=4096, repeats=5) -> float:
  """fp32 numpy matmul rate (GFLOP/s, best of `repeats`) on n x n matrices."""
  a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
  b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
  a @ b
  best = min(_timed(lambda: a @ b) for _ in range(repeats))
  return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def build(name, args):
  model = models.build(name, input_size=args.input_size, in_channels=args.in_channels,
                         num_classes=1000, scan_layers=args.scan, remat=args.remat,
                         attention_impl=args.attention or None,
                         dtype=models.dtype_of(args.dtype), param_dtype=jnp.float32)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  mesh = sharding_lib.create_mesh(tuple(int(v) for v in args.mesh.split(",")))
  sharding_lib.check_batch(args.batch, mesh)
  step = train_step.jit_train_step(model, diffusion_lib.create(), tx, mesh,
                              train_step.state_shardings(model, tx, mesh)[1], ema_decay=0.9999)
  return model, tx, mesh, step


def bench_jax(name, args) -> dict:
  """Compile and time the trainer's step for one model."""
  model, tx, mesh, step = build(name, args)
  abstract, shardings = train_step.state_shardings(model, tx, mesh)
  bs = train_step.batch_shardings(mesh)
  shape = (args.batch, args.input_size, args.input_size, args.in_channels)
  batch_abs = dict(image=jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bs["image"]),
                   label=jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=bs["label"]))
  state_abs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           abstract, shardings)
  t0 = time.perf_counter()
  lowered = step.lower(state_abs, batch_abs)
  compiled = lowered.compile()
  out = dict(model=name, batch=args.batch, compile_s=time.perf_counter() - t0,
             gflops=models.gflops(model), params_m=flops_lib.count_params(abstract.params) / 1e6)
  mem = compiled.memory_analysis()
  if mem is not None:
    out["mem_gib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 30
  if args.compile_only:
    return out
  state, _ = train_step.create_train_state(model, tx, mesh, seed=0)
  rng = np.random.default_rng(0)
  batch = jax.device_put(dict(
      image=rng.standard_normal(shape).astype(np.float32),
      label=rng.integers(0, 1000, args.batch).astype(np.int32)), bs)
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  out["step_ms"] = 1e3 * statistics.median(times)
  out["images_s"] = args.batch / (out["step_ms"] / 1e3)
  out["gflop_s"] = 6 * out["gflops"] * args.batch / (out["step_ms"] / 1e3)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["peak_gib"] = stats["peak_bytes_in_use"] / 2 ** 30
  out["maxrss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  return out


def bench_torch(name, args) -> dict:
  """The same model's train step in PyTorch (diffusers DiTTransformer2DModel, fp32)."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DiTTransformer2DModel  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  m = models.build(name)
  p, row = m.patch_size, m
  c = args.in_channels
  model = DiTTransformer2DModel(
      num_attention_heads=row.num_heads, attention_head_dim=row.hidden_size // row.num_heads,
      in_channels=c, out_channels=2 * c, num_layers=row.depth, sample_size=args.input_size,
      patch_size=p, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
  model.train()
  ema = [q.detach().clone() for q in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  abar = torch.tensor(np.cumprod(1 - diffusion_lib.linear_betas(1000)), dtype=torch.float32)
  x0 = torch.randn(args.batch, c, args.input_size, args.input_size)
  y = torch.randint(0, 1000, (args.batch,))

  def step():
    t = torch.randint(0, 1000, (args.batch,))
    noise = torch.randn_like(x0)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    drop = torch.rand(args.batch) < 0.1
    out = model(x_t, timestep=t, class_labels=torch.where(drop, 1000, y)).sample
    eps, var = out[:, :c], out[:, c:]
    # MSE on eps plus a loss on the variance channels (the VLB's cost is elementwise, negligible).
    loss = ((eps - noise) ** 2).mean() + (var ** 2).mean() * 1e-3
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(model.parameters()), 1 - 0.9999)  # pylint: disable=protected-access

  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    step()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  return dict(torch_ms=1e3 * statistics.median(times))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="DiT-S/8,DiT-S/4,DiT-S/2")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_size", type=int, default=32, help="latent side (256 px images: 32)")
  p.add_argument("--in_channels", type=int, default=4)
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes")
  p.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
  p.add_argument("--attention", default="", help="'' / xla / cudnn")
  p.add_argument("--scan", action="store_true", help="scan over layers")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--compile_only", action="store_true")
  p.add_argument("--torch", action="store_true", help="also time diffusers' DiT in PyTorch")
  p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
  p.add_argument("--matmul", action="store_true", help="measure the numpy fp32 matmul rate")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak for MFU")
  args = p.parse_args()

  print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, mesh {args.mesh}, dtype {args.dtype}, batch {args.batch}, "
        f"scan {args.scan}, remat {args.remat}")
  rate = matmul_gflops() if args.matmul else 0.0
  if rate:
    print(f"numpy fp32 matmul 4096^2: {rate:.1f} GFLOP/s")
  peak = args.peak_tflops * 1e12 * jax.device_count()
  cols = ["model", "batch", "params_m", "gflops", "compile_s", "mem_gib", "step_ms", "images_s",
          "gflop_s", "pct_matmul", "mfu", "torch_ms", "jax/torch"]
  rows = []
  for name in args.models.split(","):
    r = bench_jax(name, args)
    if rate and "gflop_s" in r:
      r["pct_matmul"] = 100 * r["gflop_s"] / rate
    if peak and "gflop_s" in r:
      r["mfu"] = r["gflop_s"] * 1e9 / peak
    if args.torch and not args.compile_only:
      r.update(bench_torch(name, args))
      r["jax/torch"] = r["torch_ms"] / r["step_ms"]
    rows.append(r)
    print("  ".join(f"{k}={_fmt(r.get(k))}" for k in cols if k in r), flush=True)
  print()
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    print("| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |")


def _fmt(v):
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
  return str(v)


if __name__ == "__main__":
  main()
