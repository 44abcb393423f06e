"""The Flax FID Inception against pytorch-fid's InceptionV3 (same random weights, no download)."""
import urllib.error

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as pfi

from dit_jax.evaluation import inception

RTOL = 1e-4  # float32, relative to the largest magnitude of the torch output


def _assert_close_rel(got, want, rtol=RTOL):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.abs(want).max()
  assert scale > 0
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _random_state_dict(seed):
  """A seeded random state dict with the keys and shapes of pytorch-fid's FID weights."""
  torch.manual_seed(seed)
  net = torchvision.models.inception_v3(num_classes=inception.NUM_LOGITS, aux_logits=False,
                                        weights=None, init_weights=False)
  return net.state_dict()


@pytest.fixture(scope="module")
def torch_fid_model():
  """pytorch-fid's own fid_inception_v3 + InceptionV3 wrapper, with random weights instead of the
  download; batch-norm statistics calibrated on an image batch so activations stay O(1)."""
  mp = pytest.MonkeyPatch()
  # The only network access in pytorch-fid is this loader; its construction code runs unchanged.
  mp.setattr(pfi, "load_state_dict_from_url", lambda url, **kw: _random_state_dict(0))
  net = pfi.fid_inception_v3()
  mp.setattr(pfi, "fid_inception_v3", lambda: net)
  wrapper = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
  mp.undo()
  assert isinstance(net.Mixed_7c, pfi.FIDInceptionE_2) and isinstance(net.Mixed_5b, pfi.FIDInceptionA)
  gen = torch.Generator().manual_seed(1)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in bns:
    bn.reset_running_stats()
    bn.momentum = None  # cumulative average: one batch sets running stats to its statistics
  wrapper.train()
  with torch.no_grad():
    wrapper(torch.rand(6, 3, 64, 64, generator=gen))
    for bn in bns:
      bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=gen))
      bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=gen))
  wrapper.eval()
  net.eval()
  return net, wrapper


def _torch_features(net, wrapper, images_u8):
  x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
  if x.shape[1] == 1:
    x = x.repeat(1, 3, 1, 1)
  captured = {}
  hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(s=o))
  with torch.no_grad():
    pool = wrapper(x)[0][:, :, 0, 0]
    logits_with_bias = net.fc(pool)
    logits = logits_with_bias - net.fc.bias
  hook.remove()
  spatial = captured["s"][:, :inception.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
  return {"pool": pool.numpy(), "spatial": spatial.numpy(), "logits": logits.numpy(),
          "logits_torch_fc": logits_with_bias.numpy(), "fc_bias": net.fc.bias.detach().numpy()}


@pytest.mark.parametrize("size_in", [(28, 28), (32, 45), (512, 300)])
def test_resize_matches_torch_interpolate(size_in):
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, *size_in, 3)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                       align_corners=False).permute(0, 2, 3, 1).numpy()
  got = np.asarray(inception.resize_bilinear(x, 299))
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


@pytest.mark.slow
def test_features_match_pytorch_fid(torch_fid_model):
  net, wrapper = torch_fid_model
  params = inception.params_from_torch_state_dict(net.state_dict())
  feature_fn = inception.make_feature_fn(params)
  rng = np.random.default_rng(2)
  # Smooth random images (a random field upsampled), so the features are not those of pure noise.
  low = rng.integers(0, 256, size=(3, 8, 8, 3)).astype(np.float32)
  images = np.asarray(inception.resize_bilinear(low, 40)).round().clip(0, 255).astype(np.uint8)
  want = _torch_features(net, wrapper, images)
  got = jax.device_get(feature_fn(images))
  assert got["pool"].shape == (3, 2048)
  assert got["spatial"].shape == (3, 17 * 17 * 7)
  assert got["logits"].shape == (3, 1008)
  # The random network must give features that differ between images, else the check is vacuous.
  assert np.abs(want["pool"][0] - want["pool"][1]).max() > 0.01 * np.abs(want["pool"]).max()
  for key in ("pool", "spatial", "logits"):
    _assert_close_rel(got[key], want[key])
  # logits are the torch fc output less its bias (ADM's IS graph leaves the bias out).
  _assert_close_rel(got["logits"] + want["fc_bias"], want["logits_torch_fc"])

  # Greyscale input is replicated to RGB as pytorch-fid's PIL .convert('RGB') does.
  grey = images[:1, :, :, :1]
  want_grey = _torch_features(net, wrapper, grey)
  _assert_close_rel(jax.device_get(feature_fn(grey))["pool"], want_grey["pool"])


def test_state_dict_file_roundtrip_and_offline_error(tmp_path, monkeypatch):
  sd = _random_state_dict(3)
  pth = tmp_path / inception.FID_WEIGHTS_FILE
  torch.save(sd, pth)
  params = inception.load_params(pth)
  assert (tmp_path / (pth.stem + ".flax.npz")).exists()
  cached = inception.load_params(pth)  # second time from the .npz, without torch
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(cached)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(params) == jax.tree.structure(cached)
  np.testing.assert_allclose(params["fc_kernel"], sd["fc.weight"].numpy().T)
  k = sd["Conv2d_1a_3x3.conv.weight"].numpy().transpose(2, 3, 1, 0)
  scale = (sd["Conv2d_1a_3x3.bn.weight"] / torch.sqrt(sd["Conv2d_1a_3x3.bn.running_var"] + 1e-3))
  np.testing.assert_allclose(params["Conv2d_1a_3x3"]["conv"]["kernel"], k * scale.numpy(),
                             rtol=1e-6)

  bad = dict(sd)
  bad["AuxLogits.fc.weight"] = torch.zeros(3)
  with pytest.raises(ValueError, match="unexpected keys"):
    inception.params_from_torch_state_dict(bad)

  def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")
  monkeypatch.setattr(inception.urllib.request, "urlopen", offline)
  empty = tmp_path / "cache"
  with pytest.raises(FileNotFoundError, match="put it at .*pt_inception-2015-12-05-6726825d.pth"):
    inception.fetch_fid_weights(empty)
  assert not list(empty.glob("*"))  # no partial file left behind
  with pytest.raises(FileNotFoundError, match="not found"):
    inception.load_params(cache_dir=empty, download=False)
