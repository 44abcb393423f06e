"""DiT against the paper's tables (Table 4, Fig. 5) and against diffusers' PyTorch DiT."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import models
from dit_jax.models import convert, dit, embeddings, flops, patchify

# Table 4: params (M) and Gflops for patch 8 / 4 / 2 (shared/REFERENCE.md).
TABLE4 = {
    "S": ((33, 33, 33), (0.36, 1.41, 6.06)),
    "B": ((131, 130, 130), (1.42, 5.56, 23.01)),
    "L": ((459, 458, 458), (5.01, 19.70, 80.71)),
    "XL": ((676, 675, 675), (7.39, 29.05, 118.64)),
}
# Fig. 5 at XL/2: Gflops, params (M).
FIG5 = {"in_context": (119.37, 449), "cross_attn": (137.62, 598), "adaln": (118.56, 600),
        "adaln_zero": (118.64, 675)}


def paper_rows():
  for size, (params, gfl) in TABLE4.items():
    for i, p in enumerate((8, 4, 2)):
      yield f"DiT-{size}/{p}", params[i], gfl[i]


def abstract_params(model):
  return jax.eval_shape(lambda: dit.init_params(model, jax.random.key(0)))


@pytest.mark.parametrize("name,params_m,gflops", list(paper_rows()))
def test_table4_params_and_gflops(name, params_m, gflops):
  model = models.build(name)
  n = flops.count_params(abstract_params(model))
  assert abs(n / 1e6 - params_m) / params_m <= 0.01, n
  # Compared at the paper's precision (two decimals): DiT-S/8's 0.358 is printed as 0.36.
  assert abs(round(models.gflops(model), 2) - gflops) / gflops <= 0.005
  assert abs(models.xla_gflops(model) - gflops) / gflops <= 0.015


def test_exact_parameter_counts():
  # REFERENCE.md: XL/2 has 674,834,720 trainable params; S/2 32,963,360 with the frozen pos-embed.
  assert flops.count_params(abstract_params(models.build("DiT-XL/2"))) == 674_834_720
  assert flops.count_params(abstract_params(models.build("DiT-S/2"))) + 256 * 384 == 32_963_360


@pytest.mark.parametrize("cond", dit.CONDITIONINGS)
def test_fig5_conditioning_variants(cond):
  model = models.build("DiT-XL/2", conditioning=cond)
  gfl, params_m = FIG5[cond]
  assert abs(flops.count_params(abstract_params(model)) / 1e6 - params_m) / params_m <= 0.01
  assert abs(models.gflops(model) - gfl) / gfl <= 0.01
  assert abs(models.xla_gflops(model) - gfl) / gfl <= 0.015


def test_patchify_roundtrip_and_order():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  t = patchify.patchify(x, 4)
  assert t.shape == (2, 4, 48)
  np.testing.assert_array_equal(t[0, 1].reshape(4, 4, 3), x[0, :4, 4:])  # row-major patches
  np.testing.assert_array_equal(patchify.unpatchify(t, 4, 2, 2), x)
  with pytest.raises(ValueError, match="does not divide"):
    models.build("DiT-S/8", input_size=28)


def test_bad_names_and_inputs():
  with pytest.raises(ValueError, match="unknown model"):
    models.build("DiT-XXL/2")
  with pytest.raises(ValueError, match="unknown conditioning"):
    models.build("DiT-S/2", conditioning="film")
  m = models.build("DiT-S/8", input_size=16, in_channels=1, num_classes=10)
  with pytest.raises(ValueError, match="expects inputs"):
    jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                  jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32)))


def test_embeddings_match_diffusers():
  from diffusers.models import embeddings as dm
  import torch
  pos = dm.get_2d_sincos_pos_embed(64, 5, base_size=5, output_type="np")  # MAE/DiT table
  np.testing.assert_allclose(embeddings.sincos_2d(64, 5, 5), pos, atol=1e-6)
  t = np.array([0, 3, 250, 999])
  ref = dm.get_timestep_embedding(torch.tensor(t), 256, flip_sin_to_cos=True,
                                  downscale_freq_shift=0).numpy()
  # float32 arguments near t*1 = 999 carry an ulp of 6e-5, so sin/cos agree to about that.
  np.testing.assert_allclose(embeddings.timestep_embedding(jnp.asarray(t), 256), ref, atol=1e-4)


def test_initialisation_matches_official_recipe():
  model = models.build("DiT-S/4", input_size=16, num_classes=10)
  p = nn.unbox(jax.jit(lambda k: dit.init_params(model, k))(jax.random.key(1)))
  d = 384
  for leaf in (p["blocks_3"]["adaLN_modulation"], p["final_layer"]["adaLN_modulation"],
               p["final_layer"]["linear"]):
    assert not np.any(leaf["kernel"]) and not np.any(leaf["bias"])
  qkv = np.asarray(p["blocks_0"]["attn"]["qkv"]["kernel"]).reshape(d, 3 * d)
  limit = np.sqrt(6 / (d + 3 * d))  # Xavier on the fused D x 3D matrix
  assert np.abs(qkv).max() <= limit and np.abs(qkv).max() > 0.99 * limit
  pe = np.asarray(p["x_embedder"]["kernel"])  # Xavier on the flattened [D, C*p*p] weight
  assert pe.shape == (4 * 16, d) and np.abs(pe).max() <= np.sqrt(6 / (64 + d))
  assert abs(np.std(p["y_embedder"]["embedding_table"]["embedding"]) - 0.02) < 0.002
  assert abs(np.std(p["t_embedder"]["mlp_0"]["kernel"]) - 0.02) < 0.002
  assert not np.any(p["blocks_0"]["attn"]["qkv"]["bias"])


def _random_official_state_dict(depth, d, heads, p, c, num_classes, grid, seed=0):
  """Random weights under the official key names; no layer is zero so every path is exercised."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)
  sd = {"x_embedder.proj.weight": r(d, c, p, p), "x_embedder.proj.bias": r(d),
        "pos_embed": embeddings.sincos_2d(d, grid, grid)[None],
        "t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d),
        "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
        "y_embedder.embedding_table.weight": r(num_classes + 1, d),
        "final_layer.linear.weight": r(p * p * 2 * c, d), "final_layer.linear.bias": r(p * p * 2 * c),
        "final_layer.adaLN_modulation.1.weight": r(2 * d, d),
        "final_layer.adaLN_modulation.1.bias": r(2 * d)}
  for i in range(depth):
    b = f"blocks.{i}."
    sd.update({b + "attn.qkv.weight": r(3 * d, d), b + "attn.qkv.bias": r(3 * d),
               b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
               b + "mlp.fc1.weight": r(4 * d, d), b + "mlp.fc1.bias": r(4 * d),
               b + "mlp.fc2.weight": r(d, 4 * d), b + "mlp.fc2.bias": r(d),
               b + "adaLN_modulation.1.weight": r(6 * d, d), b + "adaLN_modulation.1.bias": r(6 * d)})
  return sd


def _official_to_diffusers(sd, depth):
  """Test-side key map official -> diffusers (as diffusers' own conversion script lays it out)."""
  out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"],
         "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
         "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
         "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
         "proj_out_2.weight": sd["final_layer.linear.weight"],
         "proj_out_2.bias": sd["final_layer.linear.bias"]}
  for i in range(depth):
    b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
    emb = o + "norm1.emb."
    out.update({emb + "timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
                emb + "timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
                emb + "timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
                emb + "timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
                emb + "class_embedder.embedding_table.weight":
                    sd["y_embedder.embedding_table.weight"],
                o + "norm1.linear.weight": sd[b + "adaLN_modulation.1.weight"],
                o + "norm1.linear.bias": sd[b + "adaLN_modulation.1.bias"],
                o + "attn1.to_out.0.weight": sd[b + "attn.proj.weight"],
                o + "attn1.to_out.0.bias": sd[b + "attn.proj.bias"],
                o + "ff.net.0.proj.weight": sd[b + "mlp.fc1.weight"],
                o + "ff.net.0.proj.bias": sd[b + "mlp.fc1.bias"],
                o + "ff.net.2.weight": sd[b + "mlp.fc2.weight"],
                o + "ff.net.2.bias": sd[b + "mlp.fc2.bias"]})
    for j, name in enumerate("qkv"):
      w, bias = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
      out[o + f"attn1.to_{name}.weight"], out[o + f"attn1.to_{name}.bias"] = w[j], bias[j]
  return out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_converted_checkpoint_matches_diffusers(scan_layers, tmp_path):
  import torch
  from diffusers import DiTTransformer2DModel
  depth, heads, hd, p, c, ncls, size = 3, 4, 32, 2, 4, 10, 16
  d = heads * hd
  sd = _random_official_state_dict(depth, d, heads, p, c, ncls, size // p)

  ref = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hd, in_channels=c,
                              out_channels=2 * c, num_layers=depth, sample_size=size, patch_size=p,
                              num_embeds_ada_norm=ncls, norm_eps=1e-6)
  missing, unexpected = ref.load_state_dict(
      {k: torch.from_numpy(v) for k, v in _official_to_diffusers(sd, depth).items()}, strict=False)
  assert not unexpected and all(k.endswith("pos_embed.pos_embed") for k in missing), missing
  for blk in ref.transformer_blocks:
    # diffusers' DiT shifts the frequencies (exponent / (half - 1)); the official code does not.
    blk.norm1.emb.time_proj.downscale_freq_shift = 0
  ref.eval()

  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, size, size, c)).astype(np.float32)
  t = np.array([0, 417, 999])
  y = np.array([3, 0, ncls])  # the last one is the null (CFG) class
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t),
               class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)

  model = dit.DiT(input_size=size, in_channels=c, patch_size=p, hidden_size=d, depth=depth,
                  num_heads=heads, num_classes=ncls, scan_layers=scan_layers)
  convert.save(tmp_path / "ckpt", convert.from_official(sd, model), model)
  model, params = convert.load(tmp_path / "ckpt", scan_layers=scan_layers)
  got = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
  assert got.shape == (3, size, size, 2 * c)
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel <= 1e-5, rel
  assert np.abs(want).max() > 0.1  # a non-trivial output


def test_converter_rejects_a_mismatched_checkpoint():
  sd = _random_official_state_dict(2, 64, 2, 2, 4, 10, 8)
  with pytest.raises(ValueError, match="does not use"):
    convert.from_official(sd, dit.DiT(input_size=16, hidden_size=64, depth=1, num_heads=2,
                                      num_classes=10))
  with pytest.raises(ValueError, match="does not fit"):
    convert.from_official(sd, dit.DiT(input_size=16, hidden_size=64, depth=2, num_heads=2,
                                      num_classes=10, patch_size=4))


def test_gflops_with_a_text_context_matches_xla():
  model = models.build("DiT-S/4", input_size=16, conditioning="cross_attn", context_dim=48,
                     num_classes=10)
  x = jax.ShapeDtypeStruct((1, 16, 16, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  ctx = jax.ShapeDtypeStruct((1, 12, 48), jnp.float32)
  params = jax.eval_shape(lambda: dit.init_params(model, jax.random.key(0)))
  fwd = jax.jit(lambda p, x, t, y, c: model.apply({"params": p}, x, t, y, context=c))
  xla = flops.cost_flops(fwd.lower(nn.unbox(params), x, t, t, ctx).compile()) / 2 / 1e9
  analytic = models.gflops(model, context_length=12)
  assert analytic > models.gflops(model)
  assert abs(analytic - xla) / xla <= 0.015, (analytic, xla)
