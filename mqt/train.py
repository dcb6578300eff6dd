"""Training: the two-stage Matryoshka recipe, sharded over a mesh, resumable.

`train_and_evaluate(config, workdir)` runs the stages named in
`config.run_stages` (each `config.stage<N>` has its own data, optimizer rules
and m distribution), checkpointing each under `workdir/stage<N>`, then
evaluates teacher-forced answer accuracy per m on the held-out split.

Train state (a plain pytree): {"params", "opt_state", "step", "rng"}. The
jitted step takes the state (donated), a batch sharded over data x fsdp, and
the step's m values `ms` [K] as data, so it compiles once for every m.
Only the trainable parameters (optimizer rules) are differentiated.

Before anything is allocated, every stage's step is compiled on abstract shapes
(`plan_stage`): the state as `abstract_train_state` describes it (optimizer state
sharded leaf by leaf like its parameter), activations constrained to keep the
batch on data x fsdp, and a chunked loss. Its memory per device is printed and
checked against the device's (`--dry_run` stops there).
"""
import dataclasses
import json
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import traverse_util
from jax.experimental import multihost_utils

from mqt import checkpoint as ckpt_lib
from mqt import cli
from mqt import config_lib
from mqt import convert
from mqt import distributed
from mqt import layers
from mqt import matryoshka
from mqt import memory as mem_lib
from mqt import metrics as metrics_lib
from mqt import optim
from mqt import paths
from mqt import preemption
from mqt import sharding as shard_lib
from mqt.model import (IGNORE, MQTLLaVA, ModelConfig, abstract_params,
                       chunked_next_token_loss, dummy_inputs, next_token_loss)


class NonFiniteLossError(FloatingPointError):
  """A step gave a non-finite loss, gradient norm, parameter or optimizer state; its
  update was not adopted and nothing non-finite was saved."""


def all_finite(tree) -> jax.Array:
  """bool scalar: every floating-point value of `tree` is finite (one reduction per leaf)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.bool_(True)
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


# ---------------------------------------------------------------------------
# The step.

LOSS_CHUNK = 256  # Positions per chunk of the LM head + log-softmax in the train step.


def make_train_step(model: MQTLLaVA, tx, labels, accum_steps: int,
                    loss_chunk: int = LOSS_CHUNK, num_latents: int | None = None):
  """-> step(state, batch, ms) -> (state, metrics).

  num_latents: the step's bucket (`matryoshka.MSampler.bucket`): the query transformer
  runs that many latents and the LLM T + num_latents - 1 slots; every m in ms must be
  at most num_latents. None: all M.

  metrics: loss, grad_norm, tokens, and params_finite / opt_state_finite (bool: the new
  trainable parameters / optimizer state hold only finite values; the loop adopts
  and saves no state where either is False).

  The loss never holds float32 logits for every position (`chunked_next_token_loss`);
  micro-batch k of an accumulated step holds rows k, k + A, k + 2A, ... (A =
  accum_steps), so each device keeps its own rows of the batch."""

  def micro_loss(trainable, frozen, micro, ms):
    params = optim.combine(trainable, frozen)
    head = lambda x: model.apply({"params": params}, x, method=MQTLLaVA.head)
    total, count = 0.0, 0
    for k in range(ms.shape[0]):  # K is static: one forward per m of a `list` step.
      hidden, layout = model.apply({"params": params}, micro["images"], micro["input_ids"],
                                   micro["text_mask"], ms[k], num_latents=num_latents,
                                   return_hidden=True)
      _, aux = chunked_next_token_loss(head, hidden, layout, micro["labels"], loss_chunk)
      total, count = total + aux["loss_sum"], aux["tokens"]
    return total, count

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch, ms):
    trainable, frozen = optim.partition(state["params"], labels)
    split = lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps,
                                *x.shape[1:]).swapaxes(0, 1)
    micros = {k: split(batch[k]) for k in ("images", "input_ids", "text_mask", "labels")}

    def body(carry, micro):
      g_acc, s_acc, n_acc = carry
      micro = {k: layers.constrain(v, ("batch",) + (None,) * (v.ndim - 1))
               for k, v in micro.items()}
      (s, n), g = grad_fn(trainable, frozen, micro, ms)
      return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    if accum_steps == 1:
      (g, s, n), _ = body((zeros, 0.0, 0), jax.tree.map(lambda x: x[0], micros))
    else:
      (g, s, n), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.int32(0)), micros)
    denom = jnp.maximum(n, 1).astype(jnp.float32) * ms.shape[0]
    grads = jax.tree.map(lambda x: x / denom, g)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    new_state = {"params": optim.combine(trainable, frozen), "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": state["rng"]}
    return new_state, {"loss": s / denom, "grad_norm": optax.tree.norm(grads), "tokens": n,
                       "params_finite": all_finite(trainable),
                       "opt_state_finite": all_finite(opt_state)}

  return step


# ---------------------------------------------------------------------------
# Data.

def builtin_dir(config, workdir: str) -> str:
  return config.data.data_dir or paths.join(workdir, "data")


def builtin_dir_problem(config, workdir: str) -> str | None:
  """The built-in set (data and benchmarks) is generated and read on local disk: why
  `builtin_dir` cannot hold it (a cloud workdir without config.data.data_dir), or None."""
  where = builtin_dir(config, workdir)
  if paths.is_uri(where):
    return (f"the built-in data is prepared on local disk, not in {where}: set "
            f"--config.data.data_dir to a local folder (the workdir can stay in the cloud)")
  return None


def check_builtin_dir(config, workdir: str) -> None:
  """`builtin_dir_problem` as a ValueError, where a stage or the evaluation reads the
  built-in set."""
  blocks = [config[f"stage{n}"].data for n in stages_to_run(config)] + [config.eval.data]
  problem = builtin_dir_problem(config, workdir)
  if problem and any(b.kind == "builtin" for b in blocks):
    raise ValueError(problem)


def prepare_builtin(config, workdir: str) -> str:
  """Prepares the built-in set under `builtin_dir` unless it is there; -> its root.

  With several processes (a pod), process 0 prepares first and the others wait
  at a barrier, then find it ready (a shared disk) or prepare their own copy (a
  host-local disk; `ensure_builtin`'s file lock makes processes on one host take
  turns). The barrier is for shared network disks, where file locks may not hold."""
  from data import prepare  # pylint: disable=import-outside-toplevel
  prep = lambda: prepare.ensure_builtin(
      builtin_dir(config, workdir), seed=config.data.builtin_seed,
      image_size=config.data.builtin_image_size, sizes=dict(config.data.builtin_sizes))
  if jax.process_count() == 1:
    return prep()
  root = prep() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("mqt: built-in data prepared")
  return root or prep()


def open_source(config, data_cfg, workdir: str, on_error: str = "fail"):
  """A data block (stage or eval) -> a record source (data/sources.py).

  Its paths were validated by `check_paths` (train_and_evaluate calls it first).
  on_error: "fail" (the first unusable record of a JSON file is an error) or "skip"
  (unusable records are left out and listed in the source's `problems`)."""
  from data import sources  # pylint: disable=import-outside-toplevel
  split = data_cfg.split
  if data_cfg.kind == "builtin":
    source = sources.TfdsSource(prepare_builtin(config, workdir), split)
  elif data_cfg.kind == "tfds":
    source = sources.TfdsSource(data_cfg.dataset_dir, split)
  elif data_cfg.kind == "json":
    source = sources.LlavaJsonSource(data_cfg.json_path, data_cfg.image_folder, on_error)
  else:
    raise ValueError(f"unknown data.kind {data_cfg.kind!r} (builtin | tfds | json)")
  return sources.RoundsSource(source) if data_cfg.get("split_rounds") else source


def tokenizer_path(config, data_cfg, workdir: str) -> str:
  """The configured tokenizer (validated by `check_paths`), else the built-in set's own."""
  if data_cfg.kind == "builtin" and not config.tokenizer_path:
    from data import prepare  # pylint: disable=import-outside-toplevel
    return prepare.builtin_tokenizer_path(builtin_dir(config, workdir))
  return config.tokenizer_path


def pipeline_config(config, d, model_cfg: ModelConfig, workdir: str, *, train: bool,
                    where: str = ""):
  """A data block -> data.pipeline.PipelineConfig (eval: one ordered pass, fail on errors)."""
  from data import pipeline  # pylint: disable=import-outside-toplevel
  max_text_len = config_lib.max_text_len(config, d, where)
  tok_path = tokenizer_path(config, d, workdir)
  from data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  vocab = tokenizer_lib.Tokenizer.load(tok_path).vocab_size
  if vocab > model_cfg.llm.vocab_size:
    raise ValueError(f"tokenizer {tok_path} has {vocab} pieces but the model's vocabulary is "
                     f"{model_cfg.llm.vocab_size} (config.model.llm.vocab_size)")
  return pipeline.PipelineConfig(
      batch_size=d.batch_size, max_text_len=max_text_len,
      image_size=model_cfg.vision.image_size, template=d.template, image_mode=d.image_mode,
      tokenizer_path=tok_path, seed=config.seed, shuffle=train,
      group_by_modality=train and d.group_by_modality, num_epochs=None if train else 1,
      overlong=config.data.overlong, on_error=config.data.on_error if train else "fail",
      worker_count=config.data.worker_count if train else 0,
      process_index=jax.process_index(), process_count=jax.process_count())


# ---------------------------------------------------------------------------
# State.

def _matching(tree, pattern: str):
  """The sub-tree of leaves whose "component/.../leaf" path matches `pattern`."""
  rx = re.compile(pattern)
  flat = traverse_util.flatten_dict(tree, sep="/")
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if rx.search(k)}, sep="/")


def _random_params(seed, model_cfg, model, shardings, only: str = ""):
  """A random init, created sharded; `only` (a regex over parameter paths): just those
  leaves (the jitted init computes nothing else)."""
  images, ids, mask = dummy_inputs(model_cfg)
  def init(key):
    params = nn.unbox(model.init(key, images, ids, mask, model_cfg.query.num_queries))["params"]
    return _matching(params, only) if only else params
  out = _matching(shardings, only) if only else shardings
  return jax.jit(init, out_shardings=out)(jax.random.key(seed))


def reinit_params(params, pattern: str, fresh, name: str = "stage"):
  """`params` with every leaf whose "component/.../leaf" path matches `pattern` taken
  from `fresh` (a random init of at least those leaves); a pattern that matches
  nothing is an error."""
  hits = traverse_util.flatten_dict(_matching(params, pattern), sep="/")
  if not hits:
    raise ValueError(f"{name}.reinit={pattern!r} matches no parameter")
  logging.info("%s: %d parameter arrays start fresh (%s)", name, len(hits), pattern)
  new = traverse_util.flatten_dict(fresh, sep="/")
  return traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(params, sep="/"), **{k: new[k] for k in hits}}, sep="/")


def model_config(config) -> ModelConfig:
  """The architecture: config.model, or, with config.init.kind='hf' and its files present,
  what the HF checkpoint records (`convert.model_config_for_checkpoint`: config.json and
  tensor shapes override the config's defaults; a contradicting user setting is an
  error). Without the files (a dry run) the config's own shapes."""
  if config.init.kind == "hf" and not hf_init_problems(config):
    return convert.model_config_for_checkpoint(config)
  return ModelConfig.from_config(config.model)


def fresh_params(config, model_cfg, model, shardings, components=None):
  """Fresh parameters, created directly sharded (random or imported HF weights).

  HF weights stream from the files into their shardings in `model_cfg`'s param_dtype
  (`--param_dtype`), after a check (CPU backend) that the tree fits host memory. From
  CLIP + LLaMA (stage 1) only the query transformer is random: the jitted init
  computes no other leaf. `components` (HF weights only, e.g. ("vision", "query")): only
  those subtrees are read."""
  init = config.init
  wanted = lambda part: components is None or part in components
  if init.kind == "random":
    return _random_params(config.seed, model_cfg, model, shardings)
  if init.kind == "hf":
    if not (init.mqt_llava or (init.clip and init.llm)):
      raise ValueError("config.init.kind='hf' needs init.mqt_llava, or init.clip and init.llm")
    if wanted("llm"):  # Else the import checks the parts it reads.
      convert.check_host_memory(model_cfg, shardings=shardings,
                                what=f"the parameters of {init.mqt_llava or init.llm}")
    if init.mqt_llava:
      return convert.import_mqt_llava(init.mqt_llava, model_cfg, clip_path=init.clip or None,
                                      shardings=shardings, components=components)
    params = _random_params(config.seed, model_cfg, model, shardings, only="^query/")
    params["vision"] = convert.import_clip_vision(init.clip, model_cfg.vision,
                                                  shardings=shardings["vision"])
    if wanted("llm"):
      params["llm"] = convert.import_llama(init.llm, model_cfg.llm, shardings=shardings["llm"])
    return {k: v for k, v in params.items() if wanted(k)}
  if init.kind == "checkpoint":
    raise ValueError("config.init.kind='checkpoint' takes the parameters of the first stage's "
                     "init_from; set --config.stage<N>.init_from")
  raise ValueError(f"unknown init.kind {init.kind!r} (random | hf | checkpoint)")


# ---------------------------------------------------------------------------
# The compiled step, before any parameter exists (a run and --dry_run share it).

def state_initializer(tx, labels, seed: int):
  """-> make_state(params): a fresh train state (optimizer state from `tx.init`)."""
  def make_state(params):
    trainable, _ = optim.partition(params, labels)
    return {"params": params, "opt_state": tx.init(trainable), "step": jnp.int32(0),
            "rng": jax.random.PRNGKey(seed)}
  return make_state


def opt_state_shardings(opt_shapes, trainable, replicated):
  """Each optimizer-state leaf shaped like a trainable parameter takes that parameter's
  sharding; the rest (step counts) take `replicated`.

  opt_shapes: `jax.eval_shape(tx.init, trainable)`; trainable: the flat {path: leaf}
  dict of trainable parameters (ShapeDtypeStructs with shardings). The state nests
  that dict (adamw's mu and nu inside multi_transform), so a leaf's parameter is the
  innermost path key of its tree path."""
  def pick(path, leaf):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    param = next((trainable[n] for n in reversed(names)
                  if isinstance(n, str) and n in trainable), None)
    if param is not None and param.shape == leaf.shape:
      return param.sharding
    return replicated
  return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def abstract_train_state(make_state, params, labels, mesh):
  """The train state as ShapeDtypeStructs carrying their shardings; nothing allocated.

  params: abstract parameters with their shardings. The optimizer state is sharded
  leaf by leaf like its parameter (`opt_state_shardings`); step and rng replicated.
  The one description of the state that a stage creates, restores and compiles for."""
  shapes = jax.eval_shape(make_state, params)
  trainable, _ = optim.partition(params, labels)
  repl = shard_lib.replicated(mesh)
  shardings = {"params": jax.tree.map(lambda p: p.sharding, params),
               "opt_state": opt_state_shardings(shapes["opt_state"], trainable, repl),
               "step": repl, "rng": repl}
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def shardings_of(abstract):
  return jax.tree.map(lambda a: a.sharding, abstract)


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


def stage_sampler(config, name: str, stage_cfg, model_cfg: ModelConfig) -> matryoshka.MSampler:
  """The stage's m distribution; an m above M is a ValueError naming the config field."""
  mcfg = stage_cfg.matryoshka
  big_m = model_cfg.query.num_queries
  try:
    buckets = matryoshka.bucket_sizes(tuple(mcfg.buckets), big_m)
  except ValueError as e:
    raise ValueError(f"--config.{name}.matryoshka.buckets={tuple(mcfg.buckets)}: {e}") from None
  try:
    return matryoshka.MSampler(mcfg.kind, big_m, seed=config.seed + 1000 * int(name[-1]),
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


def plan_stage(config, name: str, stage_cfg, model_cfg: ModelConfig, mesh) -> StagePlan:
  """Builds the stage's optimizer, abstract state and step, and compiles the step ahead
  of time for the config's batch: all a run does before it allocates, and all that
  --dry_run does. Call under `jax.set_mesh(mesh)` and the config's logical axis rules."""
  model = MQTLLaVA(model_cfg)
  params = shard_lib.abstract_sharded(abstract_params(model_cfg)["params"], mesh,
                                     tuple(config.sharding.logical_axis_rules))
  tx, labels, sched = optim.make_optimizer(params, stage_cfg.optim, int(stage_cfg.steps))
  sampler = stage_sampler(config, name, stage_cfg, model_cfg)
  make_state = state_initializer(tx, labels, config.seed)
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


# ---------------------------------------------------------------------------
# Memory per device: figures, and whether they fit.

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


# ---------------------------------------------------------------------------

@dataclasses.dataclass
class StageResult:
  params: object
  final_step: int
  losses: list  # The last metrics_lib.LAST_LOSSES losses (across resumes).
  summary: dict = dataclasses.field(default_factory=dict)  # StageRecord.summary.


def _say(line: str) -> None:
  """One line for the user (process 0 prints it; every process logs it)."""
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)


def data_iterator(source, pcfg, name: str, step: int, data_state):
  """The stage's batches from global batch `step` on; -> (iterator, offset).

  data_state: what `data_position` saved ({"offset", "worker_count", "grain"}), a
  grain state of an older checkpoint, or None (a fresh stage). grain's state is
  applied where it fits (same worker_count); else the dataset starts at `step`,
  which gives the same batches (each batch is a function of its global step),
  and one line says so. offset: the global batch number the dataset starts at."""
  from data import pipeline  # pylint: disable=import-outside-toplevel
  if data_state is None:
    if step:
      _say(f"[{name}] the checkpoint of step {step} holds no data position; the data "
           f"position was taken from the step")
    return iter(pipeline.make_dataset(source, pcfg, start_step=step)), step
  saved = (data_state if isinstance(data_state, dict) and "offset" in data_state
           else {"offset": 0, "worker_count": None, "grain": data_state})
  workers = pcfg.worker_count
  if saved["worker_count"] in (None, workers):
    it = iter(pipeline.make_dataset(source, pcfg, start_step=int(saved["offset"])))
    try:
      it.set_state(saved["grain"])
      return it, int(saved["offset"])
    except Exception as e:  # pylint: disable=broad-except
      why = f"its grain state cannot be applied ({type(e).__name__}: {e})"
  else:
    why = (f"the checkpoint was written with data.worker_count={saved['worker_count']}, "
           f"this run has {workers}")
  _say(f"[{name}] the data position was taken from the step ({step}): {why}")
  return iter(pipeline.make_dataset(source, pcfg, start_step=step)), step


def text_problems_up_front(source, pcfg, on_error: str, say=print) -> list:
  """For a LLaVA JSON source (records in memory, already judged for structure and
  images): every sample tokenized once before training, so that an over-long or
  untemplatable record is named (on_error="fail": a DataError) or counted (skip) before
  the first step, not when (if ever) its row comes up. Other sources (a prepared TFDS
  folder, whose records carry their image bytes) are counted as their rows come up.
  -> the problems (records.Problem) found."""
  from data import pipeline  # pylint: disable=import-outside-toplevel
  from data import records  # pylint: disable=import-outside-toplevel
  from data import sources  # pylint: disable=import-outside-toplevel
  base = getattr(source, "_source", source)
  if not isinstance(base, sources.LlavaJsonSource):
    return []
  found = pipeline.text_problems(source, pcfg, progress=say)
  if found and on_error == "fail":
    raise records.DataError(records.fail_message(found[0]))
  return found


def data_position(it, offset: int, worker_count: int) -> dict:
  """The data state a checkpoint stores: {"offset", "worker_count", "grain"}."""
  return {"offset": int(offset), "worker_count": int(worker_count), "grain": it.get_state()}


def agree_on_position(position: dict, name: str, step: int) -> None:
  """Several processes: each iterates over its own rows of the same global batches, so
  their data positions must be equal (process 0's is the one saved); else an error."""
  positions = distributed.allgather_json(position)
  differ = [i for i, p in enumerate(positions) if p != positions[0]]
  if differ:
    raise RuntimeError(f"[{name}] at step {step} the data position of process(es) {differ} "
                       f"differs from process 0's ({positions[differ[0]]} against "
                       f"{positions[0]}); the checkpoint would not resume them all")


def _non_finite(loss: float, grad_norm: float, out) -> list[str]:
  """Which of loss / gradient norm / parameters / optimizer state are not finite."""
  checks = (("loss", math.isfinite(loss)), ("gradient norm", math.isfinite(grad_norm)),
            ("parameters", bool(out["params_finite"])),
            ("optimizer state", bool(out["opt_state_finite"])))
  return [what for what, ok in checks if not ok]


def _non_finite_error(name, stage_cfg, step, loss, grad_norm, ms, bad, ckpt):
  """The one-line NonFiniteLossError of a step whose update is not adopted."""
  good = ckpt.last_good_step()
  kept = (f"The last good checkpoint (step {good}) in {ckpt.directory} is kept."
          if good is not None else f"No checkpoint was written before it in {ckpt.directory}.")
  lr = float(stage_cfg.optim.lr)
  hint = (f" --config.{name}.optim.lr={lr:g} is not finite in float32: lower it."
          if not abs(lr) <= np.finfo(np.float32).max else "")
  return NonFiniteLossError(
      f"[{name}] loss {loss}, gradient norm {grad_norm} at step {step} (m={ms.tolist()}): "
      f"non-finite {', '.join(bad)}; stopping without adopting or saving this update. "
      f"{kept}{hint}")


def _start_state(config, name, stage_cfg, model_cfg, model, plan, ckpt, init_params):
  """The stage's state: its newest checkpoint that restores, else a fresh one.
  -> (state, data state or None, run record state or None, restored step or None)."""
  resumed = ckpt.restore_latest(plan.abstract_state, say=_say)
  if resumed is not None:
    step, items = resumed
    logging.info("%s: resumed from step %d", name, step)
    _say(f"[{name}] resumed from checkpoint at step {step}")
    if "run" not in items:
      _say(f"[{name}] the checkpoint of step {step} has no run record (an older version "
           f"wrote it): final_loss and the data counts cover the steps from {step} on")
    return items["state"], items.get("data"), items.get("run"), step
  p_shard = shardings_of(plan.abstract_state)["params"]
  params = init_params if init_params is not None else fresh_params(
      config, model_cfg, model, p_shard)
  if init_params is not None and stage_cfg.get("reinit"):
    params = reinit_params(params, stage_cfg.reinit,
                           _random_params(config.seed + int(name[-1]), model_cfg, model,
                                          p_shard, only=stage_cfg.reinit), name)
  params = jax.device_put(params, p_shard)
  state = jax.jit(plan.make_state, out_shardings=shardings_of(plan.abstract_state))(params)
  return state, None, None, None


def train_stage(config, name: str, stage_cfg, model_cfg: ModelConfig, mesh, workdir: str,
                init_params=None, plan: StagePlan | None = None,
                watch: preemption.Watch | None = None) -> StageResult:
  """Runs (or resumes) one stage; returns its final parameters and its summary entry.
  `plan`: the stage's `plan_stage` (compiled here when not given).

  Resumes from the newest checkpoint that restores (newer unreadable ones are moved
  aside), with the data position and the run record (last losses, data ledger) it
  holds. A step whose loss, gradient norm, new parameters or optimizer state is not
  finite raises NonFiniteLossError without adopting or saving it; a checkpoint that
  cannot be written raises checkpoint.CheckpointWriteError. SIGTERM / SIGINT (`watch`,
  active for the whole run; else one for this stage) end the step in progress, write its
  checkpoint and raise preemption.Preempted."""
  plan = plan or plan_stage(config, name, stage_cfg, model_cfg, mesh)
  model, sampler, sched = plan.model, plan.sampler, plan.sched
  total = int(stage_cfg.steps)
  stage_dir = paths.join(workdir, name)
  ckpt = ckpt_lib.Checkpointer(paths.join(stage_dir, "checkpoints"), config.checkpoint.every,
                               config.checkpoint.keep, config.checkpoint.use_async, name=name)
  source = open_source(config, stage_cfg.data, workdir, on_error=config.data.on_error)
  pcfg = pipeline_config(config, stage_cfg.data, model_cfg, workdir, train=True,
                         where=f"config.{name}.data")
  say = lambda line: _say(f"[{name}] {line}")
  state, data_state, run_state, restored = _start_state(
      config, name, stage_cfg, model_cfg, model, plan, ckpt, init_params)
  start = int(jax.device_get(state["step"]))
  record = (metrics_lib.StageRecord.from_state(run_state, source, log=say) if run_state
            else metrics_lib.StageRecord.start(source, log=say))
  record.add_problems(text_problems_up_front(source, pcfg, config.data.on_error, say))
  it, offset = data_iterator(source, pcfg, name, start,
                             data_state if restored is not None else None)
  progress = metrics_lib.Progress(stage_dir, name, total, first_step=start,
                                  every=config.log_every, is_main=jax.process_index() == 0)
  finished = False
  own_watch = watch is None
  watch = watch or preemption.Watch().__enter__()
  try:
    for step in range(start, total):
      batch = next(it)
      record.add_batch(batch)
      ms = sampler.sample(step)
      device_batch = shard_lib.put_batch(batch, mesh)
      bucket = sampler.bucket(ms)
      if bucket not in plan.steps:
        say(f"compiling the step for m <= {bucket} ({bucket} visual slots)")
      new_state, out = plan.step_for(bucket)(
          state, device_batch, jax.device_put(ms, shard_lib.replicated(mesh)))
      loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
      bad = _non_finite(loss, grad_norm, out)
      if bad:  # Not adopted, so nothing non-finite is saved.
        raise _non_finite_error(name, stage_cfg, step + 1, loss, grad_norm, ms, bad, ckpt)
      state = new_state
      record.add_loss(loss)
      progress.update(step + 1, {"loss": loss, "m": float(ms.mean()),
                                 "grad_norm": grad_norm,
                                 "lr": float(sched(step)), "skipped": record.skipped,
                                 "truncated": record.truncated},
                      tokens=_input_tokens(batch if jax.process_count() == 1 else device_batch,
                                           ms, model_cfg.image_token_id))
      stop = step + 1 < total and watch.requested
      force = step + 1 == total or stop
      position = data_position(it, offset, pcfg.worker_count)
      if jax.process_count() > 1 and ckpt.due(step + 1, force):
        record.merge_processes(distributed.allgather_json)
        agree_on_position(position, name, step + 1)
      ckpt.save(step + 1, state, position, force=force, run_state=record.state())
      if stop:
        ckpt.wait()
        raise preemption.Preempted(
            f"[{name}] stopped on {watch.signal_name or 'a signal in another process'} at "
            f"step {step + 1}/{total}; its checkpoint is in {ckpt.step_path(step + 1)}. "
            f"Run the same command again to continue.")
    finished = True
  finally:
    if own_watch:
      watch.__exit__(None, None, None)
    progress.close()
    ckpt.close(quiet=not finished)
  return StageResult(params=state["params"], final_step=total, losses=list(record.losses),
                     summary=record.summary(total))


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


def _input_tokens(batch, ms, image_token_id: int) -> int:
  """Tokens the LLM reads in this step: text plus the m visual tokens of each image row
  (which replace its placeholder), once per m of the step. `batch`: the host batch (one
  process) or the global device batch (several: each host holds only its rows)."""
  xp = np if isinstance(batch["input_ids"], np.ndarray) else jnp
  image_rows = int(xp.sum(xp.any(batch["input_ids"] == image_token_id, axis=1)))
  text = int(xp.sum(batch["text_mask"]))
  return sum(text + image_rows * (int(m) - 1) for m in ms)


# ---------------------------------------------------------------------------
# Evaluation: teacher-forced answer accuracy per m and question type.

def make_eval_step(model: MQTLLaVA):
  def step(params, batch, m):
    logits, layout = model.apply({"params": params}, batch["images"], batch["input_ids"],
                                 batch["text_mask"], m)
    target = layout.gather_labels(batch["labels"])[:, 1:]
    pred = jnp.argmax(logits[:, :-1], axis=-1)
    labelled = target != IGNORE
    correct = jnp.all(jnp.where(labelled, pred == target, True), axis=1) & labelled.any(axis=1)
    _, aux = next_token_loss(logits, layout, batch["labels"])
    return correct, aux["loss_sum"], aux["tokens"]
  return step


def evaluate(config, params, model_cfg: ModelConfig, mesh, ms, workdir: str) -> dict:
  """-> {"accuracy": {type: {m: acc}}, "loss": {m: loss}, "count": {type: n}}."""
  from data import pipeline  # pylint: disable=import-outside-toplevel
  source = open_source(config, config.eval.data, workdir)
  pcfg = pipeline_config(config, config.eval.data, model_cfg, workdir, train=False,
                         where="config.eval.data")
  model = MQTLLaVA(model_cfg)
  step = jax.jit(make_eval_step(model))
  batches = list(pipeline.make_dataset(source, pcfg))
  correct = {m: {} for m in ms}
  loss = {}
  for m in ms:
    matryoshka.validate_m(m, model_cfg.query.num_queries)
    s_tot, n_tot = 0.0, 0
    for batch in batches:
      ok, s, n = step(params, shard_lib.put_batch(batch, mesh), jnp.int32(m))
      ok = shard_lib.local_rows(ok)
      s_tot, n_tot = s_tot + float(s), n_tot + int(n)
      for r, meta in enumerate(batch["meta"]):
        if batch["empty"][r]:
          continue
        kind = (meta or {}).get("type", "all")
        correct[m].setdefault(kind, []).append(bool(ok[r]))
    loss[m] = s_tot / max(n_tot, 1)
  metas = [meta for b in batches for meta, e in zip(b["meta"], b["empty"]) if not e]
  if jax.process_count() > 1:  # Each process scored its own rows.
    parts = distributed.allgather_json({"correct": {str(m): c for m, c in correct.items()},
                                        "metas": metas})
    correct = {m: {} for m in ms}
    for part in parts:
      for m in ms:
        for kind, oks in part["correct"][str(m)].items():
          correct[m].setdefault(kind, []).extend(oks)
    metas = [meta for part in parts for meta in part["metas"]]
  kinds = sorted(correct[ms[0]])
  acc = {k: {m: float(np.mean(correct[m][k])) for m in ms} for k in kinds}
  counts = {k: len(correct[ms[0]][k]) for k in kinds}
  return {"accuracy": acc, "loss": loss, "count": counts, "chance": _chance(metas)}


def _chance(metas) -> dict:
  """Per question type, the accuracy of an image-blind guesser that answers the most
  frequent answer of each question form (records of the built-in set carry their type,
  form and answer); {} for data without those fields."""
  from data import synthetic  # pylint: disable=import-outside-toplevel
  if not metas or not all(isinstance(r, dict) and "type" in r and "answer" in r for r in metas):
    return {}
  try:
    return synthetic.chance_rates(metas)["majority"]
  except (KeyError, ValueError):  # Types the built-in set does not define.
    return {}


def format_table(result: dict, ms, chance: dict | None = None) -> str:
  chance = chance or {}
  head = f"{'question type':<14}{'n':>5}{'chance':>8}" + "".join(f"{'m=' + str(m):>8}" for m in ms)
  lines = [head, "-" * len(head)]
  for kind, row in result["accuracy"].items():
    c = chance.get(kind)
    lines.append(f"{kind:<14}{result['count'][kind]:>5}" + (f"{c:>8.2f}" if c is not None else f"{'':>8}")
                 + "".join(f"{row[m]:>8.3f}" for m in ms))
  lines.append(f"{'loss':<27}" + "".join(f"{result['loss'][m]:>8.3f}" for m in ms))
  return "\n".join(lines)


# ---------------------------------------------------------------------------

def stages_to_run(config) -> list[int]:
  return [int(x) for x in str(config.run_stages).split(",") if x.strip()]


def path_problem(field: str, value: str, what: str) -> str | None:
  """What is wrong with the path in config field `field` (None: it exists)."""
  if not value:
    return f"--config.{field} is not set ({what})"
  if not paths.exists(value):
    return f"--config.{field}={value} does not exist ({what})"
  return None


TOKENIZER_WHAT = "a LLaMA SentencePiece tokenizer.model"


def hf_init_problems(config) -> list[str]:
  """The HF weights `config.init` names: an MQT-LLaVA checkpoint, or CLIP + LLaMA."""
  init = config.init
  wanted = ([("init.mqt_llava", init.mqt_llava, "an HF-format MQT-LLaVA checkpoint")]
            if init.mqt_llava else
            [("init.clip", init.clip, "an HF CLIP vision checkpoint"),
             ("init.llm", init.llm, "an HF LLaMA/Vicuna checkpoint")])
  return [p for p in (path_problem(*w) for w in wanted) if p]


def check_paths(config) -> None:
  """Fails before any compute when a file or folder the run needs is not configured or
  missing; the message names the config field (`--config.<field>=...`)."""
  problems = []

  def need(field, value, what):
    problem = path_problem(field, value, what)
    if problem:
      problems.append(problem)

  blocks = [(f"stage{n}", config[f"stage{n}"].data) for n in stages_to_run(config)]
  if config.eval.ms:
    blocks.append(("eval", config.eval.data))
  for name, d in blocks:
    if d.kind == "tfds":
      need(f"{name}.data.dataset_dir", d.dataset_dir, "a folder prepared by python -m data.prepare")
    elif d.kind == "json":
      need(f"{name}.data.json_path", d.json_path, "a LLaVA conversation JSON")
      need(f"{name}.data.image_folder", d.image_folder, "the folder its image paths start in")
    elif d.kind != "builtin":
      problems.append(f"--config.{name}.data.kind={d.kind!r}: choose builtin | tfds | json")
    if d.kind != "builtin" or config.tokenizer_path:
      need("tokenizer_path", config.tokenizer_path, TOKENIZER_WHAT)
  first = stages_to_run(config)[:1]
  if first and (config[f"stage{first[0]}"].init_from or config.init.kind == "checkpoint"):
    need(f"stage{first[0]}.init_from", config[f"stage{first[0]}"].init_from,
         "the checkpoints folder of an earlier stage")
  elif config.init.kind == "hf":
    problems += hf_init_problems(config)
  problems = list(dict.fromkeys(problems))  # Once each, in order.
  if problems:
    raise ValueError("this run cannot start:\n  " + "\n  ".join(problems))


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
    plans[n] = plan_stage(config, name, config[name], model_cfg, mesh)
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


def train_and_evaluate(config, workdir: str, dry_run: bool = False) -> dict:
  """Runs `config.run_stages` in order, then the held-out evaluation. Every stage's
  step is compiled (and its memory checked) first, before any parameter exists.

  dry_run: only that (no data, weights or tokenizer are read); writes and returns the
  figures of `write_dry_run`."""
  t0 = time.perf_counter()
  for note in config_lib.infer_data_kinds(config, cli.user_settings()):
    _say(f"note: {note}")
  if not dry_run:
    check_paths(config)
    check_builtin_dir(config, workdir)
  paths.makedirs(workdir)
  distributed.initialize(config)
  model_cfg = model_config(config)
  check_eval_ms(config, model_cfg)
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es)", flush=True)
  for n in stages_to_run(config):
    check_batch_size(f"stage{n}.data.batch_size", config[f"stage{n}"].data.batch_size, mesh,
                     int(config[f"stage{n}"].accum_steps))
  if config.eval.ms and not dry_run:
    check_batch_size("eval.data.batch_size", config.eval.data.batch_size, mesh)
  summary = {"stages": {}}
  params = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.logical_axis_rules)):
    plans = plan_stages(config, model_cfg, mesh, dry_run=dry_run)
    if dry_run:
      return write_dry_run(workdir, plans)
    with preemption.Watch() as watch:
      for n in stages_to_run(config):
        stage_cfg = config[f"stage{n}"]
        init_params = params
        if init_params is None and stage_cfg.init_from:
          init_params = load_params(stage_cfg.init_from, model_cfg, mesh, config)
        result = train_stage(config, f"stage{n}", stage_cfg, model_cfg, mesh, workdir,
                             init_params, plans.pop(n), watch)
        params = result.params
        summary["stages"][f"stage{n}"] = result.summary
        if watch.requested:  # Arrived in the stage's last step: the stage is saved whole.
          raise preemption.Preempted(
              f"[stage{n}] stopped on {watch.signal_name or 'a signal in another process'} "
              f"after its last step ({result.final_step}); its checkpoint is in "
              f"{paths.join(workdir, f'stage{n}', 'checkpoints')}. Run the same command "
              f"again to continue.")
    skipped = eval_skip_reason(config)
    if skipped and config.eval.ms and params is not None:
      _say(f"the end-of-run evaluation is skipped: {skipped}")
      summary["eval"] = {"skipped": skipped}
    elif config.eval.ms and params is not None:
      ms = [int(m) for m in config.eval.ms]
      result = evaluate(config, params, model_cfg, mesh, ms, workdir)
      chance = {**result.pop("chance"), **dict(config.eval.get("chance", {}) or {})}
      table = format_table(result, ms, chance)
      _say("\nheld-out teacher-forced answer accuracy per m:\n" + table)
      summary["eval"] = {"ms": ms, "chance": chance, **{k: {str(kk): vv for kk, vv in v.items()}
                                     for k, v in result.items() if k != "accuracy"},
                         "accuracy": {k: {str(m): a for m, a in v.items()}
                                      for k, v in result["accuracy"].items()}}
  summary["wall_time_s"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    path = metrics_lib.write_summary(workdir, summary)
    print(f"summary written to {path} ({summary['wall_time_s']:.0f} s)", flush=True)
  return summary


def eval_skip_reason(config) -> str | None:
  """Why the end-of-run evaluation must not run (None: it runs): a stage trains on the
  user's data (kind json / tfds) while config.eval.data is still the built-in set, whose
  accuracy would say nothing about that training."""
  if config.eval.data.kind != "builtin":
    return None
  users = [f"stage{n}" for n in stages_to_run(config)
           if config[f"stage{n}"].data.kind in ("json", "tfds")]
  if not users:
    return None
  return (f"{', '.join(users)} trains on your data (kind "
          f"{config[users[0]].data.kind}) but config.eval.data is the built-in synthetic "
          f"set; set --config.eval.data.json_path=<held-out LLaVA JSON> and "
          f"--config.eval.data.image_folder=<its images> (or eval.data.dataset_dir) to "
          f"evaluate on held-out data")


def load_params(directory: str, model_cfg: ModelConfig, mesh, config, components=None):
  """Parameters from the latest checkpoint of another run or stage; `components` (e.g.
  ("vision", "query")): only those subtrees are read."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  if not paths.isdir(directory):
    raise ValueError(f"init_from checkpoint directory {directory} does not exist")
  target = shard_lib.abstract_sharded(abstract_params(model_cfg)["params"], mesh,
                                      tuple(config.sharding.logical_axis_rules))
  if components is not None:
    target = {k: target[k] for k in components}
  manager = ocp.CheckpointManager(paths.absolute(directory))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"no checkpoint in {directory}")
  # restore_args carry the target shardings: each shard is read straight onto its device,
  # whatever topology saved the checkpoint (without them orbax keeps the saved placement).
  item = {"params": target}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored["state"]["params"]
