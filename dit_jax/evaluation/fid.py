"""Sample-quality metrics with ADM's definitions: FID, sFID, Inception Score, precision/recall.

Definitions follow openai/guided-diffusion `evaluations/evaluator.py` (and pytorch-fid for the Fréchet
distance): statistics are (mean, np.cov) of the features; FID = ||mu1-mu2||² + Tr(S1 + S2 - 2 sqrt(S1 S2))
with scipy's sqrtm; IS over consecutive splits of 5000; precision/recall with k=3 nearest-neighbour
balls in squared-distance space. Every metric is named after the feature network it used
(`fid_inception`, `fid_mnist_cnn`, ...). Reference statistics are cached as .npz, and ADM's reference
batches (mu, sigma, mu_s, sigma_s, arr_0) are read as they are.
"""
import dataclasses
import hashlib
import functools
import pathlib
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from scipy import linalg
from tqdm.auto import tqdm

from dit_jax import files
from dit_jax import sharding as sharding_lib
from dit_jax.evaluation import feature_net
from dit_jax.evaluation import inception

FeatureFn = Callable[[jax.Array], dict]
IS_SPLIT_SIZE = 5000  # ADM's compute_inception_score
PR_NEIGHBOURS = 3  # ADM's ManifoldEstimator nhood_sizes
PR_REFERENCE_SIZE = 10_000  # ADM's reference batches hold 10K images for precision/recall
# In the content key of cached references: 2 = the stored features (for P/R and KID) are spread
# evenly over the images, not their first PR_REFERENCE_SIZE (1, keyless: a class-sorted head).
REFERENCE_FORMAT = 2


def statistics(features_NxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) in float64, the covariance unbiased (np.cov) as both references use."""
  features_NxD = np.asarray(features_NxD, np.float64)
  if features_NxD.ndim != 2 or len(features_NxD) < 2:
    raise ValueError(f"statistics need (N>=2, D) features, got {features_NxD.shape}")
  return features_NxD.mean(axis=0), np.cov(features_NxD, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid / ADM numerics)."""
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}; were they made by the same network?")
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    # A (nearly) singular product, e.g. fewer samples than feature dimensions.
    warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals")
    offset = np.eye(len(sigma1)) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: sqrtm has an imaginary part of {np.abs(covmean.imag).max()}")
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits_NxK: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """exp E_x KL(p(y|x) || p(y)), averaged over consecutive splits of `split_size` (ADM's splits)."""
  logits_NxK = np.asarray(logits_NxK, np.float64)
  log_p = logits_NxK - logits_NxK.max(axis=1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
  scores = []
  for i in range(0, len(log_p), split_size):
    part = log_p[i:i + split_size]
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0, keepdims=True))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
  return float(np.mean(scores))


@jax.jit
def _squared_distances(a_RxD, b_MxD):
  # ADM's DistanceBlock formula; HIGHEST keeps TF32 out of it on GPUs.
  hi = jax.lax.Precision.HIGHEST
  d = (jnp.sum(a_RxD * a_RxD, axis=1)[:, None] - 2.0 * jnp.dot(a_RxD, b_MxD.T, precision=hi)
       + jnp.sum(b_MxD * b_MxD, axis=1)[None, :])
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour(a_RxD, b_MxD, k):
  d = _squared_distances(a_RxD, b_MxD)
  return -jax.lax.top_k(-d, k + 1)[0][:, k]


@jax.jit
def _inside_any_ball(a_RxD, centres_MxD, radii_M):
  return jnp.any(_squared_distances(a_RxD, centres_MxD) <= radii_M[None, :], axis=1)


def _row_blocks(x, block):
  for i in range(0, len(x), block):
    yield x[i:i + block]


def manifold_radii(features_NxD: np.ndarray, k: int = PR_NEIGHBOURS, block: int = 1000) -> np.ndarray:
  """Squared distance of each feature to its k-th nearest other feature (ADM's manifold_radii)."""
  f = jnp.asarray(features_NxD, jnp.float32)
  if len(f) <= k:
    raise ValueError(f"need more than k={k} features for the k-NN radii, got {len(f)}")
  # The point itself is its own 0th neighbour, so index k is the k-th other point, as in ADM.
  return np.concatenate([np.asarray(_kth_neighbour(r, f, k)) for r in _row_blocks(f, block)])


def precision_recall(ref_NxD: np.ndarray, sample_MxD: np.ndarray, k: int = PR_NEIGHBOURS,
                     block: int = 1000) -> tuple[float, float]:
  """Improved precision/recall (Kynkäänniemi et al.) with ADM's k-NN balls and <= test."""
  ref = jnp.asarray(ref_NxD, jnp.float32)
  sample = jnp.asarray(sample_MxD, jnp.float32)
  radii_ref = jnp.asarray(manifold_radii(ref, k, block))
  radii_sample = jnp.asarray(manifold_radii(sample, k, block))
  sample_in = np.concatenate([np.asarray(_inside_any_ball(r, ref, radii_ref))
                              for r in _row_blocks(sample, block)])
  ref_in = np.concatenate([np.asarray(_inside_any_ball(r, sample, radii_sample))
                           for r in _row_blocks(ref, block)])
  return float(sample_in.mean()), float(ref_in.mean())


@dataclasses.dataclass
class Reference:
  """Reference-set statistics for one feature network; `spatial`/`features` may be None."""
  feature_net: str
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  features: np.ndarray | None = None  # pool features of up to PR_REFERENCE_SIZE images: P/R, KID
  num_images: int = 0

  def fingerprint(self) -> str:
    """sha256 (16 hex digits) of the statistics: which reference a FID was measured against."""
    h = hashlib.sha256(self.feature_net.encode())
    for a in (self.mu, self.sigma):
      h.update(np.ascontiguousarray(a, np.float64).tobytes())
    return h.hexdigest()[:16]

  def save(self, path, key: str = "") -> None:
    """Writes an .npz that ADM's evaluator could also read (mu, sigma, mu_s, sigma_s), with the
    content `key` of what it was computed from (cached_reference)."""
    arrays = {"mu": self.mu, "sigma": self.sigma, "feature_net": np.array(self.feature_net),
              "num_images": np.array(self.num_images), "key": np.array(key)}
    if self.mu_s is not None:
      arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
    if self.features is not None:
      arrays["features"] = self.features
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_save_npz(path, **arrays)


def compute_reference(feature_name: str, feature_fn: FeatureFn, images_u8: np.ndarray,
                      batch_size: int = 250, mesh=None, num_pr: int = PR_REFERENCE_SIZE) -> Reference:
  """Reference statistics of uint8 images under `feature_fn`, and the pool features of num_pr of
  them spread evenly over the images (all when fewer; a class-sorted sample keeps its classes)."""
  feats = extract_features(feature_fn, images_u8, batch_size, mesh, desc=f"reference {feature_name}")
  mu, sigma = statistics(feats["pool"])
  n = len(images_u8)
  keep = np.arange(n) if n <= num_pr else np.round(np.linspace(0, n - 1, num_pr)).astype(int)
  ref = Reference(feature_name, mu, sigma, features=feats["pool"][keep].astype(np.float32),
                  num_images=n)
  if "spatial" in feats:
    ref.mu_s, ref.sigma_s = statistics(feats["spatial"])
  return ref


def load_reference(path, feature_name: str, feature_fn: FeatureFn | None = None,
                   batch_size: int = 250, mesh=None) -> Reference:
  """Reads a cached reference or one of ADM's reference batches (VIRTUAL_*.npz).

  ADM's files hold Inception statistics (mu, sigma, mu_s, sigma_s) and the images (arr_0); the
  features for precision/recall are computed from arr_0 when `feature_fn` is given.
  """
  return files.read_npz(path, lambda f: _reference_of(f, path, feature_name, feature_fn, batch_size,
                                                     mesh))


def _reference_of(f, path, feature_name, feature_fn, batch_size, mesh) -> Reference:
  """The Reference in the open .npz `f` (load_reference)."""
  keys = set(f.files)
  if not {"mu", "sigma"} <= keys:
    raise ValueError(f"{path}: no mu/sigma; expected a reference .npz (ours or ADM's), has "
                     f"{sorted(keys)}")
  stored_name = str(f["feature_net"]) if "feature_net" in keys else None
  if stored_name is None and not feature_name.startswith("inception"):
    raise ValueError(f"{path} has no feature_net entry, so it is taken as ADM's Inception "
                     f"reference, which cannot be used with feature network {feature_name!r}")
  if stored_name is not None and stored_name != feature_name:
    raise ValueError(f"{path} holds statistics of feature network {stored_name!r}, not "
                     f"{feature_name!r}")
  ref = Reference(feature_name, f["mu"], f["sigma"],
                  f["mu_s"] if "mu_s" in keys else None, f["sigma_s"] if "sigma_s" in keys else None,
                  f["features"] if "features" in keys else None,
                  int(f["num_images"]) if "num_images" in keys else 0)
  if ref.features is None and "arr_0" in keys and feature_fn is not None:
    images = f["arr_0"]
    ref.num_images = ref.num_images or len(images)
    ref.features = extract_features(feature_fn, images[:PR_REFERENCE_SIZE], batch_size, mesh,
                                    desc="reference P/R features")["pool"].astype(np.float32)
  return ref


def reference_path(cache_dir, dataset: str, split: str, image_size: int, feature_name: str,
                   key: str = ""):
  """Cache file of one (dataset, split, resolution, feature network) and content `key`."""
  suffix = f"_{key}" if key else ""
  return pathlib.Path(cache_dir) / f"ref_{dataset}_{split}_{image_size}_{feature_name}{suffix}.npz"


def reference_key(images_key: str, feature_fn: FeatureFn) -> str:
  """The content key of reference statistics: the images' key, the feature network's weights
  (a retrained net never reuses statistics of the old one) and REFERENCE_FORMAT."""
  weights = getattr(feature_fn, "weights_key", None)
  if weights is None:
    raise ValueError("the feature network has no weights_key; cached statistics need one")
  return files.content_hash(images_key, weights, REFERENCE_FORMAT)


def cached_reference(cache_dir, dataset: str, split: str, image_size: int, feature_name: str,
                     feature_fn: FeatureFn, images_u8: np.ndarray, batch_size: int = 250,
                     mesh=None, log: Callable[[str], None] | None = None) -> Reference:
  """The reference of `images_u8` under `feature_fn`: cached under the key of both (the images'
  bytes, the network's weights), stored in the file and checked on load; computed on a miss."""
  key = reference_key(files.content_hash(images_u8), feature_fn)
  path = reference_path(cache_dir, dataset, split, image_size, feature_name, key)
  def read(p):
    with np.load(p) as f:
      stored = str(f["key"]) if "key" in f.files else None
    return load_reference(p, feature_name) if stored == key else stored
  cached = files.read_cache(path, read)
  if isinstance(cached, Reference):
    return cached
  if cached is not None:
    stored = cached
    if log:
      log(f"{path} holds statistics of other images or weights (key {stored}, now {key}); "
          "recomputing")
  ref = compute_reference(feature_name, feature_fn, images_u8, batch_size, mesh)
  ref.save(path, key=key)
  return ref


def extract_features(feature_fn: FeatureFn, images_u8: np.ndarray, batch_size: int = 250, mesh=None,
                     data_axis: Any = "data", desc: str = "features") -> dict:
  """Features of uint8 host images, batches sharded over the mesh's data axis (last batch padded)."""
  if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
    raise ValueError(f"expected uint8 NHWC images, got {images_u8.dtype} {images_u8.shape}")
  sharding = sharding_lib.batch_sharding(mesh, data_axis)
  num_shards = sharding_lib.data_parallel_size(mesh, data_axis)
  batch_size = max(num_shards, batch_size // num_shards * num_shards)
  out = {}
  quiet = logging.get_verbosity() < logging.INFO  # a quiet sweep prints its own progress only
  for i in tqdm(range(0, len(images_u8), batch_size), desc=desc, leave=False, disable=quiet):
    batch = images_u8[i:i + batch_size]
    n = len(batch)
    if n < batch_size:  # pad so every batch has one shape: one compile
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n, axis=0)])
    feats = jax.device_get(feature_fn(jax.device_put(batch, sharding)))
    for key, value in feats.items():
      out.setdefault(key, []).append(np.asarray(value[:n]))
  return {key: np.concatenate(value) for key, value in out.items()}


def metrics(feature_name: str, sample_features: dict, reference: Reference,
            pr: bool = True) -> dict[str, float]:
  """fid/sfid/is/precision/recall of sample features against a reference, keys suffixed by the net."""
  if reference.feature_net != feature_name:
    raise ValueError(f"reference was made with {reference.feature_net!r}, samples with {feature_name!r}")
  mu, sigma = statistics(sample_features["pool"])
  out = {f"fid_{feature_name}": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
  if "spatial" in sample_features and reference.mu_s is not None:
    mu_s, sigma_s = statistics(sample_features["spatial"])
    out[f"sfid_{feature_name}"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
  if "logits" in sample_features:
    out[f"is_{feature_name}"] = inception_score(sample_features["logits"])
  if pr and reference.features is not None:
    p, r = precision_recall(reference.features, sample_features["pool"])
    out[f"precision_{feature_name}"], out[f"recall_{feature_name}"] = p, r
  return out


def _get(data_cfg, name, default=None):
  if isinstance(data_cfg, dict):
    return data_cfg.get(name, default)
  return getattr(data_cfg, name, default)


def resolve_network(network: str, image_size: int, channels: int = 0) -> str:
  """'auto' made concrete: Inception for RGB images of 64 px and more, the dataset's CNN below."""
  if network != "auto":
    return network
  return "inception" if channels != 1 and image_size and image_size >= 64 else "cnn"


def feature_network(data_config, network: str = "auto", cache_dir=None, inception_weights=None,
                    download: bool = True, labelled_images=None,
                    log: Callable[[str], None] | None = print) -> tuple[str, FeatureFn]:
  """(name, feature_fn) for a data config (fields name, path, image_size, channels, split).

  network: 'inception' (pytorch-fid's FID Inception; its weights must be found or downloadable),
  'cnn' (a FeatureNet trained on the dataset and cached per dataset and resolution), or 'auto':
  Inception for RGB images of 64 px and more, the dataset's CNN below. A missing weights file is an
  error, never a silent switch of network, so a sweep's metrics keep one meaning.
  labelled_images: () -> (uint8 images at image_size, labels) to train the CNN on, e.g. read from
  the training pipeline's source; by default the dataset's files are read here.
  """
  name = _get(data_config, "name")
  identity = _get(data_config, "identity") or name  # names the net: fid_<identity>_cnn
  image_size = _get(data_config, "image_size")
  channels = _get(data_config, "channels", 0)
  network = resolve_network(network, image_size, channels)
  cache_dir = pathlib.Path(cache_dir or inception.default_cache_dir())
  if network == "inception":
    params = inception.load_params(inception_weights, cache_dir, download)
    fn = inception.make_feature_fn(params)
    fn.weights_key = files.content_hash(params)
    return "inception", fn
  if network == "cnn":
    if not name or not image_size:
      raise ValueError("the 'cnn' feature network needs data_config.name and .image_size "
                       f"(got {name!r}, {image_size!r})")
    if labelled_images is None:
      def labelled_images():
        images, labels, _ = feature_net.read_labelled(
            name, _get(data_config, "path"), image_size, channels, _get(data_config, "split", "train"))
        return images, labels
    variables, meta = feature_net.load_or_train(identity, cache_dir, image_size, labelled_images,
                                                log=log, channels=channels)
    return feature_net.network_name(identity), feature_net.make_feature_fn(variables, meta)
  raise ValueError(f"unknown feature network {network!r}: expected 'auto', 'inception' or 'cnn'")
