"""Training: the two-stage Matryoshka recipe, sharded over a mesh, resumable.

`train_and_evaluate(config, workdir)` runs the stages named in
`config.run_stages` (each `config.stage<N>` has its own data, optimizer rules
and m distribution), checkpointing each under `workdir/stage<N>`, then
evaluates teacher-forced answer accuracy per m on the held-out split.

Train state (a plain pytree): {"params", "opt_state", "step", "rng"}. The
jitted step takes the state (donated), a batch sharded over data x fsdp, and
the step's m values `ms` [K] as data, so it compiles once for every m.
Only the trainable parameters (optimizer rules) are differentiated.
"""
import dataclasses
import functools
import math
import os
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
from mqt import config_lib
from mqt import convert
from mqt import matryoshka
from mqt import metrics as metrics_lib
from mqt import optim
from mqt import sharding as shard_lib
from mqt.model import (IGNORE, MQTLLaVA, ModelConfig, abstract_params, dummy_inputs,
                       next_token_loss, unbox_abstract)


class NonFiniteLossError(FloatingPointError):
  pass


# ---------------------------------------------------------------------------
# The step.

def make_train_step(model: MQTLLaVA, tx, labels, accum_steps: int):
  """-> step(state, batch, ms) -> (state, metrics)."""

  def micro_loss(trainable, frozen, micro, ms):
    params = optim.combine(trainable, frozen)
    total, count = 0.0, 0
    for k in range(ms.shape[0]):  # K is static: one forward per m of a `list` step.
      logits, layout = model.apply({"params": params}, micro["images"], micro["input_ids"],
                                   micro["text_mask"], ms[k])
      _, aux = next_token_loss(logits, layout, micro["labels"])
      total, count = total + aux["loss_sum"], aux["tokens"]
    return total, count

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state, batch, ms):
    trainable, frozen = optim.partition(state["params"], labels)
    split = lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
    micros = {k: split(batch[k]) for k in ("images", "input_ids", "text_mask", "labels")}

    def body(carry, micro):
      g_acc, s_acc, n_acc = carry
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
    return new_state, {"loss": s / denom, "grad_norm": optax.tree.norm(grads), "tokens": n}

  return step


# ---------------------------------------------------------------------------
# Data.

def builtin_dir(config, workdir: str) -> str:
  return config.data.data_dir or os.path.join(workdir, "data")


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


def open_source(config, data_cfg, workdir: str):
  """A data block (stage or eval) -> a record source (data/sources.py).

  Its paths were validated by `check_paths` (train_and_evaluate calls it first)."""
  from data import sources  # pylint: disable=import-outside-toplevel
  split = data_cfg.split
  if data_cfg.kind == "builtin":
    source = sources.TfdsSource(prepare_builtin(config, workdir), split)
  elif data_cfg.kind == "tfds":
    source = sources.TfdsSource(data_cfg.dataset_dir, split)
  elif data_cfg.kind == "json":
    source = sources.LlavaJsonSource(data_cfg.json_path, data_cfg.image_folder)
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


def fresh_params(config, model_cfg, model, shardings):
  """Fresh parameters, created directly sharded (random or imported HF weights)."""
  init = config.init
  if init.kind == "random":
    return _random_params(config.seed, model_cfg, model, shardings)
  if init.kind == "hf":
    if init.mqt_llava:
      params = convert.import_mqt_llava(init.mqt_llava, model_cfg, clip_path=init.clip or None)
    elif init.clip and init.llm:  # Towers from HF; a fresh query transformer.
      params = jax.device_get(_random_params(config.seed, model_cfg, model, shardings))
      params["vision"] = convert.import_clip_vision(init.clip, model_cfg.vision)
      params["llm"] = convert.import_llama(init.llm, model_cfg.llm)
    else:
      raise ValueError("config.init.kind='hf' needs init.mqt_llava, or init.clip and init.llm")
    return jax.device_put(params, shardings)
  if init.kind == "checkpoint":
    raise ValueError("config.init.kind='checkpoint' takes the parameters of the first stage's "
                     "init_from; set --config.stage<N>.init_from")
  raise ValueError(f"unknown init.kind {init.kind!r} (random | hf | checkpoint)")


# ---------------------------------------------------------------------------

@dataclasses.dataclass
class StageResult:
  params: object
  final_step: int
  losses: list


def train_stage(config, name: str, stage_cfg, model_cfg: ModelConfig, mesh, workdir: str,
                init_params=None) -> StageResult:
  """Runs (or resumes) one stage; returns its final parameters."""
  model = MQTLLaVA(model_cfg)
  rules = tuple(config.sharding.logical_axis_rules)
  boxed = abstract_params(model_cfg)["params"]
  p_shard = shard_lib.param_shardings(boxed, mesh, rules)
  abstract = unbox_abstract(boxed)
  total = int(stage_cfg.steps)
  tx, labels, sched = optim.make_optimizer(abstract, stage_cfg.optim, total)
  sampler = matryoshka.MSampler(stage_cfg.matryoshka.kind, model_cfg.query.num_queries,
                                seed=config.seed + 1000 * int(name[-1]),
                                m=stage_cfg.matryoshka.m, ms=tuple(stage_cfg.matryoshka.ms))
  stage_dir = os.path.join(workdir, name)
  ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), config.checkpoint.every,
                               config.checkpoint.keep, config.checkpoint.use_async)

  def make_state(params):
    trainable, _ = optim.partition(params, labels)
    return {"params": params, "opt_state": tx.init(trainable), "step": jnp.int32(0),
            "rng": jax.random.PRNGKey(config.seed)}

  state_shardings = jax.jit(make_state).lower(
      jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                   abstract, p_shard)).compile().output_shardings
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(make_state, abstract), state_shardings)

  source = open_source(config, stage_cfg.data, workdir)
  from data import pipeline  # pylint: disable=import-outside-toplevel
  pcfg = pipeline_config(config, stage_cfg.data, model_cfg, workdir, train=True,
                         where=f"config.{name}.data")
  dataset = pipeline.make_dataset(source, pcfg)
  it = iter(dataset)

  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, abstract_state)
    it.set_state(data_state)
    logging.info("%s: resumed from step %d", name, latest)
    print(f"[{name}] resumed from checkpoint at step {latest}", flush=True)
  else:
    params = init_params if init_params is not None else fresh_params(
        config, model_cfg, model, p_shard)
    if init_params is not None and stage_cfg.get("reinit"):
      params = reinit_params(params, stage_cfg.reinit,
                             _random_params(config.seed + int(name[-1]), model_cfg, model,
                                            p_shard, only=stage_cfg.reinit), name)
    params = jax.device_put(params, p_shard)
    state = jax.jit(make_state, out_shardings=state_shardings)(params)

  step_fn = make_train_step(model, tx, labels, stage_cfg.accum_steps)
  batch_sharding = shard_lib.batch_sharding(mesh)
  batch_abstract = _batch_abstract(pcfg, model_cfg, batch_sharding)
  ms_abstract = jax.ShapeDtypeStruct((sampler.width,), jnp.int32,
                                     sharding=shard_lib.replicated(mesh))
  jitted = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(state_shardings, None))
  compiled = jitted.lower(abstract_state, batch_abstract, ms_abstract).compile()
  _report_memory(name, compiled)

  start = int(jax.device_get(state["step"]))
  progress = metrics_lib.Progress(stage_dir, name, total, first_step=start,
                                  every=config.log_every, is_main=jax.process_index() == 0)
  losses = []
  skipped_total = truncated_total = 0
  try:
    for step in range(start, total):
      batch = next(it)
      skipped_total += int(batch["skipped"].sum())
      truncated_total += int(batch["truncated"].sum())
      ms = sampler.sample(step)
      device_batch = shard_lib.put_batch(batch, mesh)
      new_state, out = compiled(state, device_batch, jax.device_put(ms, shard_lib.replicated(mesh)))
      loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        # The update of this step is not adopted, so nothing non-finite is saved.
        raise NonFiniteLossError(
            f"[{name}] loss {loss}, gradient norm {grad_norm} at step {step + 1} "
            f"(m={ms.tolist()}); stopping. The last good checkpoint (step "
            f"{ckpt.latest_step()}) in {ckpt.directory} is kept.")
      state = new_state
      losses.append(loss)
      progress.update(step + 1, {"loss": loss, "m": float(ms.mean()),
                                 "grad_norm": grad_norm,
                                 "lr": float(sched(step)), "skipped": skipped_total,
                                 "truncated": truncated_total},
                      tokens=_input_tokens(batch, ms, model_cfg.image_token_id))
      ckpt.save(step + 1, state, it.get_state(), force=step + 1 == total)
  finally:
    ckpt.close()
    progress.close()
  return StageResult(params=state["params"], final_step=total, losses=losses)


def check_batch_size(field: str, batch_size: int, mesh) -> None:
  """The batch is split over the data x fsdp mesh axes; say so instead of a sharding error."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ValueError(f"--config.{field}={batch_size} does not divide over the {shards} batch "
                     f"shards of the mesh {dict(mesh.shape)}")


def _input_tokens(batch, ms, image_token_id: int) -> int:
  """Tokens the LLM reads in this step: text plus the m visual tokens of each image row
  (which replace its placeholder), once per m of the step."""
  image_rows = int((batch["input_ids"] == image_token_id).any(axis=1).sum())
  text = int(batch["text_mask"].sum())
  return sum(text + image_rows * (int(m) - 1) for m in ms)


def _batch_abstract(pcfg, model_cfg, sharding):
  b, t, s = pcfg.batch_size, pcfg.max_text_len, pcfg.image_size
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  return {"images": sds((b, s, s, 3), jnp.float32), "input_ids": sds((b, t), jnp.int32),
          "text_mask": sds((b, t), jnp.bool_), "labels": sds((b, t), jnp.int32),
          "skipped": sds((b,), jnp.bool_), "truncated": sds((b,), jnp.bool_),
          "empty": sds((b,), jnp.bool_)}


def _report_memory(name, compiled):
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    mem = None
  if mem is None:
    return
  gib = lambda x: x / 2**30
  line = (f"[{name}] compiled train step memory per device: arguments "
          f"{gib(mem.argument_size_in_bytes):.3f} GiB, outputs {gib(mem.output_size_in_bytes):.3f} "
          f"GiB, temporaries {gib(mem.temp_size_in_bytes):.3f} GiB, aliased "
          f"{gib(mem.alias_size_in_bytes):.3f} GiB")
  logging.info(line)
  if jax.process_index() == 0:
    print(line, flush=True)


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
      ok = np.asarray(ok)
      s_tot, n_tot = s_tot + float(s), n_tot + int(n)
      for r, meta in enumerate(batch["meta"]):
        if batch["empty"][r]:
          continue
        kind = (meta or {}).get("type", "all")
        correct[m].setdefault(kind, []).append(bool(ok[r]))
    loss[m] = s_tot / max(n_tot, 1)
  kinds = sorted(correct[ms[0]])
  acc = {k: {m: float(np.mean(correct[m][k])) for m in ms} for k in kinds}
  counts = {k: len(correct[ms[0]][k]) for k in kinds}
  return {"accuracy": acc, "loss": loss, "count": counts,
          "chance": _chance([meta for b in batches for meta, e in zip(b["meta"], b["empty"])
                             if not e])}


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
  if not os.path.exists(value):
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


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs `config.run_stages` in order, then the held-out evaluation."""
  t0 = time.perf_counter()
  check_paths(config)
  os.makedirs(workdir, exist_ok=True)
  if config.get("distributed", False):
    jax.distributed.initialize()
  model_cfg = ModelConfig.from_config(config.model)
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es)", flush=True)
  for n in stages_to_run(config):
    check_batch_size(f"stage{n}.data.batch_size", config[f"stage{n}"].data.batch_size, mesh)
  if config.eval.ms:
    check_batch_size("eval.data.batch_size", config.eval.data.batch_size, mesh)
  summary = {"stages": {}}
  params = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.logical_axis_rules)):
    for n in stages_to_run(config):
      stage_cfg = config[f"stage{n}"]
      init_params = params
      if init_params is None and stage_cfg.init_from:
        init_params = load_params(stage_cfg.init_from, model_cfg, mesh, config)
      result = train_stage(config, f"stage{n}", stage_cfg, model_cfg, mesh, workdir, init_params)
      params = result.params
      summary["stages"][f"stage{n}"] = {
          "steps": result.final_step,
          "final_loss": float(np.mean(result.losses[-20:])) if result.losses else None}
    if config.eval.ms and params is not None:
      ms = [int(m) for m in config.eval.ms]
      result = evaluate(config, params, model_cfg, mesh, ms, workdir)
      chance = {**result.pop("chance"), **dict(config.eval.get("chance", {}) or {})}
      table = format_table(result, ms, chance)
      print("\nheld-out teacher-forced answer accuracy per m:\n" + table, flush=True)
      summary["eval"] = {"ms": ms, "chance": chance, **{k: {str(kk): vv for kk, vv in v.items()}
                                     for k, v in result.items() if k != "accuracy"},
                         "accuracy": {k: {str(m): a for m, a in v.items()}
                                      for k, v in result["accuracy"].items()}}
  summary["wall_time_s"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    path = metrics_lib.write_summary(workdir, summary)
    print(f"summary written to {path} ({summary['wall_time_s']:.0f} s)", flush=True)
  return summary


def load_params(directory: str, model_cfg: ModelConfig, mesh, config):
  """Parameters from the latest checkpoint of another run or stage."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(directory):
    raise ValueError(f"init_from checkpoint directory {directory} does not exist")
  boxed = abstract_params(model_cfg)["params"]
  shardings = shard_lib.param_shardings(boxed, mesh, tuple(config.sharding.logical_axis_rules))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        unbox_abstract(boxed), shardings)
  manager = ocp.CheckpointManager(os.path.abspath(directory))
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
