"""What a sweep costs on given hardware, before it runs (tools/plan_sweep.py prints it).

Per member: parameters; training compute in the paper's measure (3 x forward MACs per image x
images, flops.training_gflops; hardware FLOPs are 2 x that); memory per device with and without
remat, counted analytically (below); whether it fits; the step time at an assumed MFU (a named
assumption until tools/bench_gpu.py has measured one); evaluation (FID sampling, the sample grid,
the validation loss) counted separately. The sweep's device-hours, and its wall time with
`devices_per_member` devices per member and members packed longest first.

Memory per device (bytes), the analytic count, for a DiT trained by train_step.train_step with
AdamW, EMA and fp32 master params (param_dtype):
- state: params + EMA + Adam mu + nu + the gradient = 5 x params x 4, divided over the mesh's fsdp
  axis (the data axis replicates them);
- activations saved for the backward pass, per token per block, in the compute dtype: 26 D values
  (the block's input and modulated LayerNorm outputs, q/k/v and their heads-first copies, the
  attention output and its projection, the MLP's fc1, tanh and GELU outputs, the second residual)
  plus N x T softmax probabilities (none with cuDNN's fused attention, which recomputes them);
  with remat (nothing saved inside a block) the blocks' inputs (D per token per block) plus one
  block's activations while it is recomputed.
The count is cross-checked against XLA's compiled memory analysis on the CPU (tests/test_cost.py,
experiments/plan_sweep/README.md): XLA:CPU keeps bfloat16 activations in float32, so for bf16
models its count is about twice this one's activations.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dit_jax import models
from dit_jax.models import backend as backend_lib, flops

ACTIVATION_VALUES_PER_D = 26  # saved values per token per block, in units of D (see above)
STATE_COPIES = 5  # params, EMA, Adam mu and nu, gradient
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Hardware:
  """`count` devices of `peak_tflops` (dense, the run's compute dtype) and `memory_gb` each."""
  name: str
  count: int
  peak_tflops: float
  memory_gb: float
  backend: backend_lib.Backend


def memory_gb(model, batch_per_device: int, fsdp: int, remat: bool) -> dict:
  """The analytic count above for a built DiT `model` in GB (1e9); a U-Net: state only, total
  None (its activations are not counted)."""
  n_params = flops.count_params(models.abstract_params(model))
  state = STATE_COPIES * 4 * n_params / fsdp
  if models.family_of(model).name != "DiT":  # activations counted for DiTs only
    return dict(state_gb=state / 1e9, activations_gb=None, total_gb=None)
  d, n, depth = model.hidden_size, model.num_heads, model.depth
  tokens = (model.input_size // model.patch_size) ** 2
  tokens += 2 if model.conditioning == "in_context" else 0
  probs = 0 if model.attention_impl == "cudnn" else n * tokens
  size = DTYPE_BYTES[_dtype_name(model.dtype)]
  per_block = (ACTIVATION_VALUES_PER_D * d + probs) * tokens * batch_per_device * size
  if remat:
    act = depth * d * tokens * batch_per_device * size + per_block
  else:
    act = depth * per_block
  return dict(state_gb=state / 1e9, activations_gb=act / 1e9, total_gb=(state + act) / 1e9)


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name


def evaluation_forwards(eval_cfg, steps: int, data_val_size: int) -> dict:
  """Forward passes (images) of a member's evaluations over `steps` training steps: FID sampling
  (num_samples x sampling steps, x 2 with guidance), the sample grid, the validation loss."""
  def points(every):  # evaluations at every `every` steps and at the end
    return 0 if not every else steps // every + (1 if steps % every else 0)

  def sampling(q, n):
    passes = 2 if q.cfg_scale != 1.0 else 1
    return points(q.every_steps) * n * int(q.respacing) * passes

  fid = sampling(eval_cfg.fid, eval_cfg.fid.num_samples)
  grid = sampling(eval_cfg.grid, eval_cfg.grid.num_samples)
  val = points(eval_cfg.val.every_steps) * min(eval_cfg.val.num_examples, data_val_size) * \
      eval_cfg.val.num_timesteps
  return dict(fid=fid, grid=grid, val=val)


def member_row(model, steps: int, batch: int, devices: int, fsdp: int, hardware: Hardware,
               mfu: float, eval_forwards: dict) -> dict:
  """One member's cost on `devices` devices of `hardware` (a data x fsdp mesh)."""
  gflops = models.gflops(model)
  n_params = flops.count_params(models.abstract_params(model))
  per_device = batch // (devices // fsdp) if batch >= devices // fsdp else 0
  mem = memory_gb(model, per_device, fsdp, remat=False)
  mem_remat = memory_gb(model, per_device, fsdp, remat=True)
  rate = devices * hardware.peak_tflops * 1e12 * mfu  # FLOP/s the member's devices deliver
  train_flops = flops.training_gflops(gflops, batch, steps) * flops.FLOPS_PER_MAC * 1e9
  step_s = flops.training_gflops(gflops, batch) * flops.FLOPS_PER_MAC * 1e9 / rate
  eval_flops = sum(eval_forwards.values()) * gflops * flops.FLOPS_PER_MAC * 1e9
  return dict(
      model=models.name_of(model), attention=models.implementations(model)["attention_impl"],
      params_m=n_params / 1e6, gflops=gflops, steps=steps, train_pflop=train_flops / 1e15,
      mem_gb=mem["total_gb"], mem_remat_gb=mem_remat["total_gb"],
      fits=_fits(mem["total_gb"], hardware), fits_remat=_fits(mem_remat["total_gb"], hardware),
      step_s=step_s,
      train_h=steps * step_s / 3600, eval_h=eval_flops / rate / 3600, devices=devices)


def _fits(total_gb, hardware: Hardware):
  return None if total_gb is None else total_gb <= hardware.memory_gb


def schedule(rows: list[dict], slots: int) -> float:
  """Wall hours of running the members on `slots` slots, longest first (LPT), each slot taking
  the next member when free."""
  ends = [0.0] * max(slots, 1)
  for r in sorted(rows, key=lambda r: -(r["train_h"] + r["eval_h"])):
    i = ends.index(min(ends))
    ends[i] += r["train_h"] + r["eval_h"]
  return max(ends)


def totals(rows: list[dict], hardware: Hardware, devices_per_member: int) -> dict:
  """Device-hours (training, evaluation) and the wall hours with hardware.count // k slots."""
  k = devices_per_member
  return dict(train_device_h=sum(k * r["train_h"] for r in rows),
              eval_device_h=sum(k * r["eval_h"] for r in rows),
              wall_h=schedule(rows, hardware.count // k), slots=hardware.count // k)


def check_fits_mesh(batch: int, devices: int, fsdp: int) -> None:
  if devices % fsdp or batch % (devices // fsdp):
    raise ValueError(f"batch_size={batch} over {devices} devices (fsdp {fsdp}): the data-parallel "
                     f"size {devices // max(fsdp, 1)} must divide the batch")


def round_row(r: dict) -> dict:
  out = {}
  for k, v in r.items():
    if isinstance(v, float):
      out[k] = float(f"{v:.3g}") if abs(v) < 1e4 else round(v)
    else:
      out[k] = v
  return out



def compiled(model, batch: int, mesh) -> dict:
  """XLA's count of the trainer's train step for `model` at global `batch` on `mesh` (compiled,
  never run; fake CPU devices do): hardware FLOPs of the whole step (the per-device program's
  count x devices; a scanned stack counts its block once, so compile unrolled models for FLOPs)
  and the per-device memory (arguments + temporaries) in GB."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from dit_jax import benchmarking  # pylint: disable=import-outside-toplevel
  from dit_jax.training import train_step  # pylint: disable=import-outside-toplevel

  tx, step = benchmarking.trainer_step(model, mesh)
  abstract, shardings = train_step.state_shardings(model, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                       shardings)
  image = benchmarking.image_shape(batch, model.input_size, model.in_channels)
  spec = train_step.batch_shardings(mesh)
  data = {"image": jax.ShapeDtypeStruct(image, jnp.float32, sharding=spec["image"]),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=spec["label"])}
  exe = step.lower(state, data).compile()
  mem = exe.memory_analysis()
  return dict(flops=flops.cost_flops(exe) * mesh.size,
              memory_gb=(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 1e9)
