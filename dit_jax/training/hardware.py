"""Accelerators: dense peak bf16 FLOP/s (the denominator of MFU in training logs and benchmarks)
and memory per device (the sweep planner's `fits`), in one table.

Imports jax only, so the GPU benchmark (tools/bench_gpu.py) can use it on a machine without clu
or ml_collections.
"""
from __future__ import annotations

import dataclasses
import re

import jax


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One jax device of a kind: `match` is a substring of its jax device_kind."""
  name: str
  match: str
  peak_tflops: float  # dense bf16, per jax device (vendor datasheet, without sparsity)
  memory_gb: float  # HBM per jax device, the vendor's figure
  platform: str = "gpu"
  compute_capability: str = ""  # NVIDIA only


# Vendor datasheets: H100/H200 SXM 989 TFLOP/s dense bf16 (80 / 141 GB); A100 SXM 312 (80 GB);
# TPU v6e 918 (32 GB), v5p 459 (95 GB), v5e 197 (16 GB), v4 275 (32 GB) per chip = per jax device.
# First match wins ('TPU v5p' before 'TPU v5', whose device_kind is 'TPU v5 lite').
ACCELERATORS = (
    Accelerator("H200", "H200", 989.0, 141.0, compute_capability="9.0"),
    Accelerator("H100", "H100", 989.0, 80.0, compute_capability="9.0"),
    Accelerator("A100", "A100", 312.0, 80.0, compute_capability="8.0"),
    Accelerator("v6e", "TPU v6", 918.0, 32.0, "tpu"),
    Accelerator("v5p", "TPU v5p", 459.0, 95.0, "tpu"),
    Accelerator("v5e", "TPU v5", 197.0, 16.0, "tpu"),
    Accelerator("v4", "TPU v4", 275.0, 32.0, "tpu"),
    Accelerator("v3", "TPU v3", 123.0, 32.0, "tpu"),
)
PEAK_TFLOPS = tuple((a.match, a.peak_tflops) for a in ACCELERATORS)
# Cloud TPU slice names count TensorCores on v4/v5p (2 per chip = per jax device), chips on v5e/v6e.
CORES_PER_DEVICE = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def peak_tflops(device_kind: str) -> float:
  """The table's peak TFLOP/s for a jax device_kind (case-insensitive substring), 0 if unknown."""
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return 0.0


def peak_flops_per_device(configured_tflops: float = 0.0) -> float:
  """Configured peak FLOP/s per device, else looked up by the first device's kind (0 if unknown)."""
  if configured_tflops > 0:
    return configured_tflops * 1e12
  return peak_tflops(jax.devices()[0].device_kind) * 1e12


def parse(spec: str) -> tuple[Accelerator, int]:
  """'8xH100' -> (H100, 8 devices); 'v5p-64' (a Cloud TPU slice: 64 TensorCores) -> (v5p, 32)."""
  by_name = {a.name.lower(): a for a in ACCELERATORS}
  m = re.fullmatch(r"(\d+)x(\w+)", spec.strip())
  if m and m.group(2).lower() in by_name:
    return by_name[m.group(2).lower()], int(m.group(1))
  m = re.fullmatch(r"(v\d\w?)-(\d+)", spec.strip().lower())
  if m and m.group(1) in CORES_PER_DEVICE:
    cores = CORES_PER_DEVICE[m.group(1)]
    if int(m.group(2)) % cores:
      raise ValueError(f"{spec}: a {m.group(1)} slice has {cores} cores per chip")
    return by_name[m.group(1)], int(m.group(2)) // cores
  raise ValueError(f"unknown hardware {spec!r}: '<count>x<{'|'.join(a.name for a in ACCELERATORS)}"
                   f">' (e.g. 8xH100) or a TPU slice '<{'|'.join(CORES_PER_DEVICE)}>-<cores>' "
                   f"(e.g. v5p-64)")
