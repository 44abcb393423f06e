"""The model registry: the one place that knows the model families (DiT, the ADM U-Net).

A model name is '<family>-<size>[/<patch>]' ('DiT-XL/2', 'UNet-B'). Everything else in the framework
(the trainer, the sweep, the tools, the plots) goes through this module: build from a config, init,
parameter count, analytic and XLA Gflops, patch size, family name. Adding a family is one `Family`
row in `FAMILIES`.

Each family understands the config fields in its `fields`; a model field outside them that is not at
its neutral value (e.g. `depth=12` for a U-Net) is an error, never silently ignored.

With `text.enabled` the family's model is the backbone of a `text.TextConditioned` (a caption encoder
whose output the backbone cross-attends to); every function here takes either.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from dit_jax.models import attention, backend as backend_lib, dense_dot, dit, flops, mup, text, unet

# The config's model fields and the value that means "not set" (the named size's, or off).
MODEL_FIELDS = {"depth": 0, "hidden_size": 0, "num_heads": 0, "conditioning": "adaln_zero",
                "attention_impl": "auto", "scan_layers": False, "remat": False,
                "parameterization": "sp"}
# Values of a field a family without it accepts as unset ('' was attention_impl's before 'auto').
NEUTRAL_ALIASES = {"attention_impl": ("", "auto")}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = tuple(i for i in attention.IMPLEMENTATIONS if i is not None)


def dtype_of(name: str):
  """'float32' / 'bfloat16' / 'float16' -> jnp dtype, with a clear error."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; use one of {list(DTYPES)}")
  return DTYPES[name]


# The root config's fields that describe the model (the text block comes with them).
MODEL_CONFIG_FIELDS = ("model", "class_conditional", "class_dropout_prob", "learn_sigma", "dtype",
                       "param_dtype") + tuple(MODEL_FIELDS)


def model_config(config):
  """The model's sub-config: the root config's model fields (MODEL_CONFIG_FIELDS) and its `text`
  block. The training config keeps these at its top level (its fingerprints and command lines
  name them there); this is the one place that gathers them, and every function below reads it."""
  fields = {k: config[k] for k in MODEL_CONFIG_FIELDS if k != "parameterization"}
  # Configs saved before μP existed have neither field: they are SP.
  fields["parameterization"] = config.get("parameterization", "sp")
  fields["text"] = config.text.to_dict() if "text" in config else dict(enabled=False)
  fields["mup"] = config.mup.to_dict() if "mup" in config else dict(base_width=0)
  # The root's own class (an ml_collections.ConfigDict), so this module needs no ml_collections:
  # the GPU benchmark imports the registry on a machine without it.
  return type(config)(fields)


def _common_fields(model_cfg, num_classes: int) -> dict:
  return dict(num_classes=num_classes if model_cfg.class_conditional else 0,
              class_dropout_prob=model_cfg.class_dropout_prob, learn_sigma=model_cfg.learn_sigma,
              dtype=dtype_of(model_cfg.dtype), param_dtype=dtype_of(model_cfg.param_dtype))


def _dit_config_fields(model_cfg) -> dict:
  # Width/depth/heads overrides (0 = the named size's) give the off-table shapes of sweeps.
  fields = {k: model_cfg[k] for k in ("depth", "hidden_size", "num_heads") if model_cfg[k]}
  mup_base = model_cfg.mup.base_width if model_cfg.parameterization == "mup" else 0
  return dict(fields, conditioning=model_cfg.conditioning, scan_layers=model_cfg.scan_layers,
              attention_impl=model_cfg.attention_impl or None, remat=model_cfg.remat,
              mup_base_width=mup_base)


def _build_dit(size: str, patch: int, **fields) -> dit.DiT:
  row = dit.SIZES[size]
  shape = dict(depth=row.depth, hidden_size=row.hidden_size, num_heads=row.num_heads)
  return dit.DiT(patch_size=patch, **{**shape, **fields})


def _build_unet(size: str, patch: int, **fields) -> unet.UNet:
  del patch
  row = unet.SIZES[size]
  shape = dict(model_channels=row.model_channels, channel_mult=row.channel_mult,
               num_res_blocks=row.num_res_blocks, attention_resolutions=row.attention_resolutions,
               num_head_channels=row.num_head_channels, num_groups=row.num_groups)
  return unet.UNet(**{**shape, **fields})


def _dit_context_check(model_cfg) -> None:
  if model_cfg.conditioning != "cross_attn":
    raise ValueError(f"text.enabled: a DiT reads captions only through cross-attention; set "
                     f"conditioning='cross_attn' (got {model_cfg.conditioning!r})")


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: how its names read, how it is built, initialised and counted."""
  name: str
  module: type
  sizes: dict
  pattern: str  # full-match regex of a name; group 1 the size, group 2 (if any) the patch
  example: str
  fields: tuple  # the MODEL_FIELDS this family understands
  config_fields: Callable  # model_cfg -> the module fields those model_cfg fields set
  build: Callable  # (size, patch, **module fields) -> module
  init: Callable  # (module, rng) -> boxed params
  macs: Callable  # (module, context_length) -> int
  example_inputs: Callable  # (module, batch, context_length) -> (args, kwargs)
  context_check: Callable  # model_cfg -> None; raises if this model cannot read a context


FAMILIES = {
    "DiT": Family("DiT", dit.DiT, dit.SIZES, r"DiT-(\w+)/(\d+)", "DiT-XL/2", tuple(MODEL_FIELDS),
                  _dit_config_fields, _build_dit, dit.init_params, dit.macs, dit.example_inputs,
                  _dit_context_check),
    "UNet": Family("UNet", unet.UNet, unet.SIZES, r"UNet-(\w+)", "UNet-B", (), lambda c: {},
                   _build_unet, unet.init_params, unet.macs, unet.example_inputs,
                   lambda c: None),  # every attention block cross-attends when context_dim > 0
}


def parse(name: str) -> tuple[Family, str, int]:
  """'DiT-XL/2' -> (DiT family, 'XL', 2); 'UNet-B' -> (U-Net family, 'B', 1: no patching)."""
  for family in FAMILIES.values():
    m = re.fullmatch(family.pattern, str(name))
    if m and m.group(1) in family.sizes:
      return family, m.group(1), int(m.group(2)) if m.lastindex == 2 else 1
  known = "; ".join(f"'{f.pattern.split('(')[0]}<size>{'/<patch>' if '/' in f.pattern else ''}' "
                    f"with size in {list(f.sizes)}" for f in FAMILIES.values())
  raise ValueError(f"unknown model {name!r}: expected {known} (e.g. "
                   f"{', '.join(f.example for f in FAMILIES.values())})")


def family_name(name: str) -> str:
  return parse(name)[0].name


def names(family: str, sizes, patches=(None,)) -> list[str]:
  """The names of a family's grid, e.g. names('DiT', ('S', 'B'), (4, 2))."""
  f = FAMILIES[family]
  return [f"{f.name}-{s}" + (f"/{p}" if p is not None else "") for s in sizes for p in patches]


def paper_models() -> tuple:
  """The 12 DiTs of the paper's Table 4."""
  return tuple(names("DiT", ("S", "B", "L", "XL"), (8, 4, 2)))


def check_config(model_cfg) -> None:
  """The model fields (`model_config(config)`); needs no data or devices."""
  family, size, _ = parse(model_cfg.model)
  for field in ("depth", "hidden_size", "num_heads"):
    if model_cfg[field] < 0:
      raise ValueError(f"{field}={model_cfg[field]}: must be >= 0 (0 = the named size's)")
  if model_cfg.conditioning not in dit.CONDITIONINGS:
    raise ValueError(f"unknown conditioning {model_cfg.conditioning!r}; choose from "
                     f"{dit.CONDITIONINGS}")
  if model_cfg.attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {model_cfg.attention_impl!r}: use 'auto' (by backend), "
                     f"'' (dit_jax.models.attention, its own backward), or "
                     f"jax.nn.dot_product_attention's 'xla' or 'cudnn'")
  for field in ("dtype", "param_dtype"):
    dtype_of(model_cfg[field])
  for field, neutral in MODEL_FIELDS.items():
    if (field not in family.fields and model_cfg[field] != neutral
        and model_cfg[field] not in NEUTRAL_ALIASES.get(field, ())):
      raise ValueError(f"{model_cfg.model}: the {family.name} family does not use {field} (set to "
                       f"{model_cfg[field]!r}); leave it at {neutral!r}")
  if text.enabled(model_cfg.text):
    family.context_check(model_cfg)
  _check_mup(model_cfg, family, size)


def _check_mup(model_cfg, family: Family, size: str) -> None:
  """parameterization and mup.base_width (a U-Net is refused above: it leaves
  parameterization at 'sp')."""
  if model_cfg.parameterization not in mup.PARAMETERIZATIONS:
    raise ValueError(f"unknown parameterization {model_cfg.parameterization!r}; choose from "
                     f"{mup.PARAMETERIZATIONS}")
  if model_cfg.parameterization != "mup":
    return
  if text.enabled(model_cfg.text):
    raise ValueError("parameterization='mup' with text.enabled: the caption encoder's width is "
                     "not the backbone's, so μP does not cover it; use parameterization='sp'")
  row = family.sizes[size]
  d = model_cfg.hidden_size or row.hidden_size
  mup.check("mup", model_cfg.mup.base_width, d, model_cfg.num_heads or row.num_heads)


def build(name: str, *, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
          backend: backend_lib.Backend | None = None, **fields) -> nn.Module:
  """A named model, e.g. build('DiT-XL/2') is the paper's model on 32x32x4 latents; `fields`
  override the module's fields (conditioning=, learn_sigma=, model_channels=, ...). Validated.
  attention_impl='auto' is resolved for `backend` (default: jax's, backend.current())."""
  family, size, patch = parse(name)
  model = family.build(size, patch, input_size=input_size, in_channels=in_channels,
                       num_classes=num_classes, **fields)
  model.validate()
  return resolve_attention(model, backend)


def resolve_attention(model: nn.Module, backend: backend_lib.Backend | None = None) -> nn.Module:
  """The model with attention_impl='auto' replaced by attention.choose's pick (logged)."""
  if getattr(model, "attention_impl", None) != "auto":
    return model
  backend = backend or backend_lib.current()
  impl, why = attention.choose("auto", backend, model.dtype, model.hidden_size // model.num_heads,
                               masked=bool(model.context_dim))
  logging.info("%s: attention_impl='auto' -> %r (%s)", name_of(model), impl, why)
  return dataclasses.replace(model, attention_impl=impl or None)


def implementations(model: nn.Module) -> dict:
  """What the model computes with on this backend: its attention ('own' = dit_jax's) and the dense
  layers' backward ('custom' = dense_dot's, 'jax' = JAX's transpose rule)."""
  backbone = model.model if isinstance(model, text.TextConditioned) else model
  impl = getattr(backbone, "attention_impl", None) or "own"
  dense = "custom" if dense_dot.custom_backward_on(jax.default_backend()) else "jax"
  return dict(attention_impl=impl, dense_backward=dense)


def create(model_cfg, image_shape, num_classes: int, tokenizer: text.Tokenizer | None = None,
           backend: backend_lib.Backend | None = None) -> nn.Module:
  """The model `model_cfg.model` names (model_cfg: `model_config(config)`), sized to the data
  (image_shape = (H, W, C)), validated.

  With text.enabled: a text.TextConditioned whose encoder has the tokenizer's vocabulary and caption
  length (the caption source's, or a workdir's tokenizer.json) around the backbone built with
  num_classes=0 and context_dim=text.width. attention_impl='auto' is resolved for `backend`
  (default: this process's, backend.current()).
  """
  check_config(model_cfg)
  h, w, c = image_shape
  if h != w:
    raise ValueError(f"{model_cfg.model} needs square inputs, the data gives {h}x{w}")
  family = parse(model_cfg.model)[0]
  if not text.enabled(model_cfg.text):
    return build(model_cfg.model, input_size=h, in_channels=c, backend=backend,
                 **_common_fields(model_cfg, num_classes), **family.config_fields(model_cfg))
  if tokenizer is None:
    raise ValueError("text.enabled: the caption encoder's vocabulary comes from the run's "
                     "tokenizer (captions.training_source, or the workdir's tokenizer.json)")
  t = model_cfg.text
  backbone = build(model_cfg.model, input_size=h, in_channels=c, context_dim=t.width,
                   backend=backend,
                   **_common_fields(model_cfg, 0), **family.config_fields(model_cfg))
  encoder = text.TextEncoder(tokenizer.vocab_size, tokenizer.max_length, width=t.width,
                             depth=t.depth, num_heads=t.num_heads, dtype=dtype_of(model_cfg.dtype),
                             param_dtype=dtype_of(model_cfg.param_dtype))
  model = text.TextConditioned(encoder, backbone, caption_dropout_prob=t.caption_dropout_prob)
  model.validate()
  return model


def name_of(model: nn.Module) -> str:
  """The registered name of a built module whose shape is a table row, else a description."""
  family = family_of(model)
  if family.name == "DiT":
    for size, s in family.sizes.items():
      if (s.depth, s.hidden_size, s.num_heads) == (model.depth, model.hidden_size, model.num_heads):
        return names("DiT", (size,), (model.patch_size,))[0]
    return f"DiT(depth={model.depth}, hidden={model.hidden_size})/{model.patch_size}"
  return f"{family.name}(model_channels={model.model_channels})"


def family_of(model: nn.Module) -> Family:
  """The family of a built module (a text model's: its backbone's)."""
  if isinstance(model, text.TextConditioned):
    model = model.model
  for family in FAMILIES.values():
    if isinstance(model, family.module):
      return family
  raise TypeError(f"{type(model).__name__} is not a registered model family")


def null_label(model: nn.Module):
  """What the model's labels are guided against: the empty caption's token ids (text models), the
  null class num_classes (class-conditional), or None (unconditional: it reads no labels)."""
  if isinstance(model, text.TextConditioned):
    return text.null_ids(model.encoder.max_length)
  return model.num_classes if model.num_classes else None


def reads_labels(model: nn.Module) -> bool:
  """Whether the model's third input is the batch's labels (class labels or caption ids)."""
  return null_label(model) is not None


def init_params(model: nn.Module, rng) -> Any:
  """Initialised (boxed, logically partitioned) params; a μP model's rescaled (models/mup.py)
  against the SP draw of its base-width model with the same key."""
  if isinstance(model, text.TextConditioned):
    return text.init_text_params(model, rng)
  params = family_of(model).init(model, rng)
  if getattr(model, "mup_base_width", 0):
    base = family_of(model).init(mup_base_model(model), rng)
    params = mup.reinit(params, base, mup.width_mult(model.hidden_size, model.mup_base_width))
  return params


def mup_base_model(model: nn.Module) -> nn.Module:
  """The μP model's base: the same DiT at mup_base_width, with heads at the same head size."""
  heads = model.mup_base_width // mup.head_size(model.hidden_size, model.num_heads)
  return model.clone(parent=None, hidden_size=model.mup_base_width, num_heads=heads)


def lr_scales(model: nn.Module) -> dict | None:
  """{param path: factor on its Adam step} of a μP model (models/mup.py); None under SP."""
  if not getattr(model, "mup_base_width", 0):
    return None
  return mup.lr_scales(jax.eval_shape(lambda: init_params(model, jax.random.key(0))),
                       mup.width_mult(model.hidden_size, model.mup_base_width))


def abstract_params(model: nn.Module) -> Any:
  """Shapes of the params, without allocating them (traced with dit_jax's attention, which has the
  same params, so a model built for cuDNN counts on a machine without it)."""
  if getattr(model, "attention_impl", None) == "cudnn":
    model = dataclasses.replace(model, attention_impl=None)
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def gflops(model: nn.Module, context_length: int = 0) -> float:
  """Analytic forward Gflops of one image in the paper's convention (1e9 multiply-accumulates).

  A text model counts its backbone with a context of text.max_length tokens (padding included:
  attention computes them) plus the caption encoder (text.encoder_macs), which trains with it;
  `context_length` is then ignored.
  """
  if isinstance(model, text.TextConditioned):
    backbone = family_of(model).macs(model.model, model.encoder.max_length)
    return (backbone + text.encoder_macs(model.encoder)) / 1e9
  return family_of(model).macs(model, context_length) / 1e9


def xla_gflops(model: nn.Module, context_length: int = 0) -> float:
  """XLA's forward Gflops (FLOPs / 2) of one image (a text model: with its caption encoder)."""
  if isinstance(model, text.TextConditioned):
    args, kwargs = text.example_inputs(model, 1), {}
  else:
    args, kwargs = family_of(model).example_inputs(model, 1, context_length)
  init = lambda: model.init({"params": jax.random.key(0)}, *args, **kwargs)["params"]
  return flops.xla_gflops(model, init, args, kwargs)


def describe(model: nn.Module, name: str) -> dict:
  """The row fields a results table needs: family, size, patch, params, gflops, xla_gflops, and
  the implementations it computes with here (attention_impl, dense_backward)."""
  family, size, patch = parse(name)
  return dict(family=family.name, size=size, patch=patch,
              params=flops.count_params(abstract_params(model)), gflops=gflops(model),
              xla_gflops=xla_gflops(model), **implementations(model))
