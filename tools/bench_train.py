"""Train-step benchmark: step time, images/s, achieved GFLOP/s and MFU, compile time, memory.

  python tools/bench_train.py --models=DiT-S/8,DiT-S/4,DiT-S/2 --batch=8 --torch --matmul
  python tools/bench_train.py --models=DiT-XL/2 --scan --compile_only     # compile time only

JAX: the real `train_step.train_step` (AdamW, EMA, the hybrid MSE+VLB loss, non-finite guard),
jitted with the trainer's shardings on a (data, fsdp, tensor) mesh. --torch: the same model in
PyTorch (diffusers' DiTTransformer2DModel, fp32, `torch.set_num_threads(--threads)`) with the step
of facebookresearch/DiT's train.py (ADM's hybrid loss with learned Sigma, `TorchHybridLoss`; AdamW;
per-parameter EMA), and the jax/torch speed ratio. --matmul: this machine's fp32 numpy matmul rate
on 4096^2 matrices, the yardstick for achieved GFLOP/s. FLOPs per step = 2 x the paper's training
compute (flops.training_gflops: 3 x forward Gflops (MACs) x batch). MFU's peak per device is
--peak_tflops, else dit_jax.training.hardware's table for the device (none on CPU: no MFU column).
Shared code (shape flags, inputs, timing, the matmul rate): dit_jax.benchmarking.
"""
import math
import os
import resource
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import benchmarking
from dit_jax import models
from dit_jax import sharding as sharding_lib
from dit_jax.models import flops as flops_lib
from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.training import hardware
from dit_jax.training import train_step

FLAGS = flags.FLAGS
flags.DEFINE_string("models", "DiT-S/8,DiT-S/4,DiT-S/2", "Comma-separated model names.")
benchmarking.define_shape_flags(model=None)
flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor sizes.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (params stay float32).")
flags.DEFINE_string("attention", "", "'' / xla / cudnn.")
flags.DEFINE_bool("scan", False, "Scan over layers.")
flags.DEFINE_bool("remat", False, "Recompute block activations in the backward pass.")
flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps first.")
flags.DEFINE_bool("compile_only", False, "Only compile (time and XLA buffer sizes).")
flags.DEFINE_bool("torch", False, "Also time diffusers' DiT in PyTorch.")
flags.DEFINE_integer("threads", 2, "PyTorch intra-op threads.")
flags.DEFINE_bool("matmul", False, "Measure the numpy fp32 matmul rate.")
flags.DEFINE_float("peak_tflops", 0.0,
                   "Per-device peak for MFU (0: dit_jax.training.hardware's table, if it knows the "
                   "device).")


def build(name):
  """(model, tx, mesh, jitted step) of the trainer for one model at the flags' settings."""
  model = models.build(name, input_size=FLAGS.input_size, in_channels=FLAGS.in_channels,
                       num_classes=1000, scan_layers=FLAGS.scan, remat=FLAGS.remat,
                       attention_impl=FLAGS.attention or None,
                       dtype=models.dtype_of(FLAGS.dtype), param_dtype=jnp.float32)
  mesh = sharding_lib.create_mesh(tuple(int(v) for v in FLAGS.mesh.split(",")))
  sharding_lib.check_batch(FLAGS.batch, mesh)
  tx, step = benchmarking.trainer_step(model, mesh)
  return model, tx, mesh, step


def bench_jax(name) -> dict:
  """Compile and time the trainer's step for one model."""
  model, tx, mesh, step = build(name)
  batch_size = FLAGS.batch
  abstract, shardings = train_step.state_shardings(model, tx, mesh)
  bs = train_step.batch_shardings(mesh)
  shape = benchmarking.image_shape(batch_size, FLAGS.input_size, FLAGS.in_channels)
  batch_abs = dict(image=jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bs["image"]),
                   label=jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=bs["label"]))
  state_abs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           abstract, shardings)
  t0 = time.perf_counter()
  lowered = step.lower(state_abs, batch_abs)
  compiled = lowered.compile()
  out = dict(model=name, batch=batch_size, compile_s=time.perf_counter() - t0,
             gflops=models.gflops(model), params_m=flops_lib.count_params(abstract.params) / 1e6)
  mem = compiled.memory_analysis()
  if mem is not None:
    out["mem_gib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 30
  if FLAGS.compile_only:
    return out
  state, _ = train_step.create_train_state(model, tx, mesh, seed=0)
  batch = jax.device_put(
      benchmarking.random_batch(batch_size, FLAGS.input_size, FLAGS.in_channels), bs)
  _, _, times = benchmarking.time_steps(lambda s: compiled(s, batch), state,
                                        steps=FLAGS.steps, warmup=FLAGS.warmup)
  out["step_ms"] = 1e3 * statistics.median(times)
  out["images_s"] = batch_size / (out["step_ms"] / 1e3)
  out["gflop_s"] = benchmarking.train_step_flops(out["gflops"], batch_size) / 1e9 / (
      out["step_ms"] / 1e3)
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
    self.sqrt_abar = tab("sqrt_alphas_cumprod")
    self.sqrt_1m_abar = tab("sqrt_one_minus_alphas_cumprod")
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


def bench_torch(name) -> dict:
  """facebookresearch/DiT's train.py step on diffusers' DiTTransformer2DModel, fp32, CPU.

  Per step, as train.py: t ~ U{0..T-1}, the hybrid loss above (label dropout happens inside the
  model's LabelEmbedding in train mode), backward, AdamW (lr 1e-4, no weight decay), and the
  per-parameter EMA update `ema.mul_(decay).add_(p, alpha=1 - decay)` of its update_ema.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import DiTTransformer2DModel  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  row = models.build(name)
  c = FLAGS.in_channels
  model = DiTTransformer2DModel(
      num_attention_heads=row.num_heads, attention_head_dim=row.hidden_size // row.num_heads,
      in_channels=c, out_channels=2 * c, num_layers=row.depth, sample_size=FLAGS.input_size,
      patch_size=row.patch_size, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
  model.train()
  ema = [q.detach().clone() for q in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  loss_fn = TorchHybridLoss(diffusion_lib.create())
  x0 = torch.randn(FLAGS.batch, c, FLAGS.input_size, FLAGS.input_size)
  y = torch.randint(0, 1000, (FLAGS.batch,))

  def step():
    t = torch.randint(0, loss_fn.num_timesteps, (FLAGS.batch,))
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

  _, _, times = benchmarking.time_steps(lambda c: (c, step()), steps=FLAGS.steps,
                                        warmup=FLAGS.warmup)
  return dict(torch_ms=1e3 * statistics.median(times))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, mesh {FLAGS.mesh}, dtype {FLAGS.dtype}, batch {FLAGS.batch}, "
        f"scan {FLAGS.scan}, remat {FLAGS.remat}")
  rate = benchmarking.matmul_gflops() if FLAGS.matmul else 0.0
  if rate:
    print(f"numpy fp32 matmul 4096^2: {rate:.1f} GFLOP/s")
  peak = hardware.peak_flops_per_device(FLAGS.peak_tflops) * jax.device_count()
  cols = ["model", "batch", "params_m", "gflops", "compile_s", "mem_gib", "step_ms", "images_s",
          "gflop_s", "pct_matmul", "mfu", "torch_ms", "jax/torch"]
  rows = []
  for name in FLAGS.models.split(","):
    r = bench_jax(name)
    if rate and "gflop_s" in r:
      r["pct_matmul"] = 100 * r["gflop_s"] / rate
    if peak and "gflop_s" in r:
      r["mfu"] = r["gflop_s"] * 1e9 / peak
    if FLAGS.torch and not FLAGS.compile_only:
      r.update(bench_torch(name))
      r["jax/torch"] = r["torch_ms"] / r["step_ms"]
    rows.append(r)
    print("  ".join(f"{k}={benchmarking.format_value(r.get(k))}" for k in cols if k in r),
          flush=True)
  print()
  print(benchmarking.markdown_table(rows, cols))


if __name__ == "__main__":
  app.run(main)
