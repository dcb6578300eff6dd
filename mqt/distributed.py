"""Several processes, one run: `jax.distributed.initialize` from the config or environment.

One process per host (a TPU VM, a GPU node), or several on one machine. Each process
sees its local devices; after `initialize` every JAX call sees the global ones.

Where the settings come from, first match wins:
- `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`: set all three to launch processes by hand (e.g. several on one
  machine). Setting any of them starts a multi-process run; the count and the id go
  together, and what is not set JAX detects.
- `config.distributed=True` and none of them: JAX detects the cluster (Cloud TPU
  pod slices, SLURM, Open MPI, ...).
On CPUs the cross-process collectives are JAX's gloo implementation.
"""
import json
import os

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def from_environment(environ=None) -> tuple[dict, list[str]]:
  """-> (keyword arguments for jax.distributed.initialize, problems), from `ENV`."""
  environ = os.environ if environ is None else environ
  given = {k: environ[k] for k in ENV if environ.get(k, "") != ""}
  if not given:
    return {}, []
  problems = []
  pair = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  if (pair[0] in given) != (pair[1] in given):
    have, lack = (pair if pair[0] in given else pair[::-1])
    problems.append(f"{have} is set but not {lack}: set both (or neither, to let JAX "
                    f"detect the cluster)")
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in given:
    address = given["JAX_COORDINATOR_ADDRESS"]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      problems.append(f"JAX_COORDINATOR_ADDRESS={address!r} is not host:port")
    kwargs["coordinator_address"] = address
  for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if key in given:
      text = given[key]
      if not text.strip().isdigit():
        problems.append(f"{key}={text!r} is not a non-negative integer")
      else:
        kwargs[arg] = int(text)
  n, i = kwargs.get("num_processes"), kwargs.get("process_id")
  if n is not None and n < 1:
    problems.append(f"JAX_NUM_PROCESSES={n}: needs at least 1")
  elif n is not None and i is not None and i >= n:
    problems.append(f"JAX_PROCESS_ID={i} is not below JAX_NUM_PROCESSES={n} (ids count from 0)")
  return kwargs, problems


def wanted(config, environ=None) -> bool:
  """Whether this run is (or may be) one of several processes."""
  environ = os.environ if environ is None else environ
  return bool(config.get("distributed", False)) or any(environ.get(k) for k in ENV)


def problems(environ=None) -> list[str]:
  """The environment's launch settings, judged before anything starts."""
  return from_environment(environ)[1]


def initialize(config, environ=None) -> None:
  """Joins the other processes (a no-op for a single-process run); prints one line."""
  if not wanted(config, environ) or jax.distributed.is_initialized():
    return
  kwargs, found = from_environment(environ)
  if found:
    raise ValueError("; ".join(found))
  jax.distributed.initialize(**kwargs)
  print(f"process {jax.process_index()} of {jax.process_count()} "
        f"({jax.local_device_count()} local device(s) of {jax.device_count()})", flush=True)


def allgather_json(obj) -> list:
  """Every process's `obj` (JSON-serialisable), in process order; [obj] for one process.

  A collective: every process must call it at the same point."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(len(data)))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def say(line: str) -> None:
  """One line for the user: process 0 prints it, every process logs it."""
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)
