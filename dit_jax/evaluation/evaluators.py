"""Evaluators: what the training loop runs on the EMA params every so many steps.

Each evaluator is built from its own sub-config (`eval.grid`, `eval.fid`, `eval.val`) and the run's
objective (`objectives.from_config`), and has one interface, `run(params, step) -> dict` of
scalars, plus `name` and `every_steps`; the loop calls them without knowing what they compute:

- `SampleGrid` (`eval.grid.*`): a PNG grid of EMA samples (labels 0, 1, 2, ...) in workdir/samples.
- `SampleQuality` (`eval.fid.*`): FID/sFID/IS/precision/recall, KID and FID∞ of N EMA samples
  against the reference, named after the feature network (`fid_inception`, `kid_digits_cnn`).
- `ValidationLoss` (`eval.val.*`): the objective's loss on the held-out split (`data.val_size`) at a
  fixed stratified set of times with fixed noise per example: deterministic, identical for every
  member and seed, and cheap, so it can run often (`val_loss`, `val_mse`, `val_vb`).

A text-conditioned model (text.enabled) is sampled with the captions of those classes (class c ->
its caption's token ids, `captions.caption_table`), guided against the empty caption; the feature
net for FID trains on the class labels under the captions.

Latent samples are decoded with the SD VAE at `eval.vae_path` before anything looks at them, so
the feature network is chosen for the decoded images (256 px RGB for 32x32 SD latents).
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from dit_jax import files
from dit_jax import models
from dit_jax import rng as rng_lib
from dit_jax import sharding as sharding_lib
from dit_jax.data import captions
from dit_jax.data import images as images_lib
from dit_jax.data import sources
from dit_jax.evaluation import fid
from dit_jax.evaluation import inception
from dit_jax.evaluation import unbiased
from dit_jax.models import vae as vae_lib
from dit_jax.objectives import per_example

FEATURE_NETWORKS = ("auto", "inception", "cnn")


def check_config(eval_cfg, val_size: int) -> None:
  """The `eval` fields that need no data or devices (`val_size`: data.val_size). The sampler
  fields an objective reads (respacing, guide_channels) are checked by objectives.from_config."""
  grid, q = eval_cfg.grid, eval_cfg.fid
  for name, ev in (("grid", grid), ("fid", q)):
    if ev.every_steps < 0:
      raise ValueError(f"eval.{name}.every_steps must be >= 0 (0 = off), got {ev.every_steps}")
    if ev.cfg_scale < 0:
      raise ValueError(f"eval.{name}.cfg_scale={ev.cfg_scale}: use 1 for no guidance, > 1 to guide")
    if ev.guide_channels < 0:
      raise ValueError(f"eval.{name}.guide_channels must be >= 0 (0 = all), got {ev.guide_channels}")
  val = eval_cfg.val
  if val.every_steps < 0 or (val.every_steps and (val.num_examples < 1 or val.num_timesteps < 1
                                                   or val.batch_size < 1)):
    raise ValueError(f"eval.val: every_steps must be >= 0, and num_examples, num_timesteps and "
                     f"batch_size >= 1 (got {val.every_steps}, {val.num_examples}, "
                     f"{val.num_timesteps}, {val.batch_size})")
  if val.every_steps and not val_size:
    raise ValueError("eval.val.every_steps > 0 needs a held-out split: set data.val_size > 0")
  if grid.every_steps and grid.num_samples < 1:
    raise ValueError(f"eval.grid.num_samples must be >= 1, got {grid.num_samples}")
  if q.every_steps and q.num_samples:
    if q.num_samples < 2:
      raise ValueError(f"eval.fid.num_samples must be >= 2 for a covariance (or 0 = off), got "
                       f"{q.num_samples}")
    if q.batch_size < 1:
      raise ValueError(f"eval.fid.batch_size must be >= 1, got {q.batch_size}")
    if q.feature_network not in FEATURE_NETWORKS:
      raise ValueError(f"eval.fid.feature_network={q.feature_network!r}: use one of "
                       f"{FEATURE_NETWORKS}")
    unbiased.check_config(q)


def check_with_data(eval_cfg, data_cfg, source) -> None:
  """The `eval` fields that depend on the data (before any evaluator is built)."""
  eps_channels = source.image_shape[-1]
  for name in ("grid", "fid"):
    g = eval_cfg[name].guide_channels
    if g > eps_channels:
      raise ValueError(f"eval.{name}.guide_channels={g}, but the model predicts {eps_channels} "
                       f"eps channels (the rest are variance values, never guided)")
  q = eval_cfg.fid
  if q.every_steps and q.num_samples:
    _check_cache_dir(pathlib.Path(q.cache_dir or inception.default_cache_dir()))
  if q.every_steps and q.num_samples and source.kind == "latents":
    if not (q.reference and eval_cfg.vae_path):
      raise ValueError("eval.fid on latents needs eval.fid.reference (reference statistics .npz, "
                       "e.g. ADM's VIRTUAL_imagenet256_labeled.npz) and eval.vae_path (the SD-VAE "
                       "that decodes samples)")
    images = feature_images(eval_cfg, data_cfg, source)
    if fid.resolve_network(q.feature_network, images["image_size"], images["channels"]) == "cnn":
      # The dataset CNN is trained on the dataset's labelled pixels, which latents do not have.
      raise ValueError(
          f"eval.fid.feature_network={q.feature_network!r} picks the dataset CNN for the "
          f"{images['image_size']} px decoded images, but latents have no labelled pixels to train "
          f"it on; use 'inception' (with an Inception reference such as ADM's), or 'auto' with "
          f"decoded images of 64 px and more")


def _check_cache_dir(cache) -> None:
  """A cache the feature network and reference statistics can be written to (a file is created
  and removed there), or one that already holds some (a read-only, pre-filled cache on a pod is
  fine); one that is neither is an error now, not after the model compiled."""
  try:
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=cache):
      return
  except OSError as e:
    if cache.is_dir() and any(cache.glob("*.npz")):
      return
    raise PermissionError(f"eval.fid.cache_dir: cannot write to {cache} ({e.strerror or e}) and "
                          "it holds no cached feature network or reference statistics; set "
                          "eval.fid.cache_dir to a writable folder") from None


def feature_images(eval_cfg, data_cfg, source) -> dict:
  """The data config of the images the feature network sees: for latents, the VAE's decodings
  (latent side x the VAE's downsampling factor, its output channels), not the latents."""
  images = dict(data_cfg.to_dict(), image_size=source.image_shape[0], identity=source.name)
  if source.kind == "latents":
    path = pathlib.Path(eval_cfg.vae_path)
    if not (path / "config.json").is_file():
      raise FileNotFoundError(vae_lib.missing_weights_message(path))
    vae_cfg = vae_lib.VAEConfig.from_json(path / "config.json")
    images.update(image_size=source.image_shape[0] * vae_cfg.downsample_factor,
                  channels=vae_cfg.out_channels)
  return images


@functools.lru_cache(maxsize=1)
def _vae(path):
  module, params = vae_lib.load_pretrained(path)
  return params, jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))


def decode_latents(vae_path, z, scaling_factor):
  """DiT latents -> images in [-1, 1] through the SD VAE."""
  params, decode = _vae(vae_path)
  return np.asarray(decode(params, jnp.asarray(z) / scaling_factor))


class SampleGrid:
  """A PNG grid of EMA samples, labels 0, 1, 2, ... (process 0 writes it)."""
  name = "grid"
  key = "sample_time_s"  # the scalar whose row in metrics.jsonl says this evaluation ran

  def __init__(self, eval_cfg, objective, source, model, mesh, workdir):
    ev = eval_cfg.grid
    self.every_steps = ev.every_steps
    self._sample = objective.sample_fn(model, steps=ev.respacing, cfg_scale=ev.cfg_scale,
                                       guide_channels=ev.guide_channels, data_kind=source.kind,
                                       mesh=mesh)
    self._labels = np.arange(ev.num_samples, dtype=np.int32) % max(source.num_classes, 1)
    table = captions.caption_table(source)
    if table is not None:  # a text model: the captions of classes 0, 1, 2, ...
      self._labels = table[self._labels]
    self._shape = (ev.num_samples,) + tuple(source.image_shape)
    # Host (numpy) inputs: on a multi-host mesh jit treats them as replicated global values.
    self._rng = np.asarray(rng_lib.grid_key(eval_cfg.seed))
    self._latents = source.kind == "latents"
    self._vae_path, self._scale = eval_cfg.vae_path, source.scaling_factor
    self._out = pathlib.Path(workdir) / "samples"

  def run(self, params, step: int) -> dict:
    t0 = time.perf_counter()
    x = np.asarray(self._sample(params, self._labels, self._rng, self._shape))
    if self._latents:
      if not self._vae_path:
        logging.info("step %d: latents sampled; set eval.vae_path to decode grids", step)
        return {}
      x = decode_latents(self._vae_path, x, self._scale)
    if jax.process_index() == 0:
      images_lib.save_grid(np.asarray(images_lib.quantize(x)), self._out / f"step_{step:08d}.png")
    return dict(sample_time_s=time.perf_counter() - t0)


class FidSuite:
  """`run(sample_fn, rng)` -> {fid_<net>, sfid_<net>, is_<net>, precision_<net>, recall_<net>},
  and with `unbiased` (eval.fid: kid_subsets, kid_subset_size, fid_inf_points) KID and FID∞ of the
  same features (unbiased.metrics: kid_<net>, kid_std_<net>, fid_inf_<net>, fid_inf_slope_<net>),
  their subsets drawn from `eval_seed`.

  sample_fn(rng, labels_B) returns images (B, H, W, C) in [-1, 1]; it should be jitted. Labels are
  drawn uniformly from num_classes (None: unconditional, sample_fn gets labels=None) and sharded
  over the mesh's data axis, so a sample_fn jitted without explicit shardings runs data-parallel.
  Images are quantised to uint8 (images.quantize) before the feature network sees them.
  """

  def __init__(self, feature_name: str, feature_fn: fid.FeatureFn, reference: fid.Reference,
               num_samples: int, batch_size: int, num_classes: int | None = None, mesh=None,
               data_axis="data", precision_recall: bool = True, progress: bool = True,
               unbiased_cfg=None, eval_seed: int = 0):
    if reference.feature_net != feature_name:
      raise ValueError(f"reference statistics were made with {reference.feature_net!r}, not "
                       f"{feature_name!r}")
    if num_samples < 2:
      raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
    self.sharding = sharding_lib.batch_sharding(mesh, data_axis)
    num_shards = sharding_lib.data_parallel_size(mesh, data_axis)
    if batch_size % num_shards:
      raise ValueError(f"batch_size {batch_size} must be a multiple of the {num_shards} devices on "
                       f"the data axis")
    self.feature_name, self.feature_fn, self.reference = feature_name, feature_fn, reference
    self.num_samples, self.batch_size, self.num_classes = num_samples, batch_size, num_classes
    self.precision_recall, self.progress = precision_recall, progress
    self._unbiased, self._eval_seed = unbiased_cfg, eval_seed
    self._labels = jax.jit(lambda r: jax.random.randint(r, (batch_size,), 0, num_classes or 1),
                           out_shardings=self.sharding)
    self._quantize = jax.jit(images_lib.quantize, out_shardings=self.sharding)

  def _batch(self, sample_fn, rng):
    label_rng, sample_rng = jax.random.split(rng)
    labels = self._labels(label_rng) if self.num_classes else None
    x = sample_fn(sample_rng, labels)
    if x.ndim != 4 or x.shape[0] != self.batch_size:
      raise ValueError(f"sample_fn must return ({self.batch_size}, H, W, C) images in [-1, 1], "
                       f"got shape {x.shape}")
    return self.feature_fn(self._quantize(jax.device_put(x, self.sharding)))

  def sample_features(self, sample_fn, rng: jax.Array) -> dict:
    """Features of num_samples images from sample_fn (batch i uses fold_in(rng, i))."""
    collected = {}

    def fetch(feats):
      for key, value in jax.device_get(feats).items():
        collected.setdefault(key, []).append(np.asarray(value))

    pending = None
    for i in tqdm(range(math.ceil(self.num_samples / self.batch_size)),
                  desc=f"eval {self.feature_name}", disable=not self.progress):
      feats = self._batch(sample_fn, jax.random.fold_in(rng, i))
      if pending is not None:  # fetch batch i-1 after dispatching batch i, so the device never idles
        fetch(pending)
      pending = feats
    fetch(pending)
    return {key: np.concatenate(value)[:self.num_samples] for key, value in collected.items()}

  def run(self, sample_fn, rng: jax.Array) -> dict[str, float]:
    """Samples, embeds and scores num_samples images; metric names carry the feature network."""
    feats = self.sample_features(sample_fn, rng)
    out = fid.metrics(self.feature_name, feats, self.reference, pr=self.precision_recall)
    if self._unbiased is None:
      return out
    return dict(out, **unbiased.metrics(self.feature_name, feats["pool"], self.reference,
                                        self._unbiased, self._eval_seed))


def _reference(q, split: str, source, name, feature_fn, labelled_images, mesh):
  if q.reference:
    # The sampling batch: one compiled shape of the feature network, divisible by the mesh.
    return fid.load_reference(q.reference, name, feature_fn, batch_size=q.batch_size, mesh=mesh)
  cache = q.cache_dir or str(inception.default_cache_dir())
  return fid.cached_reference(cache, source.name, split, source.image_shape[0], name,
                              feature_fn, labelled_images()[0], mesh=mesh,
                              batch_size=q.batch_size, log=logging.info)


def reference_sample(q, eval_seed: int, source):
  """(uint8 images, class labels) the dataset CNN trains on and the FID reference is made of: a
  class-stratified sample of eval.fid.reference_size examples (all if <= 0) drawn with eval.seed,
  read once per process."""
  classes = captions.class_source(source)  # a caption source's base: the CNN learns classes
  n = source.num_examples if q.reference_size <= 0 else min(q.reference_size, source.num_examples)
  idx = sources.stratified_sample(sources.labels_of(classes), n, eval_seed)
  return classes.read(idx, np.zeros(len(idx), bool))


def feature_network_and_reference(eval_cfg, data_cfg, source, mesh):
  """(name, feature_fn, reference) of `eval.fid`: loaded from the cache when made from the same
  images (and weights), else made (a dataset CNN trained, reference statistics computed) and
  cached. A sweep calls it once before its workers start, so they all load what one process made."""
  q = eval_cfg.fid
  labelled_images = functools.lru_cache(maxsize=1)(
      lambda: reference_sample(q, eval_cfg.seed, source))
  name, feature_fn = fid.feature_network(
      feature_images(eval_cfg, data_cfg, source), q.feature_network, cache_dir=q.cache_dir or None,
      labelled_images=None if source.kind == "latents" else labelled_images, log=logging.info)
  return name, feature_fn, _reference(q, data_cfg.split, source, name, feature_fn,
                                      labelled_images, mesh)


class SampleQuality:
  """FID and friends of `eval.fid.num_samples` EMA samples (pixel data: against cached statistics
  of the training source; latents: against `eval.fid.reference`, samples decoded by the VAE), and
  from the same features KID and FID∞ (unbiased.py: kid_<net>, kid_std_<net>, fid_inf_<net>,
  fid_inf_slope_<net>; no KID against a stats-only reference, fid_reference.json's kid_note says
  why)."""
  name = "fid"

  def __init__(self, eval_cfg, data_cfg, objective, source, model, mesh, workdir):
    q = eval_cfg.fid
    self.every_steps = q.every_steps
    latents = source.kind == "latents"
    name, feature_fn, reference = feature_network_and_reference(eval_cfg, data_cfg, source, mesh)
    if jax.process_index() == 0:  # which statistics the rows' FIDs were measured against
      files.atomic_write_text(pathlib.Path(workdir) / "fid_reference.json", json.dumps(dict(
          fid_reference=q.reference or f"cached:{source.name}/{data_cfg.split}",
          fid_reference_fingerprint=reference.fingerprint(),
          fid_reference_size=int(reference.num_images), fid_feature_net=name,
          fid_feature_net_weights=getattr(feature_fn, "weights_key", None),
          **unbiased.kid_note(reference))))
    self._suite = FidSuite(name, feature_fn, reference, q.num_samples, q.batch_size,
                           num_classes=source.num_classes if models.reads_labels(model) else None,
                           mesh=mesh, data_axis=sharding_lib.BATCH_AXES, progress=False,
                           unbiased_cfg=q, eval_seed=eval_cfg.seed)
    # Samples stay sharded over the batch (no replicated output).
    self._sample = objective.sample_fn(model, steps=q.respacing, cfg_scale=q.cfg_scale,
                                       guide_channels=q.guide_channels, data_kind=source.kind)
    self._shape = (q.batch_size,) + tuple(source.image_shape)
    self._decode = (lambda x: decode_latents(eval_cfg.vae_path, x, source.scaling_factor)) \
        if latents else (lambda x: x)
    self._seed, self._batch = eval_cfg.seed, q.batch_size
    self.key = f"fid_{name}"
    table = captions.caption_table(source)
    # A text model samples the captions of the drawn classes; the lookup keeps their sharding.
    self._to_model = (lambda y: y) if table is None else jax.jit(lambda y: jnp.asarray(table)[y])

  def run(self, params, step: int) -> dict:
    def sample_fn(rng, labels):
      labels = np.zeros((self._batch,), np.int32) if labels is None else self._to_model(labels)
      return self._decode(self._sample(params, labels, rng, self._shape))
    return self._suite.run(sample_fn, rng_lib.fid_key(self._seed, step))


class ValidationLoss:
  """Mean loss terms of the EMA model on the held-out examples x `num_timesteps` fixed times."""
  name = "val"
  key = "val_loss"

  def __init__(self, ev, eval_seed: int, objective, val_source, model, mesh):
    process = objective.process
    n = min(ev.num_examples, val_source.num_examples)
    x, labels = val_source.read(np.arange(n), np.zeros(n, bool))
    key, posterior_key = rng_lib.validation_keys(eval_seed)
    if val_source.kind == "latents":  # one fixed posterior draw per example
      mean, logvar = np.split(np.asarray(x, np.float32), 2, axis=-1)
      eps = np.asarray(jax.random.normal(posterior_key, mean.shape, jnp.float32))
      x = (mean + np.exp(0.5 * logvar) * eps) * val_source.scaling_factor
    else:
      x = images_lib.to_unit_range(np.asarray(x))
    k = ev.num_timesteps  # every example at every fixed time
    self._x = np.repeat(x, k, axis=0)
    self._y = np.repeat(np.asarray(labels, np.int32), k)
    self._t = np.tile(np.asarray(process.fixed_times(k)), n)
    self._noise = np.asarray(per_example.per_example_normal(key, self._x.shape))
    self.every_steps, self._batch = ev.every_steps, ev.batch_size
    self._sharding = sharding_lib.batch_sharding(mesh)
    conditional = bool(model.num_classes)

    @jax.jit
    def sums(params, x, y, t, noise):
      fn = lambda x_t, t_m: model.apply({"params": params}, x_t, t_m, y if conditional else None)
      terms = process.validation_losses(fn, x, t, noise)
      return {k_: jnp.sum(v) for k_, v in terms.items()}
    self._sums = sums

  def run(self, params, step: int) -> dict:
    del step
    total, n = {}, len(self._x)
    for lo in range(0, n, self._batch):
      hi = min(n, lo + self._batch)
      part = [jax.device_put(a[lo:hi], self._sharding) if hi - lo == self._batch else a[lo:hi]
              for a in (self._x, self._y, self._t, self._noise)]
      for k_, v in self._sums(params, *part).items():
        total[k_] = total.get(k_, 0.0) + float(v)
    return {f"val_{k_}": v / n for k_, v in total.items()}


def create(eval_cfg, data_cfg, objective, source, model, mesh, workdir, val_source=None) -> list:
  """The evaluators `eval_cfg` (config.eval) turns on, in the order the loop runs them."""
  out = []
  if val_source is not None and eval_cfg.val.every_steps > 0:
    out.append(ValidationLoss(eval_cfg.val, eval_cfg.seed, objective, val_source, model, mesh))
  if eval_cfg.grid.every_steps > 0:
    out.append(SampleGrid(eval_cfg, objective, source, model, mesh, workdir))
  if eval_cfg.fid.every_steps > 0 and eval_cfg.fid.num_samples > 0:
    out.append(SampleQuality(eval_cfg, data_cfg, objective, source, model, mesh, workdir))
  return out
