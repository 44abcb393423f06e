r"""Encodes a dataset once with the SD VAE into the shards the "latents" data source reads.

  python tools/extract_latents.py --vae=checkpoints/sd-vae-ft-ema --out=/data/latents/in256 \
      --data.name=folder --data.path=/data/imagenet/train --data.image_size=256

Each example is stored twice (as is and mirrored) as the posterior's parameters, mean and logvar
(not a sample): DiT trains on a fresh posterior SAMPLE * 0.18215 every time it sees an image, so
the sampling happens at train time (pipeline.Pipeline) from (seed, step). Resumable: finished
shards are skipped. In a multi-process job every process writes its own shards (one writer per
process).
"""
import functools

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from dit_jax.data import latent_format
from dit_jax.data import sources
from dit_jax.models import vae as vae_lib

_DATA = config_flags.DEFINE_config_dict("data", sources.default_data_config(), "Images to encode.")
_VAE = flags.DEFINE_string("vae", "checkpoints/sd-vae-ft-ema",
                           "diffusers-format VAE folder (config.json + weights).")
_OUT = flags.DEFINE_string("out", None, "Output directory for meta.json and shards.", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per encoder call (each also mirrored).")
_SHARD = flags.DEFINE_integer("shard_size", 10_000, "Examples per shard file.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"],
                           "Storage dtype of mean/logvar (float16 halves the disk).")
_NO_FLIP = flags.DEFINE_bool("no_flip", False, "Store only the unmirrored encoding.")


def make_encoder(model, params, batch_size: int):
  """A jitted (images -> (mean, logvar)) over this host's devices, batch split across them."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  if batch_size % len(devices):
    raise ValueError(f"--batch_size={batch_size} must be a multiple of the {len(devices)} local "
                     "devices")
  in_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  @functools.partial(jax.jit, in_shardings=(None, in_sharding))
  def encode(p, x):
    return model.apply({"params": p}, x, method=model.encode)

  def encode_fn(x_np):
    mean, logvar = encode(params, jax.device_put(x_np, in_sharding))
    return np.asarray(mean), np.asarray(logvar)

  return encode_fn


def run(data_cfg, vae_path, out, batch_size, shard_size, dtype="float32", flips=True,
        progress=True):
  """Loads the VAE and the source, then writes/resumes the latent shards; returns meta."""
  data_cfg = data_cfg.copy_and_resolve_references()
  data_cfg.flip = False  # both mirror images are encoded explicitly
  if data_cfg.name == "latents":
    raise ValueError("data.name='latents' is already encoded; point --data at the images")
  model, params = vae_lib.load_pretrained(vae_path)  # clear FileNotFoundError if absent
  factor = model.config.downsample_factor
  if data_cfg.image_size % factor:
    raise ValueError(f"data.image_size={data_cfg.image_size} must be a multiple of the VAE's "
                     f"downsampling factor {factor}")
  source = sources.create_source(data_cfg)
  if source.image_shape[-1] != model.config.in_channels:
    raise ValueError(f"the VAE takes {model.config.in_channels}-channel images, the source gives "
                     f"{source.image_shape[-1]}; set data.channels={model.config.in_channels}")
  return latent_format.write_latents(
      source, make_encoder(model, params, batch_size), out, shard_size=shard_size,
      batch_size=batch_size, dtype=np.dtype(dtype), flips=flips, progress=progress,
      meta_extra=dict(scaling_factor=model.config.scaling_factor, vae=str(vae_path),
                      data_config=data_cfg.to_dict()),
      process_index=jax.process_index(), process_count=jax.process_count())


def main(argv):
  del argv
  meta = run(_DATA.value, _VAE.value, _OUT.value, _BATCH.value, _SHARD.value, _DTYPE.value,
             flips=not _NO_FLIP.value)
  print(f"latents of {meta['num_examples']} examples in {meta['num_shards']} shards: {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
