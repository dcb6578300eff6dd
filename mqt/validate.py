"""Checks of a run's settings before any work is done.

`config_problems(config)` looks at the config alone (no file is read, nothing is
traced or compiled); `checkpoint_problems(directory, abstract_params)` reads only an
orbax checkpoint's metadata (shapes and dtypes, no arrays) and compares it with the
model's parameters. Both return one line per problem, each naming the setting
(`--config.<field>=<value>`, or the checkpoint folder) and what is allowed; an empty
list means nothing was found. The entry points (train.py, evaluate.py, predict.py)
collect these lines with their own command-line checks and report them all at once.
"""

import jax
import numpy as np
from flax import linen as nn

from data import images as images_lib
from data import sources
from data import templates as templates_lib
from mqt import checkpoint as ckpt_lib
from mqt import config_lib
from mqt import distributed
from mqt import matryoshka
from mqt import paths
from mqt import sharding as shard_lib
from mqt.model import ModelConfig, abstract_params

DTYPES = ("float32", "bfloat16", "float16")
QUERY_VARIANTS = ("official", "perceiver")  # mqt/query_transformer.py's variants.
INIT_KINDS = ("random", "hf", "checkpoint")
TEMPLATES = templates_lib.TEMPLATES
IMAGE_MODES = images_lib.MODES
BUILTIN_SPLITS = ("captions", "instruct", "eval")
OVERLONG = ("truncate", "reject")
ON_ERROR = ("fail", "skip")
MAX_NAMED = 5  # Checkpoint leaves named before "and N more".

_MISSING = object()


def _get(config, path: str, default=_MISSING):
  """config's field at dotted `path` (default where a part is missing)."""
  node = config
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return default
  return node


def _show(value) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ", ".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def _flag(path: str, value) -> str:
  return f"--config.{path}={_show(value)}"


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _choice(config, path: str, allowed) -> list[str]:
  value = _get(config, path)
  if value is _MISSING or value in allowed:
    return []
  return [f"{_flag(path, value)} is not allowed: choose {' | '.join(allowed)}"]


def _int_at_least(config, path: str, low: int, what: str = "") -> list[str]:
  value = _get(config, path)
  if value is _MISSING or (_is_int(value) and value >= low):
    return []
  return [f"{_flag(path, value)} must be an integer >= {low}{what}"]


# ---------------------------------------------------------------------------
# The model and m.

def num_queries(config) -> int | None:
  """M (config.model.query.num_queries) when it is a positive integer, else None."""
  value = _get(config, "model.query.num_queries", None)
  return int(value) if _is_int(value) and value >= 1 else None


def _model_problems(config) -> list[str]:
  problems = _choice(config, "model.dtype", DTYPES) + _choice(config, "model.param_dtype", DTYPES)
  problems += _choice(config, "model.query.variant", QUERY_VARIANTS)
  problems += _int_at_least(config, "model.query.num_queries", 1, " (M, the most visual tokens)")
  if not problems and _get(config, "model", None) is not None:
    try:
      ModelConfig.from_config(config.model)
    except (ValueError, TypeError) as e:
      problems.append(str(e).replace("config.model", "--config.model"))
  return problems


def _m_text(m, big_m: int | None) -> str | None:
  """What is wrong with one m (None: 1 <= m <= M; big_m None: M unknown, m >= 1)."""
  if not _is_int(m):
    return f"m={m!r} is not an integer"
  if big_m is None and m < 1:
    return f"m={m} is out of range: m >= 1"
  if big_m is not None and not 1 <= m <= big_m:
    return f"m={m} is out of range: 1 <= m <= M={big_m}"
  return None


def ms_problems(field: str, ms, big_m: int | None) -> list[str]:
  """Every bad m of `ms`, one line each, named with `field` (e.g. "--ms=1,2,16").
  big_m: M, or None where it is not known yet (only m >= 1 is checked)."""
  out = []
  for m in ms:
    text = _m_text(m, big_m)
    if text:
      out.append(f"{field}: {text}" + (" (M: --config.model.query.num_queries)"
                                        if big_m is not None else ""))
  return out


def _stage_problems(config, name: str, big_m: int | None) -> list[str]:
  where = f"{name}.matryoshka"
  problems = _int_at_least(config, f"{name}.steps", 0)
  problems += _int_at_least(config, f"{name}.accum_steps", 1)
  problems += _int_at_least(config, f"{name}.data.batch_size", 1)
  problems += _choice(config, f"{where}.kind", matryoshka.KINDS)
  m, ms = _get(config, f"{where}.m", 0), _get(config, f"{where}.ms", ())
  if big_m is not None:
    if not (_is_int(m) and (m == 0 or 1 <= m <= big_m)):
      problems.append(f"{_flag(where + '.m', m)}: the fixed m must be 0 (= M) or "
                      f"1 <= m <= M={big_m} (M: --config.model.query.num_queries)")
    problems += ms_problems(_flag(f"{where}.ms", ms), tuple(ms or ()), big_m)
    buckets = _get(config, f"{where}.buckets", ())
    try:
      matryoshka.bucket_sizes(tuple(buckets or ()), big_m)
    except (TypeError, ValueError) as e:
      problems.append(f"{_flag(where + '.buckets', buckets)}: {e}")
  if _get(config, f"{where}.kind", "") == "list" and not ms:
    problems.append(f"--config.{where}.kind=list needs a non-empty --config.{where}.ms")
  return problems


def _eval_problems(config, big_m: int | None) -> list[str]:
  problems = []
  ms = _get(config, "eval.ms", ())
  if big_m is not None and ms:
    problems += ms_problems(_flag("eval.ms", ms), tuple(ms), big_m)
  for field in ("batch_size", "max_new_tokens"):
    problems += _int_at_least(config, f"eval.generation.{field}", 1)
  temperature = _get(config, "eval.generation.temperature", 0.0)
  if not isinstance(temperature, (int, float)) or temperature < 0:
    problems.append(f"{_flag('eval.generation.temperature', temperature)} must be >= 0 "
                    f"(0: greedy)")
  top_p = _get(config, "eval.generation.top_p", 1.0)
  if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
    problems.append(f"{_flag('eval.generation.top_p', top_p)} must lie in (0, 1]")
  return problems


# ---------------------------------------------------------------------------
# Data, stages, mesh, checkpoints.

def _data_problems(config, big_m: int | None) -> list[str]:
  problems = _choice(config, "data.overlong", OVERLONG) + _choice(config, "data.on_error",
                                                                     ON_ERROR)
  problems += _int_at_least(config, "data.worker_count", 0)
  for where, block in config_lib.data_blocks(config):
    problems += _choice(config, f"{where}.kind", config_lib.DATA_KINDS)
    problems += _choice(config, f"{where}.template", TEMPLATES)
    problems += _choice(config, f"{where}.image_mode", IMAGE_MODES)
    problems += _int_at_least(config, f"{where}.batch_size", 1)
    if block.get("kind") == "builtin":
      problems += [p.replace("is not allowed", "is not a built-in split")
                   for p in _choice(config, f"{where}.split", BUILTIN_SPLITS)]
    if big_m is not None:
      try:
        config_lib.max_text_len(config, block, f"--config.{where}")
      except (ValueError, TypeError, AttributeError) as e:
        problems.append(f"{e} (M: --config.model.query.num_queries)")
  return problems


def stage_names(config) -> tuple[list[str], list[str]]:
  """-> (stage block names config.run_stages names, problems with config.run_stages)."""
  text = str(_get(config, "run_stages", ""))
  names, problems = [], []
  have = sorted(k for k in config.keys() if k.startswith("stage") and k[5:].isdigit())
  for item in (x.strip() for x in text.split(",")):
    if not item:
      continue
    if not item.isdigit():
      problems.append(f"--config.run_stages={text}: {item!r} is not a stage number "
                      f"(e.g. 1,2 for {', '.join(have) or 'stage<N> blocks'})")
    elif f"stage{item}" not in config:
      problems.append(f"--config.run_stages={text}: there is no config.stage{item} block "
                      f"(the config has {', '.join(have) or 'none'})")
    else:
      names.append(f"stage{item}")
  return names, problems


def _device_count(config, devices) -> int | None:
  if devices is None:
    if distributed.wanted(config):
      return None  # Known only after jax.distributed.initialize().
    return jax.device_count()
  return devices if _is_int(devices) else len(devices)


def mesh_problems(config, devices=None) -> list[str]:
  """config.sharding.mesh against the device count (`devices`: a count, the devices, or
  None: jax.device_count(), unknown on a multi-host run before it starts)."""
  mesh = _get(config, "sharding.mesh", None)
  if mesh is None:
    return []
  problems = [f"--config.sharding.mesh.{k}: unknown mesh axis (axes: "
              f"{', '.join(shard_lib.AXES)})" for k in mesh.keys() if k not in shard_lib.AXES]
  sizes = {a: mesh.get(a, 1) for a in shard_lib.AXES}
  for axis, size in sizes.items():
    if not _is_int(size) or (size < 1 and size != -1):
      problems.append(f"{_flag('sharding.mesh.' + axis, size)} must be a positive integer or "
                      f"-1 (all remaining devices)")
  if problems:
    return problems
  shown = ", ".join(f"{a}={s}" for a, s in sizes.items())
  if list(sizes.values()).count(-1) > 1:
    return [f"--config.sharding.mesh ({shown}): at most one axis may be -1"]
  count = _device_count(config, devices)
  if count is None:
    return []
  product = int(np.prod([s for s in sizes.values() if s != -1]))
  if -1 in sizes.values():
    if product > count:
      return [f"--config.sharding.mesh ({shown}): the fixed axes take {product} devices, "
              f"more than the {count} there are"]
    if count % product:
      return [f"--config.sharding.mesh ({shown}): the fixed axes take {product} devices, "
              f"which does not divide the {count} there are"]
  elif product != count:
    more = "more" if product > count else "fewer"
    return [f"--config.sharding.mesh ({shown}) needs {product} devices, {more} than the "
            f"{count} there are: make the product {count}, or set one axis to -1"]
  return []


def _run_problems(config) -> list[str]:
  problems = _choice(config, "init.kind", INIT_KINDS)
  problems += _int_at_least(config, "checkpoint.every", 0, " (0: only at the end of a stage)")
  problems += _int_at_least(config, "checkpoint.keep", 1, " (checkpoints kept per stage)")
  problems += _int_at_least(config, "log_every", 1)
  return problems


def config_problems(config, devices=None, *, skip=()) -> list[str]:
  """Everything wrong with `config` that the config alone shows: dtypes, every m against
  M (config.model.query.num_queries), data kinds / templates / image modes, data.overlong
  and data.on_error, batch sizes, steps, the mesh against the devices (`devices`: a count
  or the devices; None: jax.device_count()), run_stages, checkpoint.every / keep.

  skip: config paths (prefixes, e.g. "eval.ms", "stage") whose problems are not wanted.
  -> one line per problem, naming the field (`--config.<path>=<value>`) and what is
  allowed; [] when there is none. Reads no file and compiles nothing."""
  big_m = num_queries(config)
  stages, problems = stage_names(config)
  problems = _model_problems(config) + problems
  for name in stages:
    problems += _stage_problems(config, name, big_m)
  problems += _eval_problems(config, big_m)
  problems += _data_problems(config, big_m)
  problems += mesh_problems(config, devices)
  problems += distributed.problems()
  problems += _run_problems(config)
  skipped = tuple(f"--config.{s}" for s in skip)
  return list(dict.fromkeys(p for p in problems if not p.startswith(skipped)))


# ---------------------------------------------------------------------------
# Checkpoints.

def _flat(tree, prefix: str = "") -> dict:
  """Nested dicts -> {"a/b/c": leaf}."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}/"))
    return out
  return {prefix[:-1]: tree}


def _shape_dtype(leaf) -> tuple[tuple[int, ...], str]:
  dtype = getattr(leaf, "dtype", None)
  return tuple(int(d) for d in leaf.shape), (np.dtype(dtype).name if dtype is not None else "?")


def checkpoint_params_metadata(directory: str) -> tuple[int | None, dict]:
  """(step, {"a/b/c": (shape, dtype name)}) of the params of the newest step of a train.py
  checkpoint folder (`state/params`) whose metadata reads, from its metadata alone;
  (None, {}) when it holds no step. A newer step whose metadata does not read is passed
  over (the trainer reports it and falls back the same way). Raises ValueError when no
  step's metadata reads or the folder is not such a checkpoint."""
  steps = ckpt_lib.all_steps(directory)
  if not steps:
    return None, {}
  errors = []
  for step in reversed(steps):
    try:
      tree = ckpt_lib.params_metadata(directory, step)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
      errors.append(f"step {step} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})")
      continue
    if tree is None:
      raise ValueError(f"checkpoint {directory} step {step} holds no parameters "
                       f"(not a train.py checkpoints folder)")
    return step, {k: _shape_dtype(v) for k, v in _flat(dict(tree)).items()}
  raise ValueError(f"checkpoint {directory}: no step's metadata can be read: "
                   f"{'; '.join(errors)}")


def _listed(items: list[str]) -> str:
  shown = "; ".join(items[:MAX_NAMED])
  return shown + (f"; and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def checkpoint_problems(directory: str, abstract_params, *, dtypes: bool = True) -> list[str]:
  """Compares the parameters of the latest checkpoint in `directory` (a train.py
  checkpoints folder; its metadata only, no arrays read) with `abstract_params` (the
  model's parameter tree: arrays or ShapeDtypeStructs, boxed or not, with or without the
  top "params" level). dtypes=False: differing dtypes are not problems (a restore casts,
  e.g. a float32 checkpoint read with --param_dtype=bfloat16).

  -> [] when every leaf matches (or the folder holds no step yet), else one line naming
  the missing, unexpected and differently shaped leaves (at most 5, then "and N more")."""
  if not paths.isdir(directory):
    return [f"checkpoint folder {directory} does not exist"]
  try:
    step, saved = checkpoint_params_metadata(directory)
  except ValueError as e:
    return [str(e)]
  if step is None:
    return []
  want = {k: _shape_dtype(v) for k, v in _flat(_plain_tree(abstract_params)).items()}
  both = [k for k in want if k in saved]
  diffs = [f"{k} has shape {saved[k][0]}, the config's model {want[k][0]}" for k in both
           if saved[k][0] != want[k][0]]
  diffs += [f"{k} is missing from the checkpoint" for k in want if k not in saved]
  diffs += [f"{k} is in the checkpoint but not in the config's model" for k in saved
            if k not in want]
  if dtypes:
    diffs += [f"{k} has dtype {saved[k][1]}, the config's model {want[k][1]}" for k in both
              if saved[k][0] == want[k][0] and saved[k][1] != want[k][1]]
  if not diffs:
    return []
  return [f"checkpoint {directory} step {step} holds a different model: {_listed(diffs)} "
          f"(use the --config and overrides it was trained with)"]


def _plain_tree(tree) -> dict:
  """Boxed or unboxed abstract params, with or without the top "params" -> nested dicts."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  tree = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)
  tree = _to_dict(tree)
  if set(tree) == {"params"}:
    tree = tree["params"]
  return tree


def _to_dict(tree):
  if hasattr(tree, "items"):
    return {str(k): _to_dict(v) for k, v in tree.items()}
  return tree


def model_checkpoint_problems(directory: str, model_cfg, *, dtypes: bool = True) -> list[str]:
  """`checkpoint_problems` against the parameters of the model `model_cfg` describes
  (shapes traced, nothing allocated or compiled)."""
  return checkpoint_problems(directory, abstract_params(model_cfg)["params"], dtypes=dtypes)


# ---------------------------------------------------------------------------
# Data files.

def data_file_problems(blocks) -> list[str]:
  """Every json data block (`blocks`: (config path, block) pairs) whose file exists but
  does not parse as a LLaVA conversation JSON: one line each, naming the field and the
  file's problem (the file is read, its images are not)."""
  problems, seen = [], {}
  for where, block in blocks:
    path = block.get("json_path") if block.get("kind") == "json" else ""
    if not path or not paths.isfile(path):
      continue  # Missing paths are named by the path checks.
    if path not in seen:
      try:
        sources.load_llava_json(path)
        seen[path] = None
      except sources.DataError as e:
        seen[path] = str(e)
    if seen[path]:
      problems.append(f"--config.{where}.json_path: {seen[path]}")
  return problems
