"""Parameters of a run: created, imported, loaded, and described before they exist.

Beside the model layer: `model_config` (the architecture of a config, or of the HF
checkpoint it names), `fresh_params` (a random init or imported HF weights, created
directly sharded), `load_params` (the latest checkpoint of another run), and the
abstract train state (`abstract_train_state`): the one description of parameters and
optimizer state, with their shardings, that training creates, restores and compiles
for and that inference loads into.
"""
import re

import jax
import jax.numpy as jnp
from absl import logging
from flax import linen as nn
from flax import traverse_util

from mqt import checkpoint as ckpt_lib
from mqt import convert
from mqt import optim
from mqt import paths
from mqt import sharding as shard_lib
from mqt.model import ModelConfig, abstract_params, dummy_inputs


def abstract_sharded_params(model_cfg: ModelConfig, mesh, rules):
  """The parameters as ShapeDtypeStructs carrying their shardings (logical axis `rules`
  over `mesh`); nothing allocated. What a stage compiles for, a checkpoint restores
  into and inference loads into."""
  return shard_lib.abstract_sharded(abstract_params(model_cfg)["params"], mesh, tuple(rules))


def param_shardings(model_cfg: ModelConfig, mesh, rules):
  """The sharding of every parameter leaf (`abstract_sharded_params`' shardings)."""
  return shardings_of(abstract_sharded_params(model_cfg, mesh, rules))


def _matching(tree, pattern: str):
  """The sub-tree of leaves whose "component/.../leaf" path matches `pattern`."""
  rx = re.compile(pattern)
  flat = traverse_util.flatten_dict(tree, sep="/")
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if rx.search(k)}, sep="/")


def random_params(seed, model_cfg, model, shardings, only: str = ""):
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


def model_config(config, hf: bool | None = None) -> ModelConfig:
  """The architecture: config.model, or, for HF weights (`hf`; default: config.init.kind
  is 'hf') whose files are present, what the HF checkpoint records
  (`convert.model_config_for_checkpoint`: config.json and tensor shapes override the
  config's defaults; a contradicting user setting is an error). Without the files (a
  dry run) the config's own shapes."""
  hf = config.init.kind == "hf" if hf is None else hf
  if hf and not hf_init_problems(config):
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
    return random_params(config.seed, model_cfg, model, shardings)
  if init.kind == "hf":
    if not (init.mqt_llava or (init.clip and init.llm)):
      raise ValueError("config.init.kind='hf' needs init.mqt_llava, or init.clip and init.llm")
    if wanted("llm"):  # Else the import checks the parts it reads.
      convert.check_host_memory(model_cfg, shardings=shardings,
                                what=f"the parameters of {init.mqt_llava or init.llm}")
    if init.mqt_llava:
      return convert.import_mqt_llava(init.mqt_llava, model_cfg, clip_path=init.clip or None,
                                      shardings=shardings, components=components)
    params = random_params(config.seed, model_cfg, model, shardings, only="^query/")
    params["vision"] = convert.import_clip_vision(init.clip, model_cfg.vision,
                                                  shardings=shardings["vision"])
    if wanted("llm"):
      params["llm"] = convert.import_llama(init.llm, model_cfg.llm, shardings=shardings["llm"])
    return {k: v for k, v in params.items() if wanted(k)}
  if init.kind == "checkpoint":
    raise ValueError("config.init.kind='checkpoint' takes the parameters of the first stage's "
                     "init_from; set --config.stage<N>.init_from")
  raise ValueError(f"unknown init.kind {init.kind!r} (random | hf | checkpoint)")


def state_initializer(tx, labels):
  """-> make_state(params): a fresh train state (optimizer state from `tx.init`)."""
  def make_state(params):
    trainable, _ = optim.partition(params, labels)
    return {"params": params, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
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
  leaf by leaf like its parameter (`opt_state_shardings`); the step replicated.
  The one description of the state that a stage creates, restores and compiles for."""
  shapes = jax.eval_shape(make_state, params)
  trainable, _ = optim.partition(params, labels)
  repl = shard_lib.replicated(mesh)
  shardings = {"params": jax.tree.map(lambda p: p.sharding, params),
               "opt_state": opt_state_shardings(shapes["opt_state"], trainable, repl),
               "step": repl}
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def shardings_of(abstract):
  return jax.tree.map(lambda a: a.sharding, abstract)


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


def load_params(directory: str, model_cfg: ModelConfig, mesh, config, components=None):
  """Parameters from the latest checkpoint of another run or stage, read onto their
  shardings; `components` (e.g. ("vision", "query")): only those subtrees are read."""
  target = abstract_sharded_params(model_cfg, mesh, config.sharding.logical_axis_rules)
  if components is not None:
    target = {k: target[k] for k in components}
  return ckpt_lib.restore_params(directory, target)
