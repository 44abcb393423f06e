"""Test setup: 8 fake CPU devices (before jax is imported) and the shared-data fixture."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import sys  # noqa: E402

# Importing triton (pulled in by torch/diffusers) after TensorFlow segfaults the process, and the
# tests use both (TF via tfds and clu, torch as the numerical reference): load torch's side first.
try:
  import torch  # noqa: F401,E402
  import triton  # noqa: F401,E402
except ImportError:
  pass

import pytest  # noqa: E402

SHARED_DATA_ENV = "DIT_JAX_SHARED_DATA"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """Path of the workplace's real data (MNIST test set, CIFAR-10 test JPEGs).

  Outside this workplace the tests that need it skip; in CI (CI=true) a missing path is an error.
  """
  path = os.environ.get(SHARED_DATA_ENV)
  in_ci = os.environ.get("CI", "").lower() == "true"
  if not path or not pathlib.Path(path, "mnist").is_dir():
    msg = f"${SHARED_DATA_ENV} not set or has no mnist/ ({path!r})"
    if in_ci:
      pytest.fail(msg + " -- CI must provide the shared data")
    pytest.skip(msg)
  return pathlib.Path(path)

# `from tests.helpers import ...` and `from configs import ...` from any test module.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
