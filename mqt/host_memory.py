"""Whether imported parameters fit this host's memory, checked before anything is read.

On a CPU backend the parameters live in host memory: an import (mqt/convert.py) first
counts the bytes its tree needs from abstract shapes (and shardings: a replicated leaf
once per device) and fails with one line (`HostMemoryError`: the bytes needed, the
bytes available, the flag that lowers it) when they exceed MemAvailable.
"""
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from mqt import memory as mem_lib
from mqt.convert_rules import expected_params
from mqt.model import ModelConfig


class HostMemoryError(MemoryError):
  """The parameters would not fit this host's memory (CPU backend); nothing was read."""


HEADROOM_BYTES = 1 << 30  # The tensors in flight (one layer group), buffers, the runtime:
# 1 GiB, or an eighth of the tree when that is less (measured on the 7B in bfloat16: the
# peak resident memory of the whole import was 0.93 GiB above the tree).


def host_bytes(shape, dtype, sharding) -> int:
  """Bytes a leaf takes in host memory once placed with `sharding` on CPU devices."""
  itemsize = jnp.dtype(dtype).itemsize
  if sharding is None:
    return math.prod(shape) * itemsize
  return math.prod(sharding.shard_shape(tuple(shape))) * itemsize * len(sharding.device_set)


def _on_cpu(shardings) -> bool:
  leaves = jax.tree.leaves(shardings) if shardings is not None else []
  devices = leaves[0].device_set if leaves else {jax.devices()[0]}
  return next(iter(devices)).platform == "cpu"


def check_host_bytes(nbytes: int, dtype, largest: int = 0, what: str = "the parameters",
                     shardings=None) -> None:
  """Raises HostMemoryError when `nbytes` of parameters in `dtype` (plus headroom, plus
  `largest`: a leaf staged on the host before it is split over several devices) exceed
  MemAvailable; only where parameters live in host memory (a CPU backend)."""
  if not _on_cpu(shardings):
    return
  available = mem_lib.host_available_bytes()
  need = nbytes + min(HEADROOM_BYTES, nbytes // 8) + largest
  if available is None or need <= available:
    return
  name = jnp.dtype(dtype).name
  fix = ("--param_dtype=bfloat16 (param_dtype='bfloat16') halves it" if name == "float32"
         else "use a host with more memory, or an accelerator")
  gib = mem_lib.format_bytes
  raise HostMemoryError(
      f"{what} in {name} need {gib(need)} of host memory ({gib(nbytes)} of parameters + "
      f"{gib(need - nbytes)} headroom) but this host has {gib(available)} available "
      f"(MemAvailable); {fix}")


def component_dtype(cfg: ModelConfig, component: str):
  """The configured param_dtype of "vision", "query" or "llm"."""
  return {"vision": cfg.vision, "query": cfg.query, "llm": cfg.llm}[component].param_dtype


def params_bytes(cfg: ModelConfig, param_dtype=None, shardings=None) -> int:
  """Host bytes of the whole parameter tree in `param_dtype` (None: the config's), from
  abstract shapes (`shardings`: count replicated leaves once per device)."""
  abstract = expected_params(cfg)
  dtype_of = lambda path: param_dtype or component_dtype(cfg, path[0])
  flat = traverse_util.flatten_dict(abstract)
  flat_sh = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  return sum(host_bytes(a.shape, dtype_of(k), flat_sh.get(k)) for k, a in flat.items())


def check_host_memory(cfg: ModelConfig, param_dtype=None, shardings=None,
                      what: str = "the parameters") -> None:
  """For commands: fails (HostMemoryError, one line naming the bytes needed, the bytes
  available and the flag that lowers it) before any weight is read or allocated, when
  the whole parameter tree in `param_dtype` would not fit this host's memory. Only on a
  CPU backend, where parameters live in host memory."""
  check_host_bytes(params_bytes(cfg, param_dtype, shardings),
                   param_dtype or cfg.llm.param_dtype, what=what, shardings=shardings)


def check_plans(plans, dtype, shardings, what) -> None:
  """plans: [(import plan {path: Leaf}, shardings of that component or None)] ->
  check_host_bytes of their leaves in `dtype`."""
  total = largest = 0
  for plan, sh in plans:
    flat_sh = traverse_util.flatten_dict(sh, sep="/") if sh is not None else {}
    for path, leaf in plan.items():
      s = flat_sh.get(path)
      total += host_bytes(leaf.shape, dtype, s)
      if s is not None and len(s.device_set) > 1:
        largest = max(largest, host_bytes(leaf.shape, dtype, None))
  check_host_bytes(total, dtype, largest, what, shardings)
