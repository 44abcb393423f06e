"""Device meshes, logical-axis rules and shardings of the train state and batches.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters
and optimizer state sharded over it, ZeRO-3 style) and `tensor` (Megatron-style splits of heads and
MLP width). The batch is split over ("data", "fsdp"). Parameters carry logical names (dit.py); one
rules table maps them to mesh axes, so a new layout is a config change.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or None = replicated). The large matrices are (embed, mlp) and
# (embed, heads, kv): embed goes to fsdp, the Megatron-split dimension (mlp/heads) to tensor.
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("patch", None),
    ("vocab", None),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple:
  """Replaces one -1 in `shape` so the product is num_devices; a clear error if it can't be."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh_shape {shape} must have {len(MESH_AXES)} entries, for axes {MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh_shape {shape}: at most one size may be -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh_shape {shape}: sizes must be positive (or one -1)")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh_shape {shape}: {num_devices} devices are not divisible by {known}; "
                       f"choose sizes whose product divides the device count")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh_shape {shape} has {int(np.prod(shape))} devices but jax sees "
                     f"{num_devices}; make the product equal the device count (or use -1 for one axis)")
  return shape


def create_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all), one size may be -1."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(shape, len(devices))
  # Auto axes: with Explicit axes (the default of make_mesh) with_sharding_constraint and flax's
  # logical partitioning do not apply.
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_mesh() -> Mesh:
  """A 1-D mesh over all devices, its one axis `data`: the default of the functions below."""
  return Mesh(np.array(jax.devices()), ("data",))


def _batch_axes(mesh: Optional[Mesh], axes) -> tuple:
  """(mesh, axes) with mesh None read as device_mesh() and its "data" axis; axes must exist."""
  if mesh is None:
    mesh, axes = device_mesh(), "data"
  for a in (axes,) if isinstance(axes, str) else tuple(axes):
    if a not in mesh.shape:
      raise ValueError(f"mesh has axes {tuple(mesh.shape)}, not the data axis {a!r}")
  return mesh, axes


def data_parallel_size(mesh: Optional[Mesh] = None, axes=BATCH_AXES) -> int:
  """Number of batch shards: the product of the sizes of `axes` (a name or a tuple of names);
  mesh None: the number of devices."""
  mesh, axes = _batch_axes(mesh, axes)
  return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def batch_sharding(mesh: Optional[Mesh] = None, axes=BATCH_AXES) -> NamedSharding:
  """The leading (batch) dimension split over `axes` of `mesh`, any further ones replicated, so
  one sharding fits [B], [B, L] and [B, H, W, C] arrays; mesh None: split over all devices."""
  mesh, axes = _batch_axes(mesh, axes)
  return NamedSharding(mesh, P(axes))


def leading_axis(sharding):
  """`sharding` kept only on the leading (batch) dimension: for the [B] or [B, L] companions of
  a [B, H, W, C] batch. Only a NamedSharding has dimensions to drop; others come back as given."""
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P(sharding.spec[0] if len(sharding.spec) else None))
  return sharding


def replicated(mesh: Optional[Mesh] = None) -> NamedSharding:
  """Every device of `mesh` (None: of all devices) holds the whole array."""
  return NamedSharding(device_mesh() if mesh is None else mesh, P())


def check_batch(global_batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over the data-parallel devices."""
  dp = data_parallel_size(mesh)
  if global_batch_size % dp:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the data-parallel size "
                     f"{dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
                     f"use a multiple of {dp}")


def _fit(spec: P, shape: tuple, mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (small layers are then replicated)."""
  out = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in names]))
    out.append(axes if shape[i] % size == 0 else None)
  return P(*out)


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree whose large leaves are nn.LogicallyPartitioned (e.g. from eval_shape).

  Leaves without logical names are replicated. The result has the structure of nn.unbox(tree).
  """
  specs = nn.get_partition_spec(abstract_boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, list(rules))
  unboxed = nn.unbox(abstract_boxed_tree)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit(s.spec, x.shape, mesh)),
                      shardings, unboxed,
                      is_leaf=lambda s: isinstance(s, NamedSharding))
