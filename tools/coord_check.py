"""μP coordinate check: a width ladder of DiTs trained a few steps, activation size per layer type.

  python tools/coord_check.py --out=experiments/mup          # coord_check.png and coord_check.md

Each width (heads of --head-size, so width grows through heads as models/mup.py's rule) trains
--steps AdamW steps of the DDPM objective (train_step.train_step, the trainer's own step) at one
learning rate, from the same seed and the same batches, under SP, μP (adaLN-Zero, dit_jax's choice)
and μP with the adaLN modulation initialised as an ordinary hidden weight (the reference DiT-μP's
choice). After each step it records, on a fixed probe batch, the RMS of each layer type's output
change from initialisation (and of the output itself) and fits the log-log slope against width:
μP predicts ~0 for every type; SP predicts ~+1 for the output layer and more for attention logits
(Adam's step moves each weight by ~lr whatever the width, and a layer sums n coherent moves).
The batches are random images and labels (the check is about scaling, not data).
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from dit_jax import models
from dit_jax import sharding
from dit_jax.models import dit
from dit_jax.objectives import diffusion as diffusion_lib
from dit_jax.training import train_step

_WIDTHS = flags.DEFINE_list("widths", ["64", "128", "256", "512"], "The width ladder.")
_HEAD = flags.DEFINE_integer("head-size", 64, "Head width (fixed; heads = width / head size).")
_BASE = flags.DEFINE_integer("base-width", 64, "mup.base_width.")
_DEPTH = flags.DEFINE_integer("depth", 2, "Blocks.")
_STEPS = flags.DEFINE_integer("steps", 4, "Training steps.")
_LR = flags.DEFINE_float("lr", 1e-3, "optim.lr (no warm-up).")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_EPS = flags.DEFINE_float("eps", 1e-8, "optim.eps (Adam's epsilon).")
_VARIANTS = flags.DEFINE_list("variants", ["sp", "mup", "mup_hidden_adaln"], "Which to train.")
_NAME = flags.DEFINE_string("name", "coord_check", "File name stem of the outputs.")
_OUT = flags.DEFINE_string("out", "experiments/mup", "Folder for coord_check.png / .md.")

VARIANTS = ("sp", "mup", "mup_hidden_adaln")
# layer type -> the intermediates (module paths, outputs) it averages over
TYPES = {"patch_embed (input)": ("x_embedder",), "qkv (hidden)": ("qkv",),
         "attn_logits": ("qkv",), "attn_proj (hidden)": ("proj",), "mlp_fc1 (hidden)": ("fc1",),
         "mlp_fc2 (hidden)": ("fc2",), "block (residual)": ("blocks_",),
         "output (final linear)": ("linear",)}


def _model(width: int, variant: str, head: int, base: int, depth: int) -> dit.DiT:
  return dit.DiT(input_size=16, in_channels=1, patch_size=4, hidden_size=width, depth=depth,
                 num_heads=width // head, num_classes=10, learn_sigma=False,
                 mup_base_width=0 if variant == "sp" else base)


def _hidden_adaln(params, key):
  """adaLN modulation kernels drawn as hidden weights (std 1/sqrt(fan_in), as the reference's
  kaiming fan_in) instead of zero."""
  def draw(path, x):
    if "adaLN_modulation" in jax.tree_util.keystr(path) and x.ndim == 2:
      k = jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % (2 ** 31))
      return jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[0])
    return x
  return jax.tree_util.tree_map_with_path(draw, params)


def _intermediates(model, params, probe) -> dict:
  """{layer type: RMS-able arrays}, from flax's captured module outputs on the probe batch."""
  _, state = model.apply({"params": params}, *probe, capture_intermediates=True,
                         mutable=["intermediates"])
  flat = {"/".join(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(state["intermediates"],
                                               is_leaf=lambda x: isinstance(x, tuple))[0]
          for k in [tuple(str(getattr(p, "key", p)) for p in k)]}
  out = {t: [] for t in TYPES}
  for path, value in flat.items():
    parts = path.split("/")
    if len(parts) < 2:  # the model's own output
      continue
    while isinstance(value, tuple):  # each call's output in a tuple; a block's output is (x, None)
      value = value[0]
    if parts[-2] == "x_embedder":
      out["patch_embed (input)"].append(value)
    elif parts[-2] == "qkv":
      out["qkv (hidden)"].append(value)
      q, k = value[:, :, 0], value[:, :, 1]
      out["attn_logits"].append(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]))
    elif parts[-2] in ("proj", "fc1", "fc2"):
      key = {"proj": "attn_proj (hidden)", "fc1": "mlp_fc1 (hidden)", "fc2": "mlp_fc2 (hidden)"}
      out[key[parts[-2]]].append(value)
    elif parts[-2].startswith("blocks_") and len(parts) == 2:
      out["block (residual)"].append(value)
    elif parts[-2] == "linear":
      out["output (final linear)"].append(value)
  return out


def _rms(xs) -> float:
  return float(np.mean([np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))) for x in xs]))


def measure(width: int, variant: str, *, head: int, base: int, depth: int, steps: int, lr: float,
            batch: int, seed: int = 0, eps: float = 1e-8) -> list[dict]:
  """Per step 0..steps: {type: (RMS of the output, RMS of its change from step 0)} for one model."""
  model = _model(width, variant, head, base, depth)
  mesh = sharding.create_mesh((1, 1, 1), jax.devices()[:1])
  optim = type("Optim", (), dict(lr=lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=eps,
                                 warmup_steps=0, grad_clip=0.0))
  tx = train_step.create_optimizer(optim, models.lr_scales(model))
  state, _ = train_step.create_train_state(model, tx, mesh, seed)
  if variant == "mup_hidden_adaln":
    state = state.replace(params=_hidden_adaln(state.params, jax.random.key(seed + 1)))
  step = jax.jit(functools.partial(train_step.train_step, model=model,
                                   objective=diffusion_lib.create(learn_sigma=False), tx=tx,
                                   ema_decay=0.0))
  rng = np.random.default_rng(seed)
  image = lambda: rng.uniform(-1, 1, (batch, 16, 16, 1)).astype(np.float32)
  probe = (image(), np.full((batch,), 500, np.int32), rng.integers(0, 10, batch).astype(np.int32))
  acts = functools.partial(_intermediates, model)  # eager: a few calls, no compile per width
  first, rows = acts(state.params, probe), []
  for s in range(steps + 1):
    now = first if s == 0 else acts(state.params, probe)
    rows.append({t: (_rms(now[t]), _rms([a - b for a, b in zip(now[t], first[t])]))
                 for t in TYPES})
    if s < steps:
      labels = rng.integers(0, 10, batch).astype(np.int32)
      state, _ = step(state, {"image": image(), "label": labels})
  return rows


def slope(widths, values) -> float:
  """Least-squares slope of log(value) against log(width)."""
  return float(np.polyfit(np.log(widths), np.log(np.maximum(values, 1e-30)), 1)[0])


def ladder(widths, variants=VARIANTS, **kw) -> dict:
  """{variant: {width: measure(...)}}."""
  return {v: {w: measure(w, v, **kw) for w in widths} for v in variants}


def slopes(results: dict, widths, step: int, which: int = 1) -> dict:
  """{variant: {type: slope of RMS (which=0) or of its change (which=1) at `step`}}."""
  return {v: {t: slope(widths, [results[v][w][step][t][which] for w in widths]) for t in TYPES}
          for v in results}


def plot(results: dict, widths, path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(len(results), len(TYPES), figsize=(3 * len(TYPES), 2.8 * len(results)),
                           squeeze=False)
  for i, (v, by_w) in enumerate(results.items()):
    steps = len(by_w[widths[0]])
    for j, t in enumerate(TYPES):
      ax = axes[i][j]
      for s in range(1, steps):
        ax.plot(widths, [by_w[w][s][t][1] for w in widths], "o-", label=f"step {s}",
                color=plt.cm.viridis(s / steps))
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_title(f"{v}: {t}", fontsize=8)
      if j == 0:
        ax.set_ylabel("RMS change from init")
      if i == len(results) - 1:
        ax.set_xlabel("width")
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def table(results: dict, widths, steps: int) -> str:
  lines = [f"Log-log slope against width ({', '.join(map(str, widths))}) of each layer type's RMS "
           f"change from initialisation after {steps} steps (and of its RMS):", "",
           "| layer type | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
  d, a = slopes(results, widths, steps, 1), slopes(results, widths, steps, 0)
  for t in TYPES:
    lines.append(f"| {t} | " + " | ".join(f"{d[v][t]:+.2f} ({a[v][t]:+.2f})" for v in results)
                 + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  widths = [int(w) for w in _WIDTHS.value]
  kw = dict(head=_HEAD.value, base=_BASE.value, depth=_DEPTH.value, steps=_STEPS.value,
            lr=_LR.value, batch=_BATCH.value, eps=_EPS.value)
  results = ladder(widths, tuple(_VARIANTS.value), **kw)
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  plot(results, widths, out / f"{_NAME.value}.png")
  text = table(results, widths, _STEPS.value)
  show = lambda v: ",".join(v) if isinstance(v, list) else v
  argv = " ".join(f"--{f}={show(flags.FLAGS[f].value)}" for f in ("out", "name", "eps", "variants")
                  if flags.FLAGS[f].present)
  (out / f"{_NAME.value}.md").write_text(
      f"`python tools/coord_check.py {argv}` (widths {widths}, head size {kw['head']}, "
      f"base width {kw['base']}, depth {kw['depth']}, lr {kw['lr']}, Adam eps {kw['eps']}, batch "
      f"{kw['batch']}, {kw['steps']} steps)\n\n" + text)
  print(text)


if __name__ == "__main__":
  app.run(main)
