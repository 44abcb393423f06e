"""What several test modules share: tiny models, configs and batches, the CLI, MNIST overfitting."""
import hashlib
import importlib.util
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import default as default_config
from dit_jax import files
from dit_jax import models
from dit_jax import sharding
from dit_jax.data import datasets
from dit_jax.models import dit as dit_lib
from dit_jax.training import checkpoint as checkpoint_lib
from dit_jax.training import train_step

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_model(**kw):
  """Depth-2, width-64 DiT on 8x8x2 images, 10 classes: every matrix divides a 2x2 fsdp x tensor."""
  args = dict(input_size=8, in_channels=2, patch_size=2, hidden_size=64, depth=2, num_heads=2,
              num_classes=10)
  args.update(kw)
  return dit_lib.DiT(**args)


def tiny_optim(**kw):
  optim = ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                         warmup_steps=0, grad_clip=0.0))
  optim.update(kw)
  return optim


def tiny_batch(b=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (b, 8, 8, 2)).astype(np.float32),
          "label": rng.integers(0, 10, b).astype(np.int32)}


def tiny_config(**overrides):
  """A depth-2, width-64 DiT-S/2 on 8x8 digits, batch 16 over the 8 test devices."""
  config = default_config.get_config("cpu")
  config.model = "DiT-S/2"
  config.depth, config.hidden_size, config.num_heads = 2, 64, 2
  config.data.image_size = 8
  config.data.max_examples = 256
  config.batch_size = 16
  config.num_train_steps = 6
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval.grid.every_steps = 0
  config.eval.fid.every_steps = 0
  config.optim.warmup_steps = 0
  config.mesh_shape = (-1, 1, 1)
  for k, v in overrides.items():
    target = config
    *parents, leaf = k.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = v
  return config


def tiny_text_config(**overrides):
  """tiny_config with captions: its DiT cross-attends to a width-32, 1-layer caption encoder."""
  text = {"conditioning": "cross_attn", "text.enabled": True, "text.width": 32, "text.depth": 1,
          "text.num_heads": 2}
  return tiny_config(**{**text, **overrides})


def read_jsonl(path):
  return files.read_jsonl(path)


# The tiny run of tests/test_train.py, through the real entry point.
TINY_FLAGS = ["--config=configs/default.py:cpu", "--config.model=DiT-S/2", "--config.depth=2",
              "--config.hidden_size=64", "--config.num_heads=2", "--config.data.image_size=8",
              "--config.data.max_examples=256", "--config.batch_size=16",
              "--config.log_every_steps=1", "--config.eval.grid.every_steps=0",
              "--config.eval.fid.every_steps=0",
              "--config.record_batch_hashes=True"]


def subprocess_env(devices=2):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def pids_with(*args: bytes) -> list[int]:
  """The processes whose command lines hold every one of `args` (whole arguments), not this one."""
  pids = []
  for d in pathlib.Path("/proc").iterdir():
    try:
      cmd = (d / "cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
      continue
    if d.name.isdigit() and int(d.name) != os.getpid() and all(a in cmd for a in args):
      pids.append(int(d.name))
  return pids


def main_cmd(workdir, *flags):
  return [sys.executable, "-m", "dit_jax.main", f"--workdir={workdir}", *TINY_FLAGS, *flags]


def tree_hash(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(tree)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def tiny_abstract_state():
  """The abstract TrainState of TINY_FLAGS's model (8x8x1 digits, 10 classes) on one device."""
  config = tiny_config()
  model = models.create(models.model_config(config), (8, 8, 1), 10)
  abstract, _ = train_step.state_shardings(model, train_step.create_optimizer(config.optim),
                                      sharding.create_mesh((-1, 1, 1)))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract)


def restore_final(workdir, step):
  ckpt = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", read_only=True)
  return ckpt.restore(step, tiny_abstract_state())


# XLA's RngBitGenerator keys compile initialisers several times faster than threefry on CPU.
KEY = jax.random.key(0, impl="rbg")


def overfit(model_apply, params, x0, diff, steps, lr, seed=0):
  """Trains on one batch with Adam; returns the loss before and after on fixed (t, noise) draws:
  four copies of the batch at timesteps spread evenly over [0, T)."""
  opt = optax.adam(lr)
  state = opt.init(params)
  n = x0.shape[0]

  def loss(p, x, t_B, noise):
    return diff.training_losses(lambda x, t: model_apply(p, x, t), x, t_B, noise)["loss"].mean()

  @jax.jit
  def step(p, s, rng):
    r1, r2 = jax.random.split(rng)
    t_B = jax.random.randint(r2, (n,), 0, diff.num_timesteps)
    g = jax.grad(loss)(p, x0, t_B, jax.random.normal(r1, x0.shape))
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  reps = 4
  x_eval = jnp.concatenate([x0] * reps)
  t_eval = jnp.linspace(0, diff.num_timesteps - 1, reps * n).astype(jnp.int32)
  noise_eval = jax.random.normal(jax.random.key(100), x_eval.shape)
  # model_apply closes over per-example conditioning of the batch; evaluate copy by copy.
  eval_loss = jax.jit(lambda p, i: loss(p, x0, jax.lax.dynamic_slice_in_dim(t_eval, i * n, n),
                                        jax.lax.dynamic_slice_in_dim(noise_eval, i * n, n)))
  mean_eval = lambda p: float(np.mean([eval_loss(p, i) for i in range(reps)]))
  before = mean_eval(params)
  rng = jax.random.key(seed)
  for i in range(steps):
    params, state = step(params, state, jax.random.fold_in(rng, i))
  return before, mean_eval(params)


def mnist_batch(shared_data, n=16, size=28):
  """The first n MNIST test digits in [-1, 1]; size 14 averages 2x2 pixel blocks (CPU-sized)."""
  images, labels = datasets.read_mnist(shared_data / "mnist")
  x = images[:n].astype(np.float32) / 127.5 - 1.0
  if size != 28:
    k = 28 // size
    x = x.reshape(n, size, k, size, k, 1).mean(axis=(2, 4))
  return jnp.asarray(x), labels[:n]


def load_tool(name: str):
  """tools/<name>.py as a module. Tools define absl flags at import, so the flags a tool loaded
  earlier in this process defined are removed first (two tools may both define --out)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for flag in TOOL_FLAGS:
    if flag in flags.FLAGS:
      delattr(flags.FLAGS, flag)
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  TOOL_FLAGS.update(set(flags.FLAGS) - before)
  return module


TOOL_FLAGS = set()
