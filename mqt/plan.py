"""Each stage planned before anything is allocated: its optimizer, abstract state and
step compiled ahead of time, and the step's memory per device checked against the
device's (`--dry_run` stops after this).
"""
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
from absl import logging

from mqt import config_lib
from mqt import matryoshka
from mqt import memory as mem_lib
from mqt import optim
from mqt import paths
from mqt import sharding as shard_lib
from mqt.model import MQTLLaVA, ModelConfig
from mqt.params import abstract_sharded_params, abstract_train_state, shardings_of
from mqt.params import state_initializer
from mqt.run_inputs import stages_to_run
from mqt.train_step import make_train_step


def batch_abstract(config, data_cfg, model_cfg: ModelConfig, mesh, where: str = ""):
  """The train batch as ShapeDtypeStructs sharded over data x fsdp, from the config alone
  (the shapes `pipeline_config` gives the data pipeline): images [B, s, s, 3], input_ids,
  text_mask, labels [B, T], and the per-row flags [B]."""
  b, t = data_cfg.batch_size, config_lib.max_text_len(config, data_cfg, where)
  s = model_cfg.vision.image_size
  sharding = shard_lib.batch_sharding(mesh)
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  return {"images": sds((b, s, s, 3), jnp.float32), "input_ids": sds((b, t), jnp.int32),
          "text_mask": sds((b, t), jnp.bool_), "labels": sds((b, t), jnp.int32),
          "skipped": sds((b,), jnp.bool_), "truncated": sds((b,), jnp.bool_),
          "empty": sds((b,), jnp.bool_)}


@dataclasses.dataclass
class StagePlan:
  """One stage's optimizer, abstract sharded state and compiled step (`plan_stage`)."""
  model: MQTLLaVA
  tx: object
  labels: object
  sched: object
  sampler: matryoshka.MSampler
  make_state: object
  abstract_state: object  # ShapeDtypeStructs with shardings (`abstract_train_state`).
  compiled: object  # step(state, batch, ms) of the largest bucket, compiled ahead.
  memory: dict  # Bytes per device (`step_memory`) of that largest step.
  jit_for: object = None  # bucket -> the jitted step of that bucket (compiled on first use).
  steps: dict = dataclasses.field(default_factory=dict)

  def step_for(self, bucket: int):
    """The step of `bucket` (`matryoshka.MSampler.bucket`); the first call of a bucket
    other than the largest compiles it."""
    if bucket not in self.steps:
      self.steps[bucket] = self.jit_for(bucket)
    return self.steps[bucket]


def stage_sampler(config, n: int, model_cfg: ModelConfig) -> matryoshka.MSampler:
  """Stage n's m distribution; an m above M is a ValueError naming the config field."""
  name = f"stage{n}"
  mcfg = config[name].matryoshka
  big_m = model_cfg.query.num_queries
  try:
    buckets = matryoshka.bucket_sizes(tuple(mcfg.buckets), big_m)
  except ValueError as e:
    raise ValueError(f"--config.{name}.matryoshka.buckets={tuple(mcfg.buckets)}: {e}") from None
  try:
    return matryoshka.MSampler(mcfg.kind, big_m, seed=config.seed + 1000 * n,
                               m=mcfg.m, ms=tuple(mcfg.ms), buckets=buckets)
  except ValueError as e:
    field = {"fixed": f"m={mcfg.m}", "list": f"ms={tuple(mcfg.ms)}"}.get(mcfg.kind,
                                                                        f"kind={mcfg.kind!r}")
    raise ValueError(f"--config.{name}.matryoshka.{field}: {e}") from None


def check_eval_ms(config, model_cfg: ModelConfig) -> None:
  """Every m of config.eval.ms within 1..M, else a ValueError naming the field."""
  for m in config.eval.ms or ():
    try:
      matryoshka.validate_m(m, model_cfg.query.num_queries)
    except ValueError as e:
      raise ValueError(f"--config.eval.ms={tuple(config.eval.ms)}: {e}") from None


def plan_stage(config, n: int, model_cfg: ModelConfig, mesh) -> StagePlan:
  """Builds stage n's optimizer, abstract state and step, and compiles the step ahead
  of time for the config's batch: all a run does before it allocates, and all that
  --dry_run does. Call under `jax.set_mesh(mesh)` and the config's logical axis rules."""
  name, stage_cfg = f"stage{n}", config[f"stage{n}"]
  model = MQTLLaVA(model_cfg)
  params = abstract_sharded_params(model_cfg, mesh, config.sharding.logical_axis_rules)
  tx, labels, sched = optim.make_optimizer(params, stage_cfg.optim, int(stage_cfg.steps))
  sampler = stage_sampler(config, n, model_cfg)
  make_state = state_initializer(tx, labels)
  abstract_state = abstract_train_state(make_state, params, labels, mesh)
  batch = batch_abstract(config, stage_cfg.data, model_cfg, mesh, f"config.{name}.data")
  ms = jax.ShapeDtypeStruct((sampler.width,), jnp.int32, sharding=shard_lib.replicated(mesh))

  def jit_for(bucket: int):
    step_fn = make_train_step(model, tx, labels, stage_cfg.accum_steps, num_latents=bucket)
    return jax.jit(step_fn, donate_argnums=(0,),
                   out_shardings=(shardings_of(abstract_state), None))

  top = max(sampler.reachable_buckets())  # The largest step: the one that must fit.
  compiled = jit_for(top).lower(abstract_state, batch, ms).compile()
  return StagePlan(model, tx, labels, sched, sampler, make_state, abstract_state, compiled,
                   step_memory(compiled, abstract_state), jit_for, {top: compiled})


# Nominal memory per device of common accelerators, for runs that name no limit.
NAMED_MEMORY_GIB = (("TPU v5e", 16), ("V100 / TPU v4", 32), ("A100 40GB", 40),
                    ("A100 / H100 80GB", 80), ("H200", 141))


class StepDoesNotFitError(MemoryError):
  pass


def step_memory(compiled, abstract_state) -> dict:
  """Bytes per device of a compiled step: parameters and optimizer state (one shard of
  each leaf), and from XLA's memory analysis the temporaries and the peak (arguments +
  outputs - aliased + temporaries); those are None where the backend reports none."""
  out = {"params_bytes_per_device": mem_lib.shard_bytes(abstract_state["params"]),
         "opt_state_bytes_per_device": mem_lib.shard_bytes(abstract_state["opt_state"]),
         "temp_bytes_per_device": None, "peak_bytes_per_device": None}
  for key, value in (mem_lib.compiled_bytes(compiled) or {}).items():
    out[key.replace("_bytes", "_bytes_per_device")] = value
  return out


def memory_line(name: str, memory: dict, limit: int | None, source: str) -> str:
  """One line: the step's figures per device and whether its peak fits."""
  fmt = mem_lib.format_bytes
  peak = memory["peak_bytes_per_device"]
  line = (f"[{name}] train step per device ({jax.device_count()} "
          f"{jax.devices()[0].platform} devices): parameters "
          f"{fmt(memory['params_bytes_per_device'])}, optimizer state "
          f"{fmt(memory['opt_state_bytes_per_device'])}, temporaries "
          f"{fmt(memory['temp_bytes_per_device'])}, peak {fmt(peak)}")
  if peak is None:
    return line + " (the backend reports no memory analysis)"
  if limit is not None:
    verdict = "fits" if peak <= limit else "does NOT fit"
    return line + f"; {verdict} in {fmt(limit)} ({source})"
  fits = [f"{n} ({g} GiB): {'yes' if peak <= g * mem_lib.GIB else 'no'}"
          for n, g in NAMED_MEMORY_GIB]
  return line + "; fits " + ", ".join(fits)


def check_fits(name: str, memory: dict, limit: int | None, source: str) -> None:
  """Stops a run whose step needs more memory per device than `limit` (None: no check)."""
  fmt = mem_lib.format_bytes
  peak = memory["peak_bytes_per_device"]
  if limit is not None and peak is not None and peak > limit:
    raise StepDoesNotFitError(
        f"[{name}] the train step needs {fmt(peak)} per device (parameters "
        f"{fmt(memory['params_bytes_per_device'])}, optimizer state "
        f"{fmt(memory['opt_state_bytes_per_device'])}, temporaries "
        f"{fmt(memory['temp_bytes_per_device'])}), more than the "
        f"{fmt(limit)} of {source}; stopped before allocating any parameter. "
        f"Lower it with more devices (config.sharding.mesh), --config.{name}.accum_steps "
        f"or --config.model.llm.remat_policy=full")


def check_batch_size(field: str, batch_size: int, mesh, accum_steps: int = 1) -> None:
  """The batch (each of its `accum_steps` micro-batches) is split over the data x fsdp
  mesh axes; say so instead of a sharding error."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"--config.{field}={batch_size} does not divide over the {shards} batch "
                     f"shards of the mesh {dict(mesh.shape)}")
  if batch_size % (accum_steps * shards):
    raise ValueError(f"--config.{field}={batch_size} in {accum_steps} micro-batches "
                     f"(accum_steps) does not divide over the {shards} batch shards of the "
                     f"mesh {dict(mesh.shape)}")


def plan_stages(config, model_cfg: ModelConfig, mesh, *, dry_run: bool) -> dict:
  """Compiles every stage of `config.run_stages` before anything is allocated, printing
  each step's memory per device; a run (not a dry run) stops with StepDoesNotFitError
  at a stage whose peak exceeds the device memory (`device_memory_limit`).
  -> {n: StagePlan}."""
  limit, source = mem_lib.device_memory_limit(config)
  plans = {}
  for n in stages_to_run(config):
    name = f"stage{n}"
    t0 = time.perf_counter()
    plans[n] = plan_stage(config, n, model_cfg, mesh)
    line = memory_line(name, plans[n].memory, limit, source)
    logging.info("%s (compiled in %.0f s)", line, time.perf_counter() - t0)
    if jax.process_index() == 0:
      print(line, flush=True)
    if not dry_run:
      check_fits(name, plans[n].memory, limit, source)
  return plans


def write_dry_run(workdir: str, plans: dict) -> dict:
  """Writes workdir/dry_run.json: {"devices": N, "stages": {"stage<n>": memory}}."""
  report = {"devices": jax.device_count(),
            "stages": {f"stage{n}": plan.memory for n, plan in plans.items()}}
  if jax.process_index() == 0:
    path = paths.join(workdir, "dry_run.json")
    paths.write_text_atomic(path, json.dumps(report, indent=1))
    print(f"dry run written to {path}", flush=True)
  return report
