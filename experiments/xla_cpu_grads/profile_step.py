"""Where a train step's time goes on XLA:CPU: a profiler trace of the trainer's step, summed by op.

  python experiments/xla_cpu_grads/profile_step.py --model=DiT-S/2 --batch=8   # 32x32x4 latents
  python experiments/xla_cpu_grads/profile_step.py --model=DiT-S/2 --depth=1    # one block

Sets XLA's CPU TraceMe flag, jits the real `train_step.train_step` as tools/bench_train.py does
(dit_jax.benchmarking.trainer_step; --depth=1 keeps the embedders and the final layer), traces
`--steps` steps with `jax.profiler` (a Perfetto JSON trace) and prints one table: each operation's
source op name (blocks folded together, forward F / backward T), its kernel kind, milliseconds per
step and, for matrix multiplies, the achieved GFLOP/s (from the optimised HLO's dot shapes).
"""
import collections
import gzip
import json
import os
import pathlib
import re
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
                           " --xla_dump_hlo_as_text --xla_dump_to=" + tempfile.mkdtemp()).strip()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dit_jax import benchmarking  # noqa: E402
from dit_jax import models  # noqa: E402
from dit_jax import sharding as sharding_lib  # noqa: E402
from dit_jax.training import train_step  # noqa: E402

FLAGS = flags.FLAGS
benchmarking.define_shape_flags()
flags.DEFINE_integer("depth", 0, "Blocks (0: the size's own depth).")
flags.DEFINE_integer("steps", 3, "Traced steps.")
flags.DEFINE_integer("top", 25, "Table rows.")


def hlo_ops(dump_dir: str) -> dict:
  """{instruction: (op_name metadata, FLOPs of the dots it runs)} from the optimised step's HLO."""
  path = max(pathlib.Path(dump_dir).glob("*train_step*after_optimizations.txt"),
             key=lambda p: p.stat().st_size)
  lines = path.read_text().splitlines()
  shapes = {}  # instruction names are unique in the module
  for line in lines:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]", line)
    if m:
      shapes[m.group(1)] = [int(v) for v in m.group(2).split(",") if v]
  dot_flops, comp_flops, comp, comp_op = {}, collections.Counter(), None, {}
  for line in lines:
    head = re.match(r"^(?:ENTRY )?%(\S+) \(.*\{$", line)
    if head:
      comp = head.group(1)
    root = re.match(r"\s*ROOT .*op_name=\"([^\"]+)\"", line)
    if root:
      comp_op[comp] = root.group(1)
    m = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]\S* dot\(%(\S+), %\S+\),.*?"
                 r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if m:
      lhs = shapes.get(m.group(3), [])
      k = int(np.prod([lhs[int(i)] for i in m.group(4).split(",") if i])) if lhs else 0
      f = 2 * k * int(np.prod([int(v) for v in m.group(2).split(",") if v]))
      dot_flops[m.group(1)] = f
      comp_flops[comp] += f
  ops = {}
  for line in lines:
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (.*)$", line)
    if not m:
      continue
    meta = re.search(r'op_name="([^"]+)"', m.group(2))
    call = re.search(r"calls=%([\w.\-]+)", m.group(2))
    f = comp_flops.get(call.group(1), 0) if call else dot_flops.get(m.group(1), 0)
    op_name = meta.group(1) if meta else comp_op.get(call.group(1), "") if call else ""
    ops[m.group(1)] = (op_name, f)
  return ops


def _short(op_name: str) -> str:
  """An op's source name with the jit prefix dropped, blocks folded, forward F / backward T."""
  op_name = re.sub(r"blocks_\d+", "blocks_*", re.sub(r"^jit\([^)]*\)/", "", op_name))
  return op_name.replace("transpose(jvp(", "T(").replace("jvp(", "F(")


def _kernel_kind(name: str) -> str:
  """A kernel instruction's kind: its name without the numeric suffix (ynn_fusion.12 ->
  ynn_fusion)."""
  return re.sub(r"\.\d+$", "", name)


def _print_gaps(events, ops, steps, top=8):
  """Time with no traced kernel running, and the op after each longest gap.

  Plain (non-fused) dots run asynchronously on Eigen's pool: their trace event ends at dispatch,
  so their work shows up as the gap before the op that waits for them.
  """
  spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                 if e.get("ph") == "X" and e["name"] in ops)
  covered, end, gaps = 0.0, spans[0][0], collections.Counter()
  for start, stop, name in spans:
    if start > end:
      gaps[_short(ops[name][0]) or _kernel_kind(name)] += start - end
    covered += max(0.0, stop - max(start, end))
    end = max(end, stop)
  span = spans[-1][1] - spans[0][0]
  print(f"\ntrace span {span / 1e3 / steps:.0f} ms/step, "
        f"kernels running {covered / 1e3 / steps:.0f}, "
        f"no traced kernel {(span - covered) / 1e3 / steps:.0f} (incl. between steps); longest, "
        f"by the op that follows:")
  for op_name, us in gaps.most_common(top):
    print(f"  {us / 1e3 / steps:7.1f} ms  before {op_name[:100]}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = FLAGS
  depth = dict(depth=args.depth) if args.depth else {}
  model = models.build(args.model, input_size=args.input_size, in_channels=args.in_channels,
                       num_classes=1000, scan_layers=False, remat=False, attention_impl=None,
                       dtype=jnp.float32, param_dtype=jnp.float32, **depth)
  mesh = sharding_lib.create_mesh((-1, 1, 1))
  sharding_lib.check_batch(args.batch, mesh)
  tx, step = benchmarking.trainer_step(model, mesh)
  state, _ = train_step.create_train_state(model, tx, mesh, seed=0)
  batch = jax.tree.map(jnp.asarray,
                       benchmarking.random_batch(args.batch, args.input_size, args.in_channels))
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, m = step(state, batch)
      jax.block_until_ready(m)
  events = json.load(gzip.open(next(pathlib.Path(trace_dir).rglob("*.json.gz"))))
  events = events["traceEvents"] if isinstance(events, dict) else events
  ops = hlo_ops(os.environ["XLA_FLAGS"].rsplit("--xla_dump_to=", 1)[1].split()[0])
  time_us, flop = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in ops:
      op_name, f = ops[e["name"]]
      key = (_kernel_kind(e["name"]), _short(op_name))
      time_us[key] += e["dur"] / args.steps
      flop[key] += f / args.steps
  total = sum(time_us.values())
  depth = f", {args.depth} block(s)" if args.depth else ""
  print(f"{args.model}{depth}, batch {args.batch}: {total / 1e3:.0f} ms of kernels per step "
        f"({jax.devices()[0].device_kind}, jax {jax.__version__})")
  print("| ms/step | % | kernel | op (F forward, T backward) | GFLOP/s |")
  print("|---:|---:|---|---|---:|")
  for (kind, op_name), us in time_us.most_common(args.top):
    rate = f"{flop[(kind, op_name)] / us / 1e3:.0f}" if flop[(kind, op_name)] else ""
    print(f"| {us / 1e3:.1f} | {100 * us / total:.1f} | {kind} | {op_name[:90]} | {rate} |")
  _print_gaps(events, ops, args.steps)
  dots = [(flop[k], us) for k, us in time_us.items() if flop[k]]
  if dots:
    f, us = map(sum, zip(*dots))
    print(f"\nmatrix multiplies: {us / 1e3:.0f} ms/step ({100 * us / total:.0f} %), "
          f"{f / us / 1e3:.0f} GFLOP/s on average")


if __name__ == "__main__":
  app.run(main)
