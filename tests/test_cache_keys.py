"""Caches keyed by content (feature net by its training images, reference statistics by their images
and the net's weights), and samples that are class-stratified, never the first N examples."""
import numpy as np
import pytest
from PIL import Image

from dit_jax import files
from dit_jax import sharding as sharding_lib
from dit_jax.data import sources, splits
from dit_jax.evaluation import evaluators, fid
from tests.helpers import tiny_config


def test_stratified_sample_keeps_class_shares_and_is_seeded():
  labels = np.repeat([0, 1, 2], [50, 30, 20])  # listed class by class, as a folder is
  idx = sources.stratified_sample(labels, 10, seed=0)
  assert np.all(np.diff(idx) > 0) and len(idx) == 10
  np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 3, 2])
  np.testing.assert_array_equal(idx, sources.stratified_sample(labels, 10, seed=0))
  assert not np.array_equal(idx, sources.stratified_sample(labels, 10, seed=1))
  # Shares that do not divide: the largest remainders get the extra examples, the total is exact.
  odd = sources.stratified_sample(np.repeat([0, 1, 2], [34, 33, 33]), 7, seed=0)
  assert len(odd) == 7 and sorted(np.bincount(np.repeat([0, 1, 2], [34, 33, 33])[odd])) == [2, 2, 3]
  np.testing.assert_array_equal(sources.stratified_sample(labels, 100, 0), np.arange(100))
  np.testing.assert_array_equal(sources.stratified_sample(labels, 500, 0), np.arange(100))


def _folder(root, counts, size=8):
  rng = np.random.default_rng(len(counts))
  for c, n in enumerate(counts):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (size, size), np.uint8)).save(root / f"class{c}/{i}.png")
  return root


def _data_cfg(**kw):
  cfg = sources.default_data_config()
  cfg.update(dict(image_size=8, channels=1, flip=False, **kw))
  return cfg


def test_max_examples_is_a_stratified_sample_of_every_class(tmp_path):
  root = _folder(tmp_path / "imgs", [6, 6, 6])
  src = sources.create_source(_data_cfg(name="folder", path=str(root), max_examples=6))
  assert src.num_examples == 6 and src.name == "folder_imgs"
  np.testing.assert_array_equal(np.bincount(sources.labels_of(src)), [2, 2, 2])  # not 6 of class 0
  other = sources.create_source(_data_cfg(name="folder", path=str(root), max_examples=6,
                                          val_seed=1))
  assert not np.array_equal(src.images, other.images)  # seeded by data.val_seed


def test_reference_sample_is_stratified(tmp_path):
  root = _folder(tmp_path / "imgs", [20, 20])
  config = tiny_config(**{"data.name": "folder", "data.path": str(root), "data.channels": 1,
                          "eval.fid.reference_size": 10})
  src = sources.create_source(config.data)
  images, labels = evaluators.reference_sample(config.eval.fid, config.eval.seed, src)
  assert len(images) == 10
  np.testing.assert_array_equal(np.bincount(labels), [5, 5])


def _npz(path, seed, n=120):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 3
  images = (rng.integers(0, 60, (n, 8, 8)) + 90 * labels[:, None, None]).astype(np.uint8)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, images=images, labels=labels)
  return path


def _made(path, cache):
  config = tiny_config(**{"data.name": "npz", "data.path": str(path), "data.max_examples": 0,
                          "eval.fid.cache_dir": str(cache), "eval.fid.num_samples": 16})
  src = sources.create_source(config.data)
  mesh = sharding_lib.create_mesh((-1, 1, 1))
  return evaluators.feature_network_and_reference(config.eval, config.data, src, mesh)


@pytest.mark.slow
def test_caches_are_keyed_by_content_never_by_the_source_name(tmp_path):
  cache = tmp_path / "cache"
  name_a, _, ref_a = _made(_npz(tmp_path / "a" / "data.npz", 0), cache)
  name_b, _, ref_b = _made(_npz(tmp_path / "b" / "data.npz", 1), cache)  # same name, other images
  assert name_a == name_b == "npz_data_cnn"  # the file's name in the metric: fid_npz_data_cnn
  assert len(list(cache.glob("feature_net_npz_data_8_*.npz"))) == 2  # a net for each
  assert len(list(cache.glob("ref_npz_data_*.npz"))) == 2
  assert ref_a.fingerprint() != ref_b.fingerprint()
  name_c, _, _ = _made(_npz(tmp_path / "mnist_small.npz", 0), cache)
  assert name_c == "npz_mnist_small_cnn"
  # The same images again: everything loads from the cache (no new file).
  before = sorted(cache.iterdir())
  _, _, again = _made(tmp_path / "a" / "data.npz", cache)
  assert sorted(cache.iterdir()) == before and again.fingerprint() == ref_a.fingerprint()


def test_reference_statistics_are_keyed_by_the_weights_and_checked_on_load(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (32, 4, 4, 1), np.uint8)

  def net(scale):
    def fn(x):
      return {"pool": x.reshape(x.shape[0], -1)[:, :5].astype(np.float32) * scale}
    fn.weights_key = f"w{scale}"
    return fn

  logged = []
  ref1 = fid.cached_reference(tmp_path, "toy", "all", 4, "toy_cnn", net(1.0), images, batch_size=8)
  ref2 = fid.cached_reference(tmp_path, "toy", "all", 4, "toy_cnn", net(2.0), images, batch_size=8)
  assert len(list(tmp_path.glob("ref_toy_*.npz"))) == 2  # a retrained net gets its own statistics
  np.testing.assert_allclose(ref2.mu, 2 * ref1.mu, rtol=1e-6)
  # A file at the right name whose stored key does not match (copied over, half-replaced) is
  # recomputed, never trusted.
  key = fid.reference_key(files.content_hash(images), net(1.0))
  path = fid.reference_path(tmp_path, "toy", "all", 4, "toy_cnn", key)
  assert path.exists()
  ref2.save(path, key="something else")
  again = fid.cached_reference(tmp_path, "toy", "all", 4, "toy_cnn", net(1.0), images,
                               batch_size=8, log=logged.append)
  np.testing.assert_allclose(again.mu, ref1.mu, rtol=1e-6)
  assert logged and "recomputing" in logged[0]
  with pytest.raises(ValueError, match="weights_key"):
    fid.cached_reference(tmp_path, "toy", "all", 4, "toy_cnn", lambda x: {"pool": x}, images)


def test_labels_of_a_held_out_split_are_its_examples_labels():
  src = sources.create_source(_data_cfg(name="digits"))
  train, val = splits.split(src, 64, seed=0)
  np.testing.assert_array_equal(sources.labels_of(val), src.labels[val.indices])
  np.testing.assert_array_equal(sources.labels_of(val), val.read(np.arange(64), np.zeros(64, bool))[1])
  assert len(sources.labels_of(train)) == src.num_examples - 64
