"""One member per accelerator (or per k): which devices each sweep worker process sees.

With `sweep.devices_per_member = k` (> 0) on a node with N accelerators, the sweep starts N // k
workers (workers.run_pool), worker i seeing only devices i*k .. i*k + k - 1, through the
environment its process starts with (before jax initialises its backend):

- NVIDIA GPUs: CUDA_VISIBLE_DEVICES;
- Cloud TPU VMs: TPU_VISIBLE_CHIPS with TPU_CHIPS_PER_PROCESS_BOUNDS (the k chips' shape),
  TPU_PROCESS_BOUNDS=1,1,1 and a port of its own (TPU_PROCESS_PORT, TPU_PROCESS_ADDRESSES), as
  libtpu's single-host multi-process setup reads them;
- the CPU: k fake devices (XLA_FLAGS=--xla_force_host_platform_device_count=k), each worker on
  its core as with `sweep.workers` (what the tests exercise here: no accelerator has been lent).

The parent learns N from the platform's own count without claiming the devices
(`accelerator_count`), so the workers, not the parent, hold the accelerators' memory.
Members go to workers longest first (runner._train_all), like the CPU workers.
"""
from __future__ import annotations

import os
import re
import subprocess

TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
PIN_CORE = "DIT_JAX_WORKER_PIN_CORE"  # '0': an accelerator worker is not pinned to one CPU core
TPU_BASE_PORT = 8476
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def check_config(s) -> None:
  """sweep.devices_per_member (`s`: config.sweep) against sweep.workers."""
  k = s.get("devices_per_member", 0)
  if k < 0:
    raise ValueError(f"sweep.devices_per_member={k}: must be >= 0 (0 = off: sweep.workers)")
  if k and s.workers:
    raise ValueError(f"sweep.devices_per_member={k} and sweep.workers={s.workers}: set one (with "
                     f"devices_per_member the node's accelerators decide how many workers run)")


def accelerator_count(platform: str) -> int:
  """Accelerators on this node, counted without initialising jax's backend on them: GPUs by
  `nvidia-smi -L` (or CUDA_VISIBLE_DEVICES when set), TPU chips by /dev/accel* or /dev/vfio."""
  if platform == "gpu":
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
      return len([d for d in visible.split(",") if d.strip()])
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"^GPU \d+", out, flags=re.M))
  if platform == "tpu":
    accel = [p for p in os.listdir("/dev") if re.fullmatch(r"accel\d+", p)]
    vfio = [p for p in os.listdir("/dev/vfio") if p.isdigit()] if os.path.isdir("/dev/vfio") \
        else []
    return len(accel) or len(vfio)
  raise ValueError(f"platform {platform!r}: devices_per_member counts GPUs or TPU chips")


def worker_envs(platform: str, num_devices: int, k: int, base_env: dict | None = None) -> list:
  """The environment of each of num_devices // k workers (a copy of base_env, default
  os.environ, with the visibility variables of its k devices set)."""
  if k < 1 or num_devices < k:
    raise ValueError(f"sweep.devices_per_member={k} on {num_devices} {platform} device(s): it "
                     f"must be between 1 and the device count")
  base = dict(os.environ if base_env is None else base_env)
  envs = []
  for i in range(num_devices // k):
    ids = ",".join(str(d) for d in range(i * k, (i + 1) * k))
    env = dict(base)
    if platform in ("gpu", "tpu"):  # its input pipeline may use every core
      env[PIN_CORE] = "0"
    if platform == "gpu":
      env["CUDA_VISIBLE_DEVICES"] = ids
    elif platform == "tpu":
      if k not in TPU_CHIP_BOUNDS:
        raise ValueError(f"sweep.devices_per_member={k} on TPU chips: use one of "
                         f"{sorted(TPU_CHIP_BOUNDS)}")
      port = TPU_BASE_PORT + i
      env.update(TPU_VISIBLE_CHIPS=ids, TPU_CHIPS_PER_PROCESS_BOUNDS=TPU_CHIP_BOUNDS[k],
                 TPU_PROCESS_BOUNDS="1,1,1", TPU_PROCESS_PORT=str(port),
                 TPU_PROCESS_ADDRESSES=f"localhost:{port}")
    elif platform == "cpu":
      flags = re.sub(DEVICE_COUNT_FLAG + r"=\d+", "", env.get("XLA_FLAGS", "")).strip()
      env["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={k}".strip()
    else:
      raise ValueError(f"platform {platform!r}: devices_per_member needs gpu, tpu or cpu")
    envs.append(env)
  return envs


def pool(s, platform: str, num_cpu_devices: int = 0) -> list | None:
  """The workers' environments for config.sweep `s`, or None when devices_per_member is off. On
  the CPU the node's 'devices' are num_cpu_devices (default: the cores this process may use)."""
  k = s.get("devices_per_member", 0)
  if not k:
    return None
  if platform == "cpu":
    n = num_cpu_devices or len(os.sched_getaffinity(0))
  else:
    n = accelerator_count(platform)
  return worker_envs(platform, n, k)


def pins_core() -> bool:
  """Whether this worker process pins itself to its core (CPU workers; see PIN_CORE)."""
  return os.environ.get(PIN_CORE, "1") != "0"


def prepare_parent(s) -> None:
  """With devices_per_member on, the parent (which builds models for the preflight) must not
  preallocate accelerator memory its workers need: XLA_PYTHON_CLIENT_PREALLOCATE=false, effective
  only if jax has not initialised its GPU backend yet."""
  if s.get("devices_per_member", 0):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
