"""Text conditioning: tokenizer, caption encoder against PyTorch's TransformerEncoder, DiT's context
in cross_attn mode, caption dropout, pre-computed contexts, a text-conditioned DiT overfitting a
batch of real MNIST digits; and text through the main trainer (tests below `# --- trainer`): the
caption source and pipeline, the registry, training/resuming/sampling a text DiT and U-Net with
train.train_and_evaluate, tools/sample_prompt.py, and bad text configs failing before compiling."""
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.models import dit, text, unet
from dit_jax.objectives import diffusion
from tests.helpers import (KEY, REPO, load_tool, mnist_batch, overfit, read_jsonl, subprocess_env,
                           tiny_text_config)

MNIST_CAPTIONS = text.class_captions(text.MNIST_CLASS_NAMES, text.TEMPLATES["mnist"])


def _randomise(params, scale=0.05, seed=1):
  """Every leaf random, so zero-initialised layers do not hide a path."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * scale, a.dtype),
                      nn.unbox(params))


def test_captions_and_tokenizer(tmp_path):
  assert text.captions_for_labels([7, 0], text.MNIST_CLASS_NAMES, text.TEMPLATES["mnist"]) == [
      "a handwritten digit seven", "a handwritten digit zero"]
  tok = text.Tokenizer.build(MNIST_CAPTIONS)
  # 3 special tokens + a, handwritten, digit + ten digit names; <bos> + 4 words.
  assert tok.vocab_size == 16 and tok.max_length == 5
  ids = tok.encode(["A handwritten digit, SEVEN!", ""])
  assert ids.dtype == np.int32 and ids.shape == (2, 5)
  assert ids[0, 0] == text.BOS_ID and np.all(ids[0] != text.PAD_ID)
  np.testing.assert_array_equal(ids[1], [text.BOS_ID, 0, 0, 0, 0])
  np.testing.assert_array_equal(ids[1], tok.null_tokens())
  assert tok.decode(ids[0]) == "a handwritten digit seven"
  assert tok.encode(["digit seven"])[0, 3] == text.PAD_ID  # shorter captions are padded
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.encode(["a handwritten digit eleven"])
  assert tok.encode(["digit eleven"], strict=False)[0, 2] == text.UNK_ID
  with pytest.raises(ValueError, match="at most 4 fit"):
    tok.encode(["a a handwritten digit seven"])
  with pytest.raises(ValueError, match="template"):
    text.class_captions(["x"], "a photo")
  tok.save(tmp_path / "tok.json")
  assert text.Tokenizer.load(tmp_path / "tok.json") == tok


def test_text_encoder_matches_torch_transformer_encoder():
  """Against torch.nn.TransformerEncoder (pre-LN, tanh-GELU, key padding mask, final norm)."""
  import torch
  d, heads, depth, length, vocab = 32, 4, 2, 6, 20
  enc = text.TextEncoder(vocab, length, width=d, depth=depth, num_heads=heads)
  ids = np.array([[1, 5, 7, 9, 0, 0], [1, 3, 4, 11, 12, 19]], np.int32)
  p = _randomise(jax.jit(enc.init)(KEY, ids)["params"], 0.2)
  got, mask = enc.apply({"params": p}, ids)
  np.testing.assert_array_equal(mask, ids != 0)

  layer = torch.nn.TransformerEncoderLayer(
      d, heads, 4 * d, dropout=0.0, activation=lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
      layer_norm_eps=1e-6, batch_first=True, norm_first=True)
  ref = torch.nn.TransformerEncoder(layer, depth, norm=torch.nn.LayerNorm(d, eps=1e-6),
                                    enable_nested_tensor=False)
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  sd = {"norm.weight": t(p["final_norm"]["scale"]), "norm.bias": t(p["final_norm"]["bias"])}
  for i in range(depth):
    lp, k = p[f"layers_{i}"], f"layers.{i}."
    a = lp["attn"]
    sd[k + "self_attn.in_proj_weight"] = t(np.concatenate(
        [np.asarray(a[n]["kernel"]).reshape(d, d).T for n in ("query", "key", "value")]))
    sd[k + "self_attn.in_proj_bias"] = t(np.concatenate(
        [np.asarray(a[n]["bias"]).reshape(d) for n in ("query", "key", "value")]))
    sd[k + "self_attn.out_proj.weight"] = t(np.asarray(a["out"]["kernel"]).reshape(d, d).T)
    sd[k + "self_attn.out_proj.bias"] = t(a["out"]["bias"])
    for ours, theirs in (("fc1", "linear1"), ("fc2", "linear2")):
      sd[k + theirs + ".weight"] = t(np.asarray(lp[ours]["kernel"]).T)
      sd[k + theirs + ".bias"] = t(lp[ours]["bias"])
    for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
      sd[k + theirs + ".weight"] = t(lp[ours]["scale"])
      sd[k + theirs + ".bias"] = t(lp[ours]["bias"])
  ref.load_state_dict(sd)
  ref.eval()
  x = np.asarray(p["token_embed"]["embedding"])[ids] + np.asarray(p["pos_embed"])[None]
  with torch.no_grad():
    want = ref(t(x), src_key_padding_mask=torch.from_numpy(ids == 0)).numpy()
  real = ids != 0  # padded positions are masked out downstream; only real tokens are compared
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="expects token ids"):
    enc.apply({"params": p}, ids[:, :5])


def _dit(context_dim, **kw):
  return dit.DiT(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, conditioning="cross_attn", context_dim=context_dim, **kw)


def test_dit_cross_attention_appends_a_masked_context():
  m, m0 = _dit(12), _dit(0)
  p = _randomise(jax.jit(lambda k: dit.init_params(m, k))(KEY))
  p0 = {k: v for k, v in p.items() if k != "context_proj"}
  assert set(p) - set(p0) == {"context_proj"}  # one D_c x D projection shared by all blocks
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
  t, y = np.array([10, 900]), np.array([3, 10])
  ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
  f = jax.jit(lambda ctx, mask: m.apply({"params": p}, x, t, y, context=ctx, context_mask=mask))
  base = m0.apply({"params": p0}, x, t, y)
  # A fully masked context leaves exactly the paper's cross-attention over the (t, y) tokens.
  np.testing.assert_allclose(f(ctx, np.zeros((2, 5), bool)), base, atol=1e-6)
  full = f(ctx, np.ones((2, 5), bool))
  assert np.abs(full - base).max() > 1e-3
  # Masked tokens are ignored, whatever they hold.
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
  ctx2 = np.where(mask[..., None], ctx, 100.0).astype(np.float32)
  np.testing.assert_allclose(f(ctx, mask), f(ctx2, mask), atol=1e-6)
  with pytest.raises(ValueError, match="needs conditioning='cross_attn'"):
    dit.DiT(context_dim=8).validate()
  with pytest.raises(ValueError, match="context_dim=0"):
    m0.apply({"params": p0}, x, t, y, context=ctx)
  with pytest.raises(ValueError, match="pass context"):
    m.apply({"params": p}, x, t, y)


def test_unet_cross_attention_reads_only_real_tokens():
  m = unet.UNet(input_size=8, in_channels=1, model_channels=32, channel_mult=(1, 2),
                num_res_blocks=1, attention_resolutions=(2,), num_head_channels=32, num_classes=0,
                context_dim=12)
  p = _randomise(jax.jit(lambda k: unet.init_params(m, k))(KEY))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
  t = np.array([10, 900])
  ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
  f = jax.jit(lambda ctx, mask: m.apply({"params": p}, x, t, context=ctx, context_mask=mask))
  mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
  ctx2 = np.where(mask[..., None], ctx, 100.0).astype(np.float32)
  np.testing.assert_allclose(f(ctx, mask), f(ctx2, mask), atol=1e-6)
  assert np.abs(f(ctx, mask) - f(ctx[::-1], mask)).max() > 1e-3  # the context steers the output


def _text_dit(tok, width=32, **kw):
  enc = text.TextEncoder(tok.vocab_size, tok.max_length, width=width, depth=1, num_heads=2)
  m = dit.DiT(input_size=28, in_channels=1, patch_size=4, hidden_size=64, depth=2, num_heads=4,
              num_classes=0, conditioning="cross_attn", context_dim=width)
  return text.TextConditioned(enc, m, **kw)


def test_caption_dropout_uses_the_empty_caption():
  tok = text.Tokenizer.build(MNIST_CAPTIONS)
  model = _text_dit(tok, caption_dropout_prob=1.0)
  p = _randomise(jax.jit(lambda k: text.init_text_params(model, k))(KEY))
  assert set(p) == {"encoder", "model"}
  x = np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype(np.float32)
  t = np.array([5, 500])
  ids = tok.encode(["a handwritten digit one", "a handwritten digit two"])
  null = np.stack([tok.null_tokens()] * 2)

  @jax.jit
  def f(ids, drop, train=False):
    return model.apply({"params": p}, x, t, ids, train=train, force_drop_ids=drop,
                       rngs={"label_dropout": jax.random.key(3)})
  uncond = f(null, None)
  np.testing.assert_allclose(f(ids, np.array([1, 1])), uncond, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda ids: model.apply(
      {"params": p}, x, t, ids, train=True, rngs={"label_dropout": jax.random.key(3)}))(ids),
      uncond, atol=1e-6)  # probability 1: every caption dropped
  assert np.abs(f(ids, np.array([0, 0])) - uncond).max() > 1e-3
  bad = text.TextConditioned(model.encoder, dit.DiT(num_classes=10, conditioning="cross_attn",
                                                    context_dim=32))
  with pytest.raises(ValueError, match="num_classes=0"):
    bad.validate()


def test_precomputed_context_store(tmp_path):
  rng = np.random.default_rng(0)
  ctx = rng.standard_normal((4, 3, 8)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], bool)
  index = np.array([40, 10, 30, 20])
  path = text.context_path(tmp_path / "train.npz")
  assert path == tmp_path / "train.context.npz"
  text.save_context(path, ctx, mask, index)
  store = text.ContextStore.load(path)
  assert store.dim == 8
  got, got_mask = store.lookup([10, 40, 10])
  np.testing.assert_array_equal(got, ctx[[1, 0, 1]])
  np.testing.assert_array_equal(got_mask, mask[[1, 0, 1]])
  with pytest.raises(ValueError, match="no stored context"):
    store.lookup([10, 11])
  null, null_mask = store.null(2)
  assert null.shape == (2, 3, 8) and not np.any(null) and null_mask[:, 0].all()
  assert not null_mask[:, 1:].any()
  with pytest.raises(ValueError, match="unique"):
    text.save_context(path, ctx, mask, [1, 1, 2, 3])
  # The stored rows feed a context model directly.
  m = _dit(8)
  p = jax.eval_shape(lambda: dit.init_params(m, jax.random.key(0)))
  out = jax.eval_shape(lambda p: m.apply({"params": p}, jnp.zeros((3, 8, 8, 1)),
                                         jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32),
                                         context=got, context_mask=got_mask), nn.unbox(p))
  assert out.shape == (3, 8, 8, 2)


@pytest.mark.slow
def test_tiny_text_conditioned_dit_overfits_a_batch_of_mnist(shared_data):
  x0, labels = mnist_batch(shared_data)
  tok = text.Tokenizer.build(MNIST_CAPTIONS)
  ids = jnp.asarray(tok.encode(text.captions_for_labels(labels, text.MNIST_CLASS_NAMES,
                                                        text.TEMPLATES["mnist"])))
  model = _text_dit(tok, caption_dropout_prob=0.0)
  params = nn.unbox(jax.jit(lambda k: text.init_text_params(model, k))(KEY))
  apply = lambda p, x, t: model.apply({"params": p}, x, t, ids)
  before, after = overfit(apply, params, x0, diffusion.create(), steps=150, lr=2e-3)
  print(f"overfit: loss {before:.4f} -> {after:.4f}")
  assert after <= before / 3, (before, after)


# --- text through the main trainer --------------------------------------------------------------

def _digits_source(config):
  from dit_jax.data import captions, sources
  return captions.training_source(config.text, sources.create_source(config.data))


def test_caption_source_and_pipeline_carry_token_ids():
  from dit_jax.data import captions, pipeline, sources
  from dit_jax import sharding
  config = tiny_text_config()
  plain = sources.create_source(config.data)
  src = captions.training_source(config.text, plain)
  assert isinstance(src, captions.CaptionSource) and src.label_shape == (5,)
  assert src.captions[7] == "a handwritten digit seven"  # digits names its classes '0'..'9'
  idx, flips = np.array([5, 0, 200]), np.array([True, False, False])
  (x, ids), (x0, y0) = src.read(idx, flips), plain.read(idx, flips)
  np.testing.assert_array_equal(x, x0)
  np.testing.assert_array_equal(ids, src.tokenizer.encode([src.captions[c] for c in y0]))
  mesh = sharding.create_mesh((-1, 1, 1))  # 8 devices: the (16, 5) labels split over the batch
  a = pipeline.Pipeline(src, 16, 0, sharding.batch_sharding(mesh)).batch(3)
  b = pipeline.Pipeline(plain, 16, 0, sharding.batch_sharding(mesh)).batch(3)
  assert a["label"].shape == (16, 5) and a["label"].dtype == jnp.int32
  assert b["label"].shape == (16,)  # class labels stay 1-D
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["label"], src.caption_ids[np.asarray(b["label"])])
  assert captions.caption_table(plain) is None and captions.class_source(src) is plain


def test_registry_wraps_the_backbone_and_counts_the_encoder():
  from dit_jax import models
  from dit_jax import config_check
  config = tiny_text_config(model="DiT-S/4", depth=4, hidden_size=0, num_heads=0,
                            **{"data.image_size": 16, "text.width": 128, "text.num_heads": 4})
  src = _digits_source(config)
  model = models.create(models.model_config(config), src.image_shape, src.num_classes,
                        tokenizer=src.tokenizer)
  assert isinstance(model, text.TextConditioned)
  assert (model.model.num_classes, model.model.context_dim) == (0, 128)
  assert models.family_of(model).name == "DiT"
  np.testing.assert_array_equal(models.null_label(model), src.tokenizer.null_tokens())
  backbone = models.gflops(model.model, context_length=src.tokenizer.max_length)
  assert models.gflops(model) == pytest.approx(backbone + text.encoder_macs(model.encoder) / 1e9)
  assert models.xla_gflops(model) == pytest.approx(models.gflops(model), rel=0.02)
  # what a text sweep records per member (sweep.runner.preflight)
  row = models.describe(config_check.check_with_data(config, src), config.model)
  assert row["params"] == sum(x.size for x in jax.tree.leaves(models.abstract_params(model)))
  assert (row["family"], row["size"], row["gflops"]) == ("DiT", "S", models.gflops(model))
  with pytest.raises(ValueError, match="tokenizer"):
    models.create(models.model_config(config), src.image_shape, src.num_classes)


def _stub_feature_network(data_cfg, network, cache_dir=None, labelled_images=None, log=None):
  """A cheap 'feature net' that checks it is given class labels, not caption ids."""
  images, labels = labelled_images()
  assert labels.ndim == 1 and labels.max() < 10
  proj = jax.random.normal(jax.random.key(0), (images[0].size, 6))  # full-rank features
  apply = jax.jit(lambda u8: {"pool": u8.reshape(u8.shape[0], -1) / 255.0 @ proj})

  def feature_fn(u8):
    return apply(u8)
  feature_fn.weights_key = "stub-proj-0"  # what keys the reference statistics made with it
  return "stub", feature_fn


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """4 steps of a tiny text DiT through the main loop: checkpoints at 2 and 4, a grid and an FID
  (stub feature net) at 4."""
  from dit_jax.evaluation import fid
  from dit_jax.training import train
  workdir = tmp_path_factory.mktemp("text_run")
  config = tiny_text_config(num_train_steps=4, **{
      "eval.grid.every_steps": 4, "eval.grid.respacing": "3", "eval.grid.num_samples": 10,
      "eval.fid.every_steps": 4, "eval.fid.num_samples": 16, "eval.fid.batch_size": 16,
      "eval.fid.respacing": "2", "eval.fid.cache_dir": str(workdir / "cache")})
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(fid, "feature_network", _stub_feature_network)
    state = train.train_and_evaluate(config, workdir / "run")
  return config, workdir / "run", jax.device_get(state)


def test_text_dit_trains_through_the_main_loop(text_run):
  from PIL import Image
  from dit_jax.training import checkpoint as checkpoint_lib
  from dit_jax import models
  config, workdir, state = text_run
  assert int(state.step) == 4 and int(state.nonfinite_total) == 0
  assert set(state.params) == {"encoder", "model"}
  assert checkpoint_lib.Checkpointer(workdir / "checkpoints", read_only=True).all_steps() == [2, 4]
  assert text.Tokenizer.load(workdir / "tokenizer.json") == _digits_source(config).tokenizer
  grid = np.asarray(Image.open(workdir / "samples" / "step_00000004.png"))
  assert grid.shape == (2 + 3 * 10, 2 + 4 * 10) and grid.std() > 0  # 10 captions: 3 rows of 4
  rows = read_jsonl(workdir / "metrics.jsonl")
  src = _digits_source(config)
  model = models.create(models.model_config(config), src.image_shape, src.num_classes,
                        tokenizer=src.tokenizer)
  assert next(r["gflops_per_image"] for r in rows if "gflops_per_image" in r) == pytest.approx(
      models.gflops(model))
  assert np.isfinite(next(r["fid_stub"] for r in rows if "fid_stub" in r))


def test_text_run_resumes_to_the_same_params(text_run, tmp_path):
  import shutil
  from dit_jax.training import train
  config, workdir, state = text_run
  shutil.copytree(workdir, tmp_path / "run")
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")  # resume from step 2
  # The resumed run evaluates nothing, a config change that is refused on resume: its config.json
  # goes, so that only the training state is compared.
  (tmp_path / "run" / "config.json").unlink()
  config = tiny_text_config(num_train_steps=4)
  resumed = jax.device_get(train.train_and_evaluate(config, tmp_path / "run"))
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.ema_params, state.ema_params)


def test_sample_prompt_cli_samples_a_trained_workdir(text_run, tmp_path):
  from PIL import Image
  _, workdir, _ = text_run
  cmd = [sys.executable, "tools/sample_prompt.py", f"--workdir={workdir}", "--num=3", "--steps=3",
         f"--out={tmp_path / 'p.png'}"]
  run = lambda *prompts: subprocess.run(cmd + [f"--prompt={p}" for p in prompts], cwd=REPO,
                                        capture_output=True, text=True, timeout=300,
                                        env=subprocess_env(1))
  out = run("a handwritten digit seven", "digit one")
  assert out.returncode == 0, out.stderr[-3000:]
  grid = np.asarray(Image.open(tmp_path / "p.png"))
  assert grid.shape == (2 + 2 * 10, 2 + 3 * 10) and grid.std() > 0  # 2 prompts x 3 samples
  bad = run("a handwritten digit eleven")
  assert bad.returncode != 0 and "outside the vocabulary: ['eleven']" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_text_unet_trains_through_the_main_loop(tmp_path):
  from dit_jax.training import train
  """One step and a grid (the DiT run above covers checkpoints: U-Net compiles cost more)."""
  config = tiny_text_config(model="UNet-Pico", conditioning="adaln_zero", depth=0, hidden_size=0,
                            num_heads=0, num_train_steps=1, checkpoint_every_steps=0,
                            **{"eval.grid.every_steps": 1, "eval.grid.respacing": "2",
                               "eval.grid.num_samples": 4})
  state = train.train_and_evaluate(config, tmp_path)
  assert int(state.step) == 1 and set(state.params) == {"encoder", "model"}
  assert "label_emb" not in state.params["model"]  # captions replace the class embedding
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))
  assert (tmp_path / "samples" / "step_00000001.png").exists()


BAD_TEXT = [
    (dict(conditioning="adaln_zero"), "set conditioning='cross_attn'"),
    (dict(**{"text.num_heads": 3}), "not divisible by text.num_heads=3"),
    (dict(**{"text.caption_dropout_prob": 1.0}), "caption_dropout_prob must be in"),
    (dict(**{"text.template": "digit"}), "needs a '{}'"),
    (dict(**{"text.max_length": 3}), "shorter than the longest caption"),
    (dict(class_conditional=False), "class_conditional=False"),
    (dict(**{"data.name": "npz", "data.path": "NPZ"}), "needs class names"),
]


@pytest.mark.parametrize("overrides, match", BAD_TEXT, ids=[m for _, m in BAD_TEXT])
def test_bad_text_configs_fail_before_compiling(overrides, match, tmp_path, monkeypatch):
  from dit_jax.evaluation import fid
  from dit_jax.training import train, train_step
  def tripwire(*a, **k):
    raise AssertionError("built despite a bad text config")
  monkeypatch.setattr(train_step, "jit_train_step", tripwire)
  monkeypatch.setattr(fid, "feature_network", tripwire)
  if overrides.get("data.path") == "NPZ":  # classes named only by index
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (8, 8, 8), np.uint8),
             labels=np.arange(8) % 2)
    overrides = dict(overrides, **{"data.path": str(tmp_path / "d.npz")})
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_text_config(**overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_unknown_prompt_words_fail_before_training():
  sample_prompt = load_tool("sample_prompt")
  sample_prompt.check_prompts(tiny_text_config(), ["A handwritten digit, SEVEN!"])
  with pytest.raises(ValueError, match=r"outside the vocabulary: \['eleven'\]"):
    sample_prompt.check_prompts(tiny_text_config(), ["a handwritten digit eleven"])
  with pytest.raises(ValueError, match="not text-conditioned"):
    sample_prompt.check_prompts(tiny_text_config(**{"text.enabled": False}), ["digit one"])
