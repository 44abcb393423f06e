"""Post-hoc EMA (EDM2): the σ_rel <-> γ map, the reconstruction of a power-function EMA from
snapshots of others (a toy trajectory, then a real tiny run), its config checks and its rows.

Time is in training steps: the EMA after step t uses β_t = (1 - 1/t)^(γ+1), t = 1, 2, ...
"""
import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import config_check
from dit_jax import sharding
from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.sweep import results
from dit_jax.training import fingerprint
from dit_jax.training import phema
from dit_jax.training import posthoc
from dit_jax.training import train
from dit_jax.training import train_step
from tests.helpers import read_jsonl, tiny_batch, tiny_config, tiny_model, tiny_optim, tree_hash

EPS32 = float(np.finfo(np.float32).eps)


def test_sigma_rel_and_gamma_round_trip_and_edm2_pairs():
  # σ_rel² = (γ+1) / ((γ+2)² (γ+3)): γ = 16.97 gives 17.97 / (18.97² x 19.97) = 0.0025 = 0.05²,
  # γ = 6.94 gives 7.94 / (8.94² x 9.94) = 0.0100 = 0.10² (EDM2's published pairs).
  gammas = phema.sigma_rel_to_gamma([0.05, 0.10])
  np.testing.assert_allclose(gammas, [16.97, 6.94], atol=5e-3)
  sigmas = np.array([0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.28])
  np.testing.assert_allclose(phema.gamma_to_sigma_rel(phema.sigma_rel_to_gamma(sigmas)), sigmas,
                             rtol=1e-10)
  # γ = 0 (a uniform average) is σ_rel = 1/sqrt(12), the largest valid σ_rel.
  assert phema.gamma_to_sigma_rel(0.0) == pytest.approx(phema.MAX_SIGMA_REL)
  assert float(phema.ema_weight(5.0, 1)) == 1.0  # t = 1: the EMA becomes the first params
  np.testing.assert_allclose(float(phema.ema_weight(6.94, 400_000)),
                             1 - (1 - 1 / 400_000) ** 7.94, rtol=1e-5)


def _trajectory(t):
  return np.stack([np.sin(t / 7) + t / 50, np.cos(t / 13) - t / 80])


def _tracked(sigma_rel, steps, every):
  """The power-function EMA of `_trajectory` by the recursion, in float64: {t: EMA} each `every`."""
  gamma = float(phema.sigma_rel_to_gamma(sigma_rel))
  ema, out = _trajectory(0.0), {}
  for t in range(1, steps + 1):
    beta = (1 - 1 / t) ** (gamma + 1)
    ema = beta * ema + (1 - beta) * _trajectory(float(t))
    if t % every == 0:
      out[t] = ema.astype(np.float32)  # snapshots are float32, as the params
  return out


def test_toy_trajectory_reconstruction_within_the_bound():
  steps, every = 500, 50
  snaps = [phema.Snapshot(t, s, v) for s in (0.05, 0.10)
           for t, v in _tracked(s, steps, every).items()]
  for target in (0.075, 0.15):
    got, cond = phema.reconstruct(snaps, target)
    exact = _tracked(target, steps, every)[steps]
    # The bound: the target profile's L2 distance r from its least-squares fit by the snapshot
    # profiles times the trajectory's L2 norm (Cauchy-Schwarz), plus the float32 rounding of the
    # snapshots amplified by the Gram matrix's condition number: cond x eps32 x max|p|.
    x, _ = phema.solve_coefficients([s.step for s in snaps], [s.sigma_rel for s in snaps],
                                    steps, target)
    corr = phema.power_function_correlation
    t_in = np.array([s.step for s in snaps], float)
    s_in = np.array([s.sigma_rel for s in snaps])
    x = x[:, 0]
    r2 = (corr(steps, target, steps, target) - 2 * x @ corr(t_in, s_in, steps, target)
          + x @ corr(t_in[:, None], s_in[:, None], t_in[None], s_in[None]) @ x)
    p = _trajectory(np.arange(steps + 1.0))
    tol = np.sqrt(max(r2, 0)) * np.sqrt((p ** 2).sum(1)) + cond * EPS32 * np.abs(p).max()
    err = np.abs(got[target] - exact)
    assert np.all(err <= tol), (target, err, tol, cond)
    assert err.max() < 1e-2 and cond < 2e3  # measured: 3.6e-3 (0.075), 3.4e-3 (0.15); cond 1.1e3
  got, _ = phema.reconstruct(snaps, 0.10)  # a tracked profile comes back as itself
  np.testing.assert_allclose(got[0.10], _tracked(0.10, steps, every)[steps], atol=1e-5)


def test_reconstruction_loads_one_leaf_of_every_snapshot_at_a_time():
  # Snapshots of a two-leaf tree whose leaves load on call (as posthoc's snapshot files): each
  # leaf is loaded once, all of leaf "a" before any of leaf "b", and the result equals the
  # reconstruction from the same trees in memory.
  steps, every, log = 200, 25, []
  def loader(name, t, sigma, x):
    return lambda: log.append((name, t, sigma)) or x
  tracked = {s: _tracked(s, steps, every) for s in (0.05, 0.10)}
  lazy = [phema.Snapshot(t, s, lambda t=t, s=s, v=v: {"a": loader("a", t, s, v[0]),
                                                       "b": loader("b", t, s, v[1:])})
          for s, by_step in tracked.items() for t, v in by_step.items()]
  eager = [phema.Snapshot(t, s, {"a": v[0], "b": v[1:]})
           for s, by_step in tracked.items() for t, v in by_step.items()]
  got, _ = phema.reconstruct(lazy, [0.075, 0.15])
  want, _ = phema.reconstruct(eager, [0.075, 0.15])
  assert len(log) == 2 * len(lazy) and len(set(log)) == len(log)
  assert [name for name, *_ in log] == ["a"] * len(lazy) + ["b"] * len(lazy)
  assert tree_hash(got) == tree_hash(want)
  with pytest.raises(ValueError, match="same parameter tree"):
    phema.reconstruct(eager + [phema.Snapshot(steps, 0.05, {"a": np.zeros(())})], 0.1)


def test_the_step_updates_the_tracked_emas_with_beta_t_and_a_skipped_step_does_not():
  mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
  model, tx = tiny_model(), train_step.create_optimizer(tiny_optim())
  state, shardings = train_step.create_train_state(model, tx, mesh, seed=0, num_phema=2)
  gammas = tuple(phema.sigma_rel_to_gamma([0.05, 0.10]))
  step = train_step.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings, 0.9,
                                   phema_gammas=gammas)
  state, _ = step(state, tiny_batch())  # t = 1: β = 0, both EMAs become the params
  first = jax.device_get(state)
  for tree in first.phema:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), tree, first.params)
  bad = tiny_batch(seed=1)
  bad["image"][0, 0, 0, 0] = np.nan
  state, m = step(jax.tree.map(jnp.array, first), bad)
  assert m["skipped"] == 1 and tree_hash(state.phema) == tree_hash(first.phema)
  state, m = step(state, tiny_batch(seed=2))  # t = 3 (the skipped batch counts as a step)
  after = jax.device_get(state)
  for tree, old, gamma in zip(after.phema, first.phema, gammas):
    w = 1 - (1 - 1 / 3) ** (gamma + 1)
    jax.tree.map(lambda e, o, p, w=w: np.testing.assert_allclose(e, o + w * (p - o), atol=1e-6),
                 tree, old, after.params)


def _posthoc_config(**overrides):
  return tiny_config(**{"ema.sigma_rels": (0.05, 0.10), "ema.num_snapshots": 8,
                        "data.val_size": 32, "eval.val.every_steps": 8,
                        "eval.val.num_examples": 32, "eval.val.num_timesteps": 2,
                        "eval.val.batch_size": 64, **overrides})


@pytest.mark.parametrize("overrides,match", [
    ({"eval.val.every_steps": 0}, "scores its candidates on the validation loss"),
    ({"eval.val.every_steps": 0, "data.val_size": 0}, "set eval.val.every_steps > 0 and data"),
    ({"ema.sigma_rels": (0.05, 0.3)}, r"ema.sigma_rels=.*must be in \(0, 0.2887\)"),
    ({"ema.sigma_rels": (0.0,)}, r"must be in \(0, 0.2887\)"),
    ({"ema.candidates": (0.1, 0.29)}, r"ema.candidates=.*must be in"),
    ({"ema.candidates": ()}, "ema.candidates is empty"),
    ({"ema.num_snapshots": 0}, "ema.num_snapshots must be >= 1"),
])
def test_a_bad_posthoc_config_is_a_clear_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_check.check(_posthoc_config(**overrides))


def test_the_fingerprint_holds_the_ema_block_only_when_posthoc_is_on():
  off = tiny_config()
  off_changed = tiny_config(**{"ema.candidates": (0.1,), "ema.num_snapshots": 3})
  assert fingerprint.fingerprint(off) == fingerprint.fingerprint(off_changed)
  assert not any(k.startswith("ema.") for k in fingerprint.fingerprinted(off.to_json()))
  on = _posthoc_config()
  assert fingerprint.fingerprint(on) != fingerprint.fingerprint(
      _posthoc_config(**{"ema.candidates": (0.1,)}))


def _rel_l2(a, b):
  diff = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  norm = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in jax.tree.leaves(b))
  return np.sqrt(diff / norm)


def test_a_tiny_run_reconstructs_a_tracked_profile_and_selects_on_val_loss(tmp_path):
  # 0.075 is tracked directly for this test only, beside the 0.05/0.10 it is reconstructed from.
  config = _posthoc_config(num_train_steps=40, checkpoint_every_steps=10,
                           **{"ema.sigma_rels": (0.05, 0.075, 0.10)})
  state = train.train_and_evaluate(config, str(tmp_path))
  snaps = posthoc.read_snapshots(tmp_path, 40)
  assert sorted({s.step for s in snaps}) == [5, 10, 15, 20, 25, 30, 35, 40]
  got, cond = phema.reconstruct([s for s in snaps if s.sigma_rel != 0.075], 0.075)
  tracked = jax.device_get(state.phema)
  err = _rel_l2(got[0.075], tracked[1])
  spread = _rel_l2(tracked[0], tracked[2])  # how far apart the two input profiles are
  print(f"tiny run: rel L2 error {err:.3g}, 0.05 vs 0.10 {spread:.3g}, condition {cond:.3g}")
  # measured: 4.0e-5 against a 0.05-to-0.10 distance of 8.8e-3; condition number 535
  assert err < 0.05 * spread and err < 2e-4, (err, spread, cond)
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  val_rows = {r["step"]: r for r in rows if "val_loss" in r}
  assert val_rows[8]["ema_sigma_rel"] == 0.10 and "ema_selection" not in val_rows[8]
  assert val_rows[40]["ema_sigma_rel"] in config.ema.candidates
  assert val_rows[40]["ema_condition"] > 0
  info = dict(model="x", gflops=1.0)
  rows = results.evaluation_rows("r", tmp_path, info, results.provenance(config, "pixels"))
  assert rows[0]["step"] == 8 and rows[0]["ema_sigma_rel"] == 0.10
  assert "ema_selection" not in rows[0] and "ema_decay" not in rows[0]
  final = rows[-1]
  assert final["step"] == 40 and final["ema"] == "posthoc"
  assert final["ema_tracked"] == [0.05, 0.075, 0.10] and final["ema_condition"] > 0
  assert final["ema_sigma_rel"] in config.ema.candidates
  assert set(final["ema_selection"]) == {repr(float(s)) for s in config.ema.candidates}
  assert final["val_loss"] == pytest.approx(min(final["ema_selection"].values()))
  picked = json.loads((tmp_path / "phema" / "selection.json").read_text())
  assert picked["sigma_rel"] == final["ema_sigma_rel"]
  # Resuming from an earlier checkpoint re-runs the steps bitwise: same tracked EMAs, snapshots.
  snapshot_40 = (tmp_path / "phema" / "00000040.npz").read_bytes()
  shutil.rmtree(tmp_path / "checkpoints" / "40")  # as if killed after step 40's snapshot...
  (tmp_path / "phema" / "00000040.npz").unlink()  # ... or before it
  again = train.train_and_evaluate(config, str(tmp_path))
  assert tree_hash(again.phema) == tree_hash(state.phema)
  assert tree_hash(again.ema_params) == tree_hash(state.ema_params)
  with np.load(tmp_path / "phema" / "00000040.npz") as a, np.load(
      io.BytesIO(snapshot_40)) as b:
    assert all(np.array_equal(a[k], b[k]) for k in b.files)
  # Sampling reads the selected profile back.
  trained = train.load_trained(tmp_path)
  expected = posthoc.reconstruct(tmp_path, 40, picked["sigma_rel"])[0][picked["sigma_rel"]]
  assert tree_hash(trained.params) == tree_hash(expected)
