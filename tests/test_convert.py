"""The official-checkpoint converter on state dicts of any size: inferred fields, diffusers as the
reference forward pass, inconsistent dicts rejected (and the tool then writes nothing)."""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from dit_jax.models import convert
from test_dit import _official_to_diffusers, _random_official_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Off every table: depth 3, width 96, patch 4, 16 px, 3 (pixel) channels, 10 classes.
DEPTH, D, P, SIZE, C, NCLS = 3, 96, 4, 16, 3, 10


def off_table_state_dict(learn_sigma=True, seed=0):
  sd = _random_official_state_dict(DEPTH, D, None, P, C, NCLS, SIZE // P, seed=seed)
  if not learn_sigma:  # keep the eps half of each patch's (p, q, 2C) outputs
    w, b = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]
    sd["final_layer.linear.weight"] = w.reshape(P * P, 2 * C, D)[:, :C].reshape(P * P * C, D)
    sd["final_layer.linear.bias"] = b.reshape(P * P, 2 * C)[:, :C].reshape(-1)
  return sd


def diffusers_forward(sd, heads, learn_sigma, x, t, y):
  import torch
  from diffusers import DiTTransformer2DModel
  ref = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=D // heads,
                              in_channels=C, out_channels=2 * C if learn_sigma else C,
                              num_layers=DEPTH, sample_size=SIZE, patch_size=P,
                              num_embeds_ada_norm=NCLS, norm_eps=1e-6)
  missing, unexpected = ref.load_state_dict(
      {k: torch.from_numpy(v) for k, v in _official_to_diffusers(sd, DEPTH).items()}, strict=False)
  assert not unexpected and all(k.endswith("pos_embed.pos_embed") for k in missing), missing
  for blk in ref.transformer_blocks:
    blk.norm1.emb.time_proj.downscale_freq_shift = 0  # as test_dit: the official frequencies
  ref.eval()
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t),
              class_labels=torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def inputs():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, SIZE, SIZE, C)).astype(np.float32)
  return x, np.array([0, 417, 999]), np.array([3, 0, NCLS])  # the last label is the null class


@pytest.mark.parametrize("num_heads,learn_sigma", [(None, True), (4, True), (None, False)])
def test_off_table_state_dict_converts_without_naming_a_size(num_heads, learn_sigma):
  sd = off_table_state_dict(learn_sigma)
  model, params = convert.convert(sd, num_heads=num_heads)
  heads = 2 if num_heads is None else num_heads  # width 96 is Pico's row: 2 heads
  assert (model.depth, model.hidden_size, model.num_heads, model.patch_size, model.input_size,
          model.in_channels, model.num_classes, model.learn_sigma, model.mlp_ratio) == (
              DEPTH, D, heads, P, SIZE, C, NCLS, learn_sigma, 4.0)
  x, t, y = inputs()
  got = np.asarray(jax.jit(model.apply)({"params": params}, x, t, y))
  want = diffusers_forward(sd, heads, learn_sigma, x, t, y)
  assert got.shape == want.shape == (3, SIZE, SIZE, 2 * C if learn_sigma else C)
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel <= 1e-5, rel
  assert np.abs(want).max() > 0.1


def test_default_num_heads():
  assert [convert.default_num_heads(d) for d in (96, 192, 384, 1024, 1152, 512)] == [
      2, 3, 6, 16, 16, 8]  # table widths (XL is 1152 / 16, not / 64), then width / 64
  with pytest.raises(ValueError, match="pass num_heads"):
    convert.default_num_heads(80)


def _drop(sd, prefix):
  return {k: v for k, v in sd.items() if not k.startswith(prefix)}


def _renumber_block_2_as_3(sd):
  return {k.replace("blocks.2.", "blocks.3."): v for k, v in sd.items()}


def _with(sd, key, value):
  return {**sd, key: value}


BAD = {
    # name: (corruption, error text)
    "block_of_another_width": (
        lambda sd: _with(sd, "blocks.1.mlp.fc1.weight", np.zeros((4 * D, D + 4), np.float32)),
        "does not fit"),
    "a_gap_in_the_blocks": (_renumber_block_2_as_3, "numbered 0..depth-1"),
    "a_missing_tensor": (lambda sd: _drop(sd, "t_embedder.mlp.2.bias"), "lacks"),
    "an_extra_tensor": (lambda sd: _with(sd, "extra.weight", np.zeros(3, np.float32)),
                        "does not use"),
    "final_layer_channels": (
        lambda sd: _with(sd, "final_layer.linear.weight", np.zeros((P * P * 5, D), np.float32)),
        "final_layer.linear has"),
    "pos_embed_not_square": (lambda sd: _with(sd, "pos_embed", sd["pos_embed"][:, :-1]),
                             "square grid"),
    "pos_embed_not_sincos": (lambda sd: _with(sd, "pos_embed", sd["pos_embed"][:, ::-1]),
                             "sin-cos"),
    "non_square_patches": (
        lambda sd: _with(sd, "x_embedder.proj.weight", np.zeros((D, C, P, P - 1), np.float32)),
        "not square"),
    "no_patch_embedding": (lambda sd: _drop(sd, "x_embedder"), "not an official DiT"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_inconsistent_state_dicts_fail_clearly(name):
  corrupt, message = BAD[name]
  with pytest.raises(ValueError, match=message):
    convert.convert(corrupt(off_table_state_dict()))


def run_tool(*args):
  # PYTHONPATH: this checkout's dit_jax, not whichever one the interpreter has installed.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "tools/convert_dit_checkpoint.py", *args], cwd=ROOT,
                        capture_output=True, text=True, env=env)


def test_convert_tool_any_size_and_rejects_without_writing(tmp_path):
  import torch
  sd = off_table_state_dict()
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "small.pt")
  out = run_tool(str(tmp_path / "small.pt"), "--out", str(tmp_path / "out"))
  assert out.returncode == 0, out.stderr
  model, params = convert.load(tmp_path / "out")
  want_model, want_params = convert.convert(sd)
  assert model == want_model
  x, t, y = inputs()
  np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, x, t, y)),
                                np.asarray(want_model.apply({"params": want_params}, x, t, y)))

  bad = _with(sd, "blocks.1.attn.qkv.weight", np.zeros((3 * D, D - 4), np.float32))
  torch.save({k: torch.from_numpy(v) for k, v in bad.items()}, tmp_path / "bad.pt")
  out = run_tool(str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o"))
  assert out.returncode != 0 and "does not fit" in out.stderr, out.stderr
  assert not (tmp_path / "o").exists()
  out = run_tool(str(tmp_path / "small.pt"), "--image-size", "256", "--out", str(tmp_path / "o"))
  assert out.returncode != 0 and "not 256px" in out.stderr, out.stderr
  assert not (tmp_path / "o").exists()
