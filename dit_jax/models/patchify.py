"""Patchify / unpatchify: images (B, H, W, C) <-> token sequences (B, H/p * W/p, p*p*C)."""
import einops
import jax.numpy as jnp


def check_patch(input_size: int, patch_size: int) -> None:
  """Raises a clear error when the patch does not tile the input."""
  if patch_size <= 0 or input_size % patch_size:
    raise ValueError(f"patch size {patch_size} does not divide the input size {input_size}; "
                     f"pick a patch in {[p for p in (1, 2, 4, 8, 16) if input_size % p == 0]}")


def patchify(x_BxHxWxC: jnp.ndarray, p: int) -> jnp.ndarray:
  """Non-overlapping p x p patches in row-major order, each flattened as (p, q, c)."""
  return einops.rearrange(x_BxHxWxC, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x_BxTxD: jnp.ndarray, p: int, h: int, w: int) -> jnp.ndarray:
  """Inverse of `patchify`: tokens (h, w, p, q, c) -> image (h*p, w*q, c), as the official DiT."""
  return einops.rearrange(x_BxTxD, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=p, q=p)
