"""The command-line tools of the model: tools/model_table.py and tools/convert_dit_checkpoint.py."""
import json
import pathlib
import subprocess
import sys

import numpy as np

from dit_jax.models import convert
from test_dit import _random_official_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_tool(*args):
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_model_table_json():
  rows = json.loads(run_tool("tools/model_table.py", "--json", "--models", "DiT-S/8,DiT-XL/2"))
  assert [r["model"] for r in rows] == ["DiT-S/8", "DiT-XL/2"]
  assert set(rows[0]) == {"model", "family", "size", "patch", "params", "gflops", "xla_gflops",
                          "attention_impl", "dense_backward"}
  # what attention_impl='auto' picks on this CPU: dit_jax's attention and dense_dot's backward
  assert (rows[0]["attention_impl"], rows[0]["dense_backward"]) == ("own", "custom")
  assert (rows[0]["family"], rows[0]["size"], rows[0]["patch"]) == ("DiT", "S", 8)
  assert rows[1]["params"] == 674_834_720 and abs(rows[1]["gflops"] - 118.64) < 0.05


def test_model_table_lists_unets_with_the_same_counter():
  rows = json.loads(run_tool("tools/model_table.py", "--json", "--models", "UNet-S"))
  assert rows[0]["model"] == "UNet-S" and abs(rows[0]["gflops"] - 4.788) < 0.01
  assert abs(rows[0]["xla_gflops"] / rows[0]["gflops"] - 1) <= 0.01


def test_convert_tool_reads_an_official_pt(tmp_path):
  import torch
  sd = _random_official_state_dict(depth=12, d=384, heads=6, p=8, c=4, num_classes=1000, grid=4)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "DiT-S-8-256x256.pt")
  run_tool("tools/convert_dit_checkpoint.py", str(tmp_path / "DiT-S-8-256x256.pt"),
           "--model", "DiT-S/8", "--out", str(tmp_path / "out"))
  model, params = convert.load(tmp_path / "out")
  assert model.patch_size == 8 and model.input_size == 32
  np.testing.assert_array_equal(params["blocks_11"]["mlp"]["fc2"]["kernel"],
                                sd["blocks.11.mlp.fc2.weight"].T)
  x = np.zeros((1, 32, 32, 4), np.float32)
  assert np.isfinite(model.apply({"params": params}, x, np.array([10]), np.array([1]))).all()


def test_convert_tool_rejects_the_wrong_model(tmp_path):
  import torch
  sd = _random_official_state_dict(depth=2, d=64, heads=2, p=2, c=4, num_classes=1000, grid=16)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "x.pt")
  out = subprocess.run([sys.executable, "tools/convert_dit_checkpoint.py", str(tmp_path / "x.pt"),
                        "--model", "DiT-S/2", "--out", str(tmp_path / "o")], cwd=ROOT,
                       capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu"})
  assert out.returncode != 0 and "does not fit DiT-S/2" in out.stderr
  assert not (tmp_path / "o").exists()
