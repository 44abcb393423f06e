"""Caption data for text conditioning, from the config's `text` block (configs/default.py).

With `text.enabled`, a run reads a `CaptionSource`: the class-labelled source of `data.*` whose labels
are replaced by the token ids (N, L) of their class's caption ("a handwritten digit seven"). The
tokenizer is a pure function of (config.text, source): the vocabulary of the class captions. The
trainer saves it as `tokenizer.json` in the workdir, so a trained run is sampled with the vocabulary it saw.
The model side (wrapping the backbone in `text.TextConditioned`) is `models.create`'s.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from dit_jax.data import sources
from dit_jax.models import text

TOKENIZER_FILE = "tokenizer.json"  # next to config.json in a training workdir


def check_config(t, class_conditional: bool) -> None:
  """The `text` fields `t`; needs no data or devices (the backbone's side: models.check_config)."""
  if not text.enabled(t):
    return
  if t.width < 1 or t.depth < 1 or t.num_heads < 1:
    raise ValueError(f"text.width, text.depth and text.num_heads must be >= 1, got {t.width}, "
                     f"{t.depth}, {t.num_heads}")
  if t.width % t.num_heads:
    raise ValueError(f"text.width={t.width} is not divisible by text.num_heads={t.num_heads}")
  if not 0.0 <= t.caption_dropout_prob < 1.0:
    raise ValueError(f"text.caption_dropout_prob must be in [0, 1) (dropout to the empty caption, "
                     f"for guidance), got {t.caption_dropout_prob}")
  if t.max_length < 0:
    raise ValueError(f"text.max_length must be >= 0 (0 = the longest caption), got {t.max_length}")
  if t.template and "{}" not in t.template:
    raise ValueError(f"text.template={t.template!r} needs a '{{}}' where the class name goes")
  if not class_conditional:
    raise ValueError("text.enabled conditions on captions of the class labels, class_conditional="
                     "False asks for an unconditional model: turn one of them off")


def class_names(source: sources.Source) -> tuple:
  """The words of each class: the source's own names, or text.CLASS_NAMES[dataset] when the source
  names its classes only by index ('0', '1', ...)."""
  names = tuple(source.class_names)
  if names == tuple(str(i) for i in range(source.num_classes)):
    if source.name not in text.CLASS_NAMES:
      raise ValueError(f"text.enabled needs class names, but data {source.name!r} names its "
                       f"{source.num_classes} classes only by index (known names: "
                       f"{sorted(text.CLASS_NAMES)}); use a dataset with named classes (a folder "
                       f"per class)")
    names = text.CLASS_NAMES[source.name]
  if len(names) != source.num_classes or not all(text.split_words(n) for n in names):
    raise ValueError(f"text.enabled needs a word for each of the {source.num_classes} classes of "
                     f"{source.name!r}, got {names}")
  return names


def template(text_cfg, source: sources.Source) -> str:
  """The caption template: text.template, else the dataset's from text.TEMPLATES."""
  if text_cfg.template:
    return text_cfg.template
  if source.name not in text.TEMPLATES:
    raise ValueError(f"no caption template for data {source.name!r}: set text.template, e.g. "
                     f"'a photo of a {{}}' (known: {sorted(text.TEMPLATES)})")
  return text.TEMPLATES[source.name]


@dataclasses.dataclass
class CaptionSource(sources.Source):
  """A class-labelled source whose `read` gives (x, caption token ids (n, L) int32)."""
  base: sources.Source = None
  tokenizer: text.Tokenizer = None
  captions: tuple = ()  # one per class
  caption_ids: np.ndarray = None  # (num_classes, L) int32: row c is class c's caption

  def read(self, indices, flips):
    x, labels = self.base.read(indices, flips)
    return x, self.caption_ids[labels]


def training_source(text_cfg, source: sources.Source) -> sources.Source:
  """What a run reads: `source`, or with text on (`text_cfg`: config.text) a CaptionSource over it.
  Raises ValueError on missing class names, a missing template or a text.max_length too short for
  the captions."""
  if not text.enabled(text_cfg):
    return source
  if isinstance(source, CaptionSource):
    raise ValueError("the source already has captions")
  caps = tuple(text.class_captions(class_names(source), template(text_cfg, source)))
  tok = text.Tokenizer.build(caps, text_cfg.max_length or None)
  fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(sources.Source)}
  return CaptionSource(**dict(fields, label_shape=(tok.max_length,)), base=source, tokenizer=tok,
                       captions=caps, caption_ids=tok.encode(caps))


def check_with_data(text_cfg, source: sources.Source) -> None:
  """A text run reads a CaptionSource (training_source), a class-label run does not."""
  if text.enabled(text_cfg) != isinstance(source, CaptionSource):
    raise ValueError(f"text.enabled={text.enabled(text_cfg)} but the source "
                     f"{'has' if isinstance(source, CaptionSource) else 'has no'} captions: build "
                     f"it with captions.training_source(config.text, source)")


def tokenizer_of(source: sources.Source):
  """The tokenizer of a caption source; None for class labels."""
  return source.tokenizer if isinstance(source, CaptionSource) else None


def caption_table(source: sources.Source):
  """(num_classes, L) caption ids that stand for class labels in a model trained on `source`, or
  None when the model reads the class labels themselves."""
  return source.caption_ids if isinstance(source, CaptionSource) else None


def class_source(source: sources.Source) -> sources.Source:
  """The class-labelled source (a caption source's base), e.g. to train a feature net on."""
  return source.base if isinstance(source, CaptionSource) else source


def save_tokenizer(workdir, tokenizer: text.Tokenizer) -> None:
  """Writes workdir/tokenizer.json; a different one already there is an error (a resumed run must
  keep its vocabulary)."""
  path = pathlib.Path(workdir) / TOKENIZER_FILE
  if path.exists() and text.Tokenizer.load(path) != tokenizer:
    raise ValueError(f"{path} holds a different tokenizer than this config and data give (text.* "
                     f"or data.* changed?): use a new workdir")
  tokenizer.save(path)


def load_tokenizer(workdir, text_cfg):
  """The tokenizer a text run (`text_cfg`: its config.text) saved in its workdir; None for a
  class-label run."""
  if not text.enabled(text_cfg):
    return None
  path = pathlib.Path(workdir) / TOKENIZER_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: a text-conditioned workdir keeps its tokenizer there")
  return text.Tokenizer.load(path)
