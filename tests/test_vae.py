"""The Flax SD VAE against diffusers' AutoencoderKL (torch, float32), weights via save_pretrained."""
import json

import pytest

# Imported at collection, before any test imports TensorFlow: TF then libtriton segfaults.
diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.models import vae

SMALL = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
# stabilityai/sd-vae-ft-ema's config.json (the diffusers defaults for these keys are different).
SD = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
          latent_channels=4, sample_size=256)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def _perturb_norms(model):
  # Fresh GroupNorms are identity (scale 1, bias 0); random values make a swapped scale/bias visible.
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))


def _compare(tmp_path, config_kwargs, size, batch):
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(**config_kwargs).eval()
  _perturb_norms(ref)
  ref.save_pretrained(tmp_path)
  model, params = vae.load_pretrained(tmp_path)
  x_NCHW = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
  latent = size // 2 ** (len(config_kwargs["block_out_channels"]) - 1)
  z_NCHW = torch.randn(batch, 4, latent, latent, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    posterior = ref.encode(x_NCHW).latent_dist
    recon = ref.decode(z_NCHW).sample
  to_nhwc = lambda t: jnp.asarray(t.numpy().transpose(0, 2, 3, 1))
  mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(
      params, to_nhwc(x_NCHW))
  out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(
      params, to_nhwc(z_NCHW))
  return ({"mean": mean, "logvar": logvar, "decoded": out},
          {"mean": to_nhwc(posterior.mean), "logvar": to_nhwc(posterior.logvar),
           "decoded": to_nhwc(recon)})


def test_small_vae_matches_diffusers(tmp_path):
  ours, ref = _compare(tmp_path, SMALL, size=16, batch=2)
  assert ours["mean"].shape == (2, 8, 8, 4) and ours["decoded"].shape == (2, 16, 16, 3)
  for k in ours:
    print(k, _rel_err(ours[k], ref[k]))
    assert _rel_err(ours[k], ref[k]) <= 1e-5, (k, _rel_err(ours[k], ref[k]))


@pytest.mark.slow
def test_sd_config_vae_matches_diffusers(tmp_path):
  ours, ref = _compare(tmp_path, SD, size=32, batch=1)
  assert vae.VAEConfig.from_json(tmp_path / "config.json").scaling_factor == 0.18215
  assert ours["mean"].shape == (1, 4, 4, 4) and ours["decoded"].shape == (1, 32, 32, 3)
  for k in ours:
    print(k, _rel_err(ours[k], ref[k]))
    assert _rel_err(ours[k], ref[k]) <= 1e-5, (k, _rel_err(ours[k], ref[k]))


def test_missing_weights_and_bad_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="huggingface-cli download stabilityai/sd-vae-ft-ema"):
    vae.load_pretrained(tmp_path / "nowhere")
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
    vae.load_pretrained(tmp_path)
  with pytest.raises(ValueError, match="up_block_types"):
    vae.VAEConfig.from_dict({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"],
                             "block_out_channels": [32, 64]})


def test_deprecated_attention_names_are_mapped(tmp_path):
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(**SMALL).eval()
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  renamed = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
             .replace("to_out.0", "proj_attn"): v for k, v in sd.items()}
  cfg = vae.VAEConfig.from_dict(dict(SMALL))
  a, b = vae.convert_state_dict(sd, cfg), vae.convert_state_dict(renamed, cfg)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))
  with pytest.raises(ValueError, match="missing"):
    vae.convert_state_dict({k: v for k, v in sd.items() if "to_q" not in k}, cfg)
