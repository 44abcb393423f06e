"""Inception-v3 as used for FID (pytorch-fid's TF-ported variant) in Flax Linen, NHWC.

The architecture is torchvision's Inception-v3 with pytorch-fid's FID blocks (FIDInceptionA/C/E_1/E_2:
average pools that ignore padding, a max pool in the last block), which reproduce the TF graph
`inception-2015-12-05` that the FID/ADM evaluators use. Weights come from pytorch-fid's converted
state dict `pt_inception-2015-12-05-6726825d.pth`; batch norm is folded into the convolutions when
the state dict is converted.

Outputs, for uint8 images of any size (grey or RGB):
  pool:    (N, 2048) pool-3 features, for FID and precision/recall.
  spatial: (N, 17*17*7) the first 7 channels of TF's `mixed_6/conv` (torch `Mixed_6d.branch1x1`,
           after its ReLU), flattened in HWC order as ADM's evaluator does, for sFID.
  logits:  (N, 1008) pool-3 times the softmax weights WITHOUT the bias, which is what ADM (and the
           original improved-gan Inception Score) feed to the softmax.
"""
import hashlib
import os
import pathlib
import shutil
import urllib.error
import urllib.request
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dit_jax import files
from dit_jax import sharding as sharding_lib

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub convention: the hex in the file name is the start of the file's sha256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
INPUT_SIZE = 299
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3  # torchvision's BasicConv2d

Dtype = Any


def default_cache_dir() -> pathlib.Path:
  """Cache for downloaded weights and reference statistics ($DIT_JAX_CACHE or ~/.cache/dit_jax)."""
  return pathlib.Path(os.environ.get("DIT_JAX_CACHE", pathlib.Path.home() / ".cache" / "dit_jax"))


def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of torch's bilinear interpolate (align_corners=False, no antialias)."""
  f32 = np.float32
  # torch's float32 scale, then a fused multiply-add rounded once to float32: this reproduces
  # its weights bit for bit (plain float32 or float64 arithmetic is off by up to 3e-5).
  scale = np.float64(f32(size_in) / f32(size_out))
  src = (scale * (np.arange(size_out) + 0.5) - 0.5).astype(f32)
  src = np.maximum(src, f32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
  i1 = np.minimum(i0 + 1, size_in - 1)
  w1 = src - i0.astype(f32)
  m = np.zeros((size_out, size_in), np.float32)
  np.add.at(m, (np.arange(size_out), i0), f32(1.0) - w1)
  np.add.at(m, (np.arange(size_out), i1), w1)
  return m


def resize_bilinear(x_NxHxWxC: jax.Array, size: int) -> jax.Array:
  """Bilinear resize exactly as torch.nn.functional.interpolate(mode='bilinear') does it."""
  _, h, w, _ = x_NxHxWxC.shape
  hi = jax.lax.Precision.HIGHEST
  if h != size:
    m = jnp.asarray(resize_matrix(h, size), x_NxHxWxC.dtype)
    x_NxHxWxC = jnp.einsum("oh,nhwc->nowc", m, x_NxHxWxC, precision=hi)
  if w != size:
    m = jnp.asarray(resize_matrix(w, size), x_NxHxWxC.dtype)
    x_NxHxWxC = jnp.einsum("ow,nhwc->nhoc", m, x_NxHxWxC, precision=hi)
  return x_NxHxWxC


def _pad(p):
  return ((p[0], p[0]), (p[1], p[1]))


class ConvBN(nn.Module):
  """Conv + (folded) batch norm + ReLU: torchvision's BasicConv2d."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, padding=_pad(self.padding), use_bias=True,
                dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # pytorch-fid's patch: TF's average pool leaves the zero padding out of the mean.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (FIDInceptionA)."""
  pool_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    b1 = conv(64, name="branch1x1")(x)
    b5 = conv(48, name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (torchvision InceptionB, unchanged by pytorch-fid)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    b3 = conv(384, (3, 3), (2, 2), name="branch3x3")(x)
    bd = conv(64, name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC); also returns branch1x1, whose first channels are sFID's input."""
  channels_7x7: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    c7 = self.channels_7x7
    b1 = conv(192, name="branch1x1")(x)
    b7 = conv(c7, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """Mixed_7a (torchvision InceptionD, unchanged by pytorch-fid)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    b3 = conv(192, name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
    bp = nn.max_pool(x, (3, 3), (2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, pool='avg') and Mixed_7c (FIDInceptionE_2, pool='max')."""
  pool: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: ConvBN(*a, **k, dtype=self.dtype, param_dtype=self.param_dtype)
    b1 = conv(320, name="branch1x1")(x)
    b3 = conv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    else:
      # pytorch-fid's patch: the TF graph max-pools here (padding counts as -inf).
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    bp = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID Inception-v3: uint8 NHWC images (any size, 1 or 3 channels) -> dict(pool, spatial, logits)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_NxHxWxC):
    if images_NxHxWxC.ndim != 4 or images_NxHxWxC.shape[-1] not in (1, 3):
      raise ValueError(f"InceptionV3 expects NHWC images with 1 or 3 channels, got shape "
                       f"{images_NxHxWxC.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images_NxHxWxC.astype(jnp.float32)
    if x.shape[-1] == 1:  # pytorch-fid reads images with PIL .convert('RGB'): grey is replicated
      x = jnp.repeat(x, 3, axis=-1)
    # pytorch-fid: ToTensor (x/255), resize to 299 with bilinear interpolate, then 2x - 1.
    x = resize_bilinear(x / 255.0, INPUT_SIZE)
    x = (2.0 * x - 1.0).astype(self.dtype)
    x = ConvBN(32, (3, 3), (2, 2), name="Conv2d_1a_3x3", **kw)(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3", **kw)(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3", **kw)(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = ConvBN(80, name="Conv2d_3b_1x1", **kw)(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3", **kw)(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = InceptionA(32, name="Mixed_5b", **kw)(x)
    x = InceptionA(64, name="Mixed_5c", **kw)(x)
    x = InceptionA(64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)
    x, _ = InceptionC(128, name="Mixed_6b", **kw)(x)
    x, _ = InceptionC(160, name="Mixed_6c", **kw)(x)
    # TF's mixed_6 is torch's Mixed_6d; `mixed_6/conv` is its 1x1 branch after the ReLU.
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d", **kw)(x)
    x, _ = InceptionC(192, name="Mixed_6e", **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)
    x = InceptionE("avg", name="Mixed_7b", **kw)(x)
    x = InceptionE("max", name="Mixed_7c", **kw)(x)
    pool_Nx2048 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].astype(jnp.float32)
    spatial = spatial.reshape(spatial.shape[0], -1)
    # ADM's IS graph multiplies pool_3 by the softmax weights only; the bias is never added.
    w = self.param("fc_kernel", nn.initializers.lecun_normal(), (2048, NUM_LOGITS),
                   self.param_dtype)
    logits = jnp.dot(pool_Nx2048, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return {"pool": pool_Nx2048, "spatial": spatial, "logits": logits}


def params_from_torch_state_dict(state_dict) -> dict:
  """Flax params from pytorch-fid's Inception state dict (numpy or torch tensors), BN folded in."""
  sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float64)
        for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  params = {}
  used = set()
  for key in sd:
    if not key.endswith(".conv.weight"):
      continue
    prefix = key[:-len(".conv.weight")]
    bn = {n: sd[f"{prefix}.bn.{n}"] for n in ("weight", "bias", "running_mean", "running_var")}
    scale = bn["weight"] / np.sqrt(bn["running_var"] + BN_EPS)
    kernel = np.transpose(sd[key], (2, 3, 1, 0)) * scale  # (O, I, kh, kw) -> (kh, kw, I, O)
    bias = bn["bias"] - bn["running_mean"] * scale
    node = params
    for part in prefix.split("."):
      node = node.setdefault(part, {})
    node["conv"] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    used.update([key] + [f"{prefix}.bn.{n}" for n in bn])
  if "fc.weight" not in sd or sd["fc.weight"].shape != (NUM_LOGITS, 2048):
    raise ValueError("state dict has no fc.weight of shape (1008, 2048): not pytorch-fid's FID "
                     "Inception weights")
  params["fc_kernel"] = sd["fc.weight"].T.astype(np.float32)
  used.update(["fc.weight", "fc.bias"])
  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(f"unexpected keys in the Inception state dict (e.g. {unused[:3]}): expected "
                     f"pytorch-fid's FID Inception (aux_logits=False)")
  expected = jax.eval_shape(lambda: InceptionV3().init(
      jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)))["params"]
  got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  if jax.tree.structure(got) != jax.tree.structure(expected) or jax.tree.leaves(got) != jax.tree.leaves(
      expected):
    raise ValueError("converted Inception params do not match the Flax InceptionV3 structure")
  return params


def _sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def fetch_fid_weights(cache_dir=None, download: bool = True) -> pathlib.Path:
  """Path of pytorch-fid's weights file in `cache_dir`, downloaded there once when online."""
  cache_dir = pathlib.Path(cache_dir or default_cache_dir())
  path = cache_dir / FID_WEIGHTS_FILE
  if path.exists():
    return path
  where = (f"Download {FID_WEIGHTS_URL} on a machine with network access and put it at {path} "
           f"(or pass its path as the Inception weights).")
  if not download:
    raise FileNotFoundError(f"FID Inception weights not found at {path}. {where}")
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".part")
  try:
    with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=60) as r, open(tmp, "wb") as f:
      shutil.copyfileobj(r, f)
  except (urllib.error.URLError, OSError) as e:
    tmp.unlink(missing_ok=True)
    raise FileNotFoundError(f"FID Inception weights not found at {path} and the download failed "
                            f"({e}); this machine is probably offline. {where}") from e
  digest = _sha256(tmp)
  if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
    tmp.unlink()
    raise ValueError(f"downloaded {FID_WEIGHTS_URL} has sha256 {digest}, expected it to start with "
                     f"{FID_WEIGHTS_SHA256_PREFIX}")
  tmp.rename(path)
  return path


def load_params(weights=None, cache_dir=None, download: bool = True) -> dict:
  """Inception params from a .pth (pytorch-fid) or converted .npz file; default: the cached .pth.

  The .pth needs torch once to read; the conversion is then cached beside it as .npz.
  """
  path = pathlib.Path(weights) if weights else fetch_fid_weights(cache_dir, download)
  if not path.exists():
    raise FileNotFoundError(f"Inception weights {path} do not exist. Get {FID_WEIGHTS_URL} and pass "
                            f"its path.")
  npz = path if path.suffix == ".npz" else path.with_suffix(".flax.npz")
  unflatten = lambda f: traverse_util.unflatten_dict(dict(f), sep="/")
  if npz == path:  # the user's converted weights: an unreadable file is their error
    return files.read_npz(path, unflatten)
  # a truncated conversion is made again from the .pth
  cached = files.read_cache(npz, lambda p: files.read_npz(p, unflatten))
  if cached is not None:
    return cached
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch (CPU is enough) once; the converted params are "
                      f"then cached at {npz}") from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  params = params_from_torch_state_dict(state_dict)
  try:
    files.atomic_save_npz(npz, **traverse_util.flatten_dict(params, sep="/"))
  except OSError:
    pass  # a read-only weights folder only costs a re-conversion next time
  return params


def make_feature_fn(params, dtype: Dtype = jnp.float32) -> Callable[[jax.Array], dict]:
  """Jitted uint8 NHWC -> dict(pool, spatial, logits); params are an argument, not constants."""
  model = InceptionV3(dtype=dtype)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  # Replicated on every device, so that batches split over all of them can be fed in.
  params = jax.device_put(params, sharding_lib.replicated())
  return lambda images: apply(params, images)
