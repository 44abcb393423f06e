"""Softmax attention for the models: jax's forward, with a hand-written backward pass.

`dot_product_attention(q, k, v, mask, implementation)` takes jax.nn.dot_product_attention's
(B, T, N, H) layout. `implementation="xla"` or `"cudnn"` calls jax's function. The default
(None / "") computes the forward with the arithmetic of jax's XLA path, with the heads moved first
(so the products' summation order, and float32 rounding, can differ), and has its own VJP:

- S = q.k^T * scale in float32, masked with jax's large negative number, P = softmax(S) in float32,
  O = P.v;
- backward as in FlashAttention (Dao et al. 2022, Alg. 2, without tiling): dV = P^T.dO,
  dP = dO.V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS.K * scale, dK = dS^T.Q * scale.

Autodiff of jax's function instead differentiates the softmax as (g - sum(g * P)) * P over the
(B, N, T, S) logits and keeps the products in the (B, T, N, H) layout, which XLA:CPU (jax 0.10)
serves with transposing copies around every per-head product. On DiT-S/2's shape (8 x 256 tokens,
6 heads of 64) one attention's forward+backward takes 30-34 ms on the 2-core CPU against 37-47 ms
for jax's (experiments/xla_cpu_grads/repro_xla_cpu_grads.py, three runs;
experiments/xla_cpu_grads/README.md, issue 16). Results agree to
float32 rounding (tests/test_fast_grads.py).

`implementation="auto"` (the config default) is resolved once per model by `choose`, from the
backend (backend.Backend), the compute dtype and the attention's shapes: dit_jax's own on the CPU
(above), jax's XLA attention on TPUs, cuDNN's fused attention on NVIDIA GPUs where its constraints
hold (jax 0.10's `cudnn/fused_attention_stablehlo.py`: float16/bfloat16 inputs; head dim a multiple
of 8 and at most 128, or 256 from Hopper (compute capability 9.0) on; a bias (our mask becomes one)
of the full (T, S) shape, which the mask broadcast over queries is not), else XLA's with the reason
logged. cuDNN's flash attention also needs an Ampere or newer GPU (compute capability 8.0).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMPLEMENTATIONS = (None, "", "xla", "cudnn", "auto")
CUDNN_DTYPES = ("float16", "bfloat16")


def choose(implementation, backend, dtype, head_dim: int, masked: bool = False) -> tuple[str, str]:
  """(the implementation to use: '' (dit_jax's own) | 'xla' | 'cudnn', why). Only 'auto' is
  decided here; any other value is returned as given. `backend`: a backend.Backend; `dtype`: the
  compute dtype; `masked`: whether a padding mask (B, 1, 1, S) is applied."""
  if implementation != "auto":
    return implementation or "", "configured"
  if backend.platform == "cpu":
    return "", "CPU: dit_jax's own backward (faster on XLA:CPU, experiments/xla_cpu_grads)"
  if backend.platform != "gpu":
    return "xla", f"{backend.platform}: jax's XLA attention"
  fallback = None
  h_max = 256 if backend.capability >= (9, 0) else 128
  if not backend.cuda:
    fallback = "not an NVIDIA GPU (cuDNN is CUDA only)"
  elif backend.capability < (8, 0):
    fallback = f"compute capability {backend.compute_capability} < 8.0 (cuDNN flash attention)"
  elif jnp.dtype(dtype).name not in CUDNN_DTYPES:
    fallback = f"compute dtype {jnp.dtype(dtype).name} (cuDNN needs float16 or bfloat16)"
  elif head_dim % 8 or head_dim > h_max:
    fallback = f"head dim {head_dim} (cuDNN needs a multiple of 8, <= {h_max})"
  elif masked:
    fallback = "a padding mask broadcast over queries (cuDNN needs a full (T, S) bias)"
  if fallback:
    return "xla", f"GPU, cuDNN fused attention not used: {fallback}"
  return "cudnn", f"GPU ({backend.device_kind}): cuDNN fused attention"


def dot_product_attention(q, k, v, mask=None, implementation=None):
  """Attention over (B, T, N, H) queries and (B, S, N, H) keys/values; mask broadcasts to (B, N, T, S)."""
  if implementation == "auto":
    raise ValueError("attention implementation 'auto' is resolved when the model is built "
                     "(models.build); got it unresolved")
  if implementation:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  return _attention(q, k, v, mask)


def _large_negative(dtype):
  """jax.nn.dot_product_attention's fill value for masked logits."""
  top = min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max))
  return jnp.asarray(-0.7 * top, dtype=dtype)


def _heads_first(a):  # (B, T, N, H) -> (B, N, T, H)
  return jnp.swapaxes(a, 1, 2)


def _precision(dtype):
  if dtype == jnp.bfloat16:
    return lax.DotAlgorithmPreset.BF16_BF16_F32
  if dtype == jnp.float16:
    return lax.DotAlgorithmPreset.F16_F16_F32
  return None


def _forward(q, k, v, mask):
  """O and the residuals; the arithmetic of jax's `_dot_product_attention_core`."""
  qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  logits = jnp.einsum("bntd,bnsd->bnts", qh, kh, precision=_precision(q.dtype),
                      preferred_element_type=logits_dtype)
  logits = logits * jnp.asarray(1 / np.sqrt(q.shape[-1]), logits.dtype)
  if mask is not None:
    logits = jnp.where(mask, logits, _large_negative(logits.dtype))
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
  o = jnp.einsum("bnts,bnsd->bntd", p, vh)
  return _heads_first(o), (qh, kh, vh, p, o)


def _backward(mask, residuals, g):
  qh, kh, vh, p, o = residuals
  scale = np.float32(1 / np.sqrt(qh.shape[-1]))
  gh = _heads_first(g)
  dv = jnp.einsum("bnts,bntd->bnsd", p, gh)
  dp = jnp.einsum("bntd,bnsd->bnts", gh, vh, preferred_element_type=jnp.float32)
  delta = jnp.sum(gh.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  ds = p.astype(jnp.float32) * (dp - delta)
  if mask is not None:  # masked logits are constants of the forward (a fully masked row too)
    ds = jnp.where(mask, ds, 0.0)
  ds = (ds * scale).astype(qh.dtype)
  dq = jnp.einsum("bnts,bnsd->bntd", ds, kh)
  dk = jnp.einsum("bnts,bntd->bnsd", ds, qh)
  return _heads_first(dq), _heads_first(dk), _heads_first(dv)


@jax.custom_vjp
def _attention(q, k, v, mask):
  return _forward(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
  o, residuals = _forward(q, k, v, mask)
  return o, (residuals, mask)


def _attention_bwd(saved, g):
  residuals, mask = saved
  return _backward(mask, residuals, g) + (None,)  # the mask (or None) has no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)
