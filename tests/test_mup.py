"""μP (models/mup.py): SP at the base width, the hand-computed init and Adam lr of each role at
width m, the MuReadout equivalence, the fingerprint, bad input, and a coordinate check."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dit_jax import config_check
from dit_jax import models
from dit_jax.models import dit
from dit_jax.models import mup
from dit_jax.sweep import members
from dit_jax.training import fingerprint
from dit_jax.training import train_step

from tests.helpers import load_tool, tiny_config, tiny_optim


def _model(width, base=0, **kw):
  args = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=width, depth=1,
              num_heads=width // 32, num_classes=10, mup_base_width=base)
  args.update(kw)
  return dit.DiT(**args)


def _inputs(b=4, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.uniform(-1, 1, (b, 8, 8, 1)), jnp.float32),
          jnp.asarray(rng.integers(0, 1000, b)), jnp.asarray(rng.integers(0, 10, b)))


def _first_update(model, optim, wake=False):
  """The first optimizer update of `model`'s params (unboxed) on a fixed loss, and the params.
  wake: the zero-initialised kernels (final linear, adaLN-Zero) are drawn from normal(0.02) first,
  so that every parameter gets a gradient."""
  params = nn_unbox(models.init_params(model, jax.random.key(0)))
  if wake:
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    params = jax.tree_util.tree_unflatten(tree, [
        0.02 * jax.random.normal(jax.random.key(i), v.shape)
        if str(p[-1].key) == "kernel" and not np.any(v) else v for i, (p, v) in enumerate(leaves)])
  x, t, y = _inputs()
  grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, y) ** 2 +
                                      model.apply({"params": p}, x, t, y)))(params)
  tx = train_step.create_optimizer(optim, models.lr_scales(model))
  updates, _ = tx.update(grads, tx.init(params), params)
  return params, updates


def nn_unbox(tree):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return nn.unbox(tree)


@pytest.mark.parametrize("conditioning", ["adaln_zero", "in_context"])
def test_mup_at_the_base_width_is_sp(conditioning):
  """Same params, same outputs and the same first AdamW update (weight decay, clipping, warm-up
  on) bit for bit: every multiplier is 1 at the base width."""
  optim = tiny_optim(weight_decay=0.1, grad_clip=0.5, warmup_steps=2)
  sp = _model(64, conditioning=conditioning)
  mp = _model(64, base=64, conditioning=conditioning)
  assert models.lr_scales(sp) is None and set(models.lr_scales(mp).values()) == {1.0}
  p_sp, u_sp = _first_update(sp, optim)
  p_mp, u_mp = _first_update(mp, optim)
  jax.tree.map(np.testing.assert_array_equal, p_sp, p_mp)
  jax.tree.map(np.testing.assert_array_equal, u_sp, u_mp)
  np.testing.assert_array_equal(sp.apply({"params": p_sp}, *_inputs()),
                                mp.apply({"params": p_mp}, *_inputs()))


def test_roles_come_from_axis_names():
  """A module gets its rule from the axes it declares (no table of paths)."""
  assert mup.role(("x", "kernel"), ("embed", "mlp")) == "hidden"
  assert mup.role(("x", "kernel"), ("layers", "heads", "kv", "embed")) == "hidden"
  assert mup.role(("x", "kernel"), ("patch", "embed")) == "input"
  assert mup.role(("x", "embedding"), ("vocab", "embed")) == "input"
  assert mup.role(("x", "kernel"), ("embed", None)) == "output"
  assert mup.role(("x", "bias"), ("mlp",)) == "vector"
  assert mup.role(("x", "bias"), (None,)) == "fixed"
  with pytest.raises(ValueError, match="more than two"):
    mup.role(("x", "kernel"), ("embed", "mlp", "heads"))
  with pytest.raises(ValueError, match="declares no logical axis names"):
    mup.roles({"w": {"kernel": jnp.zeros((2, 2))}})


def test_init_std_and_adam_lr_at_width_4x_are_the_hand_computed_ones():
  """Width 256 on base 64 (m = 4), head size 32. Init: the SP std at the base width times 1 (input),
  1/sqrt(m) (hidden), zero stays zero; Adam's first step moves each entry by at most lr x the lr
  factor (1 input/bias, 1/m hidden and output), reached where |grad| >> eps."""
  m, lr = 4.0, 1e-3
  params, updates = _first_update(_model(256, base=64), tiny_optim(lr=lr))
  _, updates = _first_update(_model(256, base=64), tiny_optim(lr=lr), wake=True)
  base = nn_unbox(models.init_params(_model(64), jax.random.key(0)))  # the base's SP draw
  patch = 2 * 2 * 1
  # (path, hand-computed SP std at the base width: xavier-uniform sqrt(2 / (fan_in + fan_out)) on
  # the flattened fans, or DiT's normal(0.02); the role's factor)
  for path, sp_std, factor in [
      (("x_embedder", "kernel"), np.sqrt(2 / (patch + 64)), 1.0),
      (("blocks_0", "attn", "qkv", "kernel"), np.sqrt(2 / (64 + 192)), m ** -0.5),
      (("blocks_0", "attn", "proj", "kernel"), np.sqrt(2 / (64 + 64)), m ** -0.5),
      (("blocks_0", "mlp", "fc1", "kernel"), np.sqrt(2 / (64 + 256)), m ** -0.5),
      (("t_embedder", "mlp_2", "kernel"), 0.02, m ** -0.5),
      (("t_embedder", "mlp_0", "kernel"), 0.02, 1.0),
      (("y_embedder", "embedding_table", "embedding"), 0.02, 1.0)]:
    got, drawn = np.std(_get(params, path)), np.std(_get(base, path))
    assert got == pytest.approx(drawn * factor, rel=1e-5), path  # the rule, on the base's draw
    n = _get(base, path).size  # ... whose std is the analytic one within 4 standard errors
    assert got == pytest.approx(sp_std * factor, rel=4 / np.sqrt(2 * n)), path
  for path in (("final_layer", "linear", "kernel"), ("blocks_0", "adaLN_modulation", "kernel")):
    assert np.std(_get(params, path)) == 0.0  # zero stays zero: adaLN-Zero kept
  step = lambda *path: float(np.max(np.abs(_get(updates, path)))) / lr
  assert step("x_embedder", "kernel") == pytest.approx(1.0, rel=1e-3)
  assert step("x_embedder", "bias") == pytest.approx(1.0, rel=1e-3)
  assert step("blocks_0", "attn", "qkv", "kernel") == pytest.approx(1 / m, rel=1e-3)
  assert step("blocks_0", "mlp", "fc2", "kernel") == pytest.approx(1 / m, rel=1e-3)
  assert step("blocks_0", "adaLN_modulation", "kernel") == pytest.approx(1 / m, rel=1e-3)
  assert step("t_embedder", "mlp_2", "kernel") == pytest.approx(1 / m, rel=1e-3)
  assert step("final_layer", "linear", "kernel") == pytest.approx(1 / m, rel=1e-3)
  assert step("final_layer", "linear", "bias") == pytest.approx(1.0, rel=1e-3)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)


def test_output_rule_is_mureadout():
  """microsoft/mup's MuReadout (y = x W / m, Adam lr) and models/mup.py's (y = x W', Adam lr / m),
  both from zero: the same outputs after several steps (up to Adam's eps, set negligible here)."""
  m, lr = 4.0, 1e-2
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 32)).astype(np.float32)
  target = rng.normal(size=(16, 3)).astype(np.float32)
  def train(forward, scale):
    w, tx = jnp.zeros((32, 3)), optax.adam(lr * scale, eps=1e-20)
    state = tx.init(w)
    for _ in range(5):
      g = jax.grad(lambda w: jnp.mean((forward(w) - target) ** 2))(w)
      u, state = tx.update(g, state)
      w = w + u
    return forward(w)
  np.testing.assert_allclose(train(lambda w: x @ w / m, 1.0), train(lambda w: x @ w, 1 / m),
                             rtol=1e-4, atol=1e-6)


def _mup_config(**kw):
  config = tiny_config()
  config.parameterization, config.mup.base_width = "mup", 32
  config.update(kw)
  return config


def test_fingerprint_holds_the_parameterization(tmp_path):
  sp, mp = tiny_config(), _mup_config()
  assert fingerprint.fingerprint(sp) != fingerprint.fingerprint(mp)
  assert fingerprint.fingerprint(mp) != fingerprint.fingerprint(_mup_config(mup={"base_width": 64}))
  old = ml_collections.ConfigDict(sp.to_dict())  # a config saved before μP existed
  del old["parameterization"], old["mup"]
  assert fingerprint.fingerprint(old) == fingerprint.fingerprint(sp)
  fingerprint.check_same_config(tmp_path / "config.json", sp)
  with pytest.raises(ValueError, match="parameterization"):
    fingerprint.check_same_config(tmp_path / "config.json", mp)


@pytest.mark.parametrize("change,message", [
    (dict(parameterization="mu"), "unknown parameterization 'mu'"),
    (dict(mup={"base_width": 48}), r"mup.base_width=48: .* head size 32"),
    (dict(mup={"base_width": 0}), r"mup.base_width=0"),
    (dict(model="UNet-Pico", depth=0, hidden_size=0, num_heads=0),
     "the UNet family does not use parameterization"),
])
def test_bad_mup_input_is_one_line_before_compiling(change, message):
  with pytest.raises(ValueError, match=message) as e:
    config_check.check(_mup_config(**change))
  assert "\n" not in str(e.value)


def test_mup_refuses_text_conditioning():
  cfg = models.model_config(_mup_config(conditioning="cross_attn"))
  cfg.text.enabled = True
  with pytest.raises(ValueError, match="parameterization='mup' with text.enabled"):
    models.check_config(cfg)


def test_sweep_crosses_parameterizations_and_lrs():
  s = ml_collections.ConfigDict(dict(sizes=("Mu1",), patches=(4,), extra_models=(), seeds=(0,),
                                     objectives=("ddpm",), budgets=(), workers=0,
                                     parameterizations=("sp", "mup"), lrs=(1e-3, 2e-3)))
  plan = members.plan(s, 10, 4, {"DiT-Mu1/4": 1.0})
  assert [m.run for m in plan] == ["DiT-Mu1/4-sp-lr0.001-s0", "DiT-Mu1/4-sp-lr0.002-s0",
                                   "DiT-Mu1/4-mup-lr0.001-s0", "DiT-Mu1/4-mup-lr0.002-s0"]
  cfg = members.member_config(ml_collections.ConfigDict(dict(_mup_config().to_dict(), sweep=s)),
                              plan[1])
  assert (cfg.parameterization, cfg.optim.lr) == ("sp", 2e-3)
  bad = ml_collections.ConfigDict(dict(s.to_dict(), parameterizations=("np",)))
  with pytest.raises(ValueError, match="sweep.parameterizations"):
    members.check_config(bad, tiny_config(eval=dict(val=dict(every_steps=1))).eval)


def test_coordinate_check_slopes():
  """Widths 64 and 256 (heads of 64), 3 AdamW steps at lr 1e-3 (adaLN-Zero's gates are zero at
  step 0, so the attention and MLP weights first move at step 2: 3 steps give them two updates):
  the log-log slope of each layer type's RMS change from initialisation against width.

  Theory (Tensor Programs V): under SP an Adam step moves every weight by ~lr whatever the width
  and a layer sums n such coherent moves, so the output layer's change grows ~ width^1 and the
  attention logits' at least as fast; under μP every change is width-independent (slope 0).
  Thresholds halfway, with margin: SP > +0.5 for the output and attention logits; μP |slope| < 0.3
  for the output, and no type's change grows faster than width^0.3. (With adaLN-Zero the
  attention's changes shrink with width over the first steps, experiments/mup/README.md, so for
  the other types only the upper bound is asserted.)"""
  tool = load_tool("coord_check")
  widths = [64, 256]
  results = tool.ladder(widths, ("sp", "mup"), head=64, base=64, depth=1, steps=3, lr=1e-3,
                        batch=4)
  slopes = tool.slopes(results, widths, step=3)
  for t in ("output (final linear)", "attn_logits"):
    assert slopes["sp"][t] > 0.5, (t, slopes["sp"])
  assert abs(slopes["mup"]["output (final linear)"]) < 0.3, slopes["mup"]
  assert max(slopes["mup"].values()) < 0.3, slopes["mup"]


def test_a_mup_run_trains_checkpoints_and_loads(tmp_path):
  """The trainer's μP path: width 64 on base 32 (m = 2); the checkpointed state (with μP's
  optimizer state) restores through train.load_trained, and its EMA params are the trained ones."""
  from dit_jax.training import train  # pylint: disable=import-outside-toplevel
  config = _mup_config(num_train_steps=2, checkpoint_every_steps=2)
  state = train.train_and_evaluate(config, tmp_path)
  trained = train.load_trained(tmp_path)
  assert trained.model.mup_base_width == 32 and trained.step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trained.params),
               jax.device_get(state.ema_params))


def test_mup_init_and_step_are_the_same_sharded():
  """μP's init (rescaled inside the sharded init's jit) and its lr factors give the same state on
  a (2 data, 2 fsdp, 2 tensor) mesh as on one device."""
  from dit_jax import sharding  # pylint: disable=import-outside-toplevel
  from dit_jax.objectives import diffusion as diffusion_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import tiny_batch, tiny_model  # pylint: disable=import-outside-toplevel
  model = tiny_model(mup_base_width=32, num_heads=2)  # width 64, head size 32: m = 2
  tx = train_step.create_optimizer(tiny_optim(), models.lr_scales(model))
  out = []
  for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((2, 2, 2), None)):
    mesh = sharding.create_mesh(shape, devices)
    state, shardings = train_step.create_train_state(model, tx, mesh, seed=0)
    step = train_step.jit_train_step(model, diffusion_lib.create(), tx, mesh, shardings, 0.9)
    state, _ = step(state, jax.device_put(tiny_batch(), train_step.batch_shardings(mesh)))
    out.append(jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *out)
