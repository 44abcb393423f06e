"""sweep.devices_per_member (dit_jax/sweep/devices.py): which devices each sweep worker sees. No
accelerator here: the GPU/TPU environments are checked as values, and on the CPU each worker's
process is started with its environment and must see exactly its k (fake) devices."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from dit_jax.sweep import devices, workers


def test_gpu_workers_see_disjoint_devices():
  envs = devices.worker_envs("gpu", 8, 2, base_env={"PATH": "/bin"})
  assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3", "4,5", "6,7"]
  assert all(e["PATH"] == "/bin" and e[devices.PIN_CORE] == "0" for e in envs)
  assert len(devices.worker_envs("gpu", 8, 3, base_env={})) == 2  # 8 // 3, two GPUs idle


def test_tpu_workers_get_chips_bounds_and_ports():
  envs = devices.worker_envs("tpu", 4, 1, base_env={})
  assert [e["TPU_VISIBLE_CHIPS"] for e in envs] == ["0", "1", "2", "3"]
  assert {e["TPU_CHIPS_PER_PROCESS_BOUNDS"] for e in envs} == {"1,1,1"}
  assert len({e["TPU_PROCESS_PORT"] for e in envs}) == 4
  assert devices.worker_envs("tpu", 4, 2, base_env={})[1]["TPU_VISIBLE_CHIPS"] == "2,3"
  with pytest.raises(ValueError, match="devices_per_member=3"):
    devices.worker_envs("tpu", 4, 3, base_env={})


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="between 1 and the device count"):
    devices.worker_envs("gpu", 2, 4, base_env={})
  s = ml_collections.ConfigDict(dict(devices_per_member=2, workers=2))
  with pytest.raises(ValueError, match="set one"):
    devices.check_config(s)
  assert devices.pool(ml_collections.ConfigDict(dict(devices_per_member=0, workers=2)),
                      "gpu") is None


def test_cpu_workers_each_see_only_their_devices():
  """Each worker process, started by workers._Worker with its environment as the sweep starts it,
  sees k fake devices, whatever XLA_FLAGS the parent had."""
  base = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  envs = devices.worker_envs("cpu", 4, 2, base_env=base)
  assert len(envs) == 2
  code = "import jax, json; print(json.dumps([jax.device_count(), jax.default_backend()]))"
  for env in envs:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [2, "cpu"]


def test_worker_process_gets_its_environment(monkeypatch):
  """workers._Worker starts its process with the given environment (and a fresh one after a
  failure keeps it): checked on the command the pool would spawn."""
  seen = []

  class FakePopen:
    def __init__(self, args, env=None, **kwargs):
      del kwargs
      seen.append((args, env))

  monkeypatch.setattr(workers.subprocess, "Popen", FakePopen)
  env = {"CUDA_VISIBLE_DEVICES": "2,3"}
  w = workers._Worker(1, env)  # pylint: disable=protected-access
  assert seen[-1][1] is env and w.env is env and "1" in seen[-1][0]
