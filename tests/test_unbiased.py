"""KID against torch-fidelity, FID∞ on Gaussians of known Fréchet distance, both in SampleQuality."""
import json
import math

import torch  # before jax/TF (see conftest)
from torch_fidelity import metric_kid

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import models
from dit_jax import objectives
from dit_jax import sharding as sharding_lib
from dit_jax.data import sources
from dit_jax.evaluation import evaluators
from dit_jax.evaluation import fid
from dit_jax.evaluation import unbiased
from dit_jax import config_check
from tests.helpers import tiny_config


def _features(seed, n, d=64, shift=0.0):
  """n draws (seed) of one correlated Gaussian, shifted."""
  mix = np.random.default_rng(1000).normal(size=(d, d)) / np.sqrt(d)
  return np.random.default_rng(seed).normal(size=(n, d)) @ mix + shift


def _torch_fidelity_kid(a, b, subsets, size, seed=0):
  out = metric_kid.kid_features_to_metric(
      torch.from_numpy(a), torch.from_numpy(b), kid_subsets=subsets, kid_subset_size=size,
      verbose=False, rng_seed=seed, kid_degree=3, kid_gamma=None, kid_coef0=1)
  return out[metric_kid.KEY_METRIC_KID_MEAN], out[metric_kid.KEY_METRIC_KID_STD]


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_kid_equals_torch_fidelity_when_every_subset_is_the_whole_set(shift):
  a, b = _features(0, 300), _features(1, 300, shift=shift)
  theirs, theirs_std = _torch_fidelity_kid(a, b, subsets=3, size=300)
  ours, ours_std, size = unbiased.kid(a, b, subsets=3, subset_size=300)
  print(f"KID, subsets = whole sets: ours {ours!r}, torch-fidelity {theirs!r}")
  assert size == 300 and ours_std < 1e-9 * max(1.0, abs(ours)) and theirs_std < 1e-9
  assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
  # The subset size is capped at the smaller set (torch-fidelity raises instead).
  assert unbiased.kid(a, b, subsets=2, subset_size=1000)[0] == pytest.approx(theirs, rel=1e-9,
                                                                              abs=1e-12)


def test_kid_matches_torch_fidelity_over_random_subsets():
  a, b = _features(2, 300), _features(3, 400, shift=0.2)
  subsets, size = 100, 100
  theirs, theirs_std = _torch_fidelity_kid(a, b, subsets, size, seed=7)
  ours, ours_std, _ = unbiased.kid(a, b, subsets, size, np.random.default_rng(7))
  assert ours > 0 and theirs > 0
  # Independent subsets: the means differ by sampling noise only, the stds alike.
  assert abs(ours - theirs) < 4 * math.sqrt(2 / subsets) * max(ours_std, theirs_std), (ours, theirs)
  assert 0.7 < ours_std / theirs_std < 1.4, (ours_std, theirs_std)
  print(f"KID over {subsets} subsets of {size}: ours {ours:.5f} ± {ours_std:.5f}, torch-fidelity "
        f"{theirs:.5f} ± {theirs_std:.5f}")
  same, _, _ = unbiased.kid(a, _features(9, 400), subsets, size)
  assert abs(same) < 0.1 * ours  # ~0 for one distribution


def test_fid_inf_counts():
  np.testing.assert_array_equal(unbiased.fid_inf_counts(512, 10),
                                [128, 171, 213, 256, 299, 341, 384, 427, 469, 512])
  np.testing.assert_array_equal(unbiased.fid_inf_counts(8, 10), [2, 3, 4, 5, 6, 7, 8])
  assert len(unbiased.fid_inf_counts(512, 0)) == 0
  a = _features(4, 40, d=8)
  assert unbiased.fid_infinity(a, np.zeros(8), np.eye(8), points=1) is None


def test_fid_inf_is_closer_to_the_exact_frechet_distance_than_fid():
  d, n = 8, 400
  m = np.linspace(0.0, 0.5, d)
  s = np.linspace(0.6, 1.6, d)
  exact = float(m @ m + np.sum((1.0 - s) ** 2))  # N(m, diag(s²)) vs N(0, I)
  assert exact == pytest.approx(fid.frechet_distance(m, np.diag(s ** 2), np.zeros(d), np.eye(d)))
  fids, infs = [], []
  for seed in range(20):
    x = np.random.default_rng(seed).normal(size=(n, d)) * s + m
    fit = unbiased.fid_infinity(x, np.zeros(d), np.eye(d), points=10,
                                rng=np.random.default_rng(100 + seed))
    assert fit["counts"][-1] == n and fit["fids"][-1] == pytest.approx(
        fid.frechet_distance(*fid.statistics(x), np.zeros(d), np.eye(d)))
    fids.append(fit["fids"][-1])
    infs.append(fit["fid_inf"])
  fid_bias, inf_bias = np.mean(fids) - exact, np.mean(infs) - exact
  print(f"exact {exact:.4f}: FID_{n} {np.mean(fids):.4f} (bias {fid_bias:+.4f}), FID∞ "
        f"{np.mean(infs):.4f} (bias {inf_bias:+.4f}, seed std {np.std(infs):.4f})")
  assert fid_bias > 0.01  # FID at finite N is biased upwards (~tr(...)/N)
  assert abs(inf_bias) < 0.5 * fid_bias
  assert abs(inf_bias) < 0.02 + 3 * np.std(infs) / math.sqrt(len(infs))


def _eval_cfg(**fid_fields):
  config = tiny_config()
  config.eval.fid.update(every_steps=1, num_samples=32, **fid_fields)
  return config.eval


@pytest.mark.parametrize("field,value,match", [
    ("kid_subsets", 0, "kid_subsets must be >= 1"),
    ("kid_subset_size", 1, "kid_subset_size must be >= 2"),
    ("fid_inf_points", 1, "fid_inf_points must be 0"),
    ("fid_inf_points", -3, "fid_inf_points must be 0"),
])
def test_config_errors(field, value, match):
  with pytest.raises(ValueError, match=match):
    evaluators.check_config(_eval_cfg(**{field: value}), val_size=0)
  evaluators.check_config(_eval_cfg(), val_size=0)  # the defaults pass


def _linear_features(images):
  x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
  return {"pool": x[:, :16] - x[:, 16:32]}


def test_sample_quality_rows_carry_kid_and_fid_inf(tmp_path, monkeypatch):
  config = tiny_config(**{"eval.fid.every_steps": 1, "eval.fid.num_samples": 32,
                          "eval.fid.batch_size": 16, "eval.fid.respacing": "2",
                          "eval.fid.kid_subsets": 5, "eval.fid.cache_dir": str(tmp_path)})
  source = sources.create_source(config.data)
  model = config_check.check_with_data(config, source)
  mesh = sharding_lib.create_mesh((-1, 1, 1))
  images = np.random.default_rng(0).integers(0, 256, (64,) + tuple(source.image_shape), np.uint8)
  _linear_features.weights_key = "linear"
  ref = fid.compute_reference("toy", _linear_features, images, batch_size=16)
  monkeypatch.setattr(evaluators, "feature_network_and_reference",
                      lambda *a: ("toy", _linear_features, ref))
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  ev = evaluators.SampleQuality(config.eval, config.data, objectives.from_config(config), source,
                                model, mesh, tmp_path)
  out = ev.run(params, 1)
  assert {"fid_toy", "kid_toy", "kid_std_toy", "fid_inf_toy", "fid_inf_slope_toy"} <= set(out)
  assert all(math.isfinite(out[k]) for k in out), out
  assert ev.run(params, 1) == out  # deterministic
  # A stats-only reference (no features): no KID, and fid_reference.json says why.
  monkeypatch.setattr(evaluators, "feature_network_and_reference", lambda *a: (
      "toy", _linear_features, fid.Reference("toy", ref.mu, ref.sigma)))
  ev = evaluators.SampleQuality(config.eval, config.data, objectives.from_config(config), source,
                                model, mesh, tmp_path)
  out = ev.run(params, 1)
  assert "kid_toy" not in out and math.isfinite(out["fid_inf_toy"])
  assert "KID needs the reference features" in (tmp_path / "fid_reference.json").read_text()


def test_results_rows_carry_kid_and_fid_inf_beside_fid(tmp_path):
  from dit_jax.sweep import results  # pylint: disable=g-import-not-at-top
  rows = [dict(step=2, fid_digits_cnn=20.0, kid_digits_cnn=0.01, kid_std_digits_cnn=0.002,
               fid_inf_digits_cnn=18.0, fid_inf_slope_digits_cnn=900.0, wall_s=1.0),
          dict(step=4, fid_digits_cnn=12.0, fid_inf_digits_cnn=10.0, fid_inf_slope_digits_cnn=800.0),
          dict(step=4, val_loss=0.5)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  got = results.evaluation_rows("r", tmp_path, dict(gflops=1.0), dict(batch_size=4))
  assert [(r["fid"], r["fid_metric"], r["kid"], r["kid_std"], r["fid_inf"], r["fid_inf_slope"])
          for r in got] == [(20.0, "fid_digits_cnn", 0.01, 0.002, 18.0, 900.0),
                            (12.0, "fid_digits_cnn", None, None, 10.0, 800.0)]
  assert got[1]["val_loss"] == 0.5
