"""Accelerators' dense peak FLOP/s: the denominator of MFU in training logs and benchmarks.

Imports jax only, so the GPU benchmark (tools/bench_gpu.py) can use it on a machine without clu
or ml_collections.
"""
import jax

# Dense peak TFLOP/s per chip, by jax device_kind substring (bf16 unless noted); first match wins.
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)


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
