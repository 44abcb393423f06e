"""Two processes (jax.distributed on 127.0.0.1, gloo) train exactly like one process."""
import json
import pathlib
import socket
import subprocess

import numpy as np
import pytest

from tests.helpers import main_cmd, restore_final, subprocess_env

STEPS = 4
FLAGS = [f"--config.num_train_steps={STEPS}", f"--config.checkpoint_every_steps={STEPS}",
         "--config.mesh_shape=(2,2,1)"]  # data x fsdp over 4 devices: params sharded across hosts


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  one = tmp_path / "one"
  subprocess.run(main_cmd(one, *FLAGS), env=subprocess_env(4), check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  two = tmp_path / "two"
  port = _free_port()
  procs = [subprocess.Popen(
      main_cmd(two, *FLAGS, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
      env=subprocess_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  for i, p in enumerate(procs):
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, f"process {i}:\n{err[-4000:]}"
  # Each process read only its half of every batch.
  hashes = [(two / f"batch_hashes.{i}.jsonl").read_text().splitlines() for i in range(2)]
  assert len(hashes[0]) == len(hashes[1]) == STEPS and hashes[0] != hashes[1]

  losses_one, losses_two = _losses(one), _losses(two)
  assert sorted(losses_one) == sorted(losses_two) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([losses_two[s] for s in sorted(losses_two)],
                             [losses_one[s] for s in sorted(losses_one)], rtol=1e-6)
  state_one, _ = restore_final(one, STEPS)
  state_two, _ = restore_final(two, STEPS)
  import jax
  for a, b in zip(jax.tree.leaves(state_two), jax.tree.leaves(state_one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(state_one.params), jax.tree.leaves(state_one.ema_params)))
  assert moved > 0  # training happened (params left their EMA)
