"""FID / sFID / IS / precision-recall against pytorch-fid, scipy and scikit-learn; sanity on real data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
from pytorch_fid import fid_score
from sklearn.neighbors import NearestNeighbors

from dit_jax.data import datasets
from dit_jax.data import images as images_lib
from dit_jax.evaluation import evaluators
from dit_jax.evaluation import feature_net
from dit_jax.evaluation import fid


def _correlated(rng, n, d, shift=0.0):
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return rng.normal(size=(n, d)) @ mix + shift


@pytest.mark.parametrize("n,d", [(2000, 128), (40, 64)])  # full-rank, and singular (n < d)
def test_frechet_distance_matches_pytorch_fid(n, d):
  rng = np.random.default_rng(0)
  a = _correlated(rng, n, d)
  b = _correlated(rng, n, d, shift=0.3) * 1.2
  mu1, s1 = fid.statistics(a)
  mu2, s2 = fid.statistics(b)
  np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-12)
  want = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert want > 1.0
  assert abs(got - want) <= 1e-6 * abs(want)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6 * want  # a distribution vs itself


def test_frechet_distance_rejects_mismatched_stats():
  with pytest.raises(ValueError, match="different feature sizes"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _is_scipy(logits, split):
  """Independent IS: scipy's softmax and rel_entr, per split."""
  scores = []
  for i in range(0, len(logits), split):
    p = scipy.special.softmax(logits[i:i + split], axis=1)
    kl = scipy.special.rel_entr(p, p.mean(axis=0, keepdims=True)).sum(axis=1)
    scores.append(np.exp(kl.mean()))
  return np.mean(scores)


def test_inception_score():
  rng = np.random.default_rng(1)
  assert fid.inception_score(np.zeros((100, 7))) == pytest.approx(1.0, abs=1e-12)
  # Confident predictions spread evenly over K classes: IS = K.
  onehot = 50.0 * np.eye(10)[np.arange(1000) % 10]
  assert fid.inception_score(onehot) == pytest.approx(10.0, rel=1e-6)
  # 12000 = splits of 5000, 5000, 2000, as ADM slices them.
  logits = 3.0 * rng.normal(size=(12000, 20))
  logits[:5000, 0] += 4.0  # splits differ, so a wrong split would change the mean
  assert fid.inception_score(logits) == pytest.approx(_is_scipy(logits, 5000), rel=1e-10)
  assert abs(fid.inception_score(logits) - _is_scipy(logits, 12000)) > 0.1


def _pr_sklearn(ref, sample, k=3):
  """Brute-force improved precision/recall with scikit-learn k-NN radii (float64)."""
  r_ref = NearestNeighbors(n_neighbors=k + 1).fit(ref).kneighbors(ref)[0][:, k] ** 2
  r_smp = NearestNeighbors(n_neighbors=k + 1).fit(sample).kneighbors(sample)[0][:, k] ** 2
  d = ((sample[:, None, :] - ref[None, :, :]) ** 2).sum(-1)  # (M, N)
  return (d <= r_ref[None, :]).any(1).mean(), (d.T <= r_smp[None, :]).any(1).mean()


def test_precision_recall_matches_sklearn():
  rng = np.random.default_rng(2)
  ref = rng.normal(size=(700, 16)).astype(np.float32)
  sample = (0.7 * rng.normal(size=(500, 16)) + 0.4).astype(np.float32)
  want_p, want_r = _pr_sklearn(ref.astype(np.float64), sample.astype(np.float64))
  p, r = fid.precision_recall(ref, sample, block=256)  # several row blocks, one ragged
  assert 0.2 < want_p < 1.0 and 0.05 < want_r < 0.95  # a case where both are informative
  assert abs(p - want_p) <= 1 / 500 and abs(r - want_r) <= 1 / 700  # at most one borderline point
  assert fid.precision_recall(ref, ref) == (1.0, 1.0)
  assert fid.precision_recall(ref, ref + 100.0) == (0.0, 0.0)


def test_quantize_matches_dit_sample_ddp():
  x = np.concatenate([np.linspace(-1.2, 1.2, 5001), np.random.default_rng(3).uniform(-1, 1, 5000)])
  x = x.astype(np.float32)
  want = torch.clamp(127.5 * torch.from_numpy(x) + 128.0, 0, 255).to(torch.uint8).numpy()
  np.testing.assert_array_equal(np.asarray(images_lib.quantize(x)), want)
  u8 = np.arange(256, dtype=np.uint8)  # real images scaled to [-1, 1] come back unchanged
  np.testing.assert_array_equal(np.asarray(images_lib.quantize(jnp.asarray(u8 / 127.5 - 1.0))), u8)


def _pool_feature_fn(images):
  """A fixed linear embedding for the file-format tests (numbers checked elsewhere)."""
  x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
  return {"pool": x[:, :6] - x[:, 6:12]}


def test_reference_cache_and_adm_files(tmp_path):
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, size=(64, 4, 4, 1), dtype=np.uint8)
  _pool_feature_fn.weights_key = "fixed"
  ref = fid.cached_reference(tmp_path, "toy", "train", 4, "toy_net", _pool_feature_fn, images,
                             batch_size=16)
  cached, = tmp_path.glob("ref_toy_train_4_toy_net_*.npz")  # one file, named by its content key
  again = fid.cached_reference(tmp_path, "toy", "train", 4, "toy_net", _pool_feature_fn, images)
  assert list(tmp_path.glob("ref_*.npz")) == [cached]  # computed once, then read from the cache
  feats = np.asarray(_pool_feature_fn(jnp.asarray(images))["pool"], np.float64)
  for r in (ref, again):
    np.testing.assert_allclose(r.mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(r.sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-8)
    assert r.features.shape == (64, 6) and r.num_images == 64
  with pytest.raises(ValueError, match="feature network 'toy_net', not 'other'"):
    fid.load_reference(cached, "other")

  # ADM's reference batch layout: Inception stats plus the images, no feature_net entry.
  adm = tmp_path / "VIRTUAL_toy.npz"
  np.savez(adm, mu=ref.mu, sigma=ref.sigma, mu_s=ref.mu[:3], sigma_s=ref.sigma[:3, :3], arr_0=images)
  loaded = fid.load_reference(adm, "inception", _pool_feature_fn, batch_size=16)
  np.testing.assert_array_equal(loaded.mu, ref.mu)
  np.testing.assert_array_equal(loaded.sigma_s, ref.sigma[:3, :3])
  np.testing.assert_allclose(loaded.features, ref.features, rtol=1e-6)
  with pytest.raises(ValueError, match="ADM's Inception reference"):
    fid.load_reference(adm, "mnist_cnn")
  m = fid.metrics("inception", {"pool": feats}, loaded)
  assert m["fid_inception"] == pytest.approx(0.0, abs=1e-6)
  assert set(m) == {"fid_inception", "precision_inception", "recall_inception"}


# --- real data: MNIST test set vs CIFAR-10, with the feature net trained on MNIST -------------------


@pytest.fixture(scope="module")
def mnist_net(shared_data, tmp_path_factory):
  """MNIST t10k, and the MNIST CNN trained (default settings) into a fresh cache dir."""
  # The shared data has only the test split; the data config's split rule reads no other.
  images, labels, split = feature_net.read_labelled("mnist", shared_data / "mnist", 28, 0, "test")
  assert split == "t10k" and images.shape == (10000, 28, 28, 1)
  cache = tmp_path_factory.mktemp("fid_cache")
  config = {"name": "mnist", "path": str(shared_data / "mnist"), "image_size": 28, "channels": 0,
            "split": "test"}
  name, feature_fn = fid.feature_network(config, "auto", cache_dir=cache, log=None)
  path, = cache.glob("feature_net_mnist_28_*.npz")  # keyed by the 10000 test images it learnt
  _, meta = feature_net.load(path)
  assert meta["data_key"] == feature_net.data_key(images, labels) and meta["num_examples"] == 10000
  return images, labels, name, feature_fn, meta, cache, config


def _fid(feats_a, feats_b):
  return fid.frechet_distance(*fid.statistics(feats_a), *fid.statistics(feats_b))


@pytest.mark.slow
def test_fid_sanity_on_mnist_and_cifar(mnist_net, shared_data):
  images, _, name, feature_fn, meta, cache, config = mnist_net
  assert name == "mnist_cnn"
  assert meta["test_accuracy"] > 0.9, meta  # a feature net that has learnt digits
  # Cached: asking again does not retrain (it would print; here it must just load).
  assert fid.feature_network(config, "cnn", cache_dir=cache, log=None)[0] == "mnist_cnn"

  half_a, half_b = images[:5000], images[5000:]
  pool = lambda x: fid.extract_features(feature_fn, x, batch_size=1000)["pool"]
  feats_a, feats_b = pool(half_a), pool(half_b)
  fid_halves = _fid(feats_a, feats_b)

  cifar, _ = datasets.read_image_folder(shared_data / "cifar10_test_jpg" / "test", 1)
  cifar = feature_net.resize_images(cifar[::2], 28)  # greyscale, 5000 images, 28x28
  fid_cifar = _fid(feats_a, pool(cifar))
  assert fid_halves < 0.05 * fid_cifar, (fid_halves, fid_cifar)

  rng = np.random.default_rng(5)
  noise = rng.normal(size=half_b.shape).astype(np.float32)
  fids = [fid_halves]
  for sigma in (0.05, 0.1, 0.2, 0.4, 0.8):  # in [-1, 1] units
    noisy = np.asarray(images_lib.quantize(half_b / 127.5 - 1.0 + sigma * noise))
    fids.append(_fid(feats_a, pool(noisy)))
  assert all(b > a for a, b in zip(fids, fids[1:])), fids
  print(f"mnist_cnn: FID halves {fid_halves:.3f}, MNIST-CIFAR {fid_cifar:.1f}, noise {fids}")


@pytest.mark.slow
def test_evaluator_with_real_images_as_samples(mnist_net):
  images, _, name, feature_fn, _, _, _ = mnist_net
  devices = np.array(jax.devices())
  assert len(devices) == 8
  mesh = jax.sharding.Mesh(devices, ("data",))
  reference = fid.compute_reference(name, feature_fn, images[:5000], mesh=mesh)
  pool_images = jnp.asarray(images[5000:] / 127.5 - 1.0, jnp.float32)
  seen = []

  @jax.jit
  def draw(rng, labels):
    idx = jax.random.choice(rng, pool_images.shape[0], (labels.shape[0],), replace=False)
    return pool_images[idx]

  def sample_fn(rng, labels):
    seen.append((labels.shape, labels.sharding.spec, int(labels.min()), int(labels.max())))
    return draw(rng, labels)

  ev = evaluators.FidSuite(name, feature_fn, reference, num_samples=1800, batch_size=400,
                           num_classes=10, mesh=mesh, progress=False)
  out = ev.run(sample_fn, jax.random.key(0))
  assert set(out) == {f"{m}_mnist_cnn" for m in ("fid", "is", "precision", "recall")}
  assert len(seen) == 5  # ceil(1800 / 400) batches, the last one trimmed
  assert all(s[0] == (400,) and s[1] == jax.sharding.PartitionSpec("data") and 0 <= s[2] <= s[3] < 10
             for s in seen)
  assert out["fid_mnist_cnn"] < 3.0, out  # real vs real (halves: ~1; sigma=0.1 noise: ~4)
  assert out["precision_mnist_cnn"] > 0.6 and out["recall_mnist_cnn"] > 0.6, out
  assert out["is_mnist_cnn"] > 7.0, out  # confident, class-balanced predictions on real digits

  # Garbage samples score badly on every metric.
  noise_fn = jax.jit(lambda rng, labels: jax.random.uniform(rng, (400, 28, 28, 1), minval=-1))
  bad = ev.run(noise_fn, jax.random.key(1))
  assert bad["fid_mnist_cnn"] > 100 * out["fid_mnist_cnn"], (bad, out)
  assert bad["precision_mnist_cnn"] < 0.1

  with pytest.raises(ValueError, match="multiple of the 8 devices"):
    evaluators.FidSuite(name, feature_fn, reference, 100, 100, mesh=mesh)
  with pytest.raises(ValueError, match="reference statistics were made with"):
    evaluators.FidSuite("digits_cnn", feature_fn, reference, 100, 80, mesh=mesh)


@pytest.mark.slow
def test_train_feature_net_tool_on_digits(tmp_path, capsys):
  from tests.helpers import load_tool  # pylint: disable=g-import-not-at-top
  meta = load_tool("train_feature_net").run("digits", 16, steps=100, cache_dir=str(tmp_path))
  assert "digits_cnn: test accuracy" in capsys.readouterr().out
  assert meta["test_accuracy"] > 0.8 and meta["image_shape"] == [16, 16, 1]
  logged = []
  name, feature_fn = fid.feature_network({"name": "digits", "image_size": 16}, "auto",
                                         cache_dir=tmp_path, log=logged.append)
  assert name == "digits_cnn" and logged == []  # the run's images are the tool's: loads, no retraining
  assert len(list(tmp_path.glob("feature_net_digits_16_*.npz"))) == 1
  out = feature_fn(np.zeros((8, 16, 16, 1), np.uint8))
  assert out["pool"].shape == (8, 128) and out["logits"].shape == (8, 10)
  with pytest.raises(ValueError, match="trained on images of shape"):
    feature_fn(np.zeros((8, 32, 32, 1), np.uint8))
