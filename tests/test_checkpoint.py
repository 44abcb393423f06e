"""Checkpoints: restore onto another mesh, keep-N, interrupted saves, SIGKILL/resume, SIGTERM."""
import json
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from dit_jax import errors
from dit_jax import sharding
from dit_jax.training import checkpoint as checkpoint_lib
from dit_jax.training import train_step

from tests.helpers import (main_cmd, restore_final, subprocess_env, tiny_model, tiny_optim,
                           tree_hash)


def wait_for_step(workdir, step, proc, timeout=300, need_checkpoint=False):
  """Polls metrics.jsonl until a row with step >= `step` appears (and a finished checkpoint)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  ckpts = pathlib.Path(workdir) / "checkpoints"
  t0 = time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, f"training exited early: {proc.communicate()}"
    done = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    if path.exists() and (done or not need_checkpoint):
      rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
      if any(r.get("step", -1) >= step and "loss" in r for r in rows):
        return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached in {timeout} s")


def test_restore_onto_a_different_mesh(tmp_path):
  model, tx = tiny_model(), train_step.create_optimizer(tiny_optim())
  mesh8 = sharding.create_mesh((8, 1, 1))
  state, _ = train_step.create_train_state(model, tx, mesh8, seed=4)
  ckpt = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=2)
  ckpt.save(7, state, {"next_step": 7})
  ckpt.wait()
  mesh222 = sharding.create_mesh((2, 2, 2))
  abstract, shardings = train_step.state_shardings(model, tx, mesh222)
  restored, data_state = ckpt.restore(None, checkpoint_lib.abstract_with_shardings(
      abstract, shardings))
  ckpt.close()
  assert data_state == {"next_step": 7}
  fc1 = restored.params["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == shardings.params["blocks_0"]["mlp"]["fc1"]["kernel"].spec
  assert fc1.addressable_shards[0].data.shape == (32, 128)  # (64, 256) over fsdp=2 x tensor=2
  assert tree_hash(restored) == tree_hash(state)


def test_keep_n(tmp_path):
  ckpt = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, {"w": np.full((3,), step, np.float32)}, {"next_step": step})
  ckpt.close()
  assert checkpoint_lib.Checkpointer(tmp_path, read_only=True).all_steps() == [3, 4]


INTERRUPTED_SAVE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from dit_jax.training import checkpoint
    ckpt = checkpoint.Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": np.ones((4,), np.float32)}, {"next_step": 1})
    ckpt.wait()
    big = np.random.default_rng(0).standard_normal(48 * 2**20, dtype=np.float32)  # 192 MiB
    ckpt.save(2, {"w": big}, {"next_step": 2})
    print("SAVING", flush=True)
    time.sleep(120)
""")


def test_interrupted_save_is_never_restored(tmp_path):
  """SIGKILL while step 2 is being written: step 1 is the latest, and it restores."""
  proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_SAVE, str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=subprocess_env(1))
  assert proc.stdout.readline().strip() == "SAVING"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("2")]
  assert leftovers and all("tmp" in name for name in leftovers), leftovers  # really cut short
  ckpt = checkpoint_lib.Checkpointer(tmp_path, read_only=True)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  state, data_state = ckpt.restore(None, {"w": jax.ShapeDtypeStruct((4,), np.float32)})
  np.testing.assert_array_equal(state["w"], np.ones(4))
  # Opening it for writing (a resumed run) removes the half-written step.
  checkpoint_lib.Checkpointer(tmp_path).close()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("2")]


def _hash_rows(workdir):
  path = pathlib.Path(workdir) / "batch_hashes.0.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
  """Uninterrupted 12 steps vs SIGKILL at a random step + resume: same state and batches."""
  flags = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=2"]
  ref = tmp_path / "ref"
  subprocess.run(main_cmd(ref, *flags), env=subprocess_env(), check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  run = tmp_path / "killed"
  kill_at = random.Random().randint(3, 9)
  proc = subprocess.Popen(main_cmd(run, *flags), env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_step(run, kill_at, proc, need_checkpoint=True)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(main_cmd(run, *flags), env=subprocess_env(), check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  ref_state, _ = restore_final(ref, 12)
  state, data_state = restore_final(run, 12)
  assert data_state["next_step"] == 12
  for part in ("params", "ema_params", "opt_state", "step", "rng"):
    assert tree_hash(getattr(state, part)) == tree_hash(getattr(ref_state, part)), part
  ref_hashes = {r["step"]: r["sha256"] for r in _hash_rows(ref)}
  rows = _hash_rows(run)
  restarts = [i for i in range(1, len(rows)) if rows[i]["step"] <= rows[i - 1]["step"]]
  assert len(restarts) == 1, f"killed at {kill_at}: the run never resumed"
  resumed_from = rows[restarts[0]]["step"]
  assert resumed_from >= 2  # it restored a checkpoint, not step 0
  assert [r["step"] for r in rows[restarts[0]:]] == list(range(resumed_from, 12))
  for r in rows:
    assert r["sha256"] == ref_hashes[r["step"]], r


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(main_cmd(tmp_path, "--config.num_train_steps=100000",
                                   "--config.checkpoint_every_steps=0"),
                          env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == errors.EXIT_PREEMPTED == 75, err[-3000:]  # a scheduler requeues on it
  assert "SIGTERM: saving step" in err
  assert err.strip().splitlines()[-1].startswith("dit_jax.main: preempted: SIGTERM at step")
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", read_only=True)
  steps = ckpt.all_steps()
  assert len(steps) == 1 and steps[0] >= 3
  state, data_state = restore_final(tmp_path, steps[0])
  assert int(state.step) == steps[0] == data_state["next_step"]
