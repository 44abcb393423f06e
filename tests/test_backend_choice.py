"""attention_impl='auto' and dense_dot's backward, decided per backend (models/backend.py,
attention.choose, dense_dot.custom_backward_on): the decisions on faked GPUs/TPUs, and the
numerics of the paths that run on the CPU."""
import torch  # noqa: F401  (before jax/TF, see conftest)
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, dit_sweep
from dit_jax import models
from dit_jax.models import attention, backend, dense_dot, dit
from dit_jax.training import fingerprint

H100 = backend.Backend("gpu", "NVIDIA H100 80GB HBM3", cuda=True, compute_capability="9.0")
A100 = backend.Backend("gpu", "NVIDIA A100-SXM4-80GB", cuda=True, compute_capability="8.0")
V100 = backend.Backend("gpu", "Tesla V100-SXM2-16GB", cuda=True, compute_capability="7.0")
MI300 = backend.Backend("gpu", "AMD Instinct MI300X", cuda=False)
TPU = backend.Backend("tpu", "TPU v5p")
CPU = backend.Backend("cpu", "cpu")


def _paper_model(backend_, **fields):
  """The paper preset's model (DiT-XL/2, bf16) as models.create builds it, on `backend_`."""
  model_cfg = models.model_config(default.get_config("paper"))
  fields = {**models._common_fields(model_cfg, 1000), **models.FAMILIES["DiT"].config_fields(
      model_cfg), **fields}
  return models.build(model_cfg.model, input_size=32, in_channels=4, backend=backend_, **fields)


def test_paper_preset_on_an_h100_picks_cudnn_and_on_cpu_and_tpu_not():
  picks = {b.device_kind: _paper_model(b).attention_impl for b in (H100, A100, TPU, CPU, V100)}
  assert picks[H100.device_kind] == "cudnn" and picks[A100.device_kind] == "cudnn"
  assert picks[TPU.device_kind] == "xla"
  assert picks[CPU.device_kind] is None  # dit_jax's own
  assert picks[V100.device_kind] == "xla"  # pre-Ampere: no cuDNN flash attention


@pytest.mark.parametrize("backend_,dtype,head_dim,masked,want", [
    (H100, jnp.bfloat16, 72, False, "cudnn"),  # DiT-XL: 1152 / 16
    (H100, jnp.float16, 64, False, "cudnn"),
    (H100, jnp.float32, 64, False, "xla"),  # cuDNN needs half precision
    (H100, jnp.bfloat16, 256, False, "cudnn"),  # Hopper allows up to 256
    (A100, jnp.bfloat16, 256, False, "xla"),  # ... Ampere up to 128
    (H100, jnp.bfloat16, 60, False, "xla"),  # not a multiple of 8
    (H100, jnp.bfloat16, 64, True, "xla"),  # a broadcast padding mask is not a (T, S) bias
    (MI300, jnp.bfloat16, 64, False, "xla"),  # not CUDA
    (TPU, jnp.bfloat16, 64, False, "xla"),
    (CPU, jnp.bfloat16, 64, False, ""),
])
def test_choose(backend_, dtype, head_dim, masked, want):
  impl, why = attention.choose("auto", backend_, dtype, head_dim, masked)
  assert impl == want and why
  # An explicit choice is kept on any backend.
  assert attention.choose("xla", backend_, dtype, head_dim, masked)[0] == "xla"


def test_float32_preset_on_gpu_falls_back_and_text_models_too():
  assert _paper_model(H100, dtype=jnp.float32).attention_impl == "xla"
  assert _paper_model(H100, conditioning="cross_attn", context_dim=64).attention_impl == "xla"
  assert _paper_model(H100, conditioning="cross_attn").attention_impl == "cudnn"  # (t, y), no mask


def test_dense_backward_is_custom_only_on_cpu():
  assert dense_dot.custom_backward_on("cpu")
  assert not dense_dot.custom_backward_on("gpu") and not dense_dot.custom_backward_on("tpu")


def test_cpu_default_is_todays_model_and_fingerprint():
  """On the CPU, 'auto' builds the module '' built (the same fields, so the same program), and
  hashes as '' did: the committed sweeps' fingerprints do not change."""
  config = dit_sweep.get_config("")
  assert config.attention_impl == "auto"
  auto = models.create(models.model_config(config), (16, 16, 1), 10)
  config_old = dit_sweep.get_config("")
  config_old.attention_impl = ""
  old = models.create(models.model_config(config_old), (16, 16, 1), 10)
  assert auto == old and auto.attention_impl is None
  assert fingerprint.fingerprint(config) == fingerprint.fingerprint(config_old)
  config_old.attention_impl = "xla"
  assert fingerprint.fingerprint(config) != fingerprint.fingerprint(config_old)
  assert models.implementations(auto) == dict(attention_impl="own", dense_backward="custom")


def _dit_grads(monkeypatch, attention_impl, custom_dense):
  monkeypatch.setattr(dense_dot, "custom_backward_on", lambda platform: custom_dense)
  kw = dict(input_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2,
            num_classes=10, attention_impl=attention_impl)
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, 2))
  t, y = jnp.array([3, 700]), jnp.array([1, 4])
  model = dit.DiT(**kw)
  params = model.init(jax.random.key(0), x, t, y)["params"]
  leaves, tree = jax.tree.flatten(params)  # off adaLN-Zero's zeros: every weight has a gradient
  params = tree.unflatten([a + 0.1 * jax.random.normal(jax.random.key(i), a.shape)
                           for i, a in enumerate(leaves)])
  loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, y) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_paths_that_run_on_cpu_agree(monkeypatch):
  """own vs xla attention x dense_dot's backward on/off (the GPU/TPU path without cuDNN): loss
  and every gradient equal to float32 rounding, and not all bit-identical (so the switch acts)."""
  ref_loss, ref = _dit_grads(monkeypatch, None, True)
  differs = False
  for impl, custom in ((None, False), ("xla", True), ("xla", False)):
    loss, grads = _dit_grads(monkeypatch, impl, custom)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
      differs |= not np.array_equal(a, b)
  assert differs
  assert float(max(jnp.max(jnp.abs(g)) for g in jax.tree.leaves(ref))) > 1e-3
