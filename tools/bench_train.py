"""Train-step benchmark: step time, images/s, achieved GFLOP/s and MFU, compile time, memory.

  python tools/bench_train.py --models=DiT-S/8,DiT-S/4,DiT-S/2 --batch=8 --torch --matmul
  python tools/bench_train.py --models=DiT-XL/2 --scan --compile_only     # compile time only

JAX: the real `train_step.train_step` (AdamW, EMA, the hybrid MSE+VLB loss, non-finite guard), jitted
with the trainer's shardings on a (data, fsdp, tensor) mesh. --torch: the same model in PyTorch
(diffusers' DiTTransformer2DModel, fp32, `torch.set_num_threads(--threads)`) with the step of
facebookresearch/DiT's train.py (ADM's hybrid loss with learned Sigma, `TorchHybridLoss`; AdamW;
per-parameter EMA), and the jax/torch speed ratio. --matmul: this machine's fp32 numpy matmul rate
on 4096^2 matrices, the yardstick for achieved GFLOP/s. FLOPs per step = 6 x paper Gflops (MACs) x batch.
"""
import argparse
import math
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

from dit_jax.objectives import diffusion as diffusion_lib  # noqa: E402
from dit_jax.models import flops as flops_lib  # noqa: E402
from dit_jax import sharding as sharding_lib  # noqa: E402
from dit_jax import models  # noqa: E402
from dit_jax.training import train_step  # noqa: E402


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


def add_shape_args(p, model="DiT-S/2"):
  """The benchmarks' shared flags: --model (one; None for none), --batch and the latent shape."""
  if model:
    p.add_argument("--model", default=model)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--input_size", type=int, default=32, help="latent side (256 px images: 32)")
  p.add_argument("--in_channels", type=int, default=4)


def random_inputs(args):
  """(x, noise, y, t) for one batch of args' shape, seeded: the same in every benchmark."""
  shape = (args.batch, args.input_size, args.input_size, args.in_channels)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32))
  noise = jnp.asarray(rng.standard_normal(shape, np.float32))
  y = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
  t = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
  return x, noise, y, t


def build(name, args):
  depth = dict(depth=args.depth) if getattr(args, "depth", 0) else {}
  model = models.build(name, input_size=args.input_size, in_channels=args.in_channels,
                         num_classes=1000, scan_layers=args.scan, remat=args.remat, **depth,
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


class TorchHybridLoss:
  """DiT's training loss (ADM's LossType.MSE with LEARNED_RANGE Sigma) in torch, per example.

  Written from ADM's gaussian_diffusion.py / losses.py formulas (what facebookresearch/DiT's
  `diffusion.training_losses` runs): mse on eps, plus the VLB term in bits/dim with the eps channels
  detached: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or at t = 0 the discretised-Gaussian decoder
  NLL; the model's log-variance interpolates log(posterior variance, clipped) and log(beta_t).
  The coefficient tables are dit_jax's (float64, cast once), so torch and jax see the same numbers.
  """

  def __init__(self, diffusion):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    tab = lambda name: torch.tensor(np.asarray(getattr(diffusion, name)), dtype=torch.float32)
    self.sqrt_abar, self.sqrt_1m_abar = tab("sqrt_alphas_cumprod"), tab("sqrt_one_minus_alphas_cumprod")
    self.recip, self.recipm1 = tab("sqrt_recip_alphas_cumprod"), tab("sqrt_recipm1_alphas_cumprod")
    self.coef1, self.coef2 = tab("posterior_mean_coef1"), tab("posterior_mean_coef2")
    self.post_logvar, self.log_betas = tab("posterior_log_variance_clipped"), tab("log_betas")
    self.num_timesteps = diffusion.num_timesteps

  @staticmethod
  def _at(table, t):
    """table[t] shaped to broadcast over (B, C, H, W)."""
    return table[t].view(-1, 1, 1, 1)

  def q_sample(self, x0, t, noise):
    return self._at(self.sqrt_abar, t) * x0 + self._at(self.sqrt_1m_abar, t) * noise

  def __call__(self, out, x0, x_t, t, noise):
    """Per-example loss, mse and vb for a model output (B, 2C, H, W) at x_t (B, C, H, W)."""
    torch = self.torch
    g = lambda table: self._at(table, t)
    c = x0.shape[1]
    eps, var = out[:, :c], out[:, c:]
    mean_flat = lambda a: a.mean(dim=(1, 2, 3))
    mse = mean_flat((noise - eps) ** 2)
    frac = (var + 1) / 2
    model_logvar = frac * g(self.log_betas) + (1 - frac) * g(self.post_logvar)
    pred_x0 = g(self.recip) * x_t - g(self.recipm1) * eps.detach()
    model_mean = g(self.coef1) * pred_x0 + g(self.coef2) * x_t
    true_mean = g(self.coef1) * x0 + g(self.coef2) * x_t
    true_logvar = g(self.post_logvar)
    kl = 0.5 * (-1.0 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
    kl = mean_flat(kl) / math.log(2.0)
    nll = -mean_flat(self._discretized_log_likelihood(x0, model_mean, 0.5 * model_logvar))
    vb = torch.where(t == 0, nll / math.log(2.0), kl)
    return mse + vb, mse, vb

  def _discretized_log_likelihood(self, x, means, log_scales):
    torch = self.torch
    cdf = lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def bench_torch(name, args) -> dict:
  """facebookresearch/DiT's train.py step on diffusers' DiTTransformer2DModel, fp32, CPU.

  Per step, as train.py: t ~ U{0..T-1}, the hybrid loss above (label dropout happens inside the
  model's LabelEmbedding in train mode), backward, AdamW (lr 1e-4, no weight decay), and the
  per-parameter EMA update `ema.mul_(decay).add_(p, alpha=1 - decay)` of its update_ema.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DiTTransformer2DModel  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  row = models.build(name)
  c = args.in_channels
  model = DiTTransformer2DModel(
      num_attention_heads=row.num_heads, attention_head_dim=row.hidden_size // row.num_heads,
      in_channels=c, out_channels=2 * c, num_layers=row.depth, sample_size=args.input_size,
      patch_size=row.patch_size, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
  model.train()
  ema = [q.detach().clone() for q in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  loss_fn = TorchHybridLoss(diffusion_lib.create())
  x0 = torch.randn(args.batch, c, args.input_size, args.input_size)
  y = torch.randint(0, 1000, (args.batch,))

  def step():
    t = torch.randint(0, loss_fn.num_timesteps, (args.batch,))
    noise = torch.randn_like(x0)
    x_t = loss_fn.q_sample(x0, t, noise)
    out = model(x_t, timestep=t, class_labels=y).sample
    loss = loss_fn(out, x0, x_t, t, noise)[0].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      for e, q in zip(ema, model.parameters()):
        e.mul_(0.9999).add_(q, alpha=1 - 0.9999)

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
  add_shape_args(p, model=None)
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
