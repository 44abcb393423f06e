"""The train step (non-finite skipping, remat, bf16) and the loop (logs, grids, config errors)."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import checkpoint as checkpoint_lib
from dit_jax import pipeline as pipeline_lib
from dit_jax import diffusion as diffusion_lib
from dit_jax import sharding
from dit_jax import train

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
from configs import default as default_config  # noqa: E402
from tests.test_sharding import tiny_batch, tiny_model, tiny_optim  # noqa: E402


def tiny_config(**overrides):
  """A depth-2, width-64 DiT-S/2 on 8x8 digits, batch 16 over the 8 test devices."""
  config = default_config.get_config("cpu")
  config.model = "DiT-S/2"
  config.depth, config.hidden_size, config.num_heads = 2, 64, 2
  config.data.image_size = 8
  config.data.max_examples = 256
  config.batch_size = 16
  config.num_train_steps = 6
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 0
  config.eval.fid_num_samples = 0
  config.optim.warmup_steps = 0
  config.mesh_shape = (-1, 1, 1)
  for k, v in overrides.items():
    target = config
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return config


def _read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def one_device_step():
  mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
  model = tiny_model()
  tx = train.create_optimizer(tiny_optim())
  state, shardings = train.create_train_state(model, tx, mesh, seed=0)
  step = train.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings, ema_decay=0.9)
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
  tx = train.create_optimizer(tiny_optim())
  batch = tiny_batch()
  state0, base_step = one_device_step
  out = {"base": jax.device_get(base_step(jax.tree.map(jnp.array, state0), batch))}
  for name, kw in dict(remat=dict(remat=True), bf16=dict(dtype=jnp.bfloat16)).items():
    model = tiny_model(**kw)
    state, shardings = train.create_train_state(model, tx, mesh, seed=0)
    step = train.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings, 0.9)
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


@pytest.mark.parametrize("overrides, match", [
    (dict(mesh_shape=(3, 1, 1)), "device count"),
    (dict(batch_size=12, mesh_shape=(8, 1, 1)), "not divisible by the data-parallel size 8"),
    (dict(model="DiT-S/3"), "patch"),
    (dict(model="DiT-Q/2"), "unknown model"),
    (dict(conditioning="film"), "unknown conditioning"),
    (dict(**{"data.name": "folder", "data.path": "/nonexistent/images"}), "does not exist"),
    (dict(**{"data.name": "latents", "data.path": ""}), "needs data.path"),
])
def test_bad_configs_fail_before_compiling(overrides, match, tmp_path, monkeypatch):
  def no_compile(*a, **k):
    raise AssertionError("compiled despite a bad config")
  monkeypatch.setattr(train, "jit_train_step", no_compile)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))


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
  config = tiny_config(eval_every_steps=6, peak_tflops_per_device=0.05,
                       **{"eval.respacing": "5", "eval.num_grid_samples": 4})
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 6 and int(state.nonfinite_total) == 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  per_step = {r["step"]: r for r in rows if "loss" in r}
  assert sorted(per_step) == [1, 2, 3, 4, 5, 6]
  assert not np.isfinite(per_step[3]["loss"]) and per_step[3]["skipped"] == 1
  assert per_step[6]["nonfinite_total"] == 1 and np.isfinite(per_step[6]["loss"])
  for key in ("images_per_sec", "steps_per_sec", "mfu", "grad_norm", "mse", "vb", "lr"):
    assert key in per_step[6], key
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
                          train.state_shardings(
                              train.create_model(config, (8, 8, 1), 10),
                              train.create_optimizer(config.optim),
                              sharding.create_mesh((-1, 1, 1)))[0])
  state, data_state = ckpt.restore(None, abstract)
  assert int(state.step) == 2 and data_state["next_step"] == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_the_trainer_trains_a_unet_through_the_same_loop(tmp_path):
  """One model interface: a 'UNet-*' name goes through the same state, step, loop and sampler."""
  from dit_jax import flops, unet
  config = tiny_config(model="UNet-Nano", num_train_steps=2, checkpoint_every_steps=2,
                       eval_every_steps=2, **{"eval.respacing": "3", "eval.num_grid_samples": 4})
  model = train.create_model(config, (8, 8, 1), 10)
  assert isinstance(model, unet.UNet) and model.num_classes == 10
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  gflops = next(r["gflops_per_image"] for r in rows if "gflops_per_image" in r)
  assert gflops == pytest.approx(flops.model_gflops(model))
  assert (tmp_path / "samples" / "step_00000002.png").exists()
