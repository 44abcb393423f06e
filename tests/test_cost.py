"""The sweep cost planner (dit_jax/sweep/cost.py, tools/plan_sweep.py): counts against the paper's
Table 4 and against XLA's compiled programs on the CPU; the hardware table; the scheduling."""
import torch  # noqa: F401  (before jax/TF, see conftest)
import jax
import jax.numpy as jnp
import pytest

from configs import dit_sweep
from dit_jax import models
from dit_jax import sharding as sharding_lib
from dit_jax.models import backend
from dit_jax.sweep import cost
from dit_jax.training import hardware

H100 = backend.Backend("gpu", "H100", cuda=True, compute_capability="9.0")


def _hw(n, spec="H100"):
  acc = {a.name: a for a in hardware.ACCELERATORS}[spec]
  return cost.Hardware(spec, n, acc.peak_tflops, acc.memory_gb, H100)


def _paper(name, back=H100, **fields):
  cfg = models.model_config(dit_sweep.get_config("paper"))
  cfg.model = name
  for k, v in fields.items():
    cfg[k] = v
  return models.create(cfg, (32, 32, 4), 1000, backend=back)


def test_hardware_table_and_specs():
  acc, n = hardware.parse("v5p-64")
  assert (acc.name, n, acc.peak_tflops) == ("v5p", 32, 459.0)  # 64 TensorCores = 32 chips
  assert hardware.parse("8xH100")[1] == 8 and hardware.parse("4xA100")[0].memory_gb == 80.0
  assert hardware.peak_tflops("TPU v5 lite") == 197.0 and hardware.peak_tflops("TPU v5p") == 459.0
  with pytest.raises(ValueError, match="unknown hardware"):
    hardware.parse("8xB300")


@pytest.mark.parametrize("name,gflops", [("DiT-S/8", 0.36), ("DiT-B/4", 5.56), ("DiT-XL/2", 118.64)])
def test_paper_rows_match_table_4(name, gflops):
  model = _paper(name)
  ev = cost.evaluation_forwards(dit_sweep.get_config("paper").eval, 400_000, 0)
  row = cost.member_row(model, 400_000, 256, 8, 1, _hw(8), 0.3, ev)
  assert abs(row["gflops"] - gflops) <= 0.02
  # Training compute: 3 x Gflops x 256 x 400K MACs, 2 FLOPs each.
  assert row["train_pflop"] == pytest.approx(6 * row["gflops"] * 256 * 400_000 / 1e6)
  assert row["attention"] == "cudnn"
  # FID-50K every 50K steps (8 times), 250 steps, no guidance; the grid: 16 x 250 x 2 (cfg 4).
  assert ev == dict(fid=8 * 50_000 * 250, grid=8 * 16 * 250 * 2, val=0)


def test_xl2_fits_8_h100s_without_remat_but_one_only_with_remat():
  model = _paper("DiT-XL/2")
  assert model.attention_impl == "cudnn"
  ev = dict(fid=0, grid=0, val=0)
  eight = cost.member_row(model, 1, 256, 8, 1, _hw(8), 0.3, ev)
  one = cost.member_row(model, 1, 256, 1, 1, _hw(1), 0.3, ev)
  assert eight["fits"] and not one["fits"] and one["fits_remat"]
  assert one["mem_remat_gb"] < one["mem_gb"] / 3
  assert one["step_s"] == pytest.approx(8 * eight["step_s"])
  # State: 5 fp32 copies of 675M params = 13.5 GB, whatever the batch.
  assert cost.memory_gb(model, 0, 1, False)["state_gb"] == pytest.approx(13.5, abs=0.05)


def _tiny(**fields):
  return models.build("DiT-S/2", input_size=16, in_channels=4, num_classes=10, depth=2,
                      scan_layers=False, dtype=jnp.float32, **fields)


def test_flops_and_memory_against_xla_compiled_on_cpu():
  """XLA's FLOP count of the compiled train step is the paper's 3 x forward (plus elementwise
  work, a few %), and the analytic memory is XLA:CPU's within 35 % (fp32, where XLA:CPU keeps
  the dtype)."""
  mesh = sharding_lib.create_mesh((-1, 1, 1), devices=jax.devices()[:1])
  batch = 64
  model = _tiny()
  xla = cost.compiled(model, batch, mesh)
  paper = 6 * models.gflops(model) * batch * 1e9
  assert 1.0 <= xla["flops"] / paper <= 1.1, (xla["flops"], paper)
  analytic = cost.memory_gb(model, batch, 1, remat=False)["total_gb"]
  assert 0.65 <= analytic / xla["memory_gb"] <= 1.35, (analytic, xla["memory_gb"])
  # Activations dominate this count: a planner that forgot them would fail the check above.
  assert cost.memory_gb(model, batch, 1, remat=False)["activations_gb"] > 0.5 * analytic


def test_schedule_is_longest_first():
  rows = [dict(train_h=h, eval_h=0.0) for h in (3, 5, 3, 4, 3)]
  assert cost.schedule(rows, 2) == 10  # LPT: 5+3 | 4+3+3
  assert cost.schedule(rows, 1) == 18 and cost.schedule(rows, 5) == 5
  t = cost.totals(rows, _hw(8), 4)
  assert t["train_device_h"] == 4 * 18 and t["slots"] == 2
