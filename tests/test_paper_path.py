"""The paper preset's FID path in miniature, offline: latents from an SD-layout VAE, an ADM-format
Inception reference, samples decoded by the VAE and scored by the FID Inception (random weights).

The miniature keeps every piece of the real path and shrinks only sizes: 24 CIFAR-10 test images at
64 px, a randomly initialised VAE with the SD VAE's layout (4 levels, factor 8, 4 latent channels)
but 8-16 channels wide, so latents are 8x8x4 and decodings 64x64x3, the smallest that `auto` scores
with Inception, as it does ImageNet's 256 px; the real `inception.InceptionV3` (it resizes every
input to 299 px, so its cost does not depend on the image size) with random weights in a temporary
cache; two DiT-Pico members (patch 4 and 2) trained 2 steps and scored with FID-8.
"""
import json
import math
import os
import subprocess
import sys
import types

import pytest

# Imported at collection, before any test imports TensorFlow: TF then libtriton segfaults.
diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from configs import dit_sweep
from dit_jax import files
from dit_jax.data import sources
from dit_jax.evaluation import evaluators
from dit_jax.evaluation import fid
from dit_jax.evaluation import inception
from tests.helpers import REPO, subprocess_env
from tests.helpers import load_tool

# stabilityai/sd-vae-ft-ema's config.json (as tests/test_vae.py), and the same shrunk: narrower
# levels and one resnet per level, but its 4 levels (downsampling factor 8) and 4 latent channels.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
              latent_channels=4, sample_size=256)
TINY_SD_VAE = dict(SD_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                   sample_size=64)
NUM_IMAGES, IMAGE_SIZE = 24, 64
# Sizes and steps only; everything else is configs/dit_sweep.py:paper's (FID unguided, no clipping).
SIZES_AND_STEPS = {"sweep.sizes": ("Pico",), "sweep.patches": (4, 2), "batch_size": 8,
                   "num_train_steps": 2, "eval.grid.every_steps": 0, "eval.fid.every_steps": 2,
                   "eval.fid.num_samples": 8, "eval.fid.batch_size": 8, "eval.fid.respacing": "2"}


def _random_inception_params(seed=0):
  """He-normal random weights in the real InceptionV3's shapes, so activations stay O(1)."""
  shapes = jax.eval_shape(lambda: inception.InceptionV3().init(
      jax.random.key(0), jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3), jnp.uint8)))
  rng = np.random.default_rng(seed)

  def draw(s):
    if len(s.shape) == 1:
      return np.zeros(s.shape, np.float32)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.standard_normal(s.shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)
  return jax.tree.map(draw, shapes["params"])


@pytest.fixture(scope="module")
def paper_files(shared_data, tmp_path_factory):
  """Latents dir, VAE folder, ADM-format reference .npz and the Inception cache, all offline."""
  tmp = tmp_path_factory.mktemp("paper")
  torch.manual_seed(0)
  diffusers.AutoencoderKL(**TINY_SD_VAE).eval().save_pretrained(tmp / "vae")
  data = sources.default_data_config()
  data.update(name="cifar10", path=str(shared_data / "cifar10_test_jpg"), split="test",
              image_size=IMAGE_SIZE, max_examples=NUM_IMAGES)
  meta = load_tool("extract_latents").run(data, tmp / "vae", tmp / "latents", batch_size=8,
                                           shard_size=16, progress=False)
  assert meta["num_examples"] == NUM_IMAGES and meta["scaling_factor"] == 0.18215

  # The Inception "download": the cached conversion load_params reads, beside the .pth it expects.
  cache = tmp / "cache"
  cache.mkdir()
  params = _random_inception_params()
  (cache / inception.FID_WEIGHTS_FILE).write_text("stand-in: the converted .flax.npz is used\n")
  files.atomic_save_npz(cache / inception.FID_WEIGHTS_FILE.replace(".pth", ".flax.npz"),
                        **traverse_util.flatten_dict(params, sep="/"))
  assert jax.tree.all(jax.tree.map(np.array_equal, inception.load_params(None, cache, False),
                                   params))

  # ADM's reference format: Inception statistics (mu, sigma) and the images (arr_0), no net name.
  images = sources.create_source(data).read(np.arange(NUM_IMAGES), np.zeros(NUM_IMAGES, bool))[0]
  apply = jax.jit(lambda p, x: inception.InceptionV3().apply({"params": p}, x))
  pool = np.concatenate([np.asarray(apply(params, images[i:i + 8])["pool"])
                         for i in range(0, NUM_IMAGES, 8)])
  mu, sigma = fid.statistics(pool)
  np.savez(tmp / "VIRTUAL_tiny64_labeled.npz", arr_0=images, mu=mu, sigma=sigma)
  return types.SimpleNamespace(latents=tmp / "latents", vae=tmp / "vae", cache=cache,
                               reference=tmp / "VIRTUAL_tiny64_labeled.npz")


def _flags(fields):
  return [f"--config.{k}={v if isinstance(v, str) else repr(v)}" for k, v in fields.items()]


@pytest.mark.slow
def test_paper_preset_scores_decoded_latents_with_inception(paper_files, tmp_path):
  """SLURM task 0 (stand-in srun) trains member 0; the whole sweep then trains the other one."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # `python` must be this interpreter (a wrapper: a symlink would lose the virtualenv).
  for name, body in (("srun", 'exec "$@"'), ("python", f'exec "{sys.executable}" "$@"')):
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)
  work = tmp_path / "sweep"
  env = dict(subprocess_env(devices=2), PATH=f"{bin_dir}:{os.environ['PATH']}",
             DIT_JAX_CACHE=str(paper_files.cache), WORKDIR=str(work),
             LATENTS=str(paper_files.latents), SLURM_ARRAY_TASK_ID="0",
             # The second process reuses the first's Inception, VAE and evaluation compiles.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  env.pop("CONFIG", None)
  sizes = _flags(dict(SIZES_AND_STEPS, **{"eval.fid.cache_dir": str(paper_files.cache)}))
  script = ["bash", str(REPO / "tools" / "slurm_sweep.sbatch")] + sizes

  out = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "set FID_REF" in out.stderr  # the paper preset needs all three
  env.update(FID_REF=str(paper_files.reference), VAE=str(paper_files.vae))
  out = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert [r["run"] for r in files.read_jsonl(work / "results.jsonl")] == ["DiT-Pico/4-s0"]

  main = [sys.executable, "-m", "dit_jax.main", "--config=configs/dit_sweep.py:paper",
          f"--workdir={work}", f"--config.data.path={paper_files.latents}",
          f"--config.eval.fid.reference={paper_files.reference}",
          f"--config.eval.vae_path={paper_files.vae}"] + sizes
  out = subprocess.run(main, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert "2 members, 1 to train (1 finished)" in out.stdout  # same config as the SLURM task's

  rows = files.read_jsonl(work / "results.jsonl")
  assert [(r["run"], r["step"], r["final"]) for r in rows] == [("DiT-Pico/4-s0", 2, True),
                                                              ("DiT-Pico/2-s0", 2, True)]
  fingerprint = fid.load_reference(paper_files.reference, "inception").fingerprint()
  for r in rows:
    assert r["status"] == "ok" and r["fid_metric"] == "fid_inception" and math.isfinite(r["fid"])
    assert r["fid_cfg_scale"] == 1.0 and r["fid_num_samples"] == 8 and r["fid_steps"] == "2"
    assert r["fid_reference_fingerprint"] == fingerprint and r["fid_feature_net"] == "inception"
    assert r["fid_reference"] == str(paper_files.reference) and r["fid_reference_size"] == NUM_IMAGES
    assert r["clip_denoised"] is False  # DiT's latent sampling
    # IS from the logits, precision/recall against arr_0's features: the whole ADM suite ran.
    assert {"is_inception", "precision_inception", "recall_inception"} <= set(r)
  assert json.loads((work / "DiT-Pico_2-s0" / "fid_reference.json").read_text())[
      "fid_reference_fingerprint"] == fingerprint


def _latents_config(tmp_path, feature_network="auto"):
  (tmp_path / "vae").mkdir(exist_ok=True)
  (tmp_path / "vae" / "config.json").write_text(json.dumps(dict(_class_name="AutoencoderKL",
                                                                **SD_VAE)))
  config = dit_sweep.get_config("paper")
  config.eval.vae_path = str(tmp_path / "vae")
  config.eval.fid.reference = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
  config.eval.fid.feature_network = feature_network
  return config


def test_latents_choose_the_feature_network_by_the_decoded_size(tmp_path):
  """32x32x4 SD latents decode to 256 px RGB: 'auto' is Inception; the CNN is refused up front."""
  latents = lambda side: types.SimpleNamespace(kind="latents", image_shape=(side, side, 4),
                                                  name="latents")
  config = _latents_config(tmp_path)
  images = evaluators.feature_images(config.eval, config.data, latents(32))
  assert (images["image_size"], images["channels"]) == (256, 3)
  assert fid.resolve_network("auto", images["image_size"], images["channels"]) == "inception"
  evaluators.check_with_data(config.eval, config.data, latents(32))
  cnn = _latents_config(tmp_path, "cnn")
  with pytest.raises(ValueError, match="latents have no labelled pixels"):
    evaluators.check_with_data(cnn.eval, cnn.data, latents(32))
  with pytest.raises(ValueError, match="for the 32 px decoded images"):
    evaluators.check_with_data(config.eval, config.data, latents(4))
  config.eval.vae_path = str(tmp_path / "no_vae")
  with pytest.raises(FileNotFoundError, match="huggingface-cli download stabilityai/sd-vae-ft-ema"):
    evaluators.check_with_data(config.eval, config.data, latents(32))
