"""Meshes, logical-axis shardings, and one train step on sharded meshes vs one device."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dit_jax import sharding
from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.training import train_step
from tests.helpers import tiny_batch, tiny_model, tiny_optim


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert sharding.resolve_mesh_shape((2, 2, 2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="device count"):
    sharding.resolve_mesh_shape((4, 1, 1), 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.resolve_mesh_shape((-1, -1, 1), 8)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.resolve_mesh_shape((-1, 3, 1), 8)


def test_check_batch():
  mesh = sharding.create_mesh((2, 2, 2))
  sharding.check_batch(8, mesh)
  with pytest.raises(ValueError, match="data-parallel size 4"):
    sharding.check_batch(6, mesh)


def test_state_shardings_follow_logical_rules():
  """fc1 (embed, mlp) -> (fsdp, tensor); qkv (embed, None, heads, kv) -> (fsdp, None, tensor)."""
  mesh = sharding.create_mesh((2, 2, 2))
  tx = train_step.create_optimizer(tiny_optim())
  _, shardings = train_step.state_shardings(tiny_model(), tx, mesh)
  blk = shardings.params["blocks_0"]
  assert blk["mlp"]["fc1"]["kernel"].spec == P("fsdp", "tensor")
  assert blk["mlp"]["fc2"]["kernel"].spec == P("tensor", "fsdp")
  assert blk["attn"]["qkv"]["kernel"].spec == P("fsdp", None, "tensor", None)
  # The optimizer moments are sharded like the params; Adam's count is replicated.
  mu = shardings.opt_state[0].mu["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert mu.spec == P("fsdp", "tensor")
  assert shardings.step.spec == P()
  # Scanned layers keep the leading "layers" axis replicated.
  _, scanned = train_step.state_shardings(tiny_model(scan_layers=True), tx, mesh)
  assert scanned.params["blocks"]["mlp"]["fc1"]["kernel"].spec == P(None, "fsdp", "tensor")


def test_noise_and_t_differ_per_example_and_ignore_sharding():
  """Each example gets its own noise and t; a sharded draw equals the one-device draw."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  shape = (16, 8, 8, 2)
  noise1, t1 = jax.jit(lambda a, b: diffusion_lib.create().draw_noise_and_t(a, b, shape))(k1, k2)
  mesh = sharding.create_mesh((8, 1, 1))
  f = jax.jit(lambda a, b: diffusion_lib.create().draw_noise_and_t(a, b, shape),
              out_shardings=(sharding.batch_sharding(mesh), train_step.batch_shardings(mesh)["label"]))
  noise8, t8 = f(k1, k2)
  assert len(noise8.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(noise8), np.asarray(noise1))
  np.testing.assert_array_equal(np.asarray(t8), np.asarray(t1))
  flat = np.asarray(noise1).reshape(16, -1)
  assert len({row.tobytes() for row in flat}) == 16
  assert len(set(np.asarray(t1).tolist())) > 8  # 16 draws from 1000 values


def _one_step(mesh_shape, devices=None, state=None):
  mesh = sharding.create_mesh(mesh_shape, devices)
  model = tiny_model()
  diffusion = diffusion_lib.create()
  tx = train_step.create_optimizer(tiny_optim())
  state, shardings = train_step.create_train_state(model, tx, mesh, seed=0)
  step = train_step.jit_train_step(model, diffusion, tx, mesh, shardings, ema_decay=0.9)
  batch = jax.device_put(tiny_batch(), train_step.batch_shardings(mesh))
  init_params = jax.device_get(state.params)
  new_state, metrics = step(state, batch)
  return init_params, jax.device_get(new_state), jax.device_get(metrics), new_state


@pytest.fixture(scope="module")
def single_device_step():
  return _one_step((1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_train_step_on_mesh_equals_single_device(mesh_shape, single_device_step):
  """Same init, same loss, same params/EMA/Adam moments after one step, to <= 1e-5."""
  init1, state1, metrics1, _ = single_device_step
  init_n, state_n, metrics_n, live = _one_step(mesh_shape)
  assert jax.device_count() == 8
  # The params really are spread: a 64x256 MLP kernel lives on all 8 devices.
  fc1 = live.params["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert len(fc1.sharding.device_set) == 8
  if mesh_shape == (2, 2, 2):
    assert fc1.addressable_shards[0].data.shape == (32, 128)
  jax.tree.map(np.testing.assert_array_equal, init_n, init1)
  np.testing.assert_allclose(metrics_n["loss"], metrics1["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics_n["grad_norm"], metrics1["grad_norm"], rtol=1e-5)
  assert metrics1["skipped"] == 0
  for a, b in zip(jax.tree.leaves(state_n), jax.tree.leaves(state1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The step moved the params (a comparison of unchanged states would prove nothing).
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(state1.params),
                                                 jax.tree.leaves(init1))]
  assert max(moved) > 1e-4
