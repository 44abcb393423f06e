"""The train step (non-finite skipping, remat, bf16) and the loop (logs, grids, config errors)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import models
from dit_jax import sharding
from dit_jax.data import pipeline as pipeline_lib
from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.training import checkpoint as checkpoint_lib
from dit_jax.training import train
from dit_jax.training import train_step

from tests.helpers import REPO, read_jsonl, tiny_batch, tiny_config, tiny_model, tiny_optim


@pytest.fixture(scope="module")
def one_device_step():
  mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
  model = tiny_model()
  tx = train_step.create_optimizer(tiny_optim())
  state, shardings = train_step.create_train_state(model, tx, mesh, seed=0)
  step = train_step.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings, ema_decay=0.9)
  return state, step


def test_nan_in_loss_is_skipped_and_training_continues(one_device_step):
  state, step = one_device_step
  before = jax.device_get(state)
  bad = tiny_batch()
  bad["image"][3, 2, 2, 0] = np.nan  # one NaN pixel makes the loss and every gradient NaN
  state, m = step(jax.tree.map(jnp.array, state), bad)
  assert not np.isfinite(m["loss"])
  assert (m["skipped"], m["nonfinite_streak"], m["nonfinite_total"]) == (1, 1, 1)
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  jax.tree.map(np.testing.assert_array_equal, after.ema_params, before.ema_params)
  assert int(after.step) == 1  # the batch was consumed
  state, m = step(state, tiny_batch(seed=1))
  assert np.isfinite(m["loss"]) and m["skipped"] == 0
  assert (m["nonfinite_streak"], m["nonfinite_total"]) == (0, 1)
  good = jax.device_get(state)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(good.params))
  assert max(np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(good.params),
                                                   jax.tree.leaves(before.params))) > 1e-4


def test_remat_and_bf16_steps(one_device_step):
  """remat recomputes the same gradients; bf16 compute keeps fp32 params and a close loss."""
  mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
  tx = train_step.create_optimizer(tiny_optim())
  batch = tiny_batch()
  state0, base_step = one_device_step
  out = {"base": jax.device_get(base_step(jax.tree.map(jnp.array, state0), batch))}
  for name, kw in dict(remat=dict(remat=True), bf16=dict(dtype=jnp.bfloat16)).items():
    model = tiny_model(**kw)
    state, shardings = train_step.create_train_state(model, tx, mesh, seed=0)
    step = train_step.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings, 0.9)
    out[name] = jax.device_get(step(state, batch))
  (base, mb), (remat, mr), (bf16, m16) = out["base"], out["remat"], out["bf16"]
  np.testing.assert_allclose(mr["loss"], mb["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(base)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16.params))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16.opt_state[0].mu))
  # adaLN-Zero outputs exactly 0 at init in any dtype, so the loss agrees; the gradients show bf16.
  np.testing.assert_allclose(m16["loss"], mb["loss"], rtol=1e-6)
  np.testing.assert_allclose(m16["grad_norm"], mb["grad_norm"], rtol=5e-2)
  assert m16["grad_norm"] != mb["grad_norm"]  # bf16 really ran


def test_the_pure_half_runs_without_tensorflow_clu_or_orbax():
  """train_step (state, optimizer, shardings, step, jit) needs jax, flax and optax only."""
  code = textwrap.dedent("""
      import sys
      BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "orbax")
      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
      sys.meta_path.insert(0, Block())
      import jax, numpy as np
      from dit_jax.objectives import diffusion, sampling
      from dit_jax.models import dit
      from dit_jax import sharding
      from dit_jax.training import train_step
      mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
      model = dit.DiT(input_size=8, in_channels=2, patch_size=2, hidden_size=64, depth=2,
                      num_heads=2, num_classes=10)
      optim = dict(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0,
                   grad_clip=0.0)
      tx = train_step.create_optimizer(type("Optim", (), optim))
      rng = np.random.default_rng(0)
      batch = {"image": rng.uniform(-1, 1, (16, 8, 8, 2)).astype(np.float32),
               "label": rng.integers(0, 10, 16).astype(np.int32)}
      state, shardings = train_step.create_train_state(model, tx, mesh, seed=0)
      step = train_step.jit_train_step(model, diffusion.create(), tx, mesh, shardings, 0.9)
      state, m = step(state, jax.device_put(batch, train_step.batch_shardings(mesh)))
      assert np.isfinite(float(m["loss"])) and int(state.step) == 1
      assert not [k for k in sys.modules if k.split(".")[0] in BLOCKED]
      print("pure ok")
  """)
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0 and "pure ok" in out.stdout, out.stderr[-3000:]


def _inject_nan(monkeypatch, steps):
  """Makes the pipeline's batches at `steps` carry a NaN pixel."""
  original = pipeline_lib.Pipeline.to_device

  def to_device(self, step, x, labels):
    out = original(self, step, x, labels)
    if step in steps:
      out["image"] = out["image"].at[0, 0, 0, 0].set(jnp.nan)
    return out
  monkeypatch.setattr(pipeline_lib.Pipeline, "to_device", to_device)


def test_loop_logs_skips_nan_and_writes_grid(tmp_path, monkeypatch):
  """A full tiny run: NaN at step 2 skipped; metrics.jsonl, TensorBoard, checkpoints, PNG grid."""
  _inject_nan(monkeypatch, {2})
  config = tiny_config(peak_tflops_per_device=0.05,
                       **{"eval.grid.every_steps": 6, "eval.grid.respacing": "5",
                          "eval.grid.num_samples": 4})
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 6 and int(state.nonfinite_total) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  per_step = {r["step"]: r for r in rows if "loss" in r}
  assert sorted(per_step) == [1, 2, 3, 4, 5, 6]
  assert not np.isfinite(per_step[3]["loss"]) and per_step[3]["skipped"] == 1
  assert per_step[6]["nonfinite_total"] == 1 and np.isfinite(per_step[6]["loss"])
  for key in ("images_per_sec", "steps_per_sec", "mfu", "grad_norm", "mse", "vb", "lr"):
    assert key in per_step[6], key
  grid_row = next(r for r in rows if "sample_time_s" in r)  # evaluated with the decay EMA
  assert grid_row["step"] == 6 and grid_row["ema_decay"] == config.ema_decay
  assert {"step": 6, "ema": "decay"} in rows
  compile_row = next(r for r in rows if "compile_time_s" in r)
  assert compile_row["compile_time_s"] > 0 and compile_row["num_params"] > 1e4
  assert list(tmp_path.glob("events.out.tfevents.*"))
  assert checkpoint_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == \
      [2, 4, 6]
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000006.png"))
  assert grid.shape == (2 + 2 * 10, 2 + 2 * 10)  # 2x2 grid of 8x8 grey images with 2 px gaps
  assert grid.std() > 0


def test_nonfinite_streak_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  _inject_nan(monkeypatch, set(range(3, 100)))
  config = tiny_config(num_train_steps=20, max_nonfinite_streak=3)
  with pytest.raises(train.NonFiniteError, match="3 consecutive steps"):
    train.train_and_evaluate(config, str(tmp_path))
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", read_only=True)
  assert ckpt.all_steps() == [2]  # nothing saved while updates were being skipped
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          train_step.state_shardings(
                              models.create(models.model_config(config), (8, 8, 1), 10),
                              train_step.create_optimizer(config.optim),
                              sharding.create_mesh((-1, 1, 1)))[0])
  state, data_state = ckpt.restore(None, abstract)
  assert int(state.step) == 2 and data_state["next_step"] == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_the_trainer_trains_a_unet_through_the_same_loop(tmp_path):
  """One model interface: a 'UNet-*' name goes through the same state, step, loop and sampler."""
  from dit_jax.models import unet
  config = tiny_config(model="UNet-Nano", num_train_steps=2, checkpoint_every_steps=2, depth=0,
                       hidden_size=0, num_heads=0, **{"eval.grid.every_steps": 2,
                                                      "eval.grid.respacing": "3",
                                                      "eval.grid.num_samples": 4})
  model = models.create(models.model_config(config), (8, 8, 1), 10)
  assert isinstance(model, unet.UNet) and model.num_classes == 10
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  gflops = next(r["gflops_per_image"] for r in rows if "gflops_per_image" in r)
  assert gflops == pytest.approx(models.gflops(model))
  assert (tmp_path / "samples" / "step_00000002.png").exists()


def test_the_trainer_trains_the_flow_objective_through_the_same_loop(tmp_path):
  """diffusion.objective='flow': same state, step, loop, checkpoints and grid (Heun sampler)."""
  config = tiny_config(learn_sigma=False, num_train_steps=4, checkpoint_every_steps=2,
                       **{"diffusion.objective": "flow", "eval.grid.every_steps": 4,
                          "eval.grid.respacing": "3", "eval.grid.num_samples": 4})
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4 and int(state.nonfinite_total) == 0
  rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
  # velocity MSE of a zero-output net at init: E|x1 - x0|^2 per dim = E x1^2 + 1 > 1; no VLB term
  assert rows[0]["loss"] > 1.0 and all(r["vb"] == 0.0 for r in rows)
  from PIL import Image
  grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000004.png"))
  assert grid.shape == (2 + 2 * 10, 2 + 2 * 10) and grid.std() > 0


def test_lr_schedules_match_their_closed_forms():
  """cosine: lr/2 (1 + cos(pi s / (T - w))) after w warm-up steps; cooldown: constant, then linear
  to 0 over the last fraction of T; constant: the paper's. The decaying ones need the run's T."""
  T, w, lr = 110, 10, 2e-3
  optim = tiny_optim(lr=lr, warmup_steps=w, schedule="cosine", cooldown_fraction=0.2)
  f = train_step.learning_rate_schedule(optim, T)
  for s in (0, 5, 10, 37, 60, 109, 110):
    want = lr * s / w if s < w else lr / 2 * (1 + np.cos(np.pi * (s - w) / (T - w)))
    assert float(f(s)) == pytest.approx(want, rel=1e-5, abs=1e-9)  # float32 near 0
  optim.schedule = "cooldown"
  f = train_step.learning_rate_schedule(optim, T)
  start = T - 22  # 20 % of 110 steps
  for s in (10, 50, start, 99, 110):
    want = lr if s <= start else lr * (T - s) / 22
    assert float(f(s)) == pytest.approx(want, rel=1e-5, abs=1e-9)  # float32 near 0
  optim.schedule = "constant"
  assert float(train_step.learning_rate_schedule(optim)(10_000)) == pytest.approx(lr)
  optim.schedule = "cosine"
  with pytest.raises(ValueError, match="give num_steps"):
    train_step.learning_rate_schedule(optim)
  optim.schedule = "linear"
  with pytest.raises(ValueError, match="optim.schedule='linear'"):
    train_step.check_config(optim, 0.99)


def test_a_decaying_schedule_cannot_be_extended(tmp_path):
  from dit_jax.training import fingerprint  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  config.optim.schedule = "cosine"
  path = tmp_path / "config.json"
  fingerprint.check_same_config(path, config)
  config.num_train_steps += 10
  with pytest.raises(ValueError, match="decays to 0 at its"):
    fingerprint.check_same_config(path, config)
  # the constant schedule leaves the fingerprint of a run made before schedules existed alone
  config.optim.schedule = "constant"
  assert "optim.schedule" not in fingerprint.fingerprinted(config.to_json_best_effort())
