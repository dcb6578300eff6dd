"""Memory figures shared by every command: bytes per device of sharded trees and of
compiled programs, the memory a device or this host has, and how to print them.

Everything here reads shapes, shardings and XLA's memory analysis of a program
compiled ahead of time: nothing is allocated.
"""
import math
import os

import jax

GIB = 2**30


def format_bytes(b: float | None) -> str:
  if b is None:
    return "?"
  return f"{b / GIB:.2f} GiB" if b >= GIB / 10 else f"{b / 2**20:.1f} MiB"


def shard_bytes(abstract) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(abstract))


def compiled_bytes(compiled) -> dict | None:
  """XLA's memory analysis of a compiled program, per device: arguments, outputs,
  aliased (donated inputs reused as outputs), temporaries and the peak (arguments +
  outputs - aliased + temporaries). None where the backend reports none."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    mem = None
  if mem is None:
    return None
  out = {"argument_bytes": int(mem.argument_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes),
         "alias_bytes": int(mem.alias_size_in_bytes),
         "temp_bytes": int(mem.temp_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def host_available_bytes() -> int | None:
  """MemAvailable of this host (Linux /proc/meminfo), None where unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def process_rss_bytes() -> int:
  """This process's resident memory now (0 where unknown)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError):
    return 0


def device_memory_limit(config) -> tuple[int | None, str]:
  """-> (bytes one device may use, or None; where that figure comes from):
  config.device_memory_gib, else the device's own `bytes_limit` where it reports one."""
  gib = float(config.get("device_memory_gib", 0) or 0)
  if gib > 0:
    return int(gib * GIB), f"config.device_memory_gib={gib:g}"
  device = jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without stats)
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"the {device.device_kind}'s bytes_limit"
  return None, (f"none ({device.platform} reports no device memory; set "
                f"--config.device_memory_gib)")
