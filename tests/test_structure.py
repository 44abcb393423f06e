"""The package's shape, checked so that it cannot silently grow back: where the root config goes,
how long modules and functions are, and what a training run imports.

Convention: the root (training or sweep) config is always a parameter named `config`; a sub-config
is named after what it is (`data_cfg`, `eval_cfg`, `optim`, `q`, ...), never `config` or `cfg`.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dit_jax"

# The only functions that receive the root config: the entry points (a training run, a sweep),
# the one ordered config check, the factories that cut it into the parts a concept reads (the
# model's fields, the objective), and what hashes or records a whole config. Adding one is a
# decision: pass the sub-config instead.
ROOT_CONFIG_FUNCTIONS = {
    "config_check.check", "config_check.check_with_data",
    "models.model_config", "objectives.from_config",
    "training.train.setup", "training.train.train_and_evaluate",
    "training.fingerprint.fingerprint", "training.fingerprint.check_same_config",
    "sweep.runner.run", "sweep.runner.preflight", "sweep.members.member_config",
    "sweep.results.provenance",
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Model __call__s are long as the references' are (the official DiT, ADM's U-Net, diffusers' VAE).
LONG_CALLS_ALLOWED = {"models/dit.py", "models/unet.py", "models/vae.py", "models/text.py",
                      "evaluation/inception.py"}


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE)
    dotted = ".".join(rel.with_suffix("").parts)
    yield rel, dotted.removesuffix(".__init__"), ast.parse(path.read_text())


def _functions(tree):
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node


def _param_names(fn):
  a = fn.args
  return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def test_the_root_config_reaches_only_the_listed_functions():
  takes_root, named_cfg = set(), []
  for rel, dotted, tree in _modules():
    for fn in _functions(tree):
      names = _param_names(fn)
      if "config" in names:
        takes_root.add(f"{dotted}.{fn.name}")
      if "cfg" in names:
        named_cfg.append(f"{rel}:{fn.lineno} {fn.name}")
  assert not named_cfg, f"name the parameter after its sub-config, not 'cfg': {named_cfg}"
  assert takes_root == ROOT_CONFIG_FUNCTIONS, (
      f"new: {sorted(takes_root - ROOT_CONFIG_FUNCTIONS)}, "
      f"gone: {sorted(ROOT_CONFIG_FUNCTIONS - takes_root)}")
  assert len(ROOT_CONFIG_FUNCTIONS) <= 12


def test_modules_and_functions_stay_small():
  long_modules, long_functions = [], []
  for rel, _, tree in _modules():
    lines = len((PACKAGE / rel).read_text().splitlines())
    if lines > MAX_MODULE_LINES:
      long_modules.append(f"{rel} ({lines})")
    for fn in _functions(tree):
      n = fn.end_lineno - fn.lineno + 1
      if n > MAX_FUNCTION_LINES and not (fn.name == "__call__"
                                         and str(rel) in LONG_CALLS_ALLOWED):
        long_functions.append(f"{rel}:{fn.lineno} {fn.name} ({n})")
  assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
  assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


@pytest.mark.parametrize("module", ["dit_jax.main", "dit_jax.training.train"])
def test_a_training_run_does_not_import_the_analysis_stack(module):
  """The entry point and the trainer (what a sweep worker runs) do not load the fits, the report
  or the figures: those load only when a sweep writes its report. (matplotlib itself is loaded by
  TensorFlow, which clu's metric writers import, so it is not the marker here.)"""
  code = (f"import sys, {module}; "
          "bad = [m for m in sys.modules if m.startswith('dit_jax.analysis')]; "
          "print(bad); assert not bad")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=PACKAGE.parent)
  assert out.returncode == 0, out.stdout + out.stderr[-2000:]
