"""Loading a trained model for inference, and answering questions at a chosen m.

Shared by the evaluation sweep (mqt/evaluate.py) and the predict command
(predict.py); parameters come through mqt/params.py, paths through mqt/run_inputs.py.
Weights come from an orbax checkpoints folder written by
train.py (default: the last stage of `--workdir`), or, with
`checkpoint="hf"`, from the HF weights named in `config.init` (e.g. the
released MQT-LLaVA-7B: `--config.init.kind=hf --config.init.mqt_llava=DIR`).
Every path is checked, and every failure named, before any compute.

`Answerer` compiles one program per (m, prompt length, batch size) ahead of
time: `num_latents=m`, so the query transformer runs m latents and the
prompt is T + m - 1 slots: cost and latency shrink with m. m is always
explicit and validated (1 <= m <= M); there is no default.
"""
import contextlib
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from data import images as images_lib
from data import templates
from data import tokenizer as tokenizer_lib
from mqt import cli
from mqt import config_lib
from mqt import generate as gen
from mqt import matryoshka
from mqt import memory as mem_lib
from mqt import paths as paths_lib
from mqt import sharding as shard_lib
from mqt import validate
from mqt import params as params_lib
from mqt import run_inputs
from mqt.model import MQTLLaVA, ModelConfig, abstract_params, unbox_abstract


@dataclasses.dataclass
class Loaded:
  model_cfg: ModelConfig
  model: MQTLLaVA
  params: object
  tokenizer: tokenizer_lib.Tokenizer | None  # None when loaded without the LLM.
  mesh: object
  checkpoint: str
  template: str = "vicuna_v1"  # The prompt template (config.eval.data.template).
  rules: tuple = ()  # Logical axis rules (config.sharding.logical_axis_rules).

  def context(self):
    """The mesh and logical axis rules every program of this model runs under."""
    return _mesh_and_rules(self.mesh, self.rules)


def _mesh_and_rules(mesh, rules):
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


def load(config, workdir: str, checkpoint: str = "", model_cfg: ModelConfig | None = None,
         components=None) -> Loaded:
  """Parameters (sharded over the config's mesh) and tokenizer, paths checked first.
  model_cfg: the architecture when the caller has it (`model_config`). components (e.g.
  ("vision", "query")): only those parameter subtrees are read; without "llm" no
  tokenizer is loaded (Loaded.tokenizer is None)."""
  with_llm = components is None or "llm" in components
  checkpoint, tok_path = run_inputs.resolve_paths(config, workdir, checkpoint,
                                                 need_tokenizer=with_llm)
  model_cfg = model_cfg or model_config(config, checkpoint)
  tokenizer = tokenizer_lib.Tokenizer.load(tok_path) if with_llm else None
  if tokenizer is not None and tokenizer.vocab_size > model_cfg.llm.vocab_size:
    raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model's "
                     f"vocabulary is {model_cfg.llm.vocab_size}")
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  model = MQTLLaVA(model_cfg)
  rules = tuple(config.sharding.logical_axis_rules)
  with _mesh_and_rules(mesh, rules):
    if checkpoint == "hf":
      shardings = params_lib.param_shardings(model_cfg, mesh, rules)
      hf = config.copy_and_resolve_references()
      hf.init.kind = "hf"
      params = params_lib.fresh_params(hf, model_cfg, model, shardings, components)
    else:
      params = params_lib.load_params(checkpoint, model_cfg, mesh, config, components)
  return Loaded(model_cfg, model, params, tokenizer, mesh, checkpoint,
                config.eval.data.template, rules)


def encode_prompt(question: str, tokenizer, has_image: bool, template: str = "vicuna_v1"):
  """A user turn -> prompt ids (`templates.prompt_for_generation`: the image placeholder
  goes where the template puts it, the question kept as LLaVA's evaluation keeps it)."""
  return templates.prompt_for_generation(question, tokenizer, template, has_image=has_image)


def pad_prompts(prompts: list[list[int]], text_len: int, pad_id: int = 0):
  """-> (ids [N, text_len] int32, mask [N, text_len] bool), right padded."""
  ids = np.full((len(prompts), text_len), pad_id, np.int32)
  mask = np.zeros((len(prompts), text_len), bool)
  for i, p in enumerate(prompts):
    if len(p) > text_len:
      raise ValueError(f"prompt {i} has {len(p)} tokens, more than the {text_len} allowed")
    ids[i, :len(p)], mask[i, :len(p)] = p, True
  return ids, mask


def load_images(paths, size: int) -> np.ndarray:
  """Image files -> [N, size, size, 3] float32 (pad to square, CLIP normalization);
  None -> zeros (a text-only prompt, which has no placeholder)."""
  out = np.zeros((len(paths), size, size, 3), np.float32)
  for i, p in enumerate(paths):
    if p is not None:
      out[i] = images_lib.load_and_preprocess(p, size, "pad")
  return out


class Answerer:
  """Batched generation at one m, compiled ahead of time for fixed shapes.

  timed=True also compiles the prompt pass alone, for `prefill_latency` (a second
  program: only where latency is measured)."""

  def __init__(self, loaded: Loaded, m: int, batch_size: int, text_len: int,
               sampling: gen.SamplingConfig, seed: int = 0, timed: bool = False):
    self.m = matryoshka.validate_m(m, loaded.model_cfg.query.num_queries)
    self.loaded, self.batch_size, self.text_len = loaded, batch_size, text_len
    self.sampling = sampling
    self.seed = seed
    model, m = loaded.model, self.m
    shapes = input_shapes(loaded.model_cfg, batch_size, text_len)
    run = _generate_fn(model, m, sampling, seed)
    def first(params, images, ids, mask):
      return gen.prefill(model, params, images, ids, mask, m, sampling.max_new_tokens,
                         num_latents=m)[0]
    t0 = time.perf_counter()
    with loaded.context():
      options = compiler_options(loaded.model_cfg)
      self._generate = jax.jit(run).lower(loaded.params, *shapes, jax.ShapeDtypeStruct(
          (), jnp.int32)).compile(options)
      self._prefill = (jax.jit(first).lower(loaded.params, *shapes).compile(options)
                       if timed else None)
    self.compile_s = time.perf_counter() - t0
    self.generate_s, self.batches, self.tokens = 0.0, 0, 0

  def prefill_latency(self, images, ids, mask, repeats: int = 5) -> float:
    """Median seconds of the prompt pass on one batch (after a warm-up call)."""
    if self._prefill is None:
      raise ValueError("prefill_latency needs an Answerer built with timed=True")
    with self.loaded.context():
      jax.block_until_ready(self._prefill(self.loaded.params, images, ids, mask))
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(self._prefill(self.loaded.params, images, ids, mask))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))

  def __call__(self, images, ids, mask, rows: int | None = None) -> list[str]:
    """One batch (padded to batch_size) -> the answers of its first `rows` rows."""
    rows = len(ids) if rows is None else rows
    t0 = time.perf_counter()
    with self.loaded.context():
      out = jax.device_get(self._generate(self.loaded.params, images, ids, mask,
                                          np.int32(self.batches)))
    self.generate_s += time.perf_counter() - t0
    self.batches += 1
    tok = self.loaded.tokenizer
    answers = []
    for r in range(rows):
      n = int(out["num_tokens"][r])
      ids_r = [int(t) for t in out["tokens"][r, :n] if int(t) != self.sampling.eos_id]
      self.tokens += n
      answers.append(tok.decode(ids_r).strip())
    return answers


def sampling_config(gen_cfg, tokenizer) -> gen.SamplingConfig:
  return gen.SamplingConfig(max_new_tokens=int(gen_cfg.max_new_tokens),
                            temperature=float(gen_cfg.temperature), top_p=float(gen_cfg.top_p),
                            eos_id=tokenizer.eos_id, pad_id=max(tokenizer.pad_id, 0))


def encode_prompts(config, tok_path: str, image_paths, questions, gen_cfg):
  """-> (prompt ids per question, sampling config), from the tokenizer alone (no weights)."""
  tok = tokenizer_lib.Tokenizer.load(tok_path)
  prompts = [encode_prompt(q, tok, p is not None, config.eval.data.template)
             for p, q in zip(image_paths, questions)]
  return prompts, sampling_config(gen_cfg, tok)


def answer(loaded: Loaded, image_paths, questions, m: int, gen_cfg, text_len: int | None = None):
  """Images + questions (one each; a None image = text only) at m -> answers."""
  prompts = [encode_prompt(q, loaded.tokenizer, p is not None, loaded.template)
             for p, q in zip(image_paths, questions)]
  text_len = text_len or max(len(p) for p in prompts)
  ids, mask = pad_prompts(prompts, text_len, max(loaded.tokenizer.pad_id, 0))
  runner = Answerer(loaded, m, len(prompts), text_len,
                    sampling_config(gen_cfg, loaded.tokenizer))
  return runner(load_images(image_paths, loaded.model_cfg.vision.image_size), ids, mask)


def check_images(paths) -> None:
  """Every image opens and decodes (a clear error naming the file otherwise)."""
  for p in paths:
    if not paths_lib.isfile(p):
      raise FileNotFoundError(f"image {p} does not exist")
    images_lib.load_image(p)


# ---------------------------------------------------------------------------
# Memory before loading: what a generation run at (m, batch, prompt length) needs.

def analytic_serving_bytes(model_cfg: ModelConfig, m: int, batch_size: int, text_len: int,
                           max_new_tokens: int) -> dict:
  """What one accelerator holding the whole model needs for a generation run, counted
  from shapes: parameters (param dtype), the KV cache (compute dtype) and the largest
  working set of one layer during the prompt pass (hidden states, MLP, float32
  attention scores)."""
  llm, vis = model_cfg.llm, model_cfg.vision
  p_bytes = np.dtype(jnp.dtype(llm.param_dtype)).itemsize
  c_bytes = np.dtype(jnp.dtype(llm.dtype)).itemsize
  tree = unbox_abstract(abstract_params(model_cfg))["params"]
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  params *= p_bytes
  s = text_len + m - 1
  cache = 2 * llm.depth * batch_size * (s + max_new_tokens) * llm.kv_heads * llm.head_dim * c_bytes
  llm_layer = batch_size * s * (6 * llm.width + 3 * llm.mlp_dim) * c_bytes + \
      batch_size * llm.heads * s * (s + max_new_tokens) * 4
  n = (vis.image_size // vis.patch_size) ** 2 + 1
  vis_layer = batch_size * n * (6 * vis.width + 2 * vis.mlp_dim) * c_bytes + \
      batch_size * vis.heads * n * n * 4
  work = max(llm_layer, vis_layer) + batch_size * llm.vocab_size * 4
  return {"params_bytes": params, "kv_cache_bytes": cache, "activation_bytes": work,
          "total_bytes": params + cache + work}


def compiler_options(model_cfg: ModelConfig) -> dict:
  """XLA options of the serving programs. On a CPU, XLA computes bfloat16 matrix products
  in float32 and hoists the conversion of each whole stacked (scanned) weight out of the
  layer loop: a float32 copy of the LLM (26 GiB at 7B) on top of its bfloat16 weights.
  Without loop-invariant code motion the conversion stays per layer (and per decoded
  token: slower, but it fits), so CPU programs over bfloat16 weights are compiled so."""
  if jax.devices()[0].platform == "cpu" and "bfloat16" in (model_cfg.llm.param_dtype,
                                                            model_cfg.llm.dtype):
    return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
  return {}


def _generate_fn(model: MQTLLaVA, m: int, sampling: gen.SamplingConfig, seed: int):
  def run(params, images, ids, mask, batch_index):
    rng = jax.random.fold_in(jax.random.key(seed), batch_index)
    return gen.generate(model, params, images, ids, mask, m, rng, sampling, num_latents=m)
  return run


def input_shapes(model_cfg: ModelConfig, batch_size: int, text_len: int):
  """The abstract (images, prompt ids, mask) of a generation program's batch."""
  vis = model_cfg.vision
  sds = jax.ShapeDtypeStruct
  return (sds((batch_size, vis.image_size, vis.image_size, vis.channels), jnp.float32),
          sds((batch_size, text_len), jnp.int32), sds((batch_size, text_len), jnp.bool_))


def serving_memory(config, model_cfg: ModelConfig, m: int, batch_size: int, text_len: int,
                   sampling: gen.SamplingConfig) -> dict:
  """Compiles the generation program of a run at (m, batch, prompt length) on abstract
  parameters (nothing is read or allocated) and returns what it needs, in bytes:
  per device on this backend (`compiled`: arguments, outputs, aliased, temporaries,
  peak = arguments + outputs - aliased + temporaries), the host memory a run on this
  host needs when its devices are the CPU (`host_bytes`: the peak of every device plus
  this process), and one accelerator's need counted from shapes (`accelerator`)."""
  m = matryoshka.validate_m(m, model_cfg.query.num_queries)
  mesh = shard_lib.make_mesh(config.sharding.mesh)
  rules = tuple(config.sharding.logical_axis_rules)
  abstract = params_lib.abstract_sharded_params(model_cfg, mesh, rules)
  model = MQTLLaVA(model_cfg)
  with _mesh_and_rules(mesh, rules):
    compiled = jax.jit(_generate_fn(model, m, sampling, int(config.seed))).lower(
        abstract, *input_shapes(model_cfg, batch_size, text_len),
        jax.ShapeDtypeStruct((), jnp.int32)).compile(compiler_options(model_cfg))
  fig = {**mem_lib.compiled_bytes(compiled), "params_bytes": mem_lib.shard_bytes(abstract)}
  platform = jax.devices()[0].platform
  out = {"m": m, "batch_size": batch_size, "text_len": text_len,
         "param_dtype": str(model_cfg.llm.param_dtype),
         "max_new_tokens": sampling.max_new_tokens, "platform": platform,
         "devices": mesh.size, "compiled": fig,
         "accelerator": analytic_serving_bytes(model_cfg, m, batch_size, text_len,
                                               sampling.max_new_tokens)}
  if platform == "cpu":
    out["host_bytes"] = fig["peak_bytes"] * mesh.size + mem_lib.process_rss_bytes()
    out["host_available_bytes"] = mem_lib.host_available_bytes()
  return out


def format_serving_memory(plan: dict) -> str:
  g = mem_lib.format_bytes
  c, a = plan["compiled"], plan["accelerator"]
  lines = [f"memory of a generation run at m={plan['m']}, batch {plan['batch_size']}, prompt "
           f"{plan['text_len']} tokens, up to {plan['max_new_tokens']} new tokens:",
           f"  compiled here ({plan['devices']} {plan['platform']} device(s)), per device: "
           f"parameters {g(c['params_bytes'])}, arguments {g(c['argument_bytes'])}, "
           f"temporaries {g(c['temp_bytes'])}, peak {g(c['peak_bytes'])}",
           f"  one accelerator (counted from shapes): {g(a['total_bytes'])} = parameters "
           f"{g(a['params_bytes'])} + KV cache {g(a['kv_cache_bytes'])} + activations "
           f"{g(a['activation_bytes'])}"]
  if "host_bytes" in plan:
    avail = plan["host_available_bytes"]
    lines.append(f"  a CPU run on this host: {g(plan['host_bytes'])} of host memory "
                 f"(available: {g(avail) if avail is not None else 'unknown'})")
  return "\n".join(lines)


def check_serving_memory(plan: dict, device_limit_bytes: int | None = None) -> None:
  """Raises MemoryError, with the figures, when the run cannot fit: on a CPU backend
  against the host's available memory, elsewhere against each device's limit."""
  fmt = mem_lib.format_bytes
  if "host_bytes" in plan:
    avail = plan["host_available_bytes"]
    need = plan["host_bytes"] - mem_lib.process_rss_bytes()  # This process is resident.
    if avail is not None and need > avail:
      fix = "--param_dtype=bfloat16, " if plan["param_dtype"] == "float32" else ""
      raise MemoryError(
          f"this generation run needs {fmt(plan['host_bytes'])} of host memory (parameters "
          f"{fmt(plan['compiled']['params_bytes'])} + temporaries "
          f"{fmt(plan['compiled']['temp_bytes'])} per device), more than the {fmt(avail)} "
          f"available; stopping before loading weights. Lower it with {fix}a smaller batch "
          f"or m, or run on an accelerator")
    return
  peak = plan["compiled"]["peak_bytes"]
  if device_limit_bytes and peak > device_limit_bytes:
    raise MemoryError(f"this generation run needs {fmt(peak)} per device, more than the "
                      f"{fmt(device_limit_bytes)} of a device; stopping before loading weights")


def load_problems(found, config, workdir: str, checkpoint: str, skip=(),
                  need_tokenizer: bool = True) -> None:
  """What would stop `load` (evaluate.py, predict.py), into `found` (a cli.Problems)
  before any weight is read: the data kinds, the config (`validate.config_problems`,
  less the fields under `skip`), the paths, and a checkpoint of another model."""
  found.check(config_lib.infer_data_kinds, config, cli.user_settings())
  config_found = validate.config_problems(config, skip=skip)
  found.add(config_found)
  paths = found.check(run_inputs.resolve_paths, config, workdir, checkpoint, need_tokenizer)
  if paths and paths[0] != "hf" and not config_found:
    found.check(lambda: found.add(validate.model_checkpoint_problems(
        paths[0], model_config(config, paths[0]), dtypes=cli.PARAM_DTYPE.value is None)))


def model_config(config, checkpoint: str) -> ModelConfig:
  """The model's architecture: from the config, or for HF weights (checkpoint="hf", their
  files present) from the checkpoint's config.json and tensor shapes as well
  (`params.model_config`)."""
  return params_lib.model_config(config, hf=checkpoint == "hf")


def plan_memory(config, model_cfg: ModelConfig, m: int, batch_size: int, text_len: int,
                sampling: gen.SamplingConfig, dry_run: bool) -> dict:
  """Prints what a generation run needs; unless `dry_run`, stops (MemoryError) when it
  cannot fit, before any weight is read."""
  plan = serving_memory(config, model_cfg, m, batch_size, text_len, sampling)
  print(format_serving_memory(plan), file=sys.stderr, flush=True)  # stdout: the answers.
  if not dry_run:
    check_serving_memory(plan, mem_lib.device_memory_limit(config)[0])
  return plan
