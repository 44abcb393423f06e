"""Pixels in and out: ADM's centre crop to the training size, the pixel encoding both ways, and PNG
grids.

`prepare_image` resizes every source's images as ADM and DiT do (`center_crop_arr`: BOX-halve, then
BICUBIC, then a centre crop), converting grey <-> RGB when asked.
uint8 pixels become model inputs in [-1, 1] by `to_unit_range`, x / 127.5 - 1: the training
pipeline, the validation loss, the latent extraction and the CNN feature network all use it.
Samples in [-1, 1] become uint8 as DiT's `sample_ddp.py` and ADM save them:
floor(clip(127.5 x + 128, 0, 255)). Every path that turns samples into pixels (FID, grids, tools)
uses `quantize`, so a grid shows exactly the pixels the feature network scored.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
  """ADM's centre crop: BOX-halve while the short side >= 2*size, BICUBIC short side to size, crop."""
  while min(pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
  scale = image_size / min(pil_image.size)
  pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.asarray(pil_image)
  top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[top:top + image_size, left:left + image_size]


def _to_pil(image_HxWxC: np.ndarray, channels: int) -> Image.Image:
  im = Image.fromarray(image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1 else image_HxWxC)
  if channels:
    im = im.convert({1: "L", 3: "RGB"}[channels])
  return im


def prepare_image(image_HxWxC: np.ndarray, image_size: int, channels: int) -> np.ndarray:
  """One uint8 image -> (image_size, image_size, C) uint8 via ADM's crop, channels converted."""
  h, w, c = image_HxWxC.shape
  if (h, w) == (image_size, image_size) and channels in (0, c):
    return image_HxWxC
  arr = center_crop_arr(_to_pil(image_HxWxC, channels), image_size)
  return arr[..., None] if arr.ndim == 2 else arr


def to_unit_range(images_u8, dtype=np.float32, clip: bool = True):
  """uint8 pixels -> [-1, 1] in `dtype`: x / 127.5 - 1, computed by the array's own library
  (numpy in, numpy out; a jax array or tracer in, jax out).

  clip: clamp to [-1, 1]. Under jit XLA may compute x * (1 / 127.5), which puts 255 an ulp above
  1.0; in numpy float32 every value is in range already, so clipping changes nothing there.
  """
  xp = np if isinstance(images_u8, np.ndarray) else jnp
  x = images_u8.astype(dtype) / 127.5 - 1.0
  return xp.clip(x, -1.0, 1.0) if clip else x


def quantize(images: jax.Array) -> jax.Array:
  """[-1, 1] images -> uint8: floor(clip(127.5 x + 128, 0, 255))."""
  return jnp.floor(jnp.clip(127.5 * jnp.asarray(images, jnp.float32) + 128.0, 0.0, 255.0)
                   ).astype(jnp.uint8)


def grid(images_BxHxWxC: np.ndarray, ncol: int | None = None) -> np.ndarray:
  """uint8 images tiled into one (rows x ncol) uint8 image with 2-pixel gaps."""
  x = np.asarray(images_BxHxWxC)
  b, h, w, c = x.shape
  ncol = ncol or int(np.ceil(np.sqrt(b)))
  nrow = -(-b // ncol)
  out = np.zeros((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), np.uint8)
  for i in range(b):
    r, q = divmod(i, ncol)
    out[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = x[i]
  return out


def save_grid(images_BxHxWxC: np.ndarray, path, ncol: int | None = None) -> None:
  """Writes uint8 images as one PNG grid."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (optional heavy dependency)
  g = grid(images_BxHxWxC, ncol)
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(path)
