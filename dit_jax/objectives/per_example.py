"""Per-example randomness and reductions, shared by every objective, sampler and evaluator.

Example i's noise depends only on (key, i) (`fold_in(key, i)`), never on the batch size, the
sharding or the device it lands on: results do not depend on the mesh, and a resumed run or a
re-sharded evaluation draws the same numbers.
"""
import jax
import jax.numpy as jnp


def per_example_keys(key, batch: int):
  """Example i's key depends only on (key, i): independent of the batch's sharding and device."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def per_example_normal(rng: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Standard normal [B, ...]; row i comes from fold_in(rng, i), whatever B and the sharding."""
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), dtype))(
      per_example_keys(rng, shape[0]))


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all non-batch axes."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))
