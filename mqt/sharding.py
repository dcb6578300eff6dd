"""Device mesh and shardings from the config (maxtext-style logical axes).

`config.sharding.mesh` gives the sizes of the `data`, `fsdp` and `tensor`
axes (one may be -1: all remaining devices); `logical_axis_rules` maps the
logical names that every parameter carries to mesh axes. The mesh uses Auto
axis types (recent `jax.make_mesh` defaults to Explicit, which Linen's logical
constraints do not support).
"""
import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def mesh_shape(spec, n_devices: int) -> tuple[int, ...]:
  sizes = [int(spec[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"{n_devices} devices do not divide by mesh {dict(zip(AXES, sizes))}")
    sizes[sizes.index(-1)] = n_devices // known
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"there are {n_devices}")
  return tuple(sizes)


def make_mesh(spec, devices=None) -> jax.sharding.Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(spec, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def param_shardings(abstract_boxed, mesh, rules):
  """Boxed abstract params (nn.LogicallyPartitioned leaves) -> NamedSharding tree."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def unbox_abstract(tree):
  """Strips logical-partitioning boxes without applying sharding constraints
  (which abstract values outside a trace cannot take, e.g. under `jax.set_mesh`)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)


def abstract_sharded(abstract_boxed, mesh, rules):
  """Boxed abstract params -> ShapeDtypeStructs carrying their NamedShardings: what a
  run creates, restores, imports and compiles for, with nothing allocated."""
  shardings = param_shardings(abstract_boxed, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      unbox_abstract(abstract_boxed), shardings)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict, mesh, process_local: bool = True) -> dict:
  """Host numpy batch (this process's rows) -> global sharded jax arrays."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in batch.items():
    if v.dtype == object:
      continue  # Host-only fields (sample ids).
    if process_local and jax.process_count() > 1:
      out[k] = jax.make_array_from_process_local_data(sharding, v)
    else:
      out[k] = jax.device_put(v, sharding)
  return out


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in its local batch's order
  (what `put_batch` made of them); the whole array on one process."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    shards.setdefault(start, np.asarray(shard.data))  # Replicas of a row block: once.
  return np.concatenate([shards[k] for k in sorted(shards)])
