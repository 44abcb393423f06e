"""Standalone reproducer for XLA:CPU (jax only): two gradients that autodiff makes slow on CPU.

  python experiments/xla_cpu_grads/repro_xla_cpu_grads.py   # a table + the optimised HLO of case 1

1. A dense layer's VJP, y = x @ w with x (8, 256, 384) and w (384, 1536), DiT-S/2's fc1. JAX's
   transpose rule writes dw as dot_general(dy, x) -> (1536, 384) followed by a transpose. XLA:CPU
   does not fold the transpose into the product: it copies dy (12 MB) into transposed order and runs
   dw as a plain dot outside the YNNPACK fusion the other products get. The same VJP written as
   dx = dy . w^T, dw = x^T . dy (kernel layout, no transpose) needs only a copy of the smaller x.
2. Softmax attention's VJP, (8, 256, 6, 64) queries/keys/values: autodiff of
   jax.nn.dot_product_attention(implementation="xla") against the FlashAttention backward
   (dS = P * (dP - rowsum(dO * O))) with the heads moved first.

3. The per-head products themselves (48 matrices of 256 x 256 by 256 x 64: P.V, Q.K^T and the
   backward's P^T.dO), which no rewrite here avoids: the batched dot runs at a third of a dense
   dot's rate. Run it once more with XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= to see the
   same products outside YNNPACK.

Each pair computes the same numbers (max difference printed). Times are the minimum over 20 calls
after one warm-up, so they compare the two programs in one run on one machine.
"""
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _time(f, *args, n=20):
  c = jax.jit(f).lower(*args).compile()
  jax.block_until_ready(c(*args))
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(c(*args))
    ts.append(time.perf_counter() - t0)
  return 1e3 * min(ts), 1e3 * statistics.median(ts), c


@jax.custom_vjp
def dense(x, w):
  return lax.dot_general(x, w, (((2,), (0,)), ((), ())))


def _dense_fwd(x, w):
  return dense(x, w), (x, w)


def _dense_bwd(res, dy):
  x, w = res
  return (lax.dot_general(dy, w, (((2,), (1,)), ((), ()))),
          lax.dot_general(x, dy, (((0, 1), (0, 1)), ((), ()))))


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def attention(q, k, v):
  return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  s = jnp.einsum("bntd,bnsd->bnts", qh, kh) * np.float32(1 / np.sqrt(q.shape[-1]))
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bnts,bnsd->bntd", p, vh)
  return jnp.swapaxes(o, 1, 2), (qh, kh, vh, p, o)


def _attention_bwd(res, g):
  qh, kh, vh, p, o = res
  gh = jnp.swapaxes(g, 1, 2)
  dv = jnp.einsum("bnts,bntd->bnsd", p, gh)
  dp = jnp.einsum("bntd,bnsd->bnts", gh, vh)
  ds = p * (dp - jnp.sum(gh * o, -1, keepdims=True)) * np.float32(1 / np.sqrt(qh.shape[-1]))
  dq = jnp.einsum("bnts,bnsd->bntd", ds, kh)
  dk = jnp.einsum("bnts,bntd->bnsd", ds, qh)
  return tuple(jnp.swapaxes(a, 1, 2) for a in (dq, dk, dv))


attention.defvjp(_attention_fwd, _attention_bwd)


def main():
  r = np.random.default_rng(0)
  n = lambda *s: jnp.asarray(r.standard_normal(s, np.float32))
  x, w, dy = n(8, 256, 384), n(384, 1536), n(8, 256, 1536)
  q, k, v, g = n(8, 256, 6, 64), n(8, 256, 6, 64), n(8, 256, 6, 64), n(8, 256, 6, 64)
  jax_attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  cases = [
      ("dense VJP, autodiff of x @ w", lambda x, w, d: jax.vjp(lambda x, w: x @ w, x, w)[1](d),
       (x, w, dy), 2 * 2 * 8 * 256 * 384 * 1536),
      ("dense VJP, kernel-layout dw", lambda x, w, d: jax.vjp(dense, x, w)[1](d), (x, w, dy),
       2 * 2 * 8 * 256 * 384 * 1536),
      ("attention VJP, autodiff of jax.nn", lambda q, k, v, g: jax.vjp(jax_attn, q, k, v)[1](g),
       (q, k, v, g), 6 * 2 * 8 * 6 * 256 * 256 * 64),  # 2 forward + 4 backward products
      ("attention VJP, FlashAttention bwd", lambda q, k, v, g: jax.vjp(attention, q, k, v)[1](g),
       (q, k, v, g), 6 * 2 * 8 * 6 * 256 * 256 * 64),  # 2 forward + 4 backward products
  ]
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
  print("| program | min ms | median ms | GFLOP/s (min) | max abs diff vs autodiff |")
  print("|---|---:|---:|---:|---:|")
  outs, hlo = {}, None
  for i, (name, f, args, flop) in enumerate(cases):
    lo, med, compiled = _time(f, *args)
    outs[i] = compiled(*args)
    hlo = hlo or compiled.as_text()
    diff = "" if i % 2 == 0 else (
        f"{max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(outs[i], outs[i - 1])):.1e}")
    print(f"| {name} | {lo:.1f} | {med:.1f} | {flop / lo / 1e6:.0f} | {diff} |")
  p, vh = n(8, 6, 256, 256), n(8, 6, 256, 64)
  flop = 2 * 8 * 6 * 256 * 256 * 64
  print("\n| per-head product (48 x 256 x 256 x 64) | min ms | GFLOP/s |")
  print("|---|---:|---:|")
  for name, spec, args in [("P.V", "bnts,bnsd->bntd", (p, vh)),
                           ("Q.K^T", "bntd,bnsd->bnts", (vh, vh)),
                           ("P^T.dO", "bnts,bntd->bnsd", (p, vh))]:
    lo = _time(lambda a, b, spec=spec: jnp.einsum(spec, a, b), *args)[0]
    print(f"| {name} `{spec}` | {lo:.2f} | {flop / lo / 1e6:.0f} |")
  lo = _time(lambda a, b: a @ b, n(2048, 384), n(384, 1536))[0]
  print(f"| for scale: dense (2048 x 384) . (384 x 1536) | {lo:.2f} | "
        f"{2 * 2048 * 384 * 1536 / lo / 1e6:.0f} |")
  print("\nOptimised HLO of the autodiff dense VJP (entry computation):")
  entry = re.sub(r", backend_config=.*$", "", hlo[hlo.index("ENTRY"):], flags=re.M)
  print(re.sub(r", metadata=\{[^}]*\}", "", entry))


if __name__ == "__main__":
  main()
