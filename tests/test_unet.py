"""ADM U-Net: skip wiring, a hand parameter count, diffusers' UNet2DModel as the numerical reference,
Gflops against XLA, and overfitting a batch of real MNIST digits."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import models
from dit_jax.models import flops, unet
from dit_jax.objectives import diffusion
from tests.helpers import KEY, mnist_batch, overfit


def _abstract(m, **kw):
  return jax.eval_shape(lambda: unet.init_params(m, jax.random.key(0), **kw))


def test_every_level_shapes_and_skip_wiring():
  m = unet.UNet(input_size=16, in_channels=3, model_channels=32, channel_mult=(1, 2, 2),
                num_res_blocks=2, attention_resolutions=(2, 4), num_head_channels=32,
                num_classes=10)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  params = jax.jit(lambda k: unet.init_params(m, k))(KEY)
  # Zero-initialised output layers would hide the decoder; give every leaf a random value.
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.05, a.dtype),
                        nn.unbox(params))
  out, state = jax.jit(lambda p: m.apply({"params": p}, x, jnp.array([3, 500]), jnp.array([1, 2]),
                                         mutable=["intermediates"]))(params)
  assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32
  skips = state["intermediates"]["skips"]
  dec_in = state["intermediates"]["decoder_inputs"]
  # ADM's input_block_chans by hand: conv_in, 2 ResBlocks, down | 2 ResBlocks, down | 2 ResBlocks.
  want = [(16, 32), (16, 32), (16, 32), (8, 32), (8, 64), (8, 64), (4, 64), (4, 64), (4, 64)]
  assert [(s.shape[1], s.shape[-1]) for s in skips] == want
  # 3 levels x (2 + 1) decoder blocks: every skip is used exactly once, last in first out.
  assert len(dec_in) == len(skips)
  h_ch = 64  # the middle block's width feeds the first decoder block
  for j, h in enumerate(dec_in):
    skip = skips[-1 - j]
    assert h.shape[1] == skip.shape[1] and h.shape[-1] == h_ch + skip.shape[-1]
    np.testing.assert_array_equal(h[..., h_ch:], skip)  # concatenated after h, as ADM's th.cat
    h_ch = 32 * (1, 2, 2)[2 - j // 3]
  # The decoder's first conv of each block reads the concatenated width.
  assert params["output_blocks_0_res"]["in_conv"]["kernel"].shape == (3, 3, 128, 64)
  assert params["output_blocks_8_res"]["in_conv"]["kernel"].shape == (3, 3, 64, 32)


def _res(cin, c, e):
  """ResBlock params by ADM's layer list: 2 GroupNorms, 2 3x3 convs, emb Linear(e, 2c), 1x1 skip."""
  n = 2 * cin + (9 * cin * c + c) + (e * 2 * c + 2 * c) + 2 * c + (9 * c * c + c)
  return n + (cin * c + c if cin != c else 0)


def _attn(c, dc=0):
  n = 2 * c + (c * 3 * c + 3 * c) + (c * c + c)  # norm, qkv, proj_out
  if dc:
    n += 2 * c + 2 * (c * c + c) + 2 * (dc * c + c)  # norm, q and out, k and v from the context
  return n


@pytest.mark.parametrize("updown", [True, False])
def test_parameter_count_by_hand(updown):
  # mc 32, mult (1, 2), one ResBlock per level, attention at rate 2, 10 classes, context 48.
  m = unet.UNet(input_size=16, in_channels=4, model_channels=32, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(2,), num_head_channels=32, num_classes=10,
                context_dim=48, resblock_updown=updown)
  e, dc = 128, 48
  down = _res(32, 32, e) if updown else 9 * 32 * 32 + 32
  up = _res(64, 64, e) if updown else 9 * 64 * 64 + 64
  n = (32 * e + e) + (e * e + e) + 11 * e         # time MLP, label table with the null row
  n += 9 * 4 * 32 + 32                            # conv_in
  n += _res(32, 32, e) + down                     # level 0: ResBlock, down
  n += _res(32, 64, e) + _attn(64, dc)            # level 1: ResBlock + attention
  n += 2 * _res(64, 64, e) + _attn(64, dc)        # middle
  n += _res(64 + 64, 64, e) + _res(64 + 32, 64, e) + 2 * _attn(64, dc)  # level 1 decoder: skips
  # 64 (ResBlock) and 32 (down)
  n += up
  n += _res(64 + 32, 32, e) + _res(64, 32, e)     # level 0 decoder: skips 32 (res), 32 (conv_in)
  n += 2 * 32 + 9 * 32 * 8 + 8                    # out norm, out conv to 2C
  assert flops.count_params(_abstract(m)) == n


def _to_flax(sd, m):
  """diffusers UNet2DModel state dict -> our params (test-side key map)."""
  t = lambda k: sd[k].numpy()
  conv = lambda k: {"kernel": t(k + ".weight").transpose(2, 3, 1, 0), "bias": t(k + ".bias")}
  dense = lambda k: {"kernel": t(k + ".weight").T, "bias": t(k + ".bias")}
  norm = lambda k: {"scale": t(k + ".weight"), "bias": t(k + ".bias")}

  def res(k):
    p = {"in_norm": norm(k + ".norm1"), "in_conv": conv(k + ".conv1"),
         "emb_proj": dense(k + ".time_emb_proj"), "out_norm": norm(k + ".norm2"),
         "out_conv": conv(k + ".conv2")}
    if k + ".conv_shortcut.weight" in sd:
      p["skip"] = conv(k + ".conv_shortcut")
    return p

  def attn(k):
    c = sd[k + ".to_q.weight"].shape[0]
    nh, hd = c // m.num_head_channels, m.num_head_channels
    qkv = np.stack([t(f"{k}.to_{n}.weight").T.reshape(c, nh, hd) for n in "qkv"], axis=1)
    qkv_b = np.stack([t(f"{k}.to_{n}.bias").reshape(nh, hd) for n in "qkv"])
    return {"norm": norm(k + ".group_norm"), "qkv": {"kernel": qkv, "bias": qkv_b},
            "proj_out": {"kernel": t(k + ".to_out.0.weight").T.reshape(nh, hd, c),
                         "bias": t(k + ".to_out.0.bias")}}

  p = {"time_embed_0": dense("time_embedding.linear_1"),
       "time_embed_1": dense("time_embedding.linear_2"),
       "label_emb": {"embedding_table": {"embedding": t("class_embedding.weight")}},
       "input_blocks_0": conv("conv_in"), "out_norm": norm("conv_norm_out"),
       "out_conv": conv("conv_out"), "middle_res_0": res("mid_block.resnets.0"),
       "middle_attn": attn("mid_block.attentions.0"), "middle_res_1": res("mid_block.resnets.1")}
  levels, k = len(m.channel_mult), 1
  for lvl in range(levels):
    for j in range(m.num_res_blocks):
      p[f"input_blocks_{k}_res"] = res(f"down_blocks.{lvl}.resnets.{j}")
      if f"down_blocks.{lvl}.attentions.{j}.to_q.weight" in sd:
        p[f"input_blocks_{k}_attn"] = attn(f"down_blocks.{lvl}.attentions.{j}")
      k += 1
    if lvl != levels - 1:
      d = f"down_blocks.{lvl}.downsamplers.0"
      p[f"input_blocks_{k}_down"] = res(d) if m.resblock_updown else {"conv": conv(d + ".conv")}
      k += 1
  k = 0
  for ui in range(levels):
    for j in range(m.num_res_blocks + 1):
      p[f"output_blocks_{k}_res"] = res(f"up_blocks.{ui}.resnets.{j}")
      if f"up_blocks.{ui}.attentions.{j}.to_q.weight" in sd:
        p[f"output_blocks_{k}_attn"] = attn(f"up_blocks.{ui}.attentions.{j}")
      if j == m.num_res_blocks and ui != levels - 1:
        u = f"up_blocks.{ui}.upsamplers.0"
        p[f"output_blocks_{k}_up"] = res(u) if m.resblock_updown else {"conv": conv(u + ".conv")}
      k += 1
  return p


@pytest.mark.parametrize("updown", [True, False])
def test_matches_diffusers_unet2d(updown):
  """Against diffusers' UNet2DModel configured as ADM (scale-shift norm, attention at rate 2)."""
  import torch
  from diffusers import UNet2DModel
  size, c, ncls = 16, 4, 10
  m = unet.UNet(input_size=size, in_channels=c, model_channels=32, channel_mult=(1, 2),
                num_res_blocks=2, attention_resolutions=(2,), num_head_channels=32,
                num_classes=ncls, resblock_updown=updown)
  down0 = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
  up1 = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
  torch.manual_seed(0)
  ref = UNet2DModel(sample_size=size, in_channels=c, out_channels=2 * c, block_out_channels=(32, 64),
                    layers_per_block=2, down_block_types=(down0, "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", up1), attention_head_dim=32,
                    resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32,
                    downsample_type="resnet" if updown else "conv",
                    upsample_type="resnet" if updown else "conv", flip_sin_to_cos=True,
                    freq_shift=0, num_class_embeds=ncls + 1, norm_eps=1e-5)
  with torch.no_grad():  # diffusers zero-inits nothing we need; make every weight non-trivial
    for prm in ref.parameters():
      prm.copy_(torch.randn_like(prm) * 0.1)
  ref.eval()
  sd = ref.state_dict()
  n_ref = sum(v.numel() for v in ref.parameters())
  assert flops.count_params(_abstract(m)) == n_ref

  params = _to_flax(sd, m)
  want_tree = jax.tree.structure(nn.unbox(_abstract(m)))
  assert jax.tree.structure(params) == want_tree
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, size, size, c)).astype(np.float32)
  t = np.array([0, 417, 999])
  y = np.array([3, 0, ncls])  # the last one is the null (CFG) class
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(m.apply)({"params": params}, x, t, y))
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel <= 1e-5, rel
  assert np.abs(want).max() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,context_length", [
    ({}, 0),
    (dict(context_dim=128, resblock_updown=False), 16),
])
def test_gflops_analytic_matches_xla(kwargs, context_length):
  m = models.build("UNet-S", **kwargs)
  analytic, xla = models.gflops(m, context_length), models.xla_gflops(m, context_length)
  # XLA also counts norms and elementwise work, so it sits slightly above the MAC count.
  assert 0 <= (xla - analytic) / analytic <= 0.01, (analytic, xla)


def test_named_sizes_span_the_dit_range():
  g = {s: models.gflops(models.build(f"UNet-{s}")) for s in ("S", "B", "L", "XL")}
  assert g["S"] < g["B"] < g["L"] < g["XL"]
  dit_s, dit_xl = (models.gflops(models.build(n)) for n in ("DiT-S/2", "DiT-XL/2"))
  assert 0.7 * dit_s <= g["S"] <= dit_s and 0.97 * dit_xl <= g["XL"] <= 1.03 * dit_xl, g
  # Padded taps (zeros) are not counted: a 3x3 'same' conv at 4x4 has (10/12)^2 of 9*4*4 taps.
  assert unet._conv_macs(4, 1, 1, 3) == 100 and unet._conv_macs(4, 1, 1, 3, stride=2) == 25


def test_bad_configs_and_inputs():
  with pytest.raises(ValueError, match="unknown model"):
    models.build("UNet-XXL")
  with pytest.raises(ValueError, match="divisible by 2"):
    models.build("UNet-S", input_size=28)  # 4 levels need a multiple of 8
  with pytest.raises(ValueError, match="downsample rates"):
    unet.UNet(channel_mult=(1, 2), attention_resolutions=(4,)).validate()
  with pytest.raises(ValueError, match="multiple of num_groups"):
    unet.UNet(model_channels=48).validate()
  m = models.build("UNet-Nano", input_size=16, in_channels=1, num_classes=10)
  t = jnp.zeros(1, jnp.int32)
  with pytest.raises(ValueError, match="expects inputs"):
    jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), t, t))
  with pytest.raises(ValueError, match="context_dim=0"):
    jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), t, t,
                                  context=jnp.zeros((1, 3, 8))))
  mc = models.build("UNet-Nano", input_size=16, in_channels=1, num_classes=0, context_dim=8)
  with pytest.raises(ValueError, match="pass context"):
    jax.eval_shape(lambda: mc.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), t))
  with pytest.raises(ValueError, match="context must be"):
    jax.eval_shape(lambda: mc.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), t,
                                   context=jnp.zeros((1, 3, 9))))


def test_init_output_is_zero_and_label_dropout_uses_the_null_class():
  m = models.build("UNet-Nano", input_size=16, in_channels=1, num_classes=10)
  p = nn.unbox(jax.jit(lambda k: unet.init_params(m, k))(KEY))
  x = jnp.ones((2, 16, 16, 1))
  apply = jax.jit(lambda p, y, drop: m.apply({"params": p}, x, jnp.array([5, 5]), y,
                                             force_drop_ids=drop))
  no_drop = jnp.array([0, 0])
  assert not np.any(apply(p, jnp.array([1, 2]), no_drop))  # zero-initialised out conv
  rng = np.random.default_rng(1)
  p = jax.tree.map(lambda a: a + jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), p)
  f = lambda y, drop=no_drop: apply(p, jnp.asarray(y), drop)
  np.testing.assert_allclose(f([3, 4], jnp.array([1, 1])), f([10, 10]), atol=1e-6)
  assert np.abs(f([3, 3]) - f([10, 10])).max() > 1e-3


@pytest.mark.slow
def test_tiny_unet_overfits_a_batch_of_mnist(shared_data):
  x0, y = mnist_batch(shared_data, n=8, size=14)
  m = unet.UNet(input_size=14, in_channels=1, model_channels=32, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(2,), num_head_channels=32, num_classes=10)
  params = nn.unbox(jax.jit(lambda k: unet.init_params(m, k))(KEY))
  apply = lambda p, x, t: m.apply({"params": p}, x, t, jnp.asarray(y))
  before, after = overfit(apply, params, x0, diffusion.create(), steps=120, lr=2e-3)
  # Zero-initialised output: the loss starts at the noise variance (1 + VLB); memorising 16 digits
  # takes the eps-MSE part far below it.
  print(f"overfit: loss {before:.4f} -> {after:.4f}")
  assert after <= before / 3, (before, after)
