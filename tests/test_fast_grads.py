"""The hand-written backward passes (dense_dot, attention) against JAX's own autodiff, and the
benchmark's torch DiT loss against dit_jax's."""
import math

import torch  # before jax/TF (see conftest)
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dit_jax.models import attention, dense_dot, dit
from dit_jax.objectives import diffusion
from tests.helpers import load_tool


def _rand(key, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


# (x shape, kernel shape, x's contracted axes): flax Dense, DenseGeneral to (3, heads, hd) as qkv,
# DenseGeneral from (heads, hd) as proj, contracted axes not last / not ascending, a 2-D input,
# and an input larger than the output (fc2: the other branch of the kernel gradient).
CASES = [((4, 16, 12), (12, 20), (2,)), ((4, 16, 12), (12, 3, 2, 5), (2,)),
         ((4, 16, 3, 4), (3, 4, 10), (2, 3)), ((4, 3, 16, 4), (3, 4, 10), (1, 3)),
         ((4, 3, 16, 4), (4, 3, 10), (3, 1)), ((6, 12), (12, 7), (1,)),
         ((4, 16, 48), (48, 8), (2,))]


@pytest.mark.parametrize("x_shape,w_shape,axes", CASES)
def test_dense_dot_matches_autodiff(x_shape, w_shape, axes):
  x, w = _rand(0, x_shape), _rand(1, w_shape)
  dims = ((axes, tuple(range(len(axes)))), ((), ()))
  out = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, dims)))
  np.testing.assert_array_equal(dense_dot.dot_general(x, w, dims), lax.dot_general(x, w, dims))
  want = jax.grad(out(lax.dot_general), (0, 1))(x, w)
  got = jax.grad(out(dense_dot.dot_general), (0, 1))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape and g.dtype == r.dtype
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  # A nonzero gradient, so the comparison tests something.
  assert float(jnp.max(jnp.abs(want[1]))) > 0.1


def test_dense_dot_falls_back_with_batch_dims():
  x, w = _rand(0, (3, 5, 4)), _rand(1, (3, 4, 6))
  dims = (((2,), (1,)), ((0,), (0,)))
  f = lambda d: jax.grad(lambda x, w: jnp.sum(d(x, w, dims) ** 2), (0, 1))(x, w)
  for g, r in zip(f(dense_dot.dot_general), f(lax.dot_general)):
    np.testing.assert_array_equal(g, r)


def _qkv(t=32, s=32, b=2, n=3, h=16, dtype=jnp.float32):
  return (_rand(2, (b, t, n, h), dtype), _rand(3, (b, s, n, h), dtype), _rand(4, (b, s, n, h), dtype))


def _check_attention(q, k, v, mask, rtol):
  g = _rand(5, q.shape, q.dtype)
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  ours = lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask)
  o_ref, vjp_ref = jax.vjp(ref, q, k, v)
  o, vjp = jax.vjp(ours, q, k, v)
  np.testing.assert_allclose(np.float32(o), np.float32(o_ref), rtol=rtol, atol=rtol)
  for a, b in zip(vjp(g), vjp_ref(g)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=rtol, atol=rtol)
    assert float(jnp.max(jnp.abs(b.astype(jnp.float32)))) > 0.01


def test_attention_matches_jax():
  _check_attention(*_qkv(), None, 1e-5)


def test_masked_attention_matches_jax_with_a_fully_masked_row():
  q, k, v = _qkv(t=8, s=12)
  mask = np.ones((2, 1, 1, 12), bool)
  mask[0, ..., 7:] = False
  mask[1] = False  # example 1 attends to nothing: jax averages, and its logits get no gradient
  _check_attention(q, k, v, jnp.asarray(mask), 1e-5)


def test_attention_bfloat16_matches_jax():
  _check_attention(*_qkv(dtype=jnp.bfloat16), None, 2e-2)


def test_dit_gradients_match_jax_attention_and_flax_dense(monkeypatch):
  """A whole DiT with both replacements against one with jax's attention and flax's Dense."""
  kw = dict(input_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2,
            num_classes=10)
  x, t, y = _rand(6, (2, 8, 8, 2)), jnp.array([3, 700]), jnp.array([1, 4])
  ours = dit.DiT(**kw)
  params = ours.init(jax.random.key(0), x, t, y)["params"]
  leaves, tree = jax.tree.flatten(params)  # move off adaLN-Zero's zeros so every weight has a grad
  params = tree.unflatten([a + 0.1 * _rand(i, a.shape) for i, a in enumerate(leaves)])
  loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, x, t, y) ** 2)
  got = jax.grad(loss(ours))(params)
  monkeypatch.setattr(dense_dot, "Dense", nn.Dense)
  monkeypatch.setattr(dense_dot, "DenseGeneral", nn.DenseGeneral)
  want = jax.grad(loss(dit.DiT(**kw, attention_impl="xla")))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_bench_torch_loss_matches_dit_jax():
  """tools/bench_train.py's torch loss (ADM's formulas) gives dit_jax's loss, mse and vb."""
  diff = diffusion.create()
  rng = np.random.default_rng(0)
  b, c = 6, 3
  x0 = rng.uniform(-1, 1, (b, 4, 4, c)).astype(np.float32)
  noise = rng.standard_normal((b, 4, 4, c)).astype(np.float32)
  out = np.concatenate([rng.standard_normal((b, 4, 4, c)),
                        rng.uniform(-1, 1, (b, 4, 4, c))], -1).astype(np.float32)
  t = np.array([0, 0, 1, 10, 500, 999], np.int32)
  want = diff.training_losses(lambda x_t, _: jnp.asarray(out), jnp.asarray(x0), jnp.asarray(t),
                              jnp.asarray(noise))
  nchw = lambda a: torch.tensor(np.ascontiguousarray(np.moveaxis(a, -1, 1)))
  fn = load_tool("bench_train").TorchHybridLoss(diff)
  tt = torch.tensor(t, dtype=torch.long)
  x_t = fn.q_sample(nchw(x0), tt, nchw(noise))
  np.testing.assert_allclose(np.moveaxis(x_t.numpy(), 1, -1), diff.q_sample(x0, t, noise),
                             rtol=1e-6, atol=1e-6)
  got = fn(nchw(out), nchw(x0), x_t, tt, nchw(noise))
  for g, key in zip(got, ("loss", "mse", "vb")):
    np.testing.assert_allclose(g.numpy(), want[key], rtol=2e-4, atol=1e-6, err_msg=key)
  assert float(np.min(want["vb"])) > 0 and math.isfinite(float(np.max(want["vb"])))
