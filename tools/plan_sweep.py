"""What a sweep will cost, before it runs: per member params, training FLOPs (the paper's 3 x
forward, and XLA's count), memory per device with and without remat, whether it fits, step time at
an assumed MFU, and the sweep's device-hours and wall time (dit_jax/sweep/cost.py).

  python tools/plan_sweep.py --config=configs/dit_sweep.py:paper --hardware=8xH100
  python tools/plan_sweep.py --config=configs/dit_sweep.py:paper --hardware=v5p-64
  python tools/plan_sweep.py --config=configs/dit_sweep.py --hardware=cpu   # this machine

--hardware: '<n>x<H100|H200|A100|...>', a Cloud TPU slice ('v5p-64': 32 chips), or 'cpu' (one
device per core; peak = this machine's measured fp32 numpy matmul rate / cores). Members whose
forward Gflops are at most --compile_max_gflops are also compiled on fake CPU devices (nothing
runs) for XLA's FLOP count and XLA:CPU's memory analysis.
"""
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dit_jax import benchmarking, models  # noqa: E402
from dit_jax import sharding as sharding_lib  # noqa: E402
from dit_jax.data import sources  # noqa: E402
from dit_jax.models import backend as backend_lib  # noqa: E402
from dit_jax.sweep import cost  # noqa: E402
from dit_jax.sweep import members as members_lib  # noqa: E402
from dit_jax.training import hardware as hardware_lib  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/dit_sweep.py:paper", "Sweep config.")
flags.DEFINE_string("hardware", "8xH100", "'<n>x<accelerator>', a TPU slice (v5p-64), or 'cpu'.")
flags.DEFINE_float("mfu", 0.30, "Assumed model FLOPs utilisation (no measurement on a device "
                   "yet: experiments/bench_gpu.md does not exist).")
flags.DEFINE_integer("devices_per_member", 0, "Devices per member (0 = sweep.devices_per_member "
                     "if the config has it, else all: one member at a time).")
flags.DEFINE_float("compile_max_gflops", 1.5, "Compile members up to these forward Gflops.")
flags.DEFINE_string("out", "", "Also write the markdown here.")
flags.DEFINE_float("cpu_gflops", 0.0, "--hardware=cpu: the machine's fp32 matmul GFLOP/s (0 = "
                   "measure it now with numpy, as experiments/ record beside every time).")
FLAGS = flags.FLAGS

COLUMNS = ["run", "attention", "params_m", "gflops", "steps", "train_pflop", "xla_train_pflop",
           "mem_gb", "mem_remat_gb", "xla_cpu_mem_gb", "xla_cpu_mem_remat_gb", "fits",
           "fits_remat", "step_s", "train_h", "eval_h"]


def hardware(spec: str) -> cost.Hardware:
  if spec == "cpu":
    cores = os.cpu_count() or 1
    rate = FLAGS.cpu_gflops or benchmarking.matmul_gflops()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    how = "given" if FLAGS.cpu_gflops else "measured"
    return cost.Hardware(f"cpu ({cores} cores, numpy fp32 matmul {rate:.0f} GFLOP/s, {how})", cores,
                         rate / cores / 1e3, ram / cores, backend_lib.Backend("cpu", "cpu"))
  acc, n = hardware_lib.parse(spec)
  back = backend_lib.Backend(acc.platform, acc.match, cuda=acc.platform == "gpu",
                             compute_capability=acc.compute_capability)
  return cost.Hardware(f"{n} x {acc.name} ({acc.peak_tflops:g} TFLOP/s bf16, {acc.memory_gb:g} GB)",
                       n, acc.peak_tflops, acc.memory_gb, back)


def data_shape(config):
  """(image_shape, num_classes) of the sweep's data; ImageNet-256 latents without reading them."""
  if config.data.name == "latents" and not config.data.path:
    side = (config.data.image_size or 256) // 8
    return (side, side, 4), 1000
  source = sources.create_source(config.data)
  return tuple(source.image_shape), source.num_classes


def compile_columns(model_cfg, image_shape, num_classes, batch, k, mesh_shape) -> dict:
  """XLA's FLOPs (unrolled) and XLA:CPU memory (as configured, remat off/on) on k fake devices."""
  mesh = sharding_lib.create_mesh(mesh_shape, devices=jax.devices()[:k])
  out = {}
  dit = models.family_name(model_cfg.model) == "DiT"  # remat and scan_layers are DiT fields
  for remat, key in ((False, "xla_cpu_mem_gb"), (True, "xla_cpu_mem_remat_gb")):
    if remat and not dit:
      continue
    model_cfg.remat = remat
    out[key] = cost.compiled(models.create(model_cfg, image_shape, num_classes), batch,
                             mesh)["memory_gb"]
  model_cfg.remat, model_cfg.scan_layers = False, False
  unrolled = models.create(model_cfg, image_shape, num_classes)
  out["xla_train_flops_step"] = cost.compiled(unrolled, batch, mesh)["flops"]
  return out


def plan(config, hw: cost.Hardware, k: int) -> list:
  image_shape, num_classes = data_shape(config)
  fsdp = int(config.mesh_shape[1]) if int(config.mesh_shape[1]) > 0 else 1
  cost.check_fits_mesh(config.batch_size, k, fsdp)
  built, gflops = {}, {}
  for name in members_lib.model_names(config.sweep):
    probe = members_lib.Member("", name, config.sweep.objectives[0], 0, config.num_train_steps)
    cfg = members_lib.member_config(config, probe)
    built[name] = (cfg, models.create(models.model_config(cfg), image_shape, num_classes,
                                      backend=hw.backend))
    gflops[name] = models.gflops(built[name][1])
  rows, xla = [], {}
  for m in members_lib.plan(config.sweep, config.num_train_steps, config.batch_size, gflops):
    cfg, model = built[m.model]
    ev = cost.evaluation_forwards(cfg.eval, m.steps, cfg.data.val_size)
    row = cost.member_row(model, m.steps, config.batch_size, k, fsdp, hw, FLAGS.mfu, ev)
    if gflops[m.model] <= FLAGS.compile_max_gflops and k <= jax.device_count():
      if m.model not in xla:
        logging.info("compiling %s on %d fake CPU devices", m.model, k)
        xla[m.model] = compile_columns(models.model_config(cfg), image_shape, num_classes,
                                       config.batch_size, k, config.mesh_shape)
      c = xla[m.model]
      row.update(xla_cpu_mem_gb=c["xla_cpu_mem_gb"], xla_cpu_mem_remat_gb=c.get("xla_cpu_mem_remat_gb"),
                 xla_train_pflop=c["xla_train_flops_step"] * m.steps / 1e15)
    rows.append(dict(row, run=m.run, model=m.model))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  hw = hardware(FLAGS.hardware)
  k = FLAGS.devices_per_member or config.sweep.get("devices_per_member", 0) or hw.count
  if hw.name.startswith("cpu") and not FLAGS.devices_per_member:
    k = 1  # the CPU sweep: one member per worker process (sweep.workers at a time)
  rows = plan(config, hw, k)
  t = cost.totals(rows, hw, k)
  if hw.name.startswith("cpu") and config.sweep.workers:
    t["wall_h"], t["slots"] = cost.schedule(rows, config.sweep.workers), config.sweep.workers
  lines = [f"hardware: {hw.name}; {k} device(s) per member, {t['slots']} member(s) at once; "
           f"batch {config.batch_size}; assumed MFU {FLAGS.mfu:g} (an assumption: no device "
           f"measurement yet)", "",
           benchmarking.markdown_table([cost.round_row(r) for r in rows], COLUMNS,
                                       fmt=lambda v: "-" if v is None else str(v)), "",
           f"{len(rows)} members: training {t['train_device_h']:.1f} device-hours, evaluation "
           f"(FID sampling, grid, validation loss) {t['eval_device_h']:.1f} device-hours; wall "
           f"time {t['wall_h']:.2f} h with {t['slots']} member(s) at once (longest first)."]
  text = "\n".join(lines)
  print(text)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
